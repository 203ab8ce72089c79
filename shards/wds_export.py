"""Export a cohort store to webdataset tar shards: whole volumes or pre-sampled patches.

Each sample has `image.npy` (C, D, H, W float32, the subject's channels stacked), `label.npy` (D, H, W) when the
subject has a label map, and `json` (subject id, channels, patch origin, metadata, spacing). Shards are plain
POSIX tars (readable by `tar` and by the stock `webdataset` library), rolled at `shard_size_mb`, and listed in
`index.json` with their sample counts and sizes. The whole export is written to a staging folder and renamed
into place when complete, so an interrupted export never leaves shards that look finished.
"""
from __future__ import annotations

import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import webdataset as wds
from tqdm.auto import tqdm

from rafmedia.core.errors import UserError
from rafmedia.core.files import publish_folder, read_json, write_json
from rafmedia.core.registry import unknown_name_error
from rafmedia.shards.store import MANIFEST, CohortStore

INDEX = "index.json"
MODES = ("volumes", "patches")


@dataclass
class ExportConfig:
    """How a cohort store is cut into webdataset shards."""

    mode: str = "volumes"  # volumes | patches
    shard_size_mb: float = 512.0  # a shard is closed once it reaches this size
    patch_size: int = 32  # patches mode: cubic patch edge, voxels
    patches_per_subject: int = 8  # patches mode
    seed: int = 0  # patches mode: corners drawn from default_rng([seed, subject index])

    def validate(self) -> None:
        if self.mode not in MODES:
            raise unknown_name_error("export.mode", self.mode, MODES)
        if self.shard_size_mb <= 0 or self.patch_size < 1 or self.patches_per_subject < 1:
            raise UserError("export.shard_size_mb, export.patch_size and export.patches_per_subject must be positive")


def sample_key(subject_id: str, patch: int | None = None) -> str:
    """webdataset splits a member name at its first dot, so keys carry no dots."""
    key = subject_id.replace(".", "_")
    return key if patch is None else f"{key}_p{patch:04d}"


def _subject_samples(store: CohortStore, subject_id: str, index: int, row: dict[str, Any],
                     config: ExportConfig) -> Iterator[dict[str, Any]]:
    attrs = store.subject_attrs(subject_id)
    shape = tuple(attrs["shape"])
    info = {"subject_id": subject_id, "channels": attrs["channels"], "spacing": attrs.get("spacing"),
            "metadata": row or attrs.get("metadata", {})}
    if config.mode == "volumes":
        regions = [(None, tuple(slice(0, size) for size in shape))]
    else:
        if min(shape) < config.patch_size:
            raise UserError(f"subject {subject_id} ({shape}) is smaller than export.patch_size={config.patch_size}")
        rng = np.random.default_rng([config.seed, index])
        corners = [tuple(int(rng.integers(0, size - config.patch_size + 1)) for size in shape)
                   for _ in range(config.patches_per_subject)]
        regions = [(p, tuple(slice(c, c + config.patch_size) for c in corner)) for p, corner in enumerate(corners)]
    for patch, region in regions:
        sample = {"__key__": sample_key(subject_id, patch),
                  "image.npy": np.stack([store.read(subject_id, channel, region) for channel in attrs["channels"]]),
                  "json": {**info, "origin": [s.start for s in region], "shape": [s.stop - s.start for s in region]}}
        if attrs.get("has_label"):
            sample["label.npy"] = store.read_label(subject_id, region)
        yield sample


def _encoded_size(sample: dict[str, Any]) -> int:
    return sum(value.nbytes + 128 for key, value in sample.items() if key.endswith(".npy")) + 2048


def export_webdataset(store: CohortStore, out: str | Path, *, config: ExportConfig, overwrite: bool = False,
                      progress: bool = True) -> Path:
    """Writes the shards and `index.json` into `out` (a new folder); returns the index path."""
    config.validate()
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it")
    staging = out.with_name(f".{out.name}.staging.{uuid.uuid4().hex[:8]}")
    staging.mkdir(parents=True)
    rows = {row["subject_id"]: row for row in store.read_manifest()} if (store.path / MANIFEST).is_file() else {}
    limit = int(config.shard_size_mb * 1024 * 1024)
    shards: list[dict[str, Any]] = []
    writer = handle = None
    try:
        for index, subject_id in enumerate(tqdm(store.subject_ids(), desc="export", unit="subject", disable=not progress)):
            for sample in _subject_samples(store, subject_id, index, rows.get(subject_id, {}), config):
                if writer is not None and handle.tell() + _encoded_size(sample) > limit:
                    _close_shard(writer, handle, shards[-1])
                    writer = None
                if writer is None:
                    name = f"shard-{len(shards):06d}.tar"
                    handle = open(staging / name, "wb")
                    writer = wds.TarWriter(handle)
                    shards.append({"name": name, "num_samples": 0, "first_key": sample["__key__"]})
                writer.write(sample)
                shards[-1]["num_samples"] += 1
                shards[-1]["last_key"] = sample["__key__"]
        if writer is not None:
            _close_shard(writer, handle, shards[-1])
        write_json(staging / INDEX, {"format": "rafmedia.webdataset/1", "source": str(store.path),
                                     "config": asdict(config), "num_samples": sum(s["num_samples"] for s in shards),
                                     "shards": shards})
        publish_folder(staging, out)
    finally:
        if handle is not None and not handle.closed:
            handle.close()
        shutil.rmtree(staging, ignore_errors=True)
    return out / INDEX


def _close_shard(writer, handle, shard: dict[str, Any]) -> None:
    """Ends the tar stream, closes the file (ours, not the writer's) and records the shard's size."""
    writer.close()
    shard["bytes"] = handle.tell()
    handle.close()


def shard_urls(folder: str | Path) -> list[str]:
    """The shard paths of an export, in order, from its index (for `webdataset.WebDataset(urls)`)."""
    folder = Path(folder)
    index = folder / INDEX
    if not index.is_file():
        raise UserError(f"{index} not found: {folder} is not a finished webdataset export")
    return [str(folder / shard["name"]) for shard in read_json(index)["shards"]]
