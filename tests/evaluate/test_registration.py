"""Registration of the breathing pair as a downstream task: TRE and warped-label Dice against exact references, a
trained head beating the identity, intervals around their means."""
import json

import numpy as np
import pytest
import torch

from rafmedia.core.errors import UserError
from rafmedia.engine.encoders import create_encoder
from rafmedia.engine.export import export_encoder
from rafmedia.evaluate.encoder_entries import EncoderEntry, Replicate
from rafmedia.evaluate.registration import (RegistrationConfig, load_paired_cohort, paired_difference,
                                            registration_scores, registration_study, split_subjects)
from rafmedia.evaluate.registration_head import IntensityGrid, target_registration_error
from rafmedia.launch.cli import main
from rafmedia.launch.config import load_config
from rafmedia.shards.store import CohortStore, StoreConfig
from rafmedia.shards.synth import VOXEL_SPACING_MM, generate_cohort
from tests.conftest import small_cohort_config

CONFIG = RegistrationConfig(head_steps=120, segmentation_steps=30)


@pytest.fixture(scope="module")
def paired(tmp_path_factory):
    config = small_cohort_config(num_subjects=16, shape=[24, 24, 24], paired_channel="exhale", paired_displacement=4.0)
    out = tmp_path_factory.mktemp("registration") / "pair.zarr"
    store = generate_cohort(config, store_config=StoreConfig(chunk_size=24), out=out, progress=False)
    return store, load_paired_cohort(store, store.subject_ids(), CONFIG)


def test_identity_tre_is_the_mean_landmark_displacement_in_mm(paired):
    store, cohort = paired
    test = np.arange(10, 16)
    zero = np.zeros((len(test), 3, 24, 24, 24), dtype=np.float32)
    scores = registration_scores(zero, cohort, test, CONFIG.structures, seed=0, bootstrap_resamples=200)
    by_hand = []
    for index in test:
        marks = store.subject_attrs(store.subject_ids()[index])["truth"]["landmarks"]
        moved = np.array(marks["exhale"]) - np.array(marks["inhale"])
        by_hand.append(np.mean([np.sqrt(sum((VOXEL_SPACING_MM * c) ** 2 for c in m)) for m in moved]))
    assert scores["per_subject"]["tre_mm"] == pytest.approx(by_hand, rel=1e-9)
    assert scores["mean"]["tre_mm"] == pytest.approx(np.mean(by_hand)) and np.mean(by_hand) > 6.0
    low, high = scores["ci95"]["tre_mm"]
    assert low <= scores["mean"]["tre_mm"] <= high and low < high
    assert scores["mean"]["dice_liver"] < 0.8  # the motion matters for the overlap too


def test_the_true_field_registers_exactly(paired):
    _, cohort = paired
    test = np.arange(10, 16)
    scores = registration_scores(cohort.fields[test].numpy(), cohort, test, CONFIG.structures, seed=0,
                                 bootstrap_resamples=100)
    assert scores["mean"]["tre_mm"] < 0.1
    assert min(scores["per_subject"]["dice"]) > 0.97


def test_tre_of_a_hand_made_case():
    field_ = np.zeros((3, 8, 8, 8))
    field_[0] = 2.0  # u = (2, 0, 0) voxels everywhere: fixed q came from moving q + (2, 0, 0)
    fixed = np.array([[3.0, 3.0, 3.0], [4.5, 2.0, 1.0]])
    assert target_registration_error(field_, fixed + [2, 0, 0], fixed, (3.0, 1.0, 1.0)) == pytest.approx([0, 0])
    assert target_registration_error(field_, fixed + [0, 1, 0], fixed, (3.0, 2.0, 1.0)) == pytest.approx(
        [np.hypot(6.0, 2.0)] * 2)


def test_intensity_grid_unfolds_each_cell_into_channels():
    x = torch.randn(2, 1, 8, 12, 4)
    cells = IntensityGrid(4).forward_features(x)
    assert cells.shape == (2, 64, 2, 3, 1)
    for i, j, k in [(0, 0, 0), (1, 2, 3), (3, 3, 3)]:
        torch.testing.assert_close(cells[:, (i * 4 + j) * 4 + k], x[:, 0, i::4, j::4, k::4])


def test_a_trained_head_beats_the_identity_and_the_study_is_json(paired):
    _, cohort = paired
    torch.manual_seed(0)
    entry = EncoderEntry(name="random cnn", source="test", digest="d",
                         replicates=[Replicate(0, create_encoder("cnn3d_small", width=4))])
    train, test = np.arange(10), np.arange(10, 16)
    study = registration_study(entry, cohort, CONFIG, train_idx=train, test_idx=test, seed=0,
                               bootstrap_resamples=200, baselines=True)
    json.dumps(study, allow_nan=False)
    identity, raw = study["baselines"]["identity"], study["baselines"]["raw_intensity"]
    assert raw["mean"]["tre_mm"] < 0.7 * identity["mean"]["tre_mm"], (raw["mean"], identity["mean"])
    assert raw["mean"]["dice"] > identity["mean"]["dice"] + 0.05
    for fit in (raw["head_fit"], study["registration"]["head_fit"]):  # the fit check: well below the zero field
        assert 1 <= fit["attempts"] <= 3 and fit["train_mse"] < 0.5 * fit["train_mse_zero"], fit
    difference = paired_difference(raw["per_subject"]["tre_mm"], identity["per_subject"]["tre_mm"], seed=0,
                                   bootstrap_resamples=200)
    assert difference["ci95"][1] < 0 and difference["ci95"][0] <= difference["mean"] <= difference["ci95"][1]
    for part in (study["registration"], study["segmentation"]):
        for name, (low, high) in part["ci95"].items():
            assert low <= part["mean"][name] <= high, name
    assert study["segmentation"]["mean"]["dice_body"] > 0.5
    with pytest.raises(UserError, match="overlap"):
        registration_study(entry, cohort, CONFIG, train_idx=train, test_idx=train, seed=0)


def test_a_cohort_without_a_breathing_pair_is_refused(small_cohort):
    store, _ = small_cohort
    with pytest.raises(UserError, match="paired_channel=exhale"):
        load_paired_cohort(store, store.subject_ids()[:2], CONFIG)
    with pytest.raises(UserError, match="fixed_channel"):
        RegistrationConfig(fixed_channel="image").validate()


def test_split_is_disjoint_covering_and_seeded():
    train, test = split_subjects(30, seed=4)
    assert len(test) == 10 and sorted([*train, *test]) == list(range(30))
    assert np.array_equal(split_subjects(30, seed=4)[1], test) and not np.array_equal(split_subjects(30, seed=5)[1], test)
    with pytest.raises(UserError, match="test fraction"):
        split_subjects(30, seed=0, test_fraction=1.0)


def test_raf_evaluate_runs_the_registration_study_and_reports_it(paired, tmp_path):
    """`raf evaluate ... evaluate.registration.enabled=true`: a cell per encoder (random baseline included) through
    the results store, the identity baseline equal to the hand-computed mean landmark motion, the report's table."""
    store = paired[0].path
    overrides = ["evaluate.registration.enabled=true", "evaluate.registration.head_steps=10",
                 "evaluate.registration.segmentation_steps=0", "evaluate.bootstrap_resamples=50",
                 "evaluate.seeds=[0]", "evaluate.random_baseline=true"]
    encoder = create_encoder("cnn3d_small", width=8)
    export_encoder(encoder, tmp_path / "enc.safetensors", architecture="cnn3d_small", options={"width": 8}, card={})
    assert main(["evaluate", "--config", "tiny", "--cohort", str(store), "--encoder", str(tmp_path / "enc.safetensors"),
                 "--out", str(tmp_path / "out"), "--quiet", *overrides]) is not None
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["kind"] == "registration" and len(report["encoders"]) == 2
    test_ids = next(iter(report["encoders"].values()))["test_subjects"]
    reader = CohortStore(store)
    motion_mm = [np.linalg.norm(np.subtract(reader.subject_attrs(s)["truth"]["landmarks"]["exhale"],
                                            reader.subject_attrs(s)["truth"]["landmarks"]["inhale"]), axis=1).mean()
                 * VOXEL_SPACING_MM for s in test_ids]
    identity = report["cohort"]["baselines"]["identity"]["mean"]["tre_mm"]
    assert identity == pytest.approx(float(np.mean(motion_mm)), rel=1e-6)
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert markdown.count("\n| ") == 2 + 2 + 1  # header, two encoders, two baselines
    with pytest.raises(UserError, match="one of them per run"):
        load_config(None, ["evaluate.cohort=x", "evaluate.encoders=[y]", "evaluate.registration.enabled=true",
                           "evaluate.weak_labels.enabled=true"]).evaluate.validate()
