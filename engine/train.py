"""The pretraining loop: fetch -> task -> backward -> step -> log, with checkpoint and resume.

Everything is built in `build_*` functions; the loop itself fits on one screen.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from rafmedia.engine.checkpoint import Checkpointer
from rafmedia.engine.errors import UserError
from rafmedia.engine.files import atomic_write_text


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping for one pretraining run."""

    steps: int = 600
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 30
    grad_clip: float = 3.0
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    num_threads: int = 0  # torch intra-op threads; 0 keeps torch's default (all cores)

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 2:
            raise UserError(f"train.steps must be >= 1 and train.batch_size >= 2, got {self.steps} and {self.batch_size}")
        if self.lr <= 0:
            raise UserError(f"train.lr must be positive, got {self.lr}")


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


class JsonlLogger:
    """Appends one JSON object per logged step to `metrics.jsonl`."""

    def __init__(self, path: Path):
        self.path = path

    def drop_from(self, step: int) -> None:
        """On resume, forgets records of steps the checkpoint does not cover (they will be logged again)."""
        if self.path.is_file():
            lines = self.path.read_text(encoding="utf-8").splitlines()
            kept = [line for line in lines if line.strip() and json.loads(line)["step"] < step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def log(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def _as_float(value: Any) -> float:
    return float(value.detach()) if torch.is_tensor(value) else float(value)


def train(task: nn.Module, batches: Callable[[int], dict[str, torch.Tensor]], *, config: TrainConfig,
          out_dir: Path, progress: bool = True) -> list[float]:
    """Runs (or resumes) pretraining of `task` and returns the loss of every step run in this call.

    `batches(step)` gives the batch of a step; it must be a pure function of the step for exact resume.
    """
    from tqdm.auto import tqdm

    config.validate()
    if config.num_threads > 0:
        torch.set_num_threads(config.num_threads)
    torch.manual_seed(config.seed)
    optimizer = build_optimizer(task, config)
    scheduler = build_scheduler(optimizer, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpointer = Checkpointer(out_dir / "checkpoints", config.checkpoint_every)
    logger = JsonlLogger(out_dir / "metrics.jsonl")
    start = _resume(checkpointer, task, optimizer, scheduler)
    logger.drop_from(start)

    task.train()
    losses = []
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="pretrain", unit="step", disable=not progress)
    for step in bar:
        began = time.perf_counter()
        outputs = task(batches(step))
        loss = outputs["loss"]
        if not torch.isfinite(loss):
            raise UserError(f"loss became {loss.item()} at step {step}; stopped. The last good checkpoint is kept in "
                            f"{checkpointer.folder}: lower train.lr (now {config.lr}) or raise train.warmup_steps and resume")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(task.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % config.log_every == 0 or step == config.steps - 1:
            logs = {key: round(_as_float(value), 6) for key, value in outputs.items()}
            logger.log({"step": step, **logs, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                        "step_seconds": round(time.perf_counter() - began, 4)})
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if checkpointer.should_save(step + 1, last_step=config.steps):
            checkpointer.save({"step": step + 1, "model": task.state_dict(), "optimizer": optimizer.state_dict(),
                               "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state()})
    return losses


def _resume(checkpointer: Checkpointer, task: nn.Module, optimizer, scheduler) -> int:
    state = checkpointer.load()
    if state is None:
        return 0
    task.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"])
