"""Patch streams: iterable datasets built from explicit stages, split by rank and worker, resumable.

    keys -> ShuffleKeys(seed, epoch) -> SplitByNode(rank, world) -> SplitByWorker(worker)   (key stages)
         -> open subjects -> plan patches -> extract (into the batch) -> tensors             (PatchStream, Batch)

A *source* lists the units to split (`keys()`: subjects of a zarr cohort store, or tar shards of a webdataset
export) and `open(key)`s them as subject readers (see `rafmedia.shards.sampling`); `ZarrSource` and
`WebDatasetSource` (`rafmedia.shards.sources`) share that interface, so one `PatchStream` reads either and, for
the same seed, draws the same patches from the same subject.

Randomness. The key shuffle of epoch e is drawn from (seed, e), identical on every rank, so the ranks and workers
split one permutation into disjoint parts that together cover the epoch. The patches of a subject visit are drawn
from (seed, e, subject id), so which rank or worker reads a subject does not change its patches, and a stream can
jump over a subject without reading it.

Resuming. `PatchStream.state_dict()` (or `StreamLoader.state_dict()` with DataLoader workers) records how many items
(batches, or patches without `batch_size`) the rank has consumed. A DataLoader hands items out round-robin over its
workers, skipping exhausted ones, so each worker's share of that count follows from it; a resumed stream rotates
the workers' roles so the next item comes from the worker that was due, skips whole subjects (and shards, when the
index gives their sizes) without reading them, and yields exactly what the uninterrupted run would have yielded.

A run with world size > 1 whose key stages have no node splitter would give every rank the same data: that is a
`UserError`, as in webdataset.
"""
from __future__ import annotations

import os
import warnings
import zlib
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, default_collate

from rafmedia.core.errors import UserError
from rafmedia.shards.sampling import PatchSampler, SubjectReader, create_sampler
from rafmedia.shards.sources import open_source

STATE_FORMAT = "rafmedia.stream-state/1"
_SHUFFLE, _PATCHES = 1, 2  # purposes mixed into the seeds, so the key shuffle and the patch draws never share a stream


# ---- key stages ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class StreamContext:
    """Who is iterating: the epoch, the rank among `world_size`, the worker among `num_workers`."""

    seed: int = 0
    epoch: int = 0
    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1


class ShuffleKeys:
    """Permutes the keys with a generator seeded from (seed, epoch): the same permutation on every rank and worker."""

    def __call__(self, keys: Sequence[str], context: StreamContext) -> list[str]:
        keys = list(keys)
        order = np.random.default_rng([context.seed, context.epoch, _SHUFFLE]).permutation(len(keys))
        return [keys[i] for i in order]


class SplitByNode:
    """Keeps every `world_size`-th key starting at `rank`: the ranks' parts are disjoint and cover the keys."""

    splits = "node"

    def __call__(self, keys: Sequence[str], context: StreamContext) -> list[str]:
        return list(keys)[context.rank::context.world_size]


class SplitByWorker:
    """Keeps every `num_workers`-th key starting at the DataLoader worker's index."""

    splits = "worker"

    def __call__(self, keys: Sequence[str], context: StreamContext) -> list[str]:
        return list(keys)[context.worker::context.num_workers]


DEFAULT_KEY_STAGES = (ShuffleKeys(), SplitByNode(), SplitByWorker())


# ---- item stages ---------------------------------------------------------------------------------
def to_tensors(patch: dict[str, Any]) -> dict[str, Any]:
    """numpy arrays -> torch tensors sharing their memory; other values (the subject id) pass through."""
    return {key: torch.from_numpy(value if value.flags.c_contiguous else value.copy())
            if isinstance(value, np.ndarray) else value for key, value in patch.items()}


def extract(planned: Iterator[tuple[SubjectReader, dict[str, Any]]], sampler: PatchSampler) -> Iterator[dict[str, Any]]:
    """(reader, plan) pairs -> patches as tensors."""
    for reader, plan in planned:
        yield to_tensors(sampler.extract(reader, plan))


class Batch:
    """Extracts runs of `batch_size` planned patches into one batch (tensors stacked, strings listed, as
    DataLoader's default_collate).

    The "image" of each patch is read straight into its slot of the batch tensor, which a DataLoader worker
    allocates in shared memory: no per-patch array, no stacking copy, no copy into shared memory on the way out.
    """

    def __init__(self, batch_size: int, drop_last: bool = False):
        self.batch_size, self.drop_last = batch_size, drop_last

    def __call__(self, planned: Iterator[tuple[SubjectReader, dict[str, Any]]],
                 sampler: PatchSampler) -> Iterator[dict[str, Any]]:
        while True:
            group = list(islice(planned, self.batch_size))
            if not group or (self.drop_last and len(group) < self.batch_size):
                return
            yield self.collate(group, sampler)

    @staticmethod
    def collate(group: list[tuple[SubjectReader, dict[str, Any]]], sampler: PatchSampler) -> dict[str, Any]:
        if not sampler.has_image:
            return default_collate([to_tensors(sampler.extract(reader, plan)) for reader, plan in group])
        channels = len(group[0][0].channels)
        images = _batch_tensor((len(group), channels, *sampler.patch_size))
        slots = images.numpy()
        rest = []
        for slot, (reader, plan) in zip(slots, group):
            if len(reader.channels) != channels:
                raise UserError(f"subject '{reader.subject_id}' has {len(reader.channels)} channels {reader.channels}, "
                                f"the batch has {channels}; choose the source's channels explicitly")
            patch = sampler.extract(reader, plan, out=slot)
            patch.pop("image")
            rest.append(to_tensors(patch))
        return {**default_collate(rest), "image": images}

    def count(self, num_items: int) -> int:
        return num_items // self.batch_size if self.drop_last else -(-num_items // self.batch_size)


def _batch_tensor(shape: tuple[int, ...]) -> torch.Tensor:
    """An empty float32 tensor, in shared memory inside a DataLoader worker (as default_collate allocates)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=torch.float32)
    storage = torch.empty(0)._typed_storage()._new_shared(int(np.prod(shape)), device="cpu")
    return torch.empty(0).new(storage).view(shape)


# ---- rank, resume arithmetic ---------------------------------------------------------------------
def resolve_rank_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world size): given explicitly, else from torch.distributed when initialised, else from torchrun's
    RANK / WORLD_SIZE, else (0, 1). Half of a pair is refused: it would silently split the data wrongly."""
    if (rank is None) != (world_size is None):
        raise UserError(f"pass both rank and world_size, or neither (got rank={rank}, world_size={world_size})")
    if rank is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        elif ("RANK" in os.environ) != ("WORLD_SIZE" in os.environ):
            raise UserError("the environment sets only one of RANK and WORLD_SIZE; set both (torchrun does) or neither")
        else:
            rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is outside world size {world_size}")
    return int(rank), int(world_size)


def worker_offsets(consumed: int, totals: Sequence[int | None]) -> tuple[list[int], int]:
    """How many of the first `consumed` items each worker produced, and which worker is due next.

    A DataLoader asks its workers in turn (0, 1, ..., 0, 1, ...) and leaves out a worker once it is exhausted;
    `totals` are the workers' item counts (None: endless).
    """
    num_workers = len(totals)
    if all(total is None for total in totals):
        return [consumed // num_workers + (w < consumed % num_workers) for w in range(num_workers)], consumed % num_workers
    offsets, due = [0] * num_workers, 0
    for _ in range(consumed):
        for step in range(num_workers):
            worker = (due + step) % num_workers
            if totals[worker] is None or offsets[worker] < totals[worker]:
                break
        else:
            raise UserError(f"the saved stream state says {consumed} items were consumed, more than the stream holds "
                            f"({sum(totals)}); was it saved from another stream?")
        offsets[worker] += 1
        due = (worker + 1) % num_workers
    for step in range(num_workers):  # the due worker is the next one with items left (if any)
        if totals[(due + step) % num_workers] is None or offsets[(due + step) % num_workers] < totals[(due + step) % num_workers]:
            return offsets, (due + step) % num_workers
    return offsets, due


def subject_rng(seed: int, epoch: int, subject_id: str) -> np.random.Generator:
    """The generator of one subject visit: a function of (seed, epoch, subject) only."""
    return np.random.default_rng([seed, epoch, _PATCHES, zlib.crc32(subject_id.encode("utf-8"))])


# ---- the stream ----------------------------------------------------------------------------------
class PatchStream(torch.utils.data.IterableDataset):
    """Patches (or batches of patches) from a source, split over ranks and DataLoader workers.

    Each epoch visits each of the rank's subjects once and draws `patches_per_subject` patches per visit (all grid
    windows for the grid sampler when None), in an order reshuffled every epoch. `epochs=None` streams forever.

    Args:
        source: a `ZarrSource` or `WebDatasetSource` (anything with keys / num_subjects / open).
        sampler: a `PatchSampler` (`create_sampler(...)`).
        patches_per_subject: patches per subject visit (None: all the sampler plans; finite samplers only).
        batch_size: collate this many patches per item (None: items are single patches).
        seed: seeds the key shuffle (seed, epoch) and each visit's patches (seed, epoch, subject).
        epochs: number of epochs, or None for an endless stream.
        rank, world_size: this process's place; resolved from torch.distributed / torchrun when not given.
        key_stages: the key pipeline; must split by node when world_size > 1 and by worker with several workers.
        drop_last: drop each worker's last incomplete batch.
    """

    def __init__(self, source, sampler: PatchSampler, *, patches_per_subject: int | None = 8,
                 batch_size: int | None = None, seed: int = 0, epochs: int | None = None, rank: int | None = None,
                 world_size: int | None = None, key_stages: Sequence[Callable] = DEFAULT_KEY_STAGES,
                 drop_last: bool = False):
        super().__init__()
        if patches_per_subject is None and not sampler.finite:
            raise UserError(f"the {sampler.name} sampler draws without end: give patches_per_subject")
        if (patches_per_subject is not None and patches_per_subject < 1) or (batch_size is not None and batch_size < 1):
            raise UserError(f"patches_per_subject and batch_size must be positive, got {patches_per_subject}, {batch_size}")
        if seed < 0 or (epochs is not None and epochs < 1):
            raise UserError(f"seed must be >= 0 and epochs >= 1 (or None for endless), got seed={seed}, epochs={epochs}")
        self.source, self.sampler, self.patches_per_subject = source, sampler, patches_per_subject
        self.seed, self.epochs, self.key_stages = seed, epochs, tuple(key_stages)
        self.batch = Batch(batch_size, drop_last) if batch_size else None
        self.rank, self.world_size = resolve_rank_world(rank, world_size)
        self._check_splitters(self.world_size, "node", f"world size is {self.world_size}", "SplitByNode()")
        self._check_rank_has_keys()
        self._resume_at, self._resume_workers = 0, None  # where the next iteration starts (load_state_dict)
        self._yielded = 0  # items the current iteration yielded in this process (num_workers=0)

    # -- stages ----------------------------------------------------------------------------------
    def _check_splitters(self, count: int, kind: str, why: str, fix: str) -> None:
        if count > 1 and not any(getattr(stage, "splits", None) == kind for stage in self.key_stages):
            raise UserError(f"{why} but the stream's key stages {[type(s).__name__ for s in self.key_stages]} have no "
                            f"{kind} splitter, so every {kind} would read the same subjects; add {fix} to key_stages "
                            "(the default stages include it)")

    def check_workers(self, num_workers: int) -> None:
        """Refuses several DataLoader workers without a worker splitter (each would read the same subjects)."""
        self._check_splitters(num_workers, "worker", f"the DataLoader has {num_workers} workers", "SplitByWorker()")

    def _check_rank_has_keys(self) -> None:
        keys = self.keys(StreamContext(self.seed, 0, self.rank, self.world_size, 0, 1))
        if not keys:
            raise UserError(f"rank {self.rank} of {self.world_size} gets no data: {self.source!r} has only "
                            f"{len(self.source.keys())} keys to split; use fewer ranks or more, smaller shards")

    def keys(self, context: StreamContext) -> list[str]:
        """The keys of one (epoch, rank, worker): the source's keys through the key stages."""
        keys = self.source.keys()
        for stage in self.key_stages:
            keys = stage(keys, context)
        return list(keys)

    def _epochs(self) -> Iterator[int]:
        epoch = 0
        while self.epochs is None or epoch < self.epochs:
            yield epoch
            epoch += 1

    def plans(self, reader: SubjectReader, epoch: int) -> list[dict[str, Any]]:
        """The patch plans of one subject visit in `epoch` (no image read)."""
        return list(islice(self.sampler.plan(reader, subject_rng(self.seed, epoch, reader.subject_id)),
                           self.patches_per_subject))

    def _planned(self, worker: int, num_workers: int, skip: int) -> Iterator[tuple[SubjectReader, dict[str, Any]]]:
        """This worker's (reader, plan) pairs in order, with read-ahead one subject visit ahead: while a visit's
        patches are decoded, the disk already fetches the next visit's chunks."""
        visits = self._visits(worker, num_workers, skip)
        ahead = self._prefetched(next(visits, None))
        while ahead is not None:
            (reader, plans), ahead = ahead, self._prefetched(next(visits, None))
            for plan in plans:
                yield reader, plan

    def _prefetched(self, visit: tuple[SubjectReader, list[dict[str, Any]]] | None):
        if visit is not None and hasattr(visit[0], "prefetch"):
            visit[0].prefetch([region for plan in visit[1] for region in self.sampler.regions(plan)])
        return visit

    def _visits(self, worker: int, num_workers: int, skip: int) -> Iterator[tuple[SubjectReader, list[dict[str, Any]]]]:
        """This worker's subject visits and the plans still to read, after skipping `skip` patches (whole subjects
        unread where possible)."""
        for epoch in self._epochs():
            context = StreamContext(self.seed, epoch, self.rank, self.world_size, worker, num_workers)
            keys = self.keys(context)
            if not keys:
                return  # more workers than keys: this worker has nothing in any epoch
            for key in keys:
                known = self.source.num_subjects(key)
                if self.patches_per_subject is not None and known is not None and skip >= known * self.patches_per_subject:
                    skip -= known * self.patches_per_subject
                    continue
                for reader in self.source.open(key):
                    plans = self.plans(reader, epoch)
                    if skip >= len(plans):
                        skip -= len(plans)
                        continue
                    yield reader, plans[skip:]
                    skip = 0

    def _count_items(self, worker: int, num_workers: int) -> int | None:
        """A worker's item count over the whole stream (None when endless); opens subjects only if sizes are unknown."""
        if self.epochs is None:
            return None
        patches = 0
        for epoch in range(self.epochs):
            for key in self.keys(StreamContext(self.seed, epoch, self.rank, self.world_size, worker, num_workers)):
                known = self.source.num_subjects(key)
                if self.patches_per_subject is not None and known is not None:
                    patches += known * self.patches_per_subject
                else:
                    patches += sum(len(self.plans(reader, epoch)) for reader in self.source.open(key))
        return self.batch.count(patches) if self.batch else patches

    # -- iteration -------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        physical, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        self.check_workers(num_workers)
        consumed = self._resume_at  # every iteration starts at the resume point, with or without workers
        self._yielded = 0
        if consumed and self._resume_workers is not None and max(self._resume_workers, 1) != num_workers:
            raise UserError(f"the stream state was saved with num_workers={self._resume_workers} but this DataLoader has "
                            f"{num_workers if info is not None else 0}; resume with the same number of workers (the "
                            "workers' interleaving fixes the order of the batches)")
        if consumed:
            totals = [self._count_items(w, num_workers) for w in range(num_workers)] if num_workers > 1 else [None]
            offsets, due = worker_offsets(consumed, totals)
        else:
            offsets, due = [0] * num_workers, 0
        role = (physical + due) % num_workers  # the resumed loader's first worker plays the one that was due
        skip = offsets[role] * (self.batch.batch_size if self.batch else 1)
        planned = self._planned(role, num_workers, skip)
        for item in (self.batch(planned, self.sampler) if self.batch else extract(planned, self.sampler)):
            if info is None:
                self._yielded += 1
            yield item

    # -- state -----------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """What a saved state must agree with to resume exactly."""
        return {"seed": self.seed, "epochs": self.epochs, "rank": self.rank, "world_size": self.world_size,
                "patches_per_subject": self.patches_per_subject,
                "batch_size": self.batch.batch_size if self.batch else None, "sampler": repr(self.sampler),
                "num_keys": len(self.source.keys())}

    def state_dict(self, consumed: int | None = None, num_workers: int = 0) -> dict[str, Any]:
        """The resume point: items consumed by this rank (default: those this process iterated itself)."""
        consumed = self._resume_at + self._yielded if consumed is None else consumed
        return {"format": STATE_FORMAT, "consumed": int(consumed), "num_workers": int(num_workers), **self.describe()}

    def load_state_dict(self, state: dict[str, Any], num_workers: int | None = None) -> None:
        """Makes the next iteration start where `state` left off."""
        if state.get("format") != STATE_FORMAT:
            raise UserError(f"not a patch stream state (format {state.get('format')!r}, expected {STATE_FORMAT!r})")
        for key, value in self.describe().items():
            if state.get(key) != value:
                raise UserError(f"cannot resume: the stream state has {key}={state.get(key)!r} but this stream has "
                                f"{key}={value!r}; rebuild the stream with the settings it was saved with")
        if num_workers is not None and max(num_workers, 1) != max(state["num_workers"], 1):
            raise UserError(f"the stream state was saved with num_workers={state['num_workers']}, this loader has "
                            f"{num_workers}; resume with the same number of workers")
        self._resume_at, self._resume_workers, self._yielded = int(state["consumed"]), int(state["num_workers"]), 0

    def __repr__(self) -> str:
        return (f"PatchStream({self.source!r}, {self.sampler!r}, patches_per_subject={self.patches_per_subject}, "
                f"batch_size={self.batch.batch_size if self.batch else None}, seed={self.seed}, epochs={self.epochs}, "
                f"rank={self.rank}/{self.world_size})")


class StreamLoader:
    """A torch DataLoader over a `PatchStream` that counts the items it hands out, so it can save and resume.

    Example:
        loader = StreamLoader(stream, num_workers=2)
        loader.load_state_dict(checkpoint["data"])  # when resuming
        for batch in loader: ...; checkpoint["data"] = loader.state_dict()
    """

    def __init__(self, stream: PatchStream, *, num_workers: int = 0, **loader_options):
        self.stream, self.num_workers, self.loader_options = stream, num_workers, loader_options
        self.consumed = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.stream.check_workers(self.num_workers)  # here, before workers start: a worker's error is slow to unwind
        self.stream.load_state_dict(self.state_dict())
        loader = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers, **self.loader_options)
        for item in loader:
            self.consumed += 1  # counted when handed out: an item the caller received is consumed
            yield item

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict(consumed=self.consumed, num_workers=self.num_workers)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state, num_workers=self.num_workers)
        self.consumed = int(state["consumed"])


# ---- typed config at the edge --------------------------------------------------------------------
@dataclass
class StreamConfig:
    """How a patch stream samples and batches (the data source is given separately)."""

    sampler: str = "uniform"
    sampler_options: dict[str, Any] = field(default_factory=lambda: {"patch_size": 96})
    channels: list[str] = field(default_factory=lambda: ["image"])
    patches_per_subject: int | None = 8
    batch_size: int | None = 8
    seed: int = 0
    epochs: int | None = None  # None: endless
    num_workers: int = 2


def build_stream_loader(config: StreamConfig, source_path: str | Path, *, rank: int | None = None,
                        world_size: int | None = None, **loader_options) -> StreamLoader:
    """The stream and its loader for a cohort store or a webdataset export, from a `StreamConfig`."""
    source = open_source(source_path, config.channels)
    stream = PatchStream(source, create_sampler(config.sampler, **config.sampler_options),
                         patches_per_subject=config.patches_per_subject, batch_size=config.batch_size,
                         seed=config.seed, epochs=config.epochs, rank=rank, world_size=world_size)
    if config.num_workers > 1 and len(stream.keys(StreamContext(config.seed, 0, stream.rank, stream.world_size))) < config.num_workers:
        warnings.warn(f"{source!r}: rank {stream.rank} has fewer keys than the {config.num_workers} workers; some "
                      "workers will have nothing to read", stacklevel=2)
    return StreamLoader(stream, num_workers=config.num_workers, **loader_options)
