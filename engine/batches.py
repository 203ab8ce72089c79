"""Batch sources for the trainer: where each micro-step's batch comes from, and how far the run has read.

`DataConfig` says where pretraining reads from: whole volumes in memory (`view_batches`: seeded epoch shuffles
of the subjects, then the task's view maker) or a patch stream of a store (`StreamBatches`).

A batch source has `next() -> batch` and `state_dict()` / `load_state_dict()`. The trainer saves the state in
every checkpoint, so a resumed run reads exactly the batches an uninterrupted run would have read:

- `StepBatches`: a pure function of the micro-step (in-memory volumes + the task's view maker); its state is
  the micro-step count.
- `StreamBatches`: a `StreamLoader` over a patch stream of a cohort store or webdataset export (volumes larger
  than memory), followed by the task's view maker; its state is the loader's (items consumed per rank).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import torch

from rafmedia.core.errors import UserError
from rafmedia.shards.volumes import normalize_intensity


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


class BatchSource(Protocol):
    def next(self) -> dict[str, torch.Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def view_generator(seed: int, position: int, rank: int = 0) -> torch.Generator:
    """The generator of the views of micro-step `position` on `rank` (rank 0's matches one-process runs)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + 7919 * position + 1 + 104_729 * rank)


class StepBatches:
    """Batches from `batch_of_step(position)`, a pure function of the micro-step."""

    kind = "step"

    def __init__(self, batch_of_step: Callable[[int], dict[str, torch.Tensor]]):
        self.batch_of_step, self.position = batch_of_step, 0

    def next(self) -> dict[str, torch.Tensor]:
        batch = self.batch_of_step(self.position)
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_kind(state, self.kind)
        self.position = int(state["position"])


# What each task data kind takes from a stream item (see `rafmedia.engine.tasks`): image channels, the label map as
# float class indices, or the two views of the paired sampler stacked as two channels.
STREAM_INPUTS: dict[str, Callable[[dict[str, Any]], torch.Tensor]] = {
    "image": lambda item: item["image"],
    "label": lambda item: item["label"].float(),
    "paired": lambda item: torch.cat([item["view_a"], item["view_b"]], dim=1),
}


class StreamBatches:
    """Task views of the patch batches a `StreamLoader` yields (an endless stream: `epochs=None`).

    `normalize` z-scores each patch (image data only). The views of the item the loader hands out n-th are drawn
    from `view_generator(seed, n, rank)`, so they too are fixed by the resume point.
    """

    kind = "stream"

    def __init__(self, loader, views: Callable, *, seed: int, rank: int = 0, data: str = "image",
                 normalize: bool = True):
        if data not in STREAM_INPUTS:
            raise UserError(f"unknown task data kind '{data}' (choose from: {', '.join(STREAM_INPUTS)})")
        self.loader, self.views, self.seed, self.rank = loader, views, seed, rank
        self.input, self.normalize = STREAM_INPUTS[data], normalize and data != "label"
        self._items: Iterator[dict[str, Any]] | None = None

    def next(self) -> dict[str, torch.Tensor]:
        if self._items is None:
            self._items = iter(self.loader)
        try:
            item = next(self._items)
        except StopIteration:
            raise UserError("the patch stream ended before training did; build it with epochs=None (endless)") from None
        volumes = self.input(item)
        if self.normalize:  # each channel of each patch on its own, as the in-memory path z-scores each volume
            volumes = normalize_intensity(volumes.flatten(0, 1).unsqueeze(1)).view(volumes.shape)
        return self.views(volumes, view_generator(self.seed, self.loader.consumed - 1, self.rank))

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_kind(state, self.kind)
        self.loader.load_state_dict(state["loader"])
        self._items = None


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
    sampler = EpochShuffledBatches(len(volumes_NCDHW), batch_size * world_size, seed)

    def batch(step: int) -> dict[str, torch.Tensor]:
        indices = sampler.indices(step)[rank * batch_size:(rank + 1) * batch_size]
        return views(volumes_NCDHW[indices], view_generator(seed, step, rank))

    return batch


def as_batch_source(batches) -> BatchSource:
    """A batch source as is; a plain function of the step becomes `StepBatches`."""
    return batches if hasattr(batches, "next") and hasattr(batches, "state_dict") else StepBatches(batches)


def _check_kind(state: dict[str, Any], kind: str) -> None:
    if state.get("kind") != kind:
        raise UserError(f"the checkpoint's data position is for a '{state.get('kind')}' source but this run reads a "
                        f"'{kind}' source; resume with the data settings the run started with")
