"""Data stages that feed pretraining and evaluation from a cohort store.

Stages, each small and testable alone: subject list -> read volumes (normalised) -> per-step batch of
indices (seeded epoch shuffles) -> views. A batch is a pure function of (seed, step), so a resumed run
sees exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from rafmedia.engine.errors import UserError
from rafmedia.shards.store import CohortStore


@dataclass
class DataConfig:
    """Where pretraining reads from, and how.

    `source: memory` loads whole volumes into memory once (small cohorts, fastest); `source: stream` streams
    random `patch_size` patches from the store with DataLoader workers (cohorts larger than memory); the task's
    view maker then works inside each volume or patch. Paired tasks read the two channels named in `channels`.
    """

    cohort: str = ""  # path of a cohort store (raf synth / raf shards ingest)
    channel: str = "image"
    channels: list[str] = field(default_factory=list)  # paired tasks: two channels of one subject, e.g. [inhale, exhale]
    source: str = "memory"  # memory | stream
    patch_size: int = 64  # stream: side of the patches read from the store
    patches_per_subject: int = 4  # stream: patches drawn per subject visit
    num_workers: int = 2  # stream: DataLoader workers

    def validate(self) -> None:
        if self.source not in ("memory", "stream"):
            raise UserError(f"data.source must be 'memory' or 'stream', got '{self.source}'")
        if self.channels and len(self.channels) != 2:
            raise UserError(f"data.channels takes two channel names for paired tasks, got {self.channels}")


def normalize_intensity(x_BCDHW: torch.Tensor) -> torch.Tensor:
    """Per-sample z-score over all voxels (MONAI NormalizeIntensity with nonzero=False), float32."""
    x_BCDHW = x_BCDHW.float()
    flat = x_BCDHW.flatten(1)
    shape = (-1,) + (1,) * (x_BCDHW.ndim - 1)
    return (x_BCDHW - flat.mean(dim=1).view(shape)) / flat.std(dim=1).clamp(min=1e-6).view(shape)


def load_volumes(store: CohortStore, subject_ids: list[str], *, channel: str = "image", normalize: bool = True,
                 progress: bool = True, desc: str = "load volumes") -> torch.Tensor:
    """Reads whole volumes into one (N, 1, D, H, W) float32 tensor, z-scored per volume if `normalize`."""
    from tqdm.auto import tqdm

    volumes = [torch.from_numpy(np.asarray(store.read(subject, channel), dtype=np.float32))
               for subject in tqdm(subject_ids, desc=desc, unit="subject", disable=not progress)]
    volumes_NCDHW = torch.stack(volumes).unsqueeze(1)
    return normalize_intensity(volumes_NCDHW) if normalize else volumes_NCDHW


class EpochShuffledBatches:
    """Batch `step` takes the next `batch_size` items of a permutation reshuffled every epoch.

    The permutation of epoch e is drawn from a generator seeded with (seed, e), so any step's indices can be
    recomputed without replaying the run.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int):
        if batch_size > num_items:
            raise ValueError(f"batch size {batch_size} is larger than the {num_items} subjects available")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.batches_per_epoch = num_items // batch_size  # the incomplete last batch of each epoch is dropped

    def epoch_permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_items, generator=generator)

    def indices(self, step: int) -> torch.Tensor:
        epoch, position = divmod(step, self.batches_per_epoch)
        start = position * self.batch_size
        return self.epoch_permutation(epoch)[start:start + self.batch_size]


def view_batches(volumes_NCDHW: torch.Tensor, views: Callable, *, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1) -> Callable[[int], dict[str, torch.Tensor]]:
    """Returns `batch(step)`: the views of rank `rank`'s share of that step's volumes.

    The step's global batch is `batch_size * world_size` items of the epoch permutation; rank r takes the r-th
    `batch_size` of them and draws its views from a generator seeded by (seed, step, rank).
    """
    from rafmedia.engine.batches import view_generator

    sampler = EpochShuffledBatches(len(volumes_NCDHW), batch_size * world_size, seed)

    def batch(step: int) -> dict[str, torch.Tensor]:
        indices = sampler.indices(step)[rank * batch_size:(rank + 1) * batch_size]
        return views(volumes_NCDHW[indices], view_generator(seed, step, rank))

    return batch
