"""benchmarks/gpu_check.sh on a machine without a GPU: it finds its environment, says "no NVIDIA GPU found", runs the
CPU parts, records every GPU part as skipped with the reason, writes its JSON and exits 0."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GPU_PARTS = {"gpu_tests", "vit_step", "views", "alterations", "embed_bf16"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the check runs its GPU parts: run it by itself")
def test_gpu_check_without_a_gpu_runs_the_cpu_parts_and_records_the_gpu_parts_as_skipped(tmp_path):
    out = tmp_path / "check.json"
    env = {**os.environ, "RAF_PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--out", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "no NVIDIA GPU found: " in run.stdout and f"gpu check written to {out}" in run.stdout
    report = json.loads(out.read_text())
    assert report["gpu"] is False and report["device"] == "none"
    parts = report["parts"]
    assert set(parts) == {"environment", "cpu_train_step", "cpu_alterations", "cpu_scaling_model"} | GPU_PARTS
    for name in GPU_PARTS:
        assert parts[name]["status"] == "skipped" and parts[name]["why"].startswith("no NVIDIA GPU found: torch ")
    assert parts["environment"]["torch"] == torch.__version__ and parts["environment"]["missing_required"] == []
    # the scaling model's hand case: 2 * 7/8 * 1 GB / 100 GB/s = 17.5 ms, hidden behind 60 ms of backward
    model = parts["cpu_scaling_model"]
    assert model["allreduce_ms"] == pytest.approx(17.5) and model["step_ms"] == pytest.approx(90.0) and model["pass"]
    step = parts["cpu_train_step"]
    assert step["ours_over_raw"] == pytest.approx(step["raw_ms"] / step["ours_ms"])  # one round: the ratio of the two
    alter = parts["cpu_alterations"]
    assert alter["ours_over_torchio"] > 0 and alter["torchio_mvoxels_per_s"] > 0
    assert report["summary"] == {"ran": 4, "skipped": 5, "errors": [], "targets_met": 1, "targets_missed": 0}
