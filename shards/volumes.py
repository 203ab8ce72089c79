"""Whole volumes of a cohort store: read once into one (N, C, D, H, W) tensor, z-scored per volume (`load_volumes`,
the in-memory data stage of pretraining, `data.source: memory`), or streamed in batches of subjects read by
DataLoader workers (`StoreVolumes`, the evaluator's reads: its memory does not grow with the cohort). Pretraining on
cohorts larger than memory streams patches instead (`rafmedia.shards.streaming`).
"""
from __future__ import annotations

import time
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from rafmedia.core.errors import UserError
from rafmedia.core.profiling import StageClock
from rafmedia.shards.store import CohortStore


def normalize_intensity(x_BCDHW: torch.Tensor) -> torch.Tensor:
    """Per-sample z-score over all voxels (MONAI NormalizeIntensity with nonzero=False), float32."""
    x_BCDHW = x_BCDHW.float()
    flat = x_BCDHW.flatten(1)
    shape = (-1,) + (1,) * (x_BCDHW.ndim - 1)
    return (x_BCDHW - flat.mean(dim=1).view(shape)) / flat.std(dim=1).clamp(min=1e-6).view(shape)


def load_volumes(store: CohortStore, subject_ids: list[str], *, channel: str = "image", normalize: bool = True,
                 progress: bool = True, desc: str = "load volumes") -> torch.Tensor:
    """Reads whole volumes into one (N, 1, D, H, W) float32 tensor, z-scored per volume if `normalize`."""
    volumes = [torch.from_numpy(np.asarray(store.read(subject, channel), dtype=np.float32))
               for subject in tqdm(subject_ids, desc=desc, unit="subject", disable=not progress)]
    volumes_NCDHW = torch.stack(volumes).unsqueeze(1)
    return normalize_intensity(volumes_NCDHW) if normalize else volumes_NCDHW


# ---- streamed subjects -----------------------------------------------------------------------------------------------
class SubjectDataset(torch.utils.data.Dataset):
    """Item k: (k, the (1, D, H, W) volume of `subject_ids[k]`'s channel), read from the store when asked.

    Picklable into DataLoader workers (only the path and the ids travel). A fresh `CohortStore` per read, because a
    store object keeps every array it opened and so would grow with the cohort.
    """

    def __init__(self, store_path: str | Path, subject_ids: Sequence[str], *, channel: str = "image",
                 dtype: np.dtype | type = np.float32):
        self.store_path, self.subject_ids, self.channel = Path(store_path), list(subject_ids), channel
        self.dtype = np.dtype(dtype)

    def __len__(self) -> int:
        return len(self.subject_ids)

    def __getitem__(self, k: int) -> tuple[int, torch.Tensor]:
        array = np.asarray(CohortStore(self.store_path).read(self.subject_ids[k], self.channel), dtype=self.dtype)
        return k, torch.from_numpy(array)[None]


class TensorVolumes:
    """Volumes already in memory (N, C, D, H, W), behind the same `batches` interface as `StoreVolumes`."""

    def __init__(self, volumes_NCDHW: torch.Tensor):
        self.volumes_NCDHW = torch.as_tensor(volumes_NCDHW)

    def __len__(self) -> int:
        return len(self.volumes_NCDHW)

    def batches(self, indices: Sequence[int], batch_size: int, *,
                clock: StageClock | None = None) -> Iterator[tuple[list[int], torch.Tensor]]:
        """(subject indices, volumes (B, C, D, H, W)) of `indices` in chunks of `batch_size`, in order."""
        for chunk in chunked(list(indices), batch_size):
            x_BCDHW = self.volumes_NCDHW[chunk]
            if clock is not None:
                clock.add("read", 0.0, volumes=len(chunk), voxels=x_BCDHW.numel(),
                          bytes=x_BCDHW.numel() * x_BCDHW.element_size())
            yield chunk, x_BCDHW


class StoreVolumes:
    """A channel of a store's subjects, streamed in batches read by DataLoader workers: memory does not grow with
    the cohort.

    `batches(indices, batch_size)` yields (subject indices, volumes (B, 1, D, H, W)) in the order of `indices`; the
    workers read ahead (`num_workers` x 2 batches, torch's default prefetch) while the caller works on the current
    batch; `num_workers=0` reads in the calling process. Counters, over the object's life: `num_read` (volumes
    read), `bytes_read`, and `peak_held`, the largest number of delivered volumes alive at once in the calling
    process (each delivered batch tensor carries a finalizer; volumes still queued in the loader are not counted:
    at most batch_size x num_workers x 2 more).

    Args:
        store_path: the cohort store.
        subject_ids: the subjects, indexed 0..N-1 by the `indices` given to `batches`.
        channel: "image", "label" or another channel of the store.
        num_workers: DataLoader worker processes (0: read in the calling process).
        dtype: the numpy dtype each volume is read as (float32 for images; the store's integer type for labels).
    """

    def __init__(self, store_path: str | Path, subject_ids: Sequence[str], *, channel: str = "image",
                 num_workers: int = 2, dtype: np.dtype | type = np.float32):
        if num_workers < 0:
            raise UserError(f"num_workers must be >= 0 (0 reads in the main process), got {num_workers}")
        self.dataset = SubjectDataset(store_path, subject_ids, channel=channel, dtype=dtype)
        self.num_workers = num_workers
        self.num_read, self.bytes_read, self.num_held, self.peak_held = 0, 0, 0, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def batches(self, indices: Sequence[int], batch_size: int, *,
                clock: StageClock | None = None) -> Iterator[tuple[list[int], torch.Tensor]]:
        """(subject indices, volumes (B, 1, D, H, W)) of `indices` in chunks of `batch_size`, in order.

        With a `clock`, stage "read" gets the time this process waits for each batch (the reads themselves run in
        the workers, overlapping the caller's work, so this is the part of the read time that is not hidden),
        with the volumes, voxels and bytes delivered.
        """
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        chunks = chunked([int(i) for i in indices], batch_size)
        if not chunks:
            return
        workers = min(self.num_workers, len(chunks))
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=chunks, num_workers=workers)
        iterator = iter(loader)
        while True:
            began = time.perf_counter()
            try:
                k_B, x_BCDHW = next(iterator)
            except StopIteration:
                return
            waited = time.perf_counter() - began
            nbytes = x_BCDHW.numel() * x_BCDHW.element_size()
            if clock is not None:
                clock.add("read", waited, volumes=len(k_B), voxels=x_BCDHW.numel(), bytes=nbytes)
            self._delivered(x_BCDHW, len(k_B), nbytes)
            yield k_B.tolist(), x_BCDHW

    def _delivered(self, x_BCDHW: torch.Tensor, count: int, nbytes: int) -> None:
        self.num_read += count
        self.bytes_read += nbytes
        self.num_held += count
        self.peak_held = max(self.peak_held, self.num_held)
        weakref.finalize(x_BCDHW, self._released, count)

    def _released(self, count: int) -> None:
        self.num_held -= count


VolumeSource = TensorVolumes | StoreVolumes


def as_volume_source(volumes: torch.Tensor | TensorVolumes | StoreVolumes) -> TensorVolumes | StoreVolumes:
    """A tensor (N, C, D, H, W) as `TensorVolumes`; a source as it is."""
    return volumes if isinstance(volumes, (TensorVolumes, StoreVolumes)) else TensorVolumes(volumes)


def chunked(items: list[int], size: int) -> list[list[int]]:
    """`items` in consecutive chunks of `size` (the last one shorter)."""
    return [items[start:start + size] for start in range(0, len(items), size)]
