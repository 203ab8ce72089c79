"""Two real CPU processes under torchrun (gloo): DDP and DeepSpeed ZeRO-2 keep the ranks identical, match one
process with the combined batch, and resume after one rank is killed with SIGKILL."""
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

from rafmedia.engine.distributed import Place, free_port
from rafmedia.engine.train import train

sys.path.insert(0, str(Path(__file__).parent))
import dist_train_worker as worker  # noqa: E402

WORKER = Path(__file__).parent / "dist_train_worker.py"
TORCHRUN = Path(sys.executable).parent / "torchrun"


def torchrun(out: Path, wrapper: str, steps: int, *options: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [str(TORCHRUN), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               str(WORKER), str(out), wrapper, str(steps), *options]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, timeout: float = 300) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-3000:]
    return output


def logged_losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("wrapper", ["ddp", "deepspeed"])
def test_two_ranks_stay_identical_and_match_one_process_with_the_combined_batch(wrapper, tmp_path, one_thread):
    steps = 4
    finish(torchrun(tmp_path / "dist", wrapper, steps))
    rank0, rank1 = (load_file(tmp_path / "dist" / f"rank{rank}.safetensors") for rank in (0, 1))
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"{key} differs between the ranks"

    # One process, plain PyTorch, whose batch of each step is rank 0's followed by rank 1's.
    task = worker.build_task()
    shares = [worker.view_batches(worker.fixed_volumes(), task.views, batch_size=worker.BATCH_PER_RANK, seed=0,
                                  rank=rank, world_size=2) for rank in (0, 1)]

    def combined(step):
        parts = [share(step) for share in shares]
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}

    config = worker.config("plain", steps)
    config.batch_size = 2 * worker.BATCH_PER_RANK
    reference = train(task, combined, config=config, out_dir=tmp_path / "one", progress=False, place=Place())
    distributed_losses = json.loads((tmp_path / "dist" / "losses_rank0.json").read_text())
    assert distributed_losses == pytest.approx(reference.losses, abs=1e-5)
    # AdamW divides by the root of the squared-gradient average, so an element whose gradient is ~1e-9 moves by
    # about +-lr whichever way rounding tips it: a few elements may differ by up to 2 lr (0.02); all others agree.
    initial = worker.build_task().state_dict()
    for key, value in task.state_dict().items():
        difference = (rank0[key] - value.float()).abs()
        assert difference.max() < 2 * config.lr + 1e-6, f"{key}: ranks and the one-process run differ"
        assert (difference > 1e-5).float().mean() < 0.01, f"{key}: ranks and the one-process run differ"
        assert (value.float() - initial[key].float()).abs().max() > 1e-3  # weights that trained, not the initial ones


@pytest.mark.parametrize("wrapper", ["ddp", "deepspeed"])
def test_a_rank_killed_with_sigkill_resumes_to_the_uninterrupted_loss_sequence(wrapper, tmp_path):
    steps, every = 24, 4
    finish(torchrun(tmp_path / "straight", wrapper, steps, f"checkpoint_every={every}"))
    straight = logged_losses(tmp_path / "straight" / "run")

    out = tmp_path / "killed"
    process = torchrun(out, wrapper, steps, f"checkpoint_every={every}")
    pointer = out / "run" / "checkpoints" / ("latest.pt" if wrapper == "ddp" else "latest_deepspeed.txt")
    deadline = time.time() + 240
    while not pointer.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(int((out / "pid_rank1").read_text()), signal.SIGKILL)
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0, "the run finished before the kill; the test did not interrupt it"
    interrupted = logged_losses(out / "run")
    assert len(interrupted) < steps

    finish(torchrun(out, wrapper, steps, f"checkpoint_every={every}"))
    resumed = logged_losses(out / "run")
    assert len(resumed) == steps
    assert resumed == pytest.approx(straight, abs=1e-6)


JOIN_AND_SUM = """
import os, torch, torch.distributed as dist
from rafmedia.engine.distributed import init_distributed, place_from_environment
place = place_from_environment()
init_distributed(place, timeout_minutes=1.0)
value = torch.tensor([float(place.rank + 1)])
dist.all_reduce(value)
print("sum", int(value.item()), flush=True)
dist.destroy_process_group()
"""


def test_a_restarted_group_joins_on_the_agent_store_that_still_holds_the_last_groups_keys():
    """torchrun's static rendezvous keeps one store (the agent's) for every restart, with the killed group's keys
    still in it. Rank 0 of the new group starts first: it must wait for rank 1's new address, not connect to the
    one the last group left (each attempt has its own key prefix, `TORCHELASTIC_RESTART_COUNT`)."""
    import torch.distributed as dist

    agent_store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # what the agent hosts

    def start(rank: int, attempt: int) -> subprocess.Popen:
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(agent_store.port), "TORCHELASTIC_USE_AGENT_STORE": "True",
               "TORCHELASTIC_RESTART_COUNT": str(attempt), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        return subprocess.Popen([sys.executable, "-c", JOIN_AND_SUM], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    for attempt in (0, 1):
        ranks = [start(0, attempt)]
        try:
            if attempt == 1:
                time.sleep(4)  # rank 0 is in init by now; rank 1's address in the store is still the last group's
            ranks.append(start(1, attempt))
            for process in ranks:
                output, _ = process.communicate(timeout=90)  # without the per-attempt prefix rank 0 hangs
                assert process.returncode == 0 and "sum 3" in output, output[-2000:]
        finally:
            for process in ranks:
                process.kill()
                process.wait()
