"""Direct reads of a cohort store's chunk files, for streaming: zarr's layout, without zarr's indexing machinery.

For the layout the store writes (regular chunk grid, default chunk keys, `bytes -> zstd | blosc -> crc32c`),
`ChunkedArray` reads the chunk files a region overlaps, checks each CRC32C, decodes straight into the output
(or a slot of a batch) and keeps decoded chunks for the rest of a subject visit. `ChunkedArray.open` returns None
for any other layout and the caller goes through zarr. Profiled on 96^3 patches of 256^3 volumes: zarr's own
reads gave 52 patches/s, direct chunk reads 101, with the per-visit chunk cache 120, decoding into the batch 133.
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator, Sequence

import google_crc32c
import numcodecs
import numpy as np


def chunk_codec(metadata: dict[str, Any]):
    """The numcodecs codec that decodes the compressed chunk payloads of a zarr v3 array (zstd or blosc)."""
    return numcodecs.Zstd() if metadata["codecs"][1]["name"] == "zstd" else numcodecs.Blosc()


class ChunkDecodeError(ValueError):
    """A chunk file fails its checksum or does not decode (the reader names the subject and the fix)."""


class ChunkedArray:
    """Reads a region of one zarr v3 array straight from its chunk files: plain reads, CRC32C check, one decode.

    Only the layout `CohortStore` writes is read this way (regular chunks, default key encoding, codecs
    bytes -> zstd | blosc -> crc32c); `open` returns None for anything else and the caller goes through zarr.
    On the 96^3-from-256^3 benchmark zarr's own indexing and event loop cost 2.7x the decode itself.

    Decoded chunks are kept (least recently used first out, up to `cache_bytes`) for the reader's lifetime, one
    subject visit: the patches of a visit overlap (8 random 96^3 patches per 256^3 volume: 5,423 chunk decodes
    instead of 9,952 over 160 patches).
    """

    def __init__(self, path: Path, metadata: dict[str, Any], cache_bytes: int = 64 << 20):
        self.path, self._root = path, str(path)  # string paths: pathlib costs ~10% of a read here
        self.shape = tuple(metadata["shape"])
        self.chunks = tuple(metadata["chunk_grid"]["configuration"]["chunk_shape"])
        self.dtype = np.dtype(metadata["data_type"]).newbyteorder("<")
        self.fill_value = metadata["fill_value"]
        self.separator = metadata["chunk_key_encoding"].get("configuration", {}).get("separator", "/")
        self._codec = chunk_codec(metadata)
        self._chunk_bytes = int(np.prod(self.chunks)) * self.dtype.itemsize
        self._cache: OrderedDict[tuple[int, ...], np.ndarray | None] = OrderedDict()
        self._cache_chunks = cache_bytes // self._chunk_bytes

    @classmethod
    def open(cls, path: str | Path, cache_bytes: int = 64 << 20) -> "ChunkedArray | None":
        path = Path(path)
        try:
            metadata = json.loads((path / "zarr.json").read_text())
        except (OSError, ValueError):
            return None
        codecs = [codec["name"] for codec in metadata.get("codecs", [])]
        endian = (metadata.get("codecs") or [{}])[0].get("configuration", {}).get("endian", "little")
        supported = (metadata.get("chunk_grid", {}).get("name") == "regular"
                     and metadata.get("chunk_key_encoding", {}).get("name") == "default"
                     and len(codecs) == 3 and codecs[0] == "bytes" and codecs[1] in ("zstd", "blosc")
                     and codecs[2] == "crc32c" and endian == "little" and not metadata.get("storage_transformers")
                     and np.dtype(metadata.get("data_type", "V")).kind in "biuf")
        return cls(path, metadata, cache_bytes) if supported else None

    def read(self, region: tuple[slice, ...] | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """The array over `region` (unit-step slices), written into `out` when given (e.g. a slot of a batch)."""
        starts, stops = _bounds(region, self.shape)
        if out is None:
            out = np.empty(tuple(b - a for a, b in zip(starts, stops)), dtype=self.dtype)
        for index in self._indices(starts, stops):
            self._copy_chunk(index, starts, stops, out)
        return out

    def prefetch(self, regions: Sequence[tuple[slice, ...] | None]) -> None:
        """Asks the kernel to start reading the regions' chunk files (posix_fadvise WILLNEED, each file once) and
        returns at once, so the disk works while earlier chunks decode."""
        wanted = dict.fromkeys(index for region in regions for index in self._indices(*_bounds(region, self.shape)))
        for index in wanted:
            if index in self._cache:
                continue
            try:
                descriptor = os.open(self._file(index), os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(descriptor)

    def _indices(self, starts: Sequence[int], stops: Sequence[int]) -> Iterator[tuple[int, int, int]]:
        ranges = [range(a // c, (b - 1) // c + 1) for a, b, c in zip(starts, stops, self.chunks)]
        return ((i, j, k) for i in ranges[0] for j in ranges[1] for k in ranges[2])

    def _file(self, index: tuple[int, ...]) -> str:
        return os.path.join(self._root, self.separator.join(["c", *map(str, index)]))

    def _copy_chunk(self, index, starts, stops, out: np.ndarray) -> None:
        lows = [max(a, n * c) for a, n, c in zip(starts, index, self.chunks)]
        highs = [min(b, (n + 1) * c) for b, n, c in zip(stops, index, self.chunks)]
        target = tuple(slice(lo - a, hi - a) for lo, hi, a in zip(lows, highs, starts))
        chunk = self._chunk(index)
        if chunk is None:  # zarr does not write chunks that hold only the fill value
            out[target] = self.fill_value
            return
        out[target] = chunk[tuple(slice(lo - n * c, hi - n * c) for lo, hi, n, c in zip(lows, highs, index, self.chunks))]

    def _chunk(self, index) -> np.ndarray | None:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        chunk = self._decode(index)
        if self._cache_chunks > 0:
            self._cache[index] = chunk
            if len(self._cache) > self._cache_chunks:
                self._cache.popitem(last=False)
        return chunk

    def _decode(self, index) -> np.ndarray | None:
        try:
            with open(self._file(index), "rb", buffering=0) as handle:
                raw = handle.read()
        except FileNotFoundError:
            return None
        payload = np.frombuffer(raw, dtype=np.uint8)[:-4]  # a view: no copy of the chunk bytes
        name = ".".join(map(str, index))
        if len(raw) < 4 or google_crc32c.value(payload).to_bytes(4, "little") != raw[-4:]:
            raise ChunkDecodeError(f"chunk {name}: stored and computed CRC32C checksums differ")
        chunk = np.empty(self._chunk_bytes, dtype=np.uint8)
        try:
            self._codec.decode(payload, out=chunk)  # straight into the array: no intermediate bytes object
        except (RuntimeError, ValueError) as error:
            raise ChunkDecodeError(f"chunk {name}: {error}") from error
        return chunk.view(self.dtype).reshape(self.chunks)


def _bounds(region: tuple[slice, ...] | None, shape: Sequence[int]) -> tuple[list[int], list[int]]:
    if region is None:
        return [0] * len(shape), list(shape)
    if len(region) != len(shape) or any(s.step not in (None, 1) for s in region):
        raise ValueError(f"region {region} must be {len(shape)} unit-step slices")
    bounds = [s.indices(size)[:2] for s, size in zip(region, shape)]
    return [a for a, _ in bounds], [max(a, b) for a, b in bounds]
