"""Pretext tasks behind one registry. A task is an `nn.Module` that owns its heads and loss:

- `task.views`: the view maker the data pipeline must run (a picklable callable);
- `task(batch)` returns `{"loss": scalar tensor, **logs}` where logs are floats or 0-d tensors;
- `task.encoder`: the encoder being trained (what gets exported);
- optionally `task.exported_encoder()`: the module `raf pretrain` exports instead of `task.encoder` (DINO's teacher);
- optionally `task.on_step_end(step, total_steps)`: called by the trainer after each optimizer step (DINO's
  teacher EMA, for instance). State a task keeps must live in parameters or buffers, so checkpoints carry it.

A task is registered with tags the config validation reads without building anything:
- `encoder_families`: the encoder families it works with (`ENCODERS.tags(name)["family"]`), None for any;
- `data`: what the data pipeline feeds its view maker: "image" (the image channel(s), default), "label"
  (the label map, as float class indices), or "paired" (two channels of one subject, `data.channels`);
- `options_from`: the view maker class a factory passes its `**view_options` to; its settings are then task
  options too (`task.options.noise_std=...`), and any other name is refused with the valid ones listed.

The trainer never names a task; it builds one with `create_task(name, encoder=..., **options)`. Each module of
the `rafmedia.engine.tasks` package registers its tasks when the package imports it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from rafmedia.core.errors import UserError
from rafmedia.core.registry import Registry, unknown_name_error
from rafmedia.engine.encoders import ENCODERS

TASKS: Registry[nn.Module] = Registry("pretext task")


def create_task(name: str, *, encoder: nn.Module, **options) -> nn.Module:
    """Builds a registered pretext task around `encoder`."""
    return TASKS.create(name, encoder=encoder, **options)


def list_tasks() -> list[str]:
    return TASKS.names()


def task_data_kind(name: str) -> str:
    """What the task's view maker is fed: "image", "label" or "paired" (see the module docstring)."""
    return TASKS.tags(name).get("data", "image")


def check_compatible(task_name: str, encoder_name: str) -> None:
    """Refuses a task/encoder pair that cannot train (MAE without a ViT), before anything is built."""
    families = TASKS.tags(task_name).get("encoder_families")
    family = ENCODERS.tags(encoder_name).get("family")
    if families is not None and family not in families:
        fitting = [name for name in ENCODERS.names() if ENCODERS.tags(name).get("family") in families]
        raise UserError(f"task '{task_name}' needs an encoder of family {' or '.join(families)}, but encoder "
                        f"'{encoder_name}' is a {family}; set encoder.name to one of: {', '.join(fitting)}")


# Normalisation in a task's MLP head. "batch" helps small CNNs learn (see TwoCropContrastive); "layer" and "none" make
# each sample's loss independent of the rest of the batch (what DDP equivalence tests and tiny batches need).
HEAD_NORMS = {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm, "none": lambda features: nn.Identity()}


def mlp_head(in_dim: int, hidden_dim: int, out_dim: int, norm: str = "batch") -> nn.Sequential:
    """A task's projection or classification head: Linear -> `HEAD_NORMS[norm]` -> ReLU -> Linear."""
    if norm not in HEAD_NORMS:
        raise unknown_name_error("head norm", norm, HEAD_NORMS)
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), HEAD_NORMS[norm](hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim))


@dataclass
class TaskConfig:
    """Which registered pretext task to train, and its options (passed to its factory)."""

    name: str = "contrastive_two_crop"
    options: dict[str, Any] = field(default_factory=dict)
