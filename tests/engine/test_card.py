"""The card `raf pretrain` writes: preprocessing read from the store, data and weights licences with the warning,
the code version (checked against git itself) and the config used."""
from __future__ import annotations

import dataclasses
import subprocess
import warnings
from pathlib import Path

import pytest

from rafmedia.engine.batches import DataConfig
from rafmedia.engine.card import LicenceWarning, card_sections, code_version, is_non_commercial, licence_warnings
from rafmedia.engine.encoders import EncoderConfig
from rafmedia.engine.export import load_encoder
from rafmedia.engine.pretrain import pretrain_encoder
from rafmedia.engine.tasks import TaskConfig
from rafmedia.engine.train import TrainConfig
from rafmedia.shards.store import StoreConfig
from rafmedia.shards.synth import VOXEL_SPACING_MM, generate_cohort
from tests.conftest import small_cohort_config

REPO = Path(__file__).resolve().parents[2]


def test_non_commercial_and_unknown_data_warn_only_under_a_permissive_weights_licence():
    assert [is_non_commercial(name) for name in ("CC-BY-NC-4.0", "cc by-nc-sa 4.0", "non-commercial research",
                                                 "CC-BY-4.0", "Apache-2.0", "unknown")] == [True] * 3 + [False] * 3
    provenance = {"licence": "mixed: CC-BY-4.0, CC-BY-NC-4.0, unknown", "sources": [
        {"name": "open", "licence": "CC-BY-4.0", "subjects": 3},
        {"name": "restricted", "licence": "CC-BY-NC-4.0", "subjects": 2},
        {"name": "scraped", "licence": "unknown", "subjects": 1}]}
    messages = licence_warnings("Apache-2.0", provenance)
    assert len(messages) == 2
    assert "'restricted' has a non-commercial licence 'CC-BY-NC-4.0'" in messages[0]
    assert "'scraped' has an unknown licence 'unknown'" in messages[1]
    assert licence_warnings("CC-BY-NC-4.0", provenance) == [] and licence_warnings("unspecified", provenance) == []
    assert len(licence_warnings("mit", {"licence": "unknown", "sources": []})) == 1  # a store that records nothing


def test_code_version_is_the_checkout_commit_and_its_dirty_flag():
    version = code_version()
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=False)
    if head.returncode != 0:  # an installed copy, not a checkout
        assert version["git"] is None
        return
    status = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                            capture_output=True, text=True, check=True).stdout
    assert version["git"] == {"commit": head.stdout.strip(), "dirty": bool(status.strip())}
    assert version["rafmedia"] == (REPO / "setup.py").read_text().split('version="')[1].split('"')[0]


def test_pretrain_writes_preprocessing_licences_code_version_and_config(tmp_path):
    store = generate_cohort(small_cohort_config(num_subjects=8, shape=[24, 24, 24]), store_config=StoreConfig(
        chunk_size=16), out=tmp_path / "cohort.zarr", progress=False)
    data = DataConfig(cohort=str(store.path))
    encoder = EncoderConfig("cnn3d_small", {"width": 4}, licence="MIT")
    task = TaskConfig("contrastive_two_crop", {"crop_size": 16, "max_shift": 2})
    train = TrainConfig(steps=2, batch_size=4, warmup_steps=1, checkpoint_every=100, log_every=1, tensorboard=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LicenceWarning)  # CC0 synthetic data under MIT weights: nothing to warn about
        weights = pretrain_encoder(data=data, encoder=encoder, task=task, train_config=train, out_dir=tmp_path / "run",
                                   progress=False)
    _, card = load_encoder(weights)
    assert card["format"] == "rafmedia.encoder/1" and card["licence"] == "MIT"
    assert card["preprocessing"] == {
        "orientation": "RAS", "spacing": [VOXEL_SPACING_MM] * 3, "channels": ["image"], "input": "image",
        "input_size": [16, 16, 16],
        "intensity": {"image": {"policy": {"name": "synthetic", "generator": "rafmedia.shards.synth"},
                                "then": "per-volume z-score"}}}
    assert card["data"]["licence"] == store.attrs()["provenance"]["licence"]
    assert sum(source["subjects"] for source in card["data"]["sources"]) == 8
    assert card["config"]["encoder"] == dataclasses.asdict(encoder) and card["config"]["task"]["options"] == \
        task.options and card["config"]["train"]["steps"] == 2 and card["config"]["data"]["cohort"] == str(store.path)
    assert card["code_version"] == code_version()
    # the same store, now recorded as non-commercial: permissive weights get a printed warning, not an error
    store.update_attrs({"provenance": {"licence": "CC-BY-NC-4.0", "sources": [
        {"name": "clinic", "licence": "CC-BY-NC-4.0", "subjects": 8}]}})
    with pytest.warns(LicenceWarning, match="'clinic' has a non-commercial licence 'CC-BY-NC-4.0'"):
        sections = card_sections(store=store, channels=["image"], kind="image", input_size=None,
                                 licence="apache-2.0", config={})
    assert sections["provenance"]["licence"] == "CC-BY-NC-4.0" and sections["licence"] == "apache-2.0"
