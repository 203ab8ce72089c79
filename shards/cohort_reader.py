"""Reading one split of a cohort build: its subjects, and their volumes with the planted alteration applied.

A split manifest (`splits/<split>.csv` of a build) has the columns `SPLIT_COLUMNS`, then the source manifest's.
`CohortSplit(build_dir, "public_test")` iterates `SplitEntry`s; `read(entry)` returns the subject's
volume from its source store and, for a challenging subject, applies the recorded alteration with a
`torch.Generator` seeded from the recorded `alteration_seed`: the altered voxels are the same on every
read, in every process, and no altered copy is ever stored.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from rafmedia.core.errors import UserError
from rafmedia.core.registry import did_you_mean
from rafmedia.shards.alterations import create_alteration
from rafmedia.shards.store import CohortStore, read_rows_csv

NO_ALTERATION = "none"  # the `alteration` of a clean subject
SPLIT_COLUMNS = ["uid", "source", "store", "subject_id", "split", "ood", "alteration", "alteration_severity",
                 "alteration_seed"]


@dataclass
class SplitEntry:
    """One subject of a split: where it lives, whether it is held out, and its planted alteration."""

    uid: str
    source: str
    store: str
    subject_id: str
    split: str
    ood: bool
    alteration: str | None  # None for a clean subject
    alteration_severity: int
    alteration_seed: int
    metadata: dict[str, Any] = field(default_factory=dict)  # every other column of the split manifest

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "SplitEntry":
        missing = [column for column in SPLIT_COLUMNS if column not in row]
        if missing:
            raise UserError(f"row {row.get('uid', row.get('subject_id', '?'))}: not a split manifest row "
                            f"(missing columns: {', '.join(missing)}); write splits with `raf cohort build`")
        alteration = str(row["alteration"])
        return cls(uid=str(row["uid"]), source=str(row["source"]), store=str(row["store"]),
                   subject_id=str(row["subject_id"]), split=str(row["split"]), ood=bool(int(row["ood"])),
                   alteration=None if alteration in (NO_ALTERATION, "") else alteration,
                   alteration_severity=int(row["alteration_severity"] or 0),
                   alteration_seed=int(row["alteration_seed"] or 0),
                   metadata={k: v for k, v in row.items() if k not in SPLIT_COLUMNS})


class EntryReader:
    """Reads entries' volumes, keeping one open `CohortStore` per source store."""

    def __init__(self):
        self._stores: dict[str, CohortStore] = {}

    def store(self, entry: SplitEntry) -> CohortStore:
        if entry.store not in self._stores:
            self._stores[entry.store] = CohortStore(entry.store)
        return self._stores[entry.store]

    def read(self, entry: SplitEntry, channel: str = "image", region: tuple[slice, ...] | None = None) -> np.ndarray:
        """The (D, H, W) volume, altered when the entry says so; `region` is cut after altering the whole volume.

        Alterations depend on the whole volume (noise scaled by its std, a field over its extent), so a
        region of an altered subject is always the same crop of the same altered volume.
        """
        store = self.store(entry)
        if entry.alteration is None:
            return store.read(entry.subject_id, channel, region)
        volume = np.asarray(store.read(entry.subject_id, channel), dtype=np.float32)
        altered = apply_recorded_alteration(volume, entry.alteration, entry.alteration_severity, entry.alteration_seed)
        return altered if region is None else altered[region]

    def read_label(self, entry: SplitEntry, region: tuple[slice, ...] | None = None) -> np.ndarray:
        return self.store(entry).read_label(entry.subject_id, region)  # intensity alterations keep the anatomy


def apply_recorded_alteration(volume: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """Applies `create_alteration(name, severity)` to a (D, H, W) volume with a generator seeded by `seed`."""
    alteration = create_alteration(name, severity=severity)
    generator = torch.Generator().manual_seed(int(seed))
    x_BCDHW = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    return alteration(x_BCDHW, generator)[0, 0].numpy()


class CohortSplit(EntryReader):
    """One split of a cohort build: `for entry in split: volume = split.read(entry)`."""

    def __init__(self, build_dir: str | Path, split: str):
        super().__init__()
        self.build_dir = Path(build_dir)
        folder = self.build_dir / "splits"
        available = sorted(p.stem for p in folder.glob("*.csv")) if folder.is_dir() else []
        if not available:
            raise UserError(f"{self.build_dir} is not a cohort build (no splits/*.csv); "
                            "make one with `raf cohort build`")
        if split not in available:
            raise UserError(f"split '{split}' is not in {self.build_dir};{did_you_mean(split, available)} "
                            f"(splits: {', '.join(available)})")
        self.split = split
        self.entries = [SplitEntry.from_row(row) for row in read_rows_csv(folder / f"{split}.csv")]

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[SplitEntry]:
        return iter(self.entries)

    def __getitem__(self, index: int) -> SplitEntry:
        return self.entries[index]


def split_sample_reader(channel: str, stride: int) -> Callable[[dict[str, Any]], np.ndarray]:
    """For the datasheet: a strided voxel sample of a split-manifest row, with its alteration applied."""
    reader = EntryReader()
    step = (slice(None, None, stride),) * 3

    def read_sample(row: dict[str, Any]) -> np.ndarray:
        return reader.read(SplitEntry.from_row(row), channel, step)

    return read_sample
