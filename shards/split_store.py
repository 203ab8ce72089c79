"""One split of a cohort build written out as a cohort store of its own, with the recorded alterations applied.

A build (`raf cohort build`) only lists its subjects (`splits/<split>.csv`) and reads the volumes from their source
stores; a benchmark portal needs each split on its own: the hidden split in a private store the evaluator scores
on, the public splits in stores that `export_webdataset` cuts into shards. `write_split_store` writes one, with:

- every subject's volumes as the build reads them (`CohortSplit.read`, alterations included), so what is scored
  is what was built, and its label map unless `label_maps` is off;
- a manifest of the split's metadata columns, less `drop_columns` (the labels of a public test split without
  labels) and less the build's bookkeeping (source store paths, alteration seeds);
- subject ids `rename(index, entry)`, or the entry's uid made store-safe ('/' -> '__'); a hidden split gets ids
  that say nothing about the source cohort.

The store is written into a staging folder and renamed into place when complete.
"""
from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from rafmedia.core.errors import UserError
from rafmedia.core.files import publish_folder
from rafmedia.shards.cohort_reader import CohortSplit, SplitEntry
from rafmedia.shards.store import CohortStore, StoreConfig

PRIVATE_COLUMNS = ("uid", "source", "store", "alteration_seed")  # where a subject came from: never copied


def store_safe_id(index: int, entry: SplitEntry) -> str:
    return entry.uid.replace("/", "__")


def write_split_store(build_dir: str | Path, split: str, out: str | Path, *, drop_columns: tuple[str, ...] = (),
                      label_maps: bool = True, rename: Callable[[int, SplitEntry], str] = store_safe_id,
                      config: StoreConfig | None = None, progress: bool = True) -> CohortStore:
    """Writes split `split` of the build at `build_dir` into a new cohort store at `out`; returns it."""
    out = Path(out)
    if out.exists():
        raise UserError(f"{out} exists already; remove it or choose another folder")
    members = CohortSplit(build_dir, split)
    if not len(members):
        raise UserError(f"split '{split}' of {build_dir} has no subjects")
    staging = out.with_name(f".{out.name}.staging-{uuid.uuid4().hex[:8]}")
    try:
        store = CohortStore.create(staging, config=config or StoreConfig(), name=f"{Path(build_dir).name}-{split}")
        rows = []
        for index, entry in enumerate(tqdm(members, desc=f"split {split}", unit="subject", disable=not progress)):
            source = members.store(entry)
            attrs = source.subject_attrs(entry.subject_id)
            subject_id = rename(index, entry)
            channels = {channel: members.read(entry, channel) for channel in attrs["channels"]}
            label = members.read_label(entry) if label_maps and attrs.get("has_label") else None
            store.write_subject(subject_id, channels=channels, label=label,
                                attrs={"spacing": attrs.get("spacing")} if attrs.get("spacing") else {})
            row = {"subject_id": subject_id, "ood": int(entry.ood), "alteration": entry.alteration or "none",
                   "alteration_severity": entry.alteration_severity, **entry.metadata}
            rows.append({k: v for k, v in row.items() if k not in PRIVATE_COLUMNS and k not in drop_columns})
        store.write_manifest(rows)
        publish_folder(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return CohortStore(out)
