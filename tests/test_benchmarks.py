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
