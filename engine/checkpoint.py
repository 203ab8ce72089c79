"""Checkpoints: periodic, atomic, and resumable.

A checkpoint is written to a temp file and renamed, so a killed run leaves either the previous checkpoint
or the new one, never a truncated file that looks valid. Loading uses `torch.load(weights_only=True)`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rafmedia.engine.files import atomic_write

LATEST = "latest.pt"


class Checkpointer:
    """Saves training state every `every` steps (and at the end) under `folder/latest.pt`."""

    def __init__(self, folder: str | Path, every: int):
        self.folder = Path(folder)
        self.every = every

    def should_save(self, step: int, *, last_step: int) -> bool:
        return step == last_step or (self.every > 0 and step % self.every == 0)

    def save(self, state: dict[str, Any]) -> Path:
        return atomic_write(self.folder / LATEST, lambda tmp: torch.save(state, tmp))

    def load(self) -> dict[str, Any] | None:
        path = self.folder / LATEST
        if not path.is_file():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)
