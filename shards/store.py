"""The cohort store: a zarr v3 hierarchy with one group per subject, plus a CSV manifest.

Layout on disk::

    cohort.zarr/
      zarr.json                 root group; attrs: format, name, store config
      subjects/<subject_id>/    one group per subject; attrs: metadata, spacing, origin, direction, provenance
        <channel>               one chunked, compressed (D, H, W) array per channel (e.g. "image", "t1", "pet")
        label                   optional integer label map, same shape
      manifest.csv              one row per subject: metadata and summary statistics
      .staging/                 subjects being written; never visible as finished subjects

Every subject is written into `.staging/` first and renamed into `subjects/` when complete, so a killed
writer never leaves a half-written subject that looks finished, and re-running skips finished subjects.
The synthetic generator and (later) file ingest both write through `CohortStore.write_subject`.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from rafmedia.core.errors import UserError
from rafmedia.core.files import atomic_write_text, publish_folder

STORE_FORMAT = "rafmedia.cohort/1"
COHORT_STORE = "cohort.zarr"  # the store's name inside a run or cohort-build folder
SUBJECTS = "subjects"
STAGING = ".staging"
MANIFEST = "manifest.csv"
LABEL = "label"
_SUBJECT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class StoreConfig:
    """How arrays are chunked and compressed."""

    chunk_size: int = 32  # cubic chunks; a random patch read touches only the chunks it overlaps
    compression_level: int = 3


def _codecs(dtype: np.dtype, level: int):
    # Blosc with bit-shuffle packs integer label maps well. For float images Blosc-LZ4 with bit-shuffle both
    # compressed better and decoded 2.5-3.5x faster than plain Zstd on synthetic and real MR chunks (1.14-1.98x vs
    # 1.07-1.66x; 2.4-3.2 GB/s vs 0.9-1.0 GB/s on one core), and decoding is what bounds random-patch streaming.
    # A CRC32C checksum on every chunk turns a chunk corrupted on disk into an error instead of silent garbage.
    if np.issubdtype(dtype, np.integer):
        return [BloscCodec(cname="zstd", clevel=level, shuffle="bitshuffle"), Crc32cCodec()]
    return [BloscCodec(cname="lz4", clevel=level, shuffle="bitshuffle"), Crc32cCodec()]


class CorruptChunkError(UserError):
    """A chunk on disk fails its checksum or does not decode."""


def resolve_store(path: str | Path) -> Path:
    """A cohort store, or a folder holding one (`cohort.zarr`, as `raf synth --out` and `raf cohort build` write);
    a path that does not exist is a UserError."""
    candidate = Path(path).expanduser()
    if (candidate / COHORT_STORE / "zarr.json").is_file():
        return candidate / COHORT_STORE
    if not candidate.exists():
        raise UserError(f"cohort store not found: {candidate} (create one with `raf synth --out DIR`)")
    return candidate


class CohortStore:
    """Reads and writes one cohort store. Cheap to pickle (arrays are reopened lazily in each process)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "zarr.json").is_file() or not (self.path / SUBJECTS).is_dir():
            raise UserError(f"{self.path} is not a rafmedia cohort store (no zarr.json / subjects/); "
                            "create one with `raf synth` or `raf shards ingest`")
        self._arrays: dict[tuple[str, str], Any] = {}

    @classmethod
    def create(cls, path: str | Path, *, config: StoreConfig, name: str, overwrite: bool = False) -> "CohortStore":
        """Creates an empty store (or opens an existing one to resume, unless `overwrite`)."""
        path = Path(path)
        if overwrite and path.exists():
            shutil.rmtree(path)
        if not (path / "zarr.json").is_file():
            root = zarr.open_group(str(path), mode="w", zarr_format=3)
            root.attrs.update({"format": STORE_FORMAT, "name": name, "chunk_size": config.chunk_size,
                               "compression_level": config.compression_level})
            root.create_group(SUBJECTS)
        return cls(path)

    # ---- writing -------------------------------------------------------------------------------
    def write_subject(self, subject_id: str, *, channels: dict[str, np.ndarray], label: np.ndarray | None,
                      attrs: dict[str, Any]) -> None:
        """Writes one subject atomically: staged in `.staging/`, then renamed into `subjects/`."""
        if not _SUBJECT_ID.match(subject_id):
            raise UserError(f"subject id '{subject_id}' may only contain letters, digits, '.', '_' and '-'")
        shapes = {name: array.shape for name, array in channels.items()}
        if label is not None:
            shapes[LABEL] = label.shape
        if len(set(shapes.values())) != 1 or any(len(shape) != 3 for shape in shapes.values()):
            raise UserError(f"subject {subject_id}: every channel and the label must be 3D and of one shape, got {shapes}")
        root_attrs = self.attrs()
        chunk, level = int(root_attrs["chunk_size"]), int(root_attrs["compression_level"])

        staging = self.path / STAGING / f"{subject_id}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        staging.parent.mkdir(exist_ok=True)
        try:
            group = zarr.open_group(str(staging), mode="w", zarr_format=3)
            arrays = dict(channels) if label is None else {**channels, LABEL: label}
            for name, array in arrays.items():
                array = np.ascontiguousarray(array)
                chunks = tuple(min(chunk, size) for size in array.shape)
                group.create_array(name, data=array, chunks=chunks, compressors=_codecs(array.dtype, level))
            group.attrs.update({**attrs, "subject_id": subject_id, "channels": list(channels),
                                "has_label": label is not None, "shape": list(array.shape)})
            publish_folder(staging, self.path / SUBJECTS / subject_id)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def write_manifest(self, rows: list[dict[str, Any]]) -> Path:
        """Writes manifest.csv atomically (columns: the union of the rows' keys, in first-seen order)."""
        return write_rows_csv(self.path / MANIFEST, rows)

    def update_attrs(self, attrs: dict[str, Any]) -> None:
        """Adds store-level attributes (e.g. how the cohort was made) to the root group."""
        zarr.open_group(str(self.path), mode="r+").attrs.update(attrs)

    # ---- reading -------------------------------------------------------------------------------
    def attrs(self) -> dict[str, Any]:
        """Store-level attributes of the root group."""
        return dict(zarr.open_group(str(self.path), mode="r").attrs)

    def has_subject(self, subject_id: str) -> bool:
        return (self.path / SUBJECTS / subject_id / "zarr.json").is_file()

    def subject_ids(self) -> list[str]:
        """Finished subjects, sorted."""
        return sorted(entry.name for entry in (self.path / SUBJECTS).iterdir()
                      if not entry.name.startswith(".") and (entry / "zarr.json").is_file())

    def subject_attrs(self, subject_id: str) -> dict[str, Any]:
        return dict(self._group(subject_id).attrs)

    def read(self, subject_id: str, channel: str = "image", region: tuple[slice, ...] | None = None) -> np.ndarray:
        """Reads a channel (or `region` of it, touching only the chunks it overlaps) as a (D, H, W) array."""
        array = self._array(subject_id, channel)
        try:
            return array[region if region is not None else ...]
        except (ValueError, RuntimeError, OSError) as error:  # checksum mismatch, codec failure, truncated file
            where = "" if region is None else f" region {_format_region(region)}"
            raise CorruptChunkError(
                f"subject '{subject_id}' channel '{channel}'{where} in {self.path}: a chunk on disk is corrupt "
                f"({error}); delete {self.path / SUBJECTS / subject_id} and re-run the ingest (or synth) to "
                "rewrite it") from error

    def read_label(self, subject_id: str, region: tuple[slice, ...] | None = None) -> np.ndarray:
        return self.read(subject_id, LABEL, region)

    def shape(self, subject_id: str, channel: str = "image") -> tuple[int, ...]:
        return tuple(self._array(subject_id, channel).shape)

    def footprint(self) -> dict[str, Any]:
        """The store's size on disk against its voxels' raw size and the source files it was ingested from.

        `source_bytes` sums the files each subject's `sources` attribute names (those still on disk; None for a
        synthetic cohort, which has none); `raw_bytes` is every array's shape x item size, uncompressed."""
        stored = raw = 0
        sources: set[str] = set()
        for folder, _dirs, files in os.walk(self.path):
            for name in files:
                path = Path(folder) / name
                stored += path.stat().st_size
                if name != "zarr.json":
                    continue
                meta = json.loads(path.read_text(encoding="utf-8"))
                if meta.get("node_type") == "array":
                    raw += int(np.prod(meta["shape"])) * np.dtype(meta["data_type"]).itemsize
                elif path.parent.parent.name == SUBJECTS:  # a subject's group: where it came from
                    sources.update(source["path"] for source in meta.get("attributes", {}).get("sources", {}).values())
        present = [Path(source) for source in sources if Path(source).exists()]
        source_bytes = sum(_bytes_under(source) for source in present) if sources else None
        return {"path": str(self.path), "store_bytes": stored, "raw_bytes": raw, "source_bytes": source_bytes,
                "sources_found": f"{len(present)} of {len(sources)}" if sources else "none (synthetic cohort)",
                "store_over_raw": round(stored / raw, 4) if raw else None,
                "store_over_source": round(stored / source_bytes, 4) if source_bytes else None}

    def read_manifest(self) -> list[dict[str, Any]]:
        """Manifest rows with numbers parsed back to int / float."""
        path = self.path / MANIFEST
        if not path.is_file():
            raise UserError(f"{path} is missing: the store has no manifest (re-run `raf synth` to finish it)")
        return read_rows_csv(path)

    def _group(self, subject_id: str):
        if not self.has_subject(subject_id):
            raise UserError(f"subject '{subject_id}' is not in {self.path}")
        return zarr.open_group(str(self.path / SUBJECTS / subject_id), mode="r")

    def _array(self, subject_id: str, channel: str):
        key = (subject_id, channel)
        if key not in self._arrays:
            group = self._group(subject_id)
            if channel not in group:
                raise UserError(f"subject '{subject_id}' has no channel '{channel}' "
                                f"(it has: {', '.join(sorted(group.array_keys()))})")
            self._arrays[key] = group[channel]
        return self._arrays[key]

    def __getstate__(self):
        return {"path": self.path, "_arrays": {}}


def _format_region(region: tuple[slice, ...]) -> str:
    return "[" + ", ".join(f"{r.start or 0}:{'' if r.stop is None else r.stop}" for r in region) + "]"


# ---- manifest CSVs (the store's manifest.csv, and the split manifests of a cohort build) ---------------------
def parse_cell(value: str) -> Any:
    """A manifest CSV cell as the value it was written from: an int, else a float, else the text itself
    ("" stays "", the spelling of a missing value)."""
    for parse in (int, float):
        try:
            return parse(value)
        except ValueError:
            pass
    return value


def _bytes_under(path: Path) -> int:
    """A file's size, or the total size of the files in a folder (a DICOM series)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def read_rows_csv(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a manifest CSV, one dict per line, with numbers parsed back to int / float (`parse_cell`)."""
    with open(path, newline="", encoding="utf-8") as handle:
        return [{key: parse_cell(value) for key, value in row.items()} for row in csv.DictReader(handle)]


def write_rows_csv(path: str | Path, rows: list[dict[str, Any]], columns: list[str] | None = None) -> Path:
    """Writes rows as a CSV, atomically; returns `path`.

    Args:
        path: the file (its folder is created).
        rows: one dict per line; a key missing from a row is written as an empty cell.
        columns: the header, in order (default: the union of the rows' keys, in first-seen order).
    """
    columns = columns or list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n", restval="")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buffer.getvalue())
