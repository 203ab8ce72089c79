"""The exceptions the `raf` command turns into exit codes, raised anywhere below it.

- `UserError`: a mistake the user can fix (bad config value, missing file, unknown name): one plain line, exit 2.
- `Preempted`: a run stopped by a signal after saving its checkpoint: exit 128 + the signal, same command resumes.

Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

from pathlib import Path


class UserError(ValueError):
    """A mistake in the user's input. The message names the key, path or value and how to fix it."""


class Preempted(Exception):
    """Training stopped on a signal after saving a checkpoint; running the same command again resumes."""

    def __init__(self, signal_name: str, step: int, checkpoints: Path):
        super().__init__(f"stopped by {signal_name} after step {step}; checkpoint saved in {checkpoints}. "
                         "Run the same command again to resume")
        self.signal_name, self.step = signal_name, step
