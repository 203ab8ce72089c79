"""The brain weak-label cohort: the rater flips at the requested rate, counts are exact, the planted lesion and
hypometabolism are physically there, the grade formula is monotone, output is deterministic, the CLI works."""
import json
import math
import shutil

import numpy as np
import pytest
from scipy import ndimage
from scipy.stats import binomtest

from rafmedia.core.errors import UserError
from rafmedia.launch.cli import main
from rafmedia.shards.datasheet import DatasheetConfig, compute_datasheet, load_manifest
from rafmedia.shards.store import CohortStore, StoreConfig
from rafmedia.shards.synth import SiteProfile
from rafmedia.shards.synth_brain import (BRAIN_LABELS, CHANNELS, REGION_WEIGHTS, BrainCohortConfig,
                                         assign_brain_subjects, brain_masks, generate_brain_cohort, grade_from_findings,
                                         lesion_masks, rate_grades, render_brain_subject)

SMALL = {"shape": [32, 32, 32], "lesion_radius": [2.0, 4.0], "num_subjects": 6}


@pytest.fixture(scope="module")
def brain_cohort(tmp_path_factory):
    """16 subjects at the default 48^3 shape, one process."""
    config = BrainCohortConfig(num_subjects=16, workers=1, missing={"flair": 0.25, "pet": 0.25})
    store = generate_brain_cohort(config, store_config=StoreConfig(), out=tmp_path_factory.mktemp("brain") / "s",
                                  progress=False)
    return store


def test_rater_moves_grades_by_one_at_the_requested_rate():
    rng = np.random.default_rng(7)
    true = rng.integers(0, 4, size=20000)
    rated = rate_grades(true, 0.15, 4, np.random.default_rng(8))
    moved = rated != true
    # The requested probability lies in the 99.9% interval of the observed flip rate.
    interval = binomtest(int(moved.sum()), moved.size, 0.15).proportion_ci(confidence_level=0.999)
    assert interval.low < 0.15 < interval.high
    assert set(np.unique(rated[moved] - true[moved])) == {-1, 1}
    assert rated.min() >= 0 and rated.max() <= 3
    assert np.all(rated[moved & (true == 0)] == 1) and np.all(rated[moved & (true == 3)] == 2)
    inner = moved & (true > 0) & (true < 3)
    assert binomtest(int((rated[inner] > true[inner]).sum()), int(inner.sum()), 0.5).pvalue > 0.001  # up = down
    assert np.array_equal(rate_grades(true, 0.0, 4, rng), true)


def test_grade_formula_hand_cases_and_monotonicity():
    config = BrainCohortConfig()  # K = 4, lesion_radius [2.5, 6.5], hypometabolism 0.25

    def volume(effective_radius, weight=1.0):
        return 4 / 3 * math.pi * effective_radius**3 / weight

    assert grade_from_findings(0, 1.0, 0.0, config) == 0
    assert grade_from_findings(volume(2.5), 1.0, 0.25 / 3, config) == 1  # gL = 1, gH = 1
    assert grade_from_findings(volume(4.5), 1.0, 0.25 * 2 / 3, config) == 2  # gL = 2, gH = 2
    assert grade_from_findings(volume(6.5), 1.0, 0.25, config) == 3  # gL = 3, gH = 3
    assert grade_from_findings(volume(6.5), 1.0, 0.1, config) == 2  # gL = 3, gH = 1.2: mean 2.1
    assert grade_from_findings(1, 1.0, 0.0, config) == 1  # any lesion is at least grade 1
    # Location matters: the same lesion in the temporal lobe (weight 1.5: r_eff 5.72, gL 2.61) outranks it in the
    # occipital (0.8: r_eff 4.64, gL 2.07); with gH = 0.6 the means are 1.61 and 1.34.
    same = volume(5.0)
    assert grade_from_findings(same, REGION_WEIGHTS["temporal"], 0.05, config) == 2
    assert grade_from_findings(same, REGION_WEIGHTS["occipital"], 0.05, config) == 1
    volumes, depths = np.linspace(0, volume(8.0), 60), np.linspace(0, 0.3, 40)
    for depth in (0.0, 0.1, 0.25):
        grades = [grade_from_findings(v, 1.0, depth, config) for v in volumes]
        assert np.all(np.diff(grades) >= 0) and grades[-1] > grades[0]
    for lesion in (0.0, volume(3.0), volume(6.0)):
        grades = [grade_from_findings(lesion, 1.0, d, config) for d in depths]
        assert np.all(np.diff(grades) >= 0) and grades[-1] > grades[0]


def test_grade_and_missing_channel_counts_are_exact_and_no_subject_lacks_every_channel(brain_cohort):
    store = brain_cohort
    rows = store.read_manifest()
    # 16 x [0.4, 0.3, 0.2, 0.1] = 6.4, 4.8, 3.2, 1.6 -> floors 6, 4, 3, 1; largest remainders go to grades 1 and 3.
    assert [sum(r["grade_true"] == g for r in rows) for g in range(4)] == [6, 5, 3, 2]
    assert [sum(not r[f"has_{c}"] for r in rows) for c in CHANNELS] == [0, 4, 4]
    for row in rows:
        channels = store.subject_attrs(row["subject_id"])["channels"]
        assert channels == [c for c in CHANNELS if row[f"has_{c}"]]
        assert all((row[f"{c}_mean"] == "") == (c not in channels) for c in CHANNELS)  # blank stats when missing
        assert row["disease"] == int(row["grade"] > 0) and abs(row["grade"] - row["grade_true"]) <= 1
    planted = json.loads((store.path / "planted.json").read_text())
    assert planted["grade_counts_true"] == {"0": 6, "1": 5, "2": 3, "3": 2}
    assert planted["missing_counts"] == {"t1": 0, "flair": 4, "pet": 4}
    assert planted["rater_flip_rate"] == np.mean([r["grade"] != r["grade_true"] for r in rows])
    # A crowded case: 12 of 20 subjects lack each channel (36 of 40 possible), yet none lacks all three.
    crowded = BrainCohortConfig(num_subjects=20, missing={c: 0.6 for c in CHANNELS})
    subjects = assign_brain_subjects(crowded)
    assert all(subject["channels"] for subject in subjects)
    assert [sum(c not in s["channels"] for s in subjects) for c in CHANNELS] == [12, 12, 12]
    with pytest.raises(UserError, match="brain_cohort.missing"):
        BrainCohortConfig(num_subjects=20, missing={c: 0.7 for c in CHANNELS}).validate()
    with pytest.raises(UserError, match="brain_cohort.missing.flare: unknown channel; did you mean 'flair'"):
        BrainCohortConfig(missing={"flare": 0.1}).validate()


def test_the_datasheet_runs_on_subjects_with_different_channels(brain_cohort):
    store = brain_cohort
    rows, read_sample, _, _ = load_manifest(store.path, channel="pet", stride=4)
    sheet = compute_datasheet(rows, config=DatasheetConfig(channel="pet"), title="brain", read_sample=read_sample,
                              progress=False)
    assert sheet["intensity"]["num_without_channel"] == 4
    assert sum(group["num_subjects"] for group in sheet["intensity"]["groups"].values()) == 12
    with pytest.raises(UserError, match="no subject .* has channel 'image'.*t1, flair, pet"):
        load_manifest(store.path, channel="image", stride=4)


def test_planted_lesion_has_its_size_lies_in_the_brain_and_shows_in_each_contrast(brain_cohort):
    store = brain_cohort
    rows = store.read_manifest()
    ids = [row["subject_id"] for row in rows]
    lesions, brains = lesion_masks(store, ids), brain_masks(store, ids)
    config = BrainCohortConfig()  # the fixture's grades, radii and depth
    assert lesions.shape == brains.shape == (16, 48, 48, 48)
    assert not lesions[[r["grade_true"] == 0 for r in rows]].any()
    planted = json.loads((store.path / "planted.json").read_text())["subjects"]
    for index, row in enumerate(rows):
        if row["grade_true"] == 0:
            continue
        lesion, truth = lesions[index], planted[row["subject_id"]]["lesion"]
        assert lesion.sum() == truth["voxels"] == row["lesion_voxels"]
        weight = REGION_WEIGHTS[row["lesion_region"]]  # the manifest's findings give back the planted grade
        assert grade_from_findings(row["lesion_voxels"], weight, row["hypometabolism"], config) == row["grade_true"]
        assert np.all(brains[index][lesion])
        assert truth["brain_fraction"] == pytest.approx(lesion.sum() / brains[index].sum(), abs=1e-6)
        assert lesion[tuple(truth["center"])]
        # A lobulated sphere of the planted radius: its voxel count is the ball's volume to within 35%.
        assert 0.65 < lesion.sum() / (4 / 3 * math.pi * truth["radius"] ** 3) < 1.35, (row["subject_id"], truth)
        label = store.read_label(row["subject_id"])
        near_white = (ndimage.binary_dilation(lesion, iterations=4) & ~ndimage.binary_dilation(lesion, iterations=1)
                      & (label == BRAIN_LABELS["white"]))
        for channel, sign in (("flair", 1), ("t1", -1)):
            if row[f"has_{channel}"]:
                volume = store.read(row["subject_id"], channel)
                assert sign * (volume[lesion].mean() - volume[near_white].mean()) > 0.15, (row["subject_id"], channel)


def test_pet_is_lower_in_the_hypometabolic_region_than_in_the_same_subject_at_grade_0():
    """Anatomy is drawn before the findings, so a subject re-rendered at grade 0 is its own healthy twin; a site
    without bias field or noise leaves only the planted PET change."""
    config = BrainCohortConfig(num_subjects=10)
    clean_site = SiteProfile(noise_std=0.0, bias_field=0.0, blur_sigma=0.0)
    for subject in [s for s in assign_brain_subjects(config) if s["grade_true"] >= 2][:2]:
        sick, label, truth = render_brain_subject(subject, config, clean_site, channels=("pet",))
        twin, twin_label, _ = render_brain_subject({**subject, "grade_true": 0, "lesion_region": "none"}, config,
                                                   clean_site, channels=("pet",))
        bump = truth["hypometabolism"]
        assert np.array_equal(label > 0, twin_label > 0)  # the same brain
        distance = np.sqrt(sum((np.indices(label.shape)[a] - bump["center"][a]) ** 2 for a in range(3)))
        away_from_lesion = ~ndimage.binary_dilation(label == BRAIN_LABELS["lesion"], iterations=3)
        cortex = (label == BRAIN_LABELS["grey"]) & away_from_lesion
        core = cortex & (distance < bump["sigma_voxels"])
        far = cortex & (distance > 3 * bump["sigma_voxels"])
        # Tissue texture is drawn after the findings, so the twin's differs by a few percent: compare means.
        ratio_core = sick["pet"][core].mean() / twin["pet"][core].mean()
        ratio_far = sick["pet"][far].mean() / twin["pet"][far].mean()
        expected = 1 - bump["depth"] * np.exp(-distance[core] ** 2 / (2 * bump["sigma_voxels"] ** 2)).mean()
        assert ratio_core == pytest.approx(expected, abs=0.03), (subject["subject_id"], ratio_core, expected)
        assert ratio_far == pytest.approx(1.0, abs=0.02)


def test_same_seed_same_cohort_for_any_worker_count_and_resume_keeps_it(tmp_path):
    def generate(out, **changes):
        config = BrainCohortConfig(**{**SMALL, "workers": 1, **changes})
        return generate_brain_cohort(config, store_config=StoreConfig(), out=tmp_path / out, progress=False)

    one, two = generate("one"), generate("two", workers=2)
    assert one.read_manifest() == two.read_manifest()
    for subject_id in one.subject_ids():
        for name in [*one.subject_attrs(subject_id)["channels"], "label"]:
            assert np.array_equal(one.read(subject_id, name), two.read(subject_id, name))
    other = generate("other", seed=1)
    assert not np.array_equal(one.read("sub-0000", "t1"), other.read("sub-0000", "t1"))
    shutil.rmtree(one.path / "subjects" / "sub-0003")
    (one.path / "manifest.csv").unlink()
    resumed = generate("one")
    assert resumed.read_manifest() == two.read_manifest()
    planted = [json.loads((store.path / "planted.json").read_text()) for store in (one, two)]
    assert [p["config"].pop("workers") for p in planted] == [1, 2] and planted[0] == planted[1]
    with pytest.raises(UserError, match="changed: rater_noise"):
        generate("one", rater_noise=0.3)


def test_raf_synth_kind_brain_writes_the_store_and_names_a_bad_key(tmp_path, capsys):
    common = ["synth", "--kind", "brain", "--out", str(tmp_path / "brain"), "--quiet", "brain_cohort.workers=1",
              "brain_cohort.num_subjects=3", "brain_cohort.shape=[24,24,24]", "brain_cohort.lesion_radius=[2,4]"]
    assert main(common) == 0
    assert "manifest.csv and planted.json inside" in capsys.readouterr().out
    store = CohortStore(tmp_path / "brain" / "cohort.zarr")
    assert store.subject_ids() == ["sub-0000", "sub-0001", "sub-0002"]
    assert json.loads((store.path / "planted.json").read_text())["num_subjects"] == 3
    assert "brain_cohort:" in (tmp_path / "brain" / "resolved_config.yaml").read_text()
    assert main([*common, "brain_cohort.num_subject=5"]) == 2
    assert "brain_cohort.num_subject" in capsys.readouterr().err
