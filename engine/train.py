"""The pretraining loop: fetch -> micro-steps (forward, backward) -> optimizer step -> EMA -> log -> checkpoint.

Everything is built in `build_*` functions and the wrapper registry (plain PyTorch, DDP, DeepSpeed); the loop
itself fits on one screen. A checkpoint holds the model, optimizer, scheduler, every rank's RNG state and data
position, and the EMA, so a resumed run continues the uninterrupted run's loss sequence exactly. SIGTERM and
SIGUSR1 (SLURM's preemption and time-limit warnings) save a checkpoint at the end of the current step and stop.
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.profiler import ProfilerActivity, profile, record_function, schedule, tensorboard_trace_handler
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from rafmedia.core.errors import Preempted, UserError
from rafmedia.core.files import atomic_write_text
from rafmedia.engine.accounting import (Footprint, StepClock, batch_voxels, device_peak_tflops, step_flops,
                                        write_footprint)
from rafmedia.engine.batches import as_batch_source
from rafmedia.engine.distributed import (Place, StopVote, device_for, gather_objects, init_distributed,
                                         mean_across_ranks, place_from_environment)
from rafmedia.engine.monitors import EmbeddingMonitor
from rafmedia.engine.wrappers import PRECISIONS, WRAPPERS, create_wrapper
from rafmedia.shards.store import CohortStore

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)  # USR2: submitit's time-limit warning


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping for one pretraining run. `batch_size` is per rank and per micro-step."""

    steps: int = 600
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 30
    grad_clip: float = 3.0
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100  # also on the last step and on SIGTERM / SIGUSR1
    num_threads: int = 0  # torch intra-op threads; 0 keeps torch's default (all cores)
    wrapper: str = "plain"  # plain | ddp | deepspeed  (`raf list wrappers`)
    precision: str = "fp32"  # fp32 | bf16 | fp16
    zero_stage: int = 2  # DeepSpeed ZeRO stage (deepspeed wrapper only)
    deepspeed: dict[str, Any] = field(default_factory=dict)  # extra DeepSpeed config keys, merged on top
    ema_decay: float = 0.0  # > 0 keeps an EMA of the encoder's weights, exported instead of the raw weights
    tensorboard: bool = True  # also log to out_dir/tensorboard (rank 0)
    profile_steps: int = 0  # > 0: torch.profiler traces this many steps (after profile_start) to out_dir/profile
    profile_start: int = 5  # steps run (in this call) before the first profiled one
    count_flops: bool | None = None  # count a step's model FLOPs once (TFLOP/s, MFU); None: on CUDA only
    monitor_every: int = 50  # collapse / site-shortcut monitors every N steps and on the last (0: off; monitors.py)
    monitor_subjects: int = 32  # size of the fixed, seeded monitor set read from the cohort store

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 2:
            raise UserError(f"train.steps must be >= 1 and train.batch_size >= 2, got {self.steps} and "
                            f"{self.batch_size}")
        if self.lr <= 0:
            raise UserError(f"train.lr must be positive, got {self.lr}")
        if self.grad_accum_steps < 1:
            raise UserError(f"train.grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        WRAPPERS.get(self.wrapper)  # an unknown name is a UserError with the valid ones
        if self.precision not in PRECISIONS:
            raise UserError(f"train.precision must be one of {', '.join(PRECISIONS)}, got '{self.precision}'")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f"train.ema_decay must be in [0, 1) (0 turns the EMA off), got {self.ema_decay}")
        if self.profile_steps < 0 or self.profile_start < 1:
            raise UserError(f"train.profile_steps must be >= 0 and train.profile_start >= 1, got "
                            f"{self.profile_steps} and {self.profile_start}")
        if self.monitor_every < 0 or self.monitor_subjects < 4:
            raise UserError(f"train.monitor_every must be >= 0 (0 turns the monitors off) and train.monitor_subjects "
                            f">= 4, got {self.monitor_every} and {self.monitor_subjects}")

    def monitor_due(self, step: int, last: bool) -> bool:
        """Whether the monitors run after `step` (the same answer on every rank: it decides a collective)."""
        return self.monitor_every > 0 and (step % self.monitor_every == 0 or last)


@dataclass
class TrainResult:
    losses: list[float]  # the loss of every step run in this call (mean over ranks and micro-batches)
    last_step: int
    ema: nn.Module | None = None  # the EMA of the encoder, when train.ema_decay > 0


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; biases and normalisation weights (1-D parameters) get no weight decay."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps=config.warmup_steps, total_steps=config.steps))


def build_profiler(config: TrainConfig, out_dir: Path, place: Place):
    """torch.profiler over `profile_steps` steps, one Chrome trace per rank in out_dir/profile (TensorBoard's
    profiler plugin or https://ui.perfetto.dev open it); a no-op context when profiling is off."""
    if config.profile_steps <= 0:
        return contextlib.nullcontext(None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    return profile(activities=activities, record_shapes=True, with_flops=True,
                   schedule=schedule(wait=config.profile_start - 1, warmup=1, active=config.profile_steps, repeat=1),
                   on_trace_ready=tensorboard_trace_handler(str(out_dir / "profile"), worker_name=f"rank{place.rank}"))


def build_ema(task: nn.Module, config: TrainConfig) -> AveragedModel | None:
    """An exponential moving average of the encoder's weights and buffers (torch's AveragedModel)."""
    if config.ema_decay <= 0:
        return None
    return AveragedModel(task.encoder, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)


class MetricLogger:
    """Rank 0 appends one JSON object per logged step to `metrics.jsonl`, and the same scalars to TensorBoard."""

    def __init__(self, out_dir: Path, *, enabled: bool, tensorboard: bool):
        self.path, self.enabled, self.writer = out_dir / "metrics.jsonl", enabled, None
        if enabled and tensorboard:
            self.writer = SummaryWriter(str(out_dir / "tensorboard"))

    def drop_from(self, step: int) -> None:
        """On resume, forgets records of steps the checkpoint does not cover (they will be logged again)."""
        if self.enabled and self.path.is_file():
            lines = self.path.read_text(encoding="utf-8").splitlines()
            kept = [line for line in lines if line.strip() and json.loads(line)["step"] < step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, dict):  # the monitor's record: monitor/rankme, monitor/site_leakage, ...
                    for name, scalar in value.items():
                        self.writer.add_scalar(f"{key}/{name}", float(scalar), record["step"])
                elif key != "step":
                    self.writer.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class StopRequest:
    """Remembers a SIGTERM / SIGUSR1 until the loop reaches the end of a step (handlers restored on exit)."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value
            for key, value in batch.items()}


def _as_float(value: Any) -> float:
    return float(value.detach()) if torch.is_tensor(value) else float(value)


def train(task: nn.Module, batches, *, config: TrainConfig, out_dir: Path, progress: bool = True,
          place: Place | None = None, store: str | Path | None = None,
          footprint: Footprint | None = None, monitor: EmbeddingMonitor | None = None) -> TrainResult:
    """Runs (or resumes) pretraining of `task` and returns the losses of the steps run in this call.

    `batches` is a batch source (`rafmedia.engine.batches`) or a pure function of the micro-step. Under torchrun
    or the deepspeed launcher every rank calls this with its own source (its share of the data). `store`, the
    cohort store read, puts its size against its sources' into the run's footprint.json; `footprint`, made before
    the data was loaded, counts the load too (default: from this call on). `monitor` (rank 0's; None elsewhere or
    when off) measures `task.encoder` on the steps `config.monitor_due` names, logged under "monitor".
    """
    config.validate()
    if config.num_threads > 0:
        torch.set_num_threads(config.num_threads)
    place = place or place_from_environment()
    init_distributed(place)
    device = device_for(place)
    torch.manual_seed(config.seed)
    task.to(device)
    optimizer = build_optimizer(task, config)
    scheduler = build_scheduler(optimizer, config)
    wrapper = create_wrapper(config.wrapper, task=task, optimizer=optimizer, scheduler=scheduler, config=config,
                             place=place, device=device)
    try:
        return _run(task, wrapper, batches, config, Path(out_dir), progress, place, device, store,
                    footprint or Footprint(), monitor)
    finally:
        wrapper.close()


class LossBuffer:
    """This rank's loss of each step, kept on the device until a boundary (logging, checkpoint, stop, the end)
    reduces them across ranks in one all-reduce and checks them: no per-step host synchronisation.

    A non-finite mean stops the run before any checkpoint could save the weights it produced."""

    def __init__(self, checkpoints: Path, config: TrainConfig):
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.losses: list[float] = []
        self.checkpoints, self.config = checkpoints, config

    def add(self, step: int, outputs: list[dict[str, Any]]) -> None:
        self.pending.append((step, torch.stack([o["loss"].detach() for o in outputs]).double().mean()))

    def settle(self) -> None:
        if not self.pending:
            return
        steps = [step for step, _ in self.pending]
        values = mean_across_ranks(torch.stack([loss for _, loss in self.pending])).tolist()
        self.pending.clear()
        for step, value in zip(steps, values):
            if not math.isfinite(value):
                raise UserError(f"loss became {value} at step {step}; stopped. The last good checkpoint is kept in "
                                f"{self.checkpoints}: lower train.lr (now {self.config.lr}) or raise "
                                "train.warmup_steps and resume")
        self.losses.extend(values)


def _run(task, wrapper, batches, config: TrainConfig, out_dir: Path, progress: bool, place: Place,
         device: torch.device, store, footprint: Footprint, monitor: EmbeddingMonitor | None) -> TrainResult:
    ema = build_ema(task, config)
    source = as_batch_source(batches)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoints = out_dir / "checkpoints"
    logger = MetricLogger(out_dir, enabled=place.is_main, tensorboard=config.tensorboard)
    start = resume(wrapper, checkpoints, source, ema, place)
    logger.drop_from(start)
    clock, losses = StepClock(device), LossBuffer(checkpoints, config)
    flops, peak = None, device_peak_tflops(device, config.precision)
    store_footprint = CohortStore(store).footprint() if store and place.is_main else None  # one walk per call
    # ZeRO-3 partitions the weights: a copy of the task has none to count with
    count_flops = (device.type == "cuda" if config.count_flops is None else config.count_flops) and not (
        config.wrapper == "deepspeed" and config.zero_stage == 3)

    def save(step: int) -> None:
        ranks = gather_objects({"torch_rng": torch.get_rng_state(), "data": source.state_dict()})
        wrapper.save(checkpoints, {"step": step, "world_size": place.world_size, "ranks": ranks,
                                   "ema": ema.state_dict() if ema is not None else None})
        used = gather_objects(footprint.measure())
        if place.is_main:
            write_footprint(out_dir, used, device=device, steps=step - start, store=store_footprint)

    task.train()
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="pretrain", unit="step",
               disable=not (progress and place.is_main))
    with StopRequest() as stop, build_profiler(config, out_dir, place) as profiler, closing(StopVote()) as vote:
        for step in bar:
            outputs = []
            for micro in range(config.grad_accum_steps):
                with clock.data(), record_function("data"):
                    batch = to_device(source.next(), device)
                with clock.compute(), record_function("forward_backward"):
                    outputs.append(wrapper.micro_step(batch, boundary=micro == config.grad_accum_steps - 1))
            with clock.compute(), record_function("optimizer"):
                grad_norm = wrapper.optimizer_step()
                if hasattr(task, "on_step_end"):
                    task.on_step_end(step, config.steps)
                if ema is not None:
                    ema.update_parameters(task.encoder)
            losses.add(step, outputs)
            clock.step_done(batch_voxels(batch) * config.grad_accum_steps)
            if flops is None and count_flops:
                flops = step_flops(task, batch, dtype=wrapper.dtype, micro_steps=config.grad_accum_steps)
            stopping = vote.vote(stop.signal_name is not None)
            last = step + 1 == config.steps
            monitor_due = config.monitor_due(step, last)
            log_due = step % config.log_every == 0 or last or monitor_due
            checkpoint_due = config.checkpoint_every > 0 and (step + 1) % config.checkpoint_every == 0
            if log_due or checkpoint_due or stopping or last:
                losses.settle()
            if log_due:
                logs = {key: round(sum(_as_float(o[key]) for o in outputs) / len(outputs), 6) for key in outputs[0]}
                timing = clock.record(samples_per_step=config.batch_size * config.grad_accum_steps,
                                      flops_per_step=flops, peak_tflops=peak)
                if monitor_due and monitor is not None and place.is_main:
                    with clock.outside():  # the monitors' time is no step's: rates and MFU stay the loop's
                        logs["monitor"] = monitor.measure(task.encoder, step)
                logger.log({"step": step, **logs, "loss": losses.losses[-1], "lr": wrapper.lr(),
                            "grad_norm": _as_float(grad_norm), **timing})
                bar.set_postfix(loss=f"{losses.losses[-1]:.3f}")
            if profiler is not None:
                profiler.step()
            if stopping or last or checkpoint_due:
                save(step + 1)
            if stopping:
                logger.close()
                raise Preempted(stop.signal_name or "a signal on another rank", step + 1, checkpoints)
    logger.close()
    return TrainResult(losses=losses.losses, last_step=config.steps, ema=ema.module if ema is not None else None)


def resume(wrapper, checkpoints: Path, source, ema, place: Place) -> int:
    """Loads the latest checkpoint into the wrapper, data source, RNG and EMA; returns the step to start at."""
    state = wrapper.load(checkpoints)
    if state is None:
        return 0
    if state["world_size"] != place.world_size:
        raise UserError(f"the checkpoint in {checkpoints} was written by {state['world_size']} ranks, this run has "
                        f"{place.world_size}; resume with the same number of processes (or start a new --out)")
    mine = state["ranks"][place.rank]
    torch.set_rng_state(mine["torch_rng"])
    source.load_state_dict(mine["data"])
    if ema is not None:
        if state.get("ema") is None:
            raise UserError(f"the checkpoint in {checkpoints} has no EMA but train.ema_decay > 0; resume with the "
                            "ema_decay the run started with")
        ema.load_state_dict(state["ema"])
    return int(state["step"])
