"""webdataset export: real tar shards, read back by the stock webdataset library and by `tar`."""
import json
import subprocess

import numpy as np
import pytest
import webdataset as wds

from rafmedia.core.errors import UserError
from rafmedia.shards.wds_export import ExportConfig, export_webdataset, shard_urls


def test_volumes_round_trip_through_stock_webdataset_and_shards_respect_the_size(small_cohort, tmp_path):
    store, _ = small_cohort
    index_path = export_webdataset(store, tmp_path / "wds", config=ExportConfig(shard_size_mb=0.5), progress=False)
    index = json.loads(index_path.read_text())
    assert index["num_samples"] == len(store.subject_ids()) == sum(s["num_samples"] for s in index["shards"])
    assert len(index["shards"]) > 1
    limit = 0.5 * 1024 * 1024
    assert all(shard["bytes"] <= limit for shard in index["shards"])
    rows = {row["subject_id"]: row for row in store.read_manifest()}
    seen = []
    for sample in wds.WebDataset(shard_urls(tmp_path / "wds"), shardshuffle=False).decode():
        subject = sample["json"]["subject_id"]
        seen.append(subject)
        assert sample["image.npy"].shape == (1, 32, 32, 32)
        assert np.array_equal(sample["image.npy"][0], store.read(subject))
        assert np.array_equal(sample["label.npy"], store.read_label(subject))
        assert sample["json"]["metadata"]["site"] == rows[subject]["site"]
    assert seen == store.subject_ids()
    members = subprocess.run(["tar", "-tf", shard_urls(tmp_path / "wds")[0]], capture_output=True, text=True,
                             check=True).stdout.split()
    assert members[:3] == ["sub-0000.image.npy", "sub-0000.json", "sub-0000.label.npy"]


def test_patches_are_the_store_regions_they_claim_and_are_deterministic(small_cohort, tmp_path):
    store, _ = small_cohort
    config = ExportConfig(mode="patches", patch_size=12, patches_per_subject=3, seed=5)
    export_webdataset(store, tmp_path / "a", config=config, progress=False)
    export_webdataset(store, tmp_path / "b", config=config, progress=False)
    first = list(wds.WebDataset(shard_urls(tmp_path / "a"), shardshuffle=False).decode())
    second = list(wds.WebDataset(shard_urls(tmp_path / "b"), shardshuffle=False).decode())
    assert len(first) == 3 * len(store.subject_ids())
    for a, b in zip(first, second):
        assert a["__key__"] == b["__key__"] and np.array_equal(a["image.npy"], b["image.npy"])
        d, h, w = a["json"]["origin"]
        region = (slice(d, d + 12), slice(h, h + 12), slice(w, w + 12))
        assert np.array_equal(a["image.npy"][0], store.read(a["json"]["subject_id"], region=region))
        assert np.array_equal(a["label.npy"], store.read_label(a["json"]["subject_id"], region=region))
    assert len({tuple(s["json"]["origin"]) for s in first[:3]}) == 3  # three different corners


def test_existing_output_and_bad_options_are_user_errors(small_cohort, tmp_path):
    store, _ = small_cohort
    (tmp_path / "taken").mkdir()
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        export_webdataset(store, tmp_path / "taken", config=ExportConfig(), progress=False)
    with pytest.raises(UserError, match="did you mean 'patches'"):
        export_webdataset(store, tmp_path / "x", config=ExportConfig(mode="patch"), progress=False)
    with pytest.raises(UserError, match="smaller than export.patch_size=64"):
        export_webdataset(store, tmp_path / "y", config=ExportConfig(mode="patches", patch_size=64), progress=False)
    assert not (tmp_path / "y").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # staging cleaned up
