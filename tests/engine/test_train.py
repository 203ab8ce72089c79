"""The loop: exact resume after a kill, NaN handling, schedule values, EMA, precision, wrappers, profiling."""
import json
import os

import pytest
import torch

from rafmedia.core.errors import UserError
from rafmedia.engine.batches import view_batches
from rafmedia.engine.encoders import create_encoder
from rafmedia.engine.tasks import create_task
from rafmedia.engine.train import TrainConfig, train, warmup_cosine


def _task_and_batches(volumes, seed=0):
    torch.manual_seed(seed)
    task = create_task("contrastive_two_crop", encoder=create_encoder("cnn3d_small", width=8), crop_size=16,
                       max_shift=4)
    return task, view_batches(volumes, task.views, batch_size=6, seed=seed)


@pytest.fixture(scope="module")
def volumes():
    generator = torch.Generator().manual_seed(0)
    return torch.randn((12, 1, 24, 24, 24), generator=generator)


def test_resume_reproduces_the_uninterrupted_loss_sequence_bitwise(volumes, tmp_path):
    config = TrainConfig(steps=8, batch_size=6, warmup_steps=2, checkpoint_every=4, log_every=1)
    task, batches = _task_and_batches(volumes)
    straight = train(task, batches, config=config, out_dir=tmp_path / "straight", progress=False).losses

    # Interrupted run: dies between the step-4 checkpoint and step 5, like a kill -9.
    class Killed(Exception):
        pass

    task, batches = _task_and_batches(volumes)

    def dying_batches(step):
        if step == 5:
            raise Killed
        return batches(step)

    with pytest.raises(Killed):
        train(task, dying_batches, config=config, out_dir=tmp_path / "resumed", progress=False)
    # A restart builds everything anew (with a different init): the state must come from the checkpoint.
    task, _ = _task_and_batches(volumes, seed=123)
    rest = train(task, batches, config=config, out_dir=tmp_path / "resumed", progress=False).losses
    assert len(rest) == 4
    assert rest == straight[4:]


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(volumes, tmp_path):
    config = TrainConfig(steps=6, batch_size=6, warmup_steps=1, checkpoint_every=2)
    task, batches = _task_and_batches(volumes)

    def poisoned(step):
        batch = batches(step)
        if step == 3:
            batch = {key: value * float("nan") for key, value in batch.items()}
        return batch

    with pytest.raises(UserError, match="loss became nan at step 3"):
        train(task, poisoned, config=config, out_dir=tmp_path, progress=False)
    state = torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=True)
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_warmup_cosine_schedule_values():
    assert warmup_cosine(0, warmup_steps=4, total_steps=12) == 0.25
    assert warmup_cosine(3, warmup_steps=4, total_steps=12) == 1.0
    assert warmup_cosine(4, warmup_steps=4, total_steps=12) == 1.0
    assert abs(warmup_cosine(8, warmup_steps=4, total_steps=12) - 0.5) < 1e-12
    assert warmup_cosine(12, warmup_steps=4, total_steps=12) == 0.0


def _rotation_task(seed=0):
    """BatchNorm-free, so one sample's loss does not depend on the others in its batch."""
    torch.manual_seed(seed)
    encoder = create_encoder("cnn3d_small", width=4, num_stages=2, norm="group")
    return create_task("rotation", encoder=encoder, crop_size=12, hidden_dim=16, head_norm="layer")


def test_gradient_accumulation_equals_one_batch_of_the_combined_size(volumes, tmp_path):
    from rafmedia.engine.batches import view_batches

    task = _rotation_task()
    halves = view_batches(volumes, task.views, batch_size=3, seed=0)
    accumulated = train(task, halves, config=TrainConfig(steps=3, batch_size=3, grad_accum_steps=2, warmup_steps=1,
                                                         lr=1e-2, tensorboard=False, checkpoint_every=0),
                        out_dir=tmp_path / "accumulated", progress=False)
    whole = _rotation_task()

    def combined(step):  # micro-batches 2s and 2s+1 of the accumulated run, as one batch
        parts = [halves(2 * step), halves(2 * step + 1)]
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}

    one = train(whole, combined, config=TrainConfig(steps=3, batch_size=6, warmup_steps=1, lr=1e-2, tensorboard=False,
                                                    checkpoint_every=0), out_dir=tmp_path / "one", progress=False)
    assert accumulated.losses == pytest.approx(one.losses, abs=1e-5)
    for (key, a), b in zip(task.state_dict().items(), whole.state_dict().values()):
        assert (a - b).abs().max() < 2e-2 and ((a - b).abs() > 1e-5).float().mean() < 0.01, key


def test_ema_follows_the_hand_computed_average_of_the_weights_after_each_step(volumes, tmp_path):
    from rafmedia.engine.batches import view_batches

    task = _rotation_task()
    seen = []
    task.on_step_end = lambda step, total: seen.append({k: v.clone() for k, v in task.encoder.state_dict().items()})
    decay = 0.7
    result = train(task, view_batches(volumes, task.views, batch_size=4, seed=0), out_dir=tmp_path, progress=False,
                   config=TrainConfig(steps=4, batch_size=4, warmup_steps=1, ema_decay=decay, tensorboard=False))
    expected = {key: value.float() for key, value in seen[0].items()}  # the first update copies the weights
    for weights in seen[1:]:
        expected = {key: decay * expected[key] + (1 - decay) * weights[key].float() for key in expected}
    for key, value in result.ema.state_dict().items():
        if key in expected and value.is_floating_point():
            torch.testing.assert_close(value, expected[key], rtol=1e-6, atol=1e-7)
    assert not torch.equal(result.ema.state_dict()["features.0.0.weight"], seen[-1]["features.0.0.weight"])


def test_tensorboard_holds_the_same_scalars_as_metrics_jsonl(volumes, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    task, batches = _task_and_batches(volumes)
    train(task, batches, config=TrainConfig(steps=5, batch_size=6, warmup_steps=1, log_every=2), out_dir=tmp_path,
          progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    logged = [(event.step, event.value) for event in events.Scalars("train/loss")]
    assert [r["step"] for r in records] == [0, 2, 4]
    assert logged == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in records]
    assert {"train/lr", "train/grad_norm", "train/pair_accuracy"} <= set(events.Tags()["scalars"])


def test_bf16_autocast_trains_on_cpu_close_to_fp32(volumes, tmp_path):
    from rafmedia.engine.batches import view_batches

    runs = {}
    for precision in ("fp32", "bf16"):
        task = _rotation_task()
        runs[precision] = train(task, view_batches(volumes, task.views, batch_size=4, seed=0), progress=False,
                                out_dir=tmp_path / precision, config=TrainConfig(
                                    steps=2, batch_size=4, lr=5e-4, warmup_steps=1, precision=precision,
                                    tensorboard=False))
    bf16, fp32 = runs["bf16"].losses, runs["fp32"].losses
    assert bf16[0] != fp32[0]  # bf16 did run in bf16
    # The first step sees the same weights: only bf16 rounding (8-bit mantissa, 0.4% per op) separates the losses.
    # Later steps may drift further: Adam's first update is about lr * sign(grad), and bf16 flips some signs.
    assert bf16[0] == pytest.approx(fp32[0], rel=0.02)
    assert bf16[1] == pytest.approx(fp32[1], rel=0.1)


def test_resuming_with_another_number_of_ranks_is_refused(volumes, tmp_path):
    task, batches = _task_and_batches(volumes)
    config = TrainConfig(steps=2, batch_size=6, warmup_steps=1, tensorboard=False)
    train(task, batches, config=config, out_dir=tmp_path, progress=False)
    path = tmp_path / "checkpoints" / "latest.pt"
    state = torch.load(path, weights_only=True)
    torch.save({**state, "world_size": 2}, path)
    config.steps = 4
    with pytest.raises(UserError, match="written by 2 ranks, this run has 1; resume with the same number"):
        train(task, batches, config=config, out_dir=tmp_path, progress=False)


def test_a_half_set_launcher_environment_names_what_is_missing():
    from rafmedia.engine.distributed import place_from_environment

    assert place_from_environment({}).world_size == 1
    place = place_from_environment({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h",
                                    "MASTER_PORT": "1"})
    assert (place.rank, place.local_rank, place.world_size) == (1, 1, 2)
    with pytest.raises(UserError, match="RANK, WORLD_SIZE given but MASTER_ADDR, MASTER_PORT missing"):
        place_from_environment({"RANK": "0", "WORLD_SIZE": "2"})


def test_deepspeed_in_one_process_follows_the_plain_pytorch_losses(volumes, tmp_path):
    from rafmedia.engine.batches import view_batches

    runs = {}
    for wrapper in ("plain", "deepspeed"):
        task = _rotation_task()
        runs[wrapper] = train(task, view_batches(volumes, task.views, batch_size=4, seed=0), progress=False,
                              out_dir=tmp_path / wrapper, config=TrainConfig(
                                  steps=3, batch_size=4, warmup_steps=1, wrapper=wrapper, zero_stage=2,
                                  checkpoint_every=2, tensorboard=False))
    assert runs["deepspeed"].losses == pytest.approx(runs["plain"].losses, abs=1e-5)
    assert (tmp_path / "deepspeed" / "checkpoints" / "latest_deepspeed.txt").read_text().strip() == "step00000003"
    saved = [p.name for p in (tmp_path / "deepspeed" / "checkpoints" / "deepspeed").iterdir() if p.is_dir()]
    assert saved == ["step00000003"]  # the step-2 checkpoint was removed once step 3's was complete


def test_one_process_deepspeed_leaves_the_process_as_it_found_it(volumes, tmp_path, monkeypatch):
    """DeepSpeed needs a process group even for one process; ours lasts for the run only, so that a later
    launcher (mpirun, a stream reading torchrun's variables) never sees a half-set environment."""
    import torch.distributed as dist

    from rafmedia.engine.batches import view_batches

    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    task = _rotation_task()
    train(task, view_batches(volumes, task.views, batch_size=2, seed=0), progress=False, out_dir=tmp_path,
          config=TrainConfig(steps=1, batch_size=2, warmup_steps=0, wrapper="deepspeed", tensorboard=False))
    assert not dist.is_initialized()
    variables = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    assert [key for key in variables if key in os.environ] == []
    # and a second run in the same process starts DeepSpeed again
    resumed = train(task, view_batches(volumes, task.views, batch_size=2, seed=0), progress=False, out_dir=tmp_path,
                    config=TrainConfig(steps=2, batch_size=2, warmup_steps=0, wrapper="deepspeed", tensorboard=False))
    assert len(resumed.losses) == 1 and not dist.is_initialized()


def test_profiling_writes_a_trace_of_the_requested_steps_only(volumes, tmp_path):
    from rafmedia.engine.batches import view_batches

    task = _rotation_task()
    train(task, view_batches(volumes, task.views, batch_size=2, seed=0), progress=False, out_dir=tmp_path,
          config=TrainConfig(steps=6, batch_size=2, warmup_steps=0, tensorboard=False, profile_steps=2,
                             profile_start=3))
    traces = list((tmp_path / "profile").glob("rank0*.pt.trace.json"))
    assert len(traces) == 1
    events = json.loads(traces[0].read_text())["traceEvents"]
    steps = sorted({event["name"] for event in events if event.get("name", "").startswith("ProfilerStep#")})
    assert steps == ["ProfilerStep#3", "ProfilerStep#4"]  # the 4th and 5th steps of the run, counted from 0
    assert any(event.get("name") == "aten::convolution" for event in events)  # the encoder's forward is in it


def test_bf16_on_cpu_gives_the_fp32_weight_gradient_of_a_conv3d_on_a_2x2x2_map():
    """oneDNN's bf16 conv3d backward returns garbage on such maps (a different value at each call, sometimes inf):
    the wrapper runs CPU half precision on PyTorch's own kernels (`wrappers.cpu_half_precision_kernels`)."""
    from torch import nn

    from rafmedia.engine.distributed import Place
    from rafmedia.engine.wrappers import create_wrapper

    class ConvTask(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv3d(16, 16, 3, padding=1, bias=False)

        def forward(self, batch):
            return {"loss": self.conv(batch["x"]).float().square().mean()}

    torch.manual_seed(0)
    task, batch = ConvTask(), {"x": torch.randn(4, 16, 2, 2, 2)}
    task(batch)["loss"].backward()
    reference = task.conv.weight.grad.clone()
    optimizer = torch.optim.SGD(task.parameters(), lr=0.0)
    wrapper = create_wrapper("plain", task=task, optimizer=optimizer, place=Place(), device=torch.device("cpu"),
                             scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
                             config=TrainConfig(precision="bf16"))
    for _ in range(10):
        task.zero_grad()
        wrapper.micro_step(batch, boundary=True)
        # bf16 inputs and weights (8-bit mantissa) over 432-term sums: within 2% of the largest fp32 gradient
        torch.testing.assert_close(task.conv.weight.grad, reference, rtol=0, atol=0.02 * float(reference.abs().max()))
