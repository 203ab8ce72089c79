"""Per-step accounting: data wait and compute time, rates, FLOPs and MFU, the footprint, and a loop that reduces
losses and agrees on stop requests only at boundaries (two real gloo processes count the collectives)."""
import json
import os
import signal
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rafmedia.core.errors import Preempted
from rafmedia.engine.accounting import FOOTPRINT_FILE, batch_voxels, device_peak_tflops, step_flops
from rafmedia.engine.batches import view_batches
from rafmedia.engine.distributed import Place, free_port
from rafmedia.engine.encoders import create_encoder
from rafmedia.engine.tasks import create_task
from rafmedia.engine.train import TrainConfig, train

WAIT_S = 0.05


def _task():
    torch.manual_seed(0)
    return create_task("contrastive_two_crop", encoder=create_encoder("cnn3d_small", width=4), crop_size=16,
                       max_shift=4)


def _volumes():
    return torch.randn((8, 1, 24, 24, 24), generator=torch.Generator().manual_seed(0))


class Linear(torch.nn.Module):
    """A task of one bias-free linear layer: forward 2*B*I*O FLOPs, backward (weight gradient only) 2*B*I*O."""

    def __init__(self, inputs: int, outputs: int):
        super().__init__()
        self.layer = torch.nn.Linear(inputs, outputs, bias=False)

    def forward(self, batch):
        return {"loss": self.layer(batch["x"]).square().mean()}


def test_data_wait_compute_and_rates_are_measured_per_logged_interval(tmp_path):
    task = _task()
    batch_of_step = view_batches(_volumes(), task.views, batch_size=4, seed=0)

    def slow(step):  # a loader that makes the trainer wait WAIT_S for every batch
        time.sleep(WAIT_S)
        return batch_of_step(step)

    train(task, slow, config=TrainConfig(steps=9, batch_size=4, warmup_steps=1, log_every=4, checkpoint_every=0,
                                         tensorboard=False, count_flops=True), out_dir=tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 4, 8]
    voxels_per_step = batch_voxels(batch_of_step(0))
    assert voxels_per_step == 2 * 4 * 16 ** 3  # two 16^3 crops of each of the 4 volumes
    for record in records[1:]:  # the first interval also holds the FLOP count and start-up
        assert WAIT_S <= record["data_wait_s"] < WAIT_S + 0.1  # the sleep, plus making the views
        assert record["compute_s"] > 0
        assert record["data_wait_s"] + record["compute_s"] <= record["step_seconds"] * 1.001
        assert record["samples_per_s"] == pytest.approx(4 / record["step_seconds"], rel=2e-3)
        assert record["voxels_per_s"] == pytest.approx(voxels_per_step / record["step_seconds"], rel=2e-3)
        assert record["peak_rss_mb"] > 50
        assert record["tflops"] > 0 and "mfu" not in record  # no device peak for a CPU
    footprint = json.loads((tmp_path / FOOTPRINT_FILE).read_text())
    assert footprint["device_hours"] == 0 and footprint["core_hours"] > 0
    assert footprint["calls"][0]["steps_run"] == 9 and len(footprint["calls"]) == 1  # 3 saves, one call


def test_step_flops_match_the_hand_count_and_leave_the_run_untouched():
    task = Linear(32, 8)
    batch = {"x": torch.randn(5, 32)}
    before = task.layer.weight.clone()
    rng = torch.get_rng_state()
    assert step_flops(task, batch, dtype=None, micro_steps=3) == 3 * 4 * 5 * 32 * 8
    assert torch.equal(task.layer.weight, before) and task.layer.weight.grad is None
    assert torch.equal(torch.get_rng_state(), rng)


def test_device_peaks_come_from_the_table_by_name():
    cuda = torch.device("cuda")
    assert device_peak_tflops(torch.device("cpu"), "bf16") is None
    assert device_peak_tflops(cuda, "bf16", name="NVIDIA H100 80GB HBM3") == 989.4
    assert device_peak_tflops(cuda, "bf16", name="NVIDIA H100 PCIe") == 756.0
    assert device_peak_tflops(cuda, "bf16", name="NVIDIA A100-SXM4-80GB") == 312.0
    assert device_peak_tflops(cuda, "bf16", name="Some Future GPU") is None


def _rank(rank: int, port: int, out: str, results) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    blocking, original = [], dist.all_reduce

    def counted(tensor, *args, **kwargs):
        if not kwargs.get("async_op"):
            blocking.append(tensor.numel())
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counted
    task = _task()
    batch_of_step = view_batches(_volumes(), task.views, batch_size=2, seed=0, rank=rank, world_size=2)

    def batches(step):
        if rank == 1 and step == 5:  # a preemption signal reaches one rank only, during step 5
            os.kill(os.getpid(), signal.SIGTERM)
        return batch_of_step(step)

    config = TrainConfig(steps=12, batch_size=2, warmup_steps=1, log_every=4, checkpoint_every=0, wrapper="ddp",
                         tensorboard=False, count_flops=False)
    place = Place(rank=rank, local_rank=rank, world_size=2, launcher="torchrun", master_port=port)
    stopped = None
    try:
        train(task, batches, config=config, out_dir=f"{out}/run", progress=False, place=place)
    except Preempted as error:
        stopped = error.step
    results[rank] = {"blocking_all_reduces": len(blocking), "stopped": stopped}
    dist.destroy_process_group()


def test_two_ranks_reduce_losses_only_at_boundaries_and_stop_together_one_step_after_a_signal(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_rank, args=(free_port(), str(tmp_path), results), nprocs=2, join=True)
    # steps 0 and 4 logged, then the vote of step 5 read at step 6: a checkpoint after step 6 (7 steps done)
    assert results[0]["stopped"] == results[1]["stopped"] == 7
    assert results[0]["blocking_all_reduces"] == results[1]["blocking_all_reduces"] == 3  # 2 logs + the stop
    state = torch.load(tmp_path / "run" / "checkpoints" / "latest.pt", weights_only=True)
    assert state["step"] == 7
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_no_host_synchronisation_between_boundaries_on_cuda(tmp_path):
    task = _task()
    volumes = _volumes()
    batch_of_step = view_batches(volumes, task.views, batch_size=4, seed=0)
    config = TrainConfig(steps=24, batch_size=4, warmup_steps=1, log_every=12, checkpoint_every=0, tensorboard=False,
                         count_flops=False)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with pytest.warns(UserWarning) as caught:
            train(task, batch_of_step, config=config, out_dir=tmp_path, progress=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) < 24  # a handful per boundary (3 of them), never one per step
