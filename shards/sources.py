"""Sources of a patch stream: what `PatchStream` splits (`keys()`) and opens as subject readers (`open(key)`).

- `ZarrSource`: the subjects of a cohort store; `StoreSubject` reads a subject's regions from its chunk files
  directly (`read(..., out=array)` decodes into the batch).
- `WebDatasetSource`: the tar shards of a `raf shards export`; `WebDatasetSubject` is one decoded sample.
- `open_source(path)`: whichever of the two the path is.

Both share one interface (keys / num_subjects / open), so one `PatchStream` reads either and, for the same seed,
draws the same patches from the same subject.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import webdataset as wds
from webdataset.autodecode import basichandlers

from rafmedia.core.errors import UserError
from rafmedia.shards.chunks import ChunkDecodeError, ChunkedArray
from rafmedia.shards.sampling import ArraySubject, SubjectReader
from rafmedia.shards.store import COHORT_STORE, LABEL, SUBJECTS, CohortStore, CorruptChunkError, resolve_store


class StoreSubject:
    """The `SubjectReader` of one subject of a cohort store; regions come from the chunk files directly."""

    read_into_supported = True  # read(..., out=array) decodes into `out`

    def __init__(self, store: CohortStore, subject_id: str, channels: Sequence[str], direct: bool = True):
        self.store, self.subject_id = store, subject_id
        self.attrs = store.subject_attrs(subject_id)
        self.shape = tuple(int(s) for s in self.attrs["shape"])
        self.has_label = bool(self.attrs.get("has_label"))
        self.channels = tuple(channels)
        missing = [name for name in self.channels if name not in self.attrs["channels"]]
        if missing:
            raise UserError(f"subject '{subject_id}' in {store.path} has no channel {missing} "
                            f"(it has: {', '.join(self.attrs['channels'])}); pick channels that every subject has")
        self._direct = direct
        self._arrays: dict[str, ChunkedArray | None] = {}

    def read(self, channel: str, region: tuple[slice, ...] | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """The channel over `region`; with `out`, written into it (no intermediate array on the direct path)."""
        array = self._array(channel)
        if array is None:
            values = self.store.read(self.subject_id, channel, region)
            if out is None:
                return values
            out[...] = values
            return out
        try:
            return array.read(region, out)
        except (ChunkDecodeError, OSError) as error:  # the same contract as CohortStore.read
            raise CorruptChunkError(
                f"subject '{self.subject_id}' channel '{channel}' in {self.store.path}: a chunk on disk is corrupt "
                f"({error}); delete {self.store.path / SUBJECTS / self.subject_id} and re-run the ingest (or synth) "
                "to rewrite it") from error

    def read_label(self, region: tuple[slice, ...] | None = None) -> np.ndarray:
        return self.read(LABEL, region)

    def prefetch(self, regions: Sequence[tuple[slice, ...]]) -> None:
        """Read-ahead of the chunk files of the patches about to be read, so disk reads overlap with decoding."""
        if not hasattr(os, "posix_fadvise"):
            return
        for channel in self.channels + ((LABEL,) if self.has_label else ()):
            array = self._array(channel)
            if array is not None:
                array.prefetch(regions)

    def _array(self, channel: str) -> ChunkedArray | None:
        if channel not in self._arrays:
            path = self.store.path / SUBJECTS / self.subject_id / channel
            if not (path / "zarr.json").is_file():
                self.store.read(self.subject_id, channel, (slice(0, 0),) * 3)  # raises the store's own UserError
            self._arrays[channel] = ChunkedArray.open(path) if self._direct else None
        return self._arrays[channel]


class ZarrSource:
    """Subjects of a cohort store (or of a folder holding `cohort.zarr`, as `raf synth --out` writes); each key is
    one subject. Pickles cheaply (arrays reopen in each worker)."""

    def __init__(self, store_path: str | Path, channels: Sequence[str] = ("image",),
                 subject_ids: Sequence[str] | None = None, direct_reads: bool = True):
        self.store = CohortStore(resolve_store(store_path))
        self.channels, self.direct_reads = tuple(channels), direct_reads
        available = self.store.subject_ids()
        if subject_ids is None:
            subject_ids = available
        unknown = sorted(set(subject_ids) - set(available))
        if unknown:
            raise UserError(f"subjects {unknown[:5]} are not in {self.store.path} ({len(available)} subjects there)")
        if not subject_ids:
            raise UserError(f"{self.store.path} has no subjects to stream; generate some with `raf synth`")
        self.subject_ids = list(subject_ids)

    def keys(self) -> list[str]:
        return list(self.subject_ids)

    def num_subjects(self, key: str) -> int | None:
        return 1

    def open(self, key: str) -> Iterator[SubjectReader]:
        yield StoreSubject(self.store, key, self.channels, direct=self.direct_reads)

    def __repr__(self) -> str:
        return f"ZarrSource({str(self.store.path)!r}, {len(self.subject_ids)} subjects, channels={list(self.channels)})"


class WebDatasetSubject:
    """A `SubjectReader` over one webdataset sample of a volumes export; arrays are decoded on first access."""

    def __init__(self, sample: dict[str, Any], channels: Sequence[str] | None):
        self._sample = sample
        info = json.loads(sample["json"])
        self.subject_id, self.attrs = info["subject_id"], info
        self.shape = tuple(int(s) for s in info["shape"])
        self.has_label = "label.npy" in sample
        self.channels = tuple(channels or info["channels"])
        self._memory: ArraySubject | None = None

    def _decoded(self) -> ArraySubject:
        if self._memory is None:
            stack = basichandlers("npy", self._sample["image.npy"])
            label = basichandlers("npy", self._sample["label.npy"]) if self.has_label else None
            arrays = {name: stack[index] for index, name in enumerate(self.attrs["channels"])}
            self._memory = ArraySubject(self.subject_id, arrays, label, self.attrs, self.channels)
        return self._memory

    def read(self, channel: str, region: tuple[slice, ...] | None = None) -> np.ndarray:
        return self._decoded().read(channel, region)

    def read_label(self, region: tuple[slice, ...] | None = None) -> np.ndarray:
        return self._decoded().read_label(region)


class WebDatasetSource:
    """Tar shards of a `raf shards export` (mode volumes), read with the stock webdataset library; each key is a shard.

    Args:
        shards: the export folder, its `index.json`, or a list of shard paths/URLs. With the index, shard sizes are
            known and a resumed stream skips whole shards without reading them.
        channels: the channels stacked into "image" (default: all the export holds).
    """

    def __init__(self, shards: str | Path | Sequence[str], channels: Sequence[str] | None = None):
        self.channels = tuple(channels) if channels else None
        self.sizes: dict[str, int] = {}
        if isinstance(shards, (str, Path)) and not str(shards).endswith(".tar"):
            index_path = Path(shards) / "index.json" if Path(shards).is_dir() else Path(shards)
            if not index_path.is_file():
                raise UserError(f"{index_path} not found (no webdataset index there): pass a webdataset export folder (from `raf shards export`), "
                                "its index.json, or a list of .tar shards")
            index = json.loads(index_path.read_text())
            mode = index.get("config", {}).get("mode")
            if mode != "volumes":
                raise UserError(f"{index_path} is a '{mode}' export; a patch stream samples whole volumes, so export "
                                "with `raf shards export --mode volumes`")
            self.urls = [str(index_path.parent / shard["name"]) for shard in index["shards"]]
            self.sizes = {url: shard["num_samples"] for url, shard in zip(self.urls, index["shards"])}
        else:
            self.urls = [str(url) for url in ([shards] if isinstance(shards, (str, Path)) else shards)]
        if not self.urls:
            raise UserError(f"no webdataset shards given ({shards!r})")

    def keys(self) -> list[str]:
        return list(self.urls)

    def num_subjects(self, key: str) -> int | None:
        return self.sizes.get(key)

    def open(self, key: str) -> Iterator[SubjectReader]:
        for sample in wds.DataPipeline(wds.SimpleShardList([key]), wds.tarfile_to_samples()):
            yield WebDatasetSubject(sample, self.channels)

    def __repr__(self) -> str:
        return f"WebDatasetSource({len(self.urls)} shards, channels={self.channels or 'all'})"


def open_source(path: str | Path, channels: Sequence[str] | None = None):
    """A `ZarrSource` for a cohort store (or a folder holding `cohort.zarr`, as `raf synth --out` writes), a
    `WebDatasetSource` for an export folder, its index.json or a .tar."""
    path = Path(path)
    if (path / "zarr.json").is_file() or (path / COHORT_STORE / "zarr.json").is_file():
        return ZarrSource(path, channels or ("image",))
    if (path / "index.json").is_file() or path.suffix in (".json", ".tar"):
        return WebDatasetSource(str(path), channels)
    raise UserError(f"{path} is neither a cohort store (zarr.json) nor a webdataset export (index.json)")
