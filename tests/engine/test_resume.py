"""Real interruptions of `raf pretrain` (one process): kill -9 at an arbitrary moment and SIGTERM, then resume.

The resumed run's loss sequence must equal an uninterrupted run's bit for bit, reading volumes from memory or
streaming patches from the zarr store with two DataLoader workers (the data-stream position is restored).
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

RAF = Path(sys.executable).parent / "raf"
STEPS = 18


def pretrain_command(store, out: Path, source: str, steps: int = STEPS) -> list[str]:
    return [str(RAF), "pretrain", "--cohort", str(store.path), "--out", str(out), "--quiet",
            f"train.steps={steps}", "train.batch_size=4", "train.checkpoint_every=3", "train.log_every=1",
            "train.warmup_steps=2", "train.num_threads=1", "train.ema_decay=0.9", "encoder.options.width=4",
            "task.name=rotation", "task.options={crop_size: 16, hidden_dim: 32}", f"data.source={source}",
            "data.patch_size=24", "data.patches_per_subject=2", "data.num_workers=2"]


def run(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)


@pytest.fixture(scope="module")
def straight_runs(small_cohort, tmp_path_factory):
    store, _ = small_cohort
    out = tmp_path_factory.mktemp("straight")
    return {source: (run(pretrain_command(store, out / source, source)), losses(out / source))
            for source in ("memory", "stream")}


@pytest.mark.parametrize("source", ["memory", "stream"])
def test_kill_9_then_resume_gives_the_uninterrupted_losses_bitwise(source, small_cohort, straight_runs, tmp_path):
    store, _ = small_cohort
    command = pretrain_command(store, tmp_path, source)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_for(tmp_path / "checkpoints" / "latest.pt", process)
    process.send_signal(signal.SIGKILL)  # wherever it is: mid-step, mid-checkpoint write
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the run ended before the kill; the test did not interrupt it"
    assert not (tmp_path / "encoder.safetensors").exists()

    run(command)
    _, straight = straight_runs[source]
    assert losses(tmp_path) == straight  # bit for bit, including the steps re-run after the checkpoint
    assert len(straight) == STEPS and len(set(straight)) > STEPS // 2


def test_sigterm_saves_a_checkpoint_stops_with_143_and_the_same_command_resumes(small_cohort, straight_runs, tmp_path):
    store, _ = small_cohort
    command = pretrain_command(store, tmp_path, "memory")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_for(tmp_path / "metrics.jsonl", process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    stopped_at = int(stderr.split("stopped by SIGTERM after step ")[1].split(";")[0])
    assert 0 < stopped_at < STEPS
    state = torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=True)
    assert state["step"] == stopped_at  # saved at the end of the step it was in, not at the last periodic one
    assert len(losses(tmp_path)) == stopped_at

    run(command)
    assert losses(tmp_path) == straight_runs["memory"][1]


def test_ema_weights_are_exported_and_differ_from_the_last_weights(straight_runs, tmp_path):
    from rafmedia.engine.export import load_encoder

    out = Path(straight_runs["memory"][0].args[5])
    encoder, card = load_encoder(out / "encoder.safetensors")
    assert card["weights"] == "ema" and card["train"]["ema_decay"] == 0.9
    last = torch.load(out / "checkpoints" / "latest.pt", weights_only=True)["model"]
    exported = encoder.state_dict()
    assert any(not torch.equal(exported[key], last[f"encoder.{key}"]) for key in exported)
