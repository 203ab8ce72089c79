"""Turning a cohort build into a challenge: public splits as webdataset shards with checksums, the hidden split as
a private cohort store, datasheets, and the two phases.

`add_challenge(root, db, build_dir, slug=...)`:

- the training split and the public test split are written as stores (`write_split_store`, alterations applied)
  and cut into webdataset shards under ROOT/public/<slug>/<split>/ with their index.json, the split's manifest.csv
  (without the label columns for a public test split published without labels) and SHA256SUMS; every file is a
  row of the downloads table, the only files a download route serves;
- the public test split is also kept whole, labels included, under ROOT/private for the sanity phase; the hidden
  split only ever exists there, its subjects renamed `case-NNNN` in a seeded shuffled order;
- each split's datasheet (the build's HTML) is published as a download of split "datasheet";
- two phases: "sanity" scores on the public test split and shows the worker's log and its scores (rounded to
  their intervals' precision; with the Ladder when the public test split is published without labels), "final"
  scores on the hidden split, shows no log and keeps a private leaderboard until the organisers reveal it (Kaggle's
  private leaderboard: the sanity phase plays the public one), with a per-team daily limit equal to the per-user
  one (Kaggle: a team submits as one participant) and the Ladder on, which guards the scores should the organisers
  make the leaderboard public while the phase runs.
"""
from __future__ import annotations

import json
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from rafmedia.core.config import Schema
from rafmedia.core.errors import UserError
from rafmedia.core.files import atomic_write_text, publish_folder, read_json, sha256_file, write_json
from rafmedia.evaluate.config import EvaluateConfig
from rafmedia.portal.db import Challenge, Download, Phase
from rafmedia.portal.settings import PortalRoot
from rafmedia.shards.split_store import write_split_store
from rafmedia.shards.store import CohortStore
from rafmedia.shards.wds_export import ExportConfig, export_webdataset

SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{1,47}$")
SPLITS = {"train": "train", "public_test": "public_test", "hidden_test": "hidden_test"}  # role -> default split name
# The scoring protocol of a new challenge: evaluate.* defaults, organiser-run probes over 5 split seeds (UNICORN),
# no random baseline per submission (the organiser submits one as an entry of its own).
DEFAULT_PROTOCOL: dict[str, Any] = {"seeds": [0, 1, 2, 3, 4], "random_baseline": False}
PHASES = [
    {"name": "sanity", "split": "public_test", "show_logs": True, "daily_limit": 10, "ladder": False,
     "description": "Checks that your encoder runs: scored on the public test split, the worker's log is shown."},
    {"name": "final", "split": "hidden_test", "show_logs": False, "daily_limit": 2, "team_daily_limit": 2,
     "ladder": True, "private_leaderboard": True,
     "description": "Scored on the hidden test split, which never leaves the server; logs are not shown, and "
                    "scores stay private until the organisers reveal the leaderboard at the end."},
]


def evaluate_config(protocol: dict[str, Any]) -> EvaluateConfig:
    """The evaluate.* settings of a protocol (defaults for every key it does not set), validated."""
    return Schema(EvaluateConfig, key_label="protocol key").build({**DEFAULT_PROTOCOL, **protocol})


def hidden_ids(num_subjects: int, seed: int) -> list[str]:
    """`case-NNNN` ids in a seeded random order: the hidden store's ids say nothing about the source subjects."""
    order = np.random.default_rng([seed, 7]).permutation(num_subjects)
    return [f"case-{int(position):04d}" for position in order]


def publish_split(root: PortalRoot, build_dir: Path, split: str, slug: str, *, drop_columns: tuple[str, ...],
                  shard_size_mb: float, progress: bool) -> tuple[Path, list[dict[str, Any]]]:
    """Shards, manifest and SHA256SUMS of one public split in ROOT/public/<slug>/<split>; returns the folder and
    its files (name, relative path, bytes, sha256)."""
    final = root.public / slug / split
    work = root.uploads / f".publish-{uuid.uuid4().hex[:8]}"
    try:
        store = write_split_store(build_dir, split, work / "cohort.zarr", drop_columns=drop_columns,
                                  label_maps=not drop_columns, progress=progress)
        export_webdataset(store, work / "shards", config=ExportConfig(shard_size_mb=shard_size_mb),
                          progress=progress)
        shutil.copyfile(store.path / "manifest.csv", work / "shards" / "manifest.csv")
        index = read_json(work / "shards" / "index.json")
        write_json(work / "shards" / "index.json", {**index, "source": f"{slug}/{split}"})  # not the server's path
        files = sorted(p for p in (work / "shards").iterdir() if p.is_file())
        sums = {p.name: sha256_file(p) for p in files}
        atomic_write_text(work / "shards" / "SHA256SUMS", "".join(f"{h}  {n}\n" for n, h in sums.items()))
        publish_folder(work / "shards", final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    sums["SHA256SUMS"] = sha256_file(final / "SHA256SUMS")
    records = [{"name": name, "relative_path": str((final / name).relative_to(root.public)),
                "bytes": (final / name).stat().st_size, "sha256": sha} for name, sha in sorted(sums.items())]
    return final, records


def add_challenge(root: PortalRoot, db: Session, build_dir: str | Path, *, slug: str, title: str = "",
                  description: str = "", licence: str = "", public_test_labels: bool = True,
                  protocol: dict[str, Any] | None = None, splits: dict[str, str] | None = None,
                  shard_size_mb: float = 64.0, progress: bool = True) -> Challenge:
    """Publishes the build at `build_dir` as challenge `slug` (module docstring); the caller commits `db`."""
    build_dir = Path(build_dir)
    if not SLUG.match(slug):
        raise UserError(f"challenge name '{slug}' must be 2-48 lower-case letters, digits or '-'")
    if db.scalar(select(Challenge).where(Challenge.slug == slug)) is not None:
        raise UserError(f"challenge '{slug}' exists already")
    if not (build_dir / "cohort.json").is_file():
        raise UserError(f"{build_dir} is not a cohort build (no cohort.json); make one with `raf cohort build`")
    splits = {**SPLITS, **(splits or {})}
    protocol = dict(protocol or {})
    config = evaluate_config(protocol)  # a bad protocol fails before anything is written
    label_columns = tuple(dict.fromkeys([config.primary_target, *config.targets, *config.ordinal_targets]))
    summary = read_json(build_dir / "cohort.json")
    private = root.private / slug
    if private.exists() or (root.public / slug).exists():
        raise UserError(f"{private} or {root.public / slug} exists already; remove it to publish '{slug}' again")

    challenge = Challenge(slug=slug, title=title or summary.get("name", slug), description=description,
                          licence=licence, public_test_labels=public_test_labels, protocol_json=json.dumps(protocol))
    db.add(challenge)
    db.flush()
    try:
        for role in ("train", "public_test"):
            _, records = publish_split(root, build_dir, splits[role], slug, shard_size_mb=shard_size_mb,
                                       drop_columns=() if role == "train" or public_test_labels else label_columns,
                                       progress=progress)
            db.add_all(Download(challenge_id=challenge.id, split=role, **record) for record in records)
        write_split_store(build_dir, splits["public_test"], private / "public_test" / "cohort.zarr",
                          progress=progress)
        num_hidden = summary["splits"][splits["hidden_test"]]["num_subjects"]
        ids = hidden_ids(num_hidden, int(summary.get("seed", 0)))
        hidden = write_split_store(build_dir, splits["hidden_test"], private / "hidden_test" / "cohort.zarr",
                                   rename=lambda index, entry: ids[index], progress=progress)
        for role in ("train", "public_test", "hidden_test"):
            db.add(_datasheet(root, build_dir / "datasheets" / splits[role] / "datasheet.html", slug, role,
                              challenge.id))
    except BaseException:
        shutil.rmtree(private, ignore_errors=True)
        shutil.rmtree(root.public / slug, ignore_errors=True)
        raise
    first = hidden.subject_ids()[0]
    attrs = hidden.subject_attrs(first)
    challenge.input_json = json.dumps({"channels": attrs["channels"], "shape": attrs["shape"]})
    for phase in PHASES:  # public test labels kept hidden are hidden labels too: the Ladder guards them
        db.add(Phase(challenge_id=challenge.id, **{**phase, "ladder": phase["ladder"] or not public_test_labels}))
    db.flush()
    return challenge


def _datasheet(root: PortalRoot, source: Path, slug: str, role: str, challenge_id: int) -> Download:
    if not source.is_file():
        raise UserError(f"{source} is missing: rebuild the cohort without --no-datasheets")
    target = root.public / slug / "datasheets" / f"{role}.html"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return Download(challenge_id=challenge_id, split="datasheet", name=f"{role}.html",
                    relative_path=str(target.relative_to(root.public)), bytes=target.stat().st_size,
                    sha256=sha256_file(target))


def scoring_store(root: PortalRoot, phase: Phase) -> CohortStore:
    """The private store a phase scores on."""
    return CohortStore(root.private / phase.challenge.slug / phase.split / "cohort.zarr")
