"""The loader benchmark runs end to end in --quick mode (tiny volumes): every loader delivers, data is cached."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_loader_benchmark_quick_runs(tmp_path):
    loader = _load("loader")
    rows = loader.main(["--quick", "--data", str(tmp_path), "--caches", "cold", "--json", str(tmp_path / "rows.json")])
    names = [row.loader.split(":")[0].split(" ")[0] for row in rows]
    assert names == ["ours", "TorchIO", "MONAI", "TorchIO", "MONAI", "raw"]
    assert [row.data for row in rows[1:5]] == [".nii.gz", ".nii.gz", ".nii", ".nii"]
    config = loader.QUICK
    for row in rows:
        assert row.patches >= config.num_patches() and math.isfinite(row.patches_per_s) and row.patches_per_s > 0
        assert row.mb_per_s == pytest.approx(row.patches_per_s * config.patch ** 3 * 4 / 1e6)
    assert len(json.loads((tmp_path / "rows.json").read_text())) == 6
    folder = tmp_path / "quick"
    batch = next(loader.ours(folder, config))
    assert tuple(batch.shape) == (config.batch, 1, config.patch, config.patch, config.patch)
    stamps = {path: path.stat().st_mtime_ns for path in loader.data_files(folder)}
    loader.prepare_data(folder, config)  # cached: nothing is rendered or rewritten
    assert {path: path.stat().st_mtime_ns for path in loader.data_files(folder)} == stamps


def test_alteration_benchmark_quick_covers_every_alteration_and_its_peers():
    from rafmedia.shards.alterations import list_alterations

    bench = _load("alterations")
    rows = bench.main(["--quick", "--repeats", "1"])
    assert sorted({row.alteration for row in rows}) == list_alterations()
    assert {row.batch for row in rows} == {1, 2}  # --quick: a single volume and a batch of 2
    with_torchio = {row.alteration for row in rows if "TorchIO" in row.peers}
    assert {"gaussian_noise", "bias_field", "motion", "ghosting", "kspace_spike", "anisotropic_blur", "gamma",
            "elastic"} <= with_torchio
    assert all(row.ours > 0 and math.isfinite(row.ours) for row in rows)
    assert bench.geometric_mean_ratio(rows, "TorchIO") > 0 and bench.geometric_mean_ratio(rows, "MONAI") > 0
