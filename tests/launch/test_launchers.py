"""One `raf pretrain` under every launcher: torchrun (one node, and two launcher processes as two nodes), the
deepspeed launcher and mpirun give two ranks the same data shares, so they give the same loss sequence; and under
`torchrun --max-restarts 1` a rank killed mid-run restarts the group from the last checkpoint and the run ends with
the uninterrupted run's weights."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rafmedia.engine.distributed import free_port
from tests.launch.helpers import RAF, losses, make_cohort

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "OMPI_ALLOW_RUN_AS_ROOT": "1",
       "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
WORKER = Path(__file__).resolve().parents[1] / "engine" / "dist_train_worker.py"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("cohort"), num_subjects=16)


def pretrain_args(cohort: Path, out: Path, wrapper: str = "ddp") -> list[str]:
    return ["pretrain", "--cohort", str(cohort), "--out", str(out), "--config", "tiny", "--quiet",
            f"train.wrapper={wrapper}", "train.steps=5", "train.num_threads=1", "train.log_every=1"]


def launch(mode: str, cohort: Path, out: Path) -> None:
    port = str(free_port())
    module = [sys.executable, "-m", "rafmedia.launch.cli"]
    commands = {
        "torchrun": [[str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", port, "-m", "rafmedia.launch.cli",
                      *pretrain_args(cohort, out)]],
        "torchrun two nodes": [[str(BIN / "torchrun"), "--nnodes", "2", "--nproc_per_node", "1", "--node_rank",
                                str(node), "--master_addr", "127.0.0.1", "--master_port", port, "-m",
                                "rafmedia.launch.cli", *pretrain_args(cohort, out)] for node in (0, 1)],
        "deepspeed": [[str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", port, str(RAF),
                       *pretrain_args(cohort, out, wrapper="deepspeed")]],
        "mpirun": [[str(BIN / "mpirun"), "-n", "2", "--oversubscribe", *module, *pretrain_args(cohort, out)]],
    }[mode]
    processes = [subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for command in commands]
    for process in processes:
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, output[-3000:]


@pytest.fixture(scope="module")
def reference(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("torchrun")
    launch("torchrun", cohort, out)
    return losses(out)


@pytest.mark.parametrize("mode", ["torchrun two nodes", "deepspeed", "mpirun"])
def test_every_launcher_runs_the_same_two_rank_training(mode, cohort, reference, tmp_path):
    launch(mode, cohort, tmp_path)
    card = json.loads((tmp_path / "encoder.card.json").read_text())
    assert card["world_size"] == 2
    # DeepSpeed reduces gradients in its own order: the same training up to float32 rounding (one ulp at 3.5 is 2.4e-7)
    assert losses(tmp_path) == pytest.approx(reference, rel=1e-6, abs=0)
    assert len(reference) == 5 and len(set(reference)) == 5


def test_one_rank_killed_under_torchrun_max_restarts_restarts_the_group_and_ends_with_the_same_weights(tmp_path):
    def run(out: Path) -> subprocess.Popen:
        command = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--max-restarts", "1", "--master_port",
                   str(free_port()), str(WORKER), str(out), "ddp", "30", "checkpoint_every=4"]
        return subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    straight = run(tmp_path / "straight")
    output, _ = straight.communicate(timeout=600)
    assert straight.returncode == 0, output[-3000:]

    out = tmp_path / "killed"
    process = run(out)
    checkpoint = out / "run" / "checkpoints" / "latest.pt"
    deadline = time.time() + 300
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    first_pid = int((out / "pid_rank1").read_text())
    os.kill(first_pid, signal.SIGKILL)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]  # the restart finished the run
    assert int((out / "pid_rank1").read_text()) != first_pid  # rank 1 was started again
    assert "exitcode: -9" in output  # torchrun saw the killed rank (and, by the pid above, started it again)
    finals = [load_file(path / "rank0.safetensors") for path in (tmp_path / "straight", out)]
    for key in finals[0]:
        torch.testing.assert_close(finals[1][key], finals[0][key], rtol=0, atol=1e-6)
    assert losses(out / "run") == pytest.approx(losses(tmp_path / "straight" / "run"), abs=1e-6)
