"""Listing the inputs of `raf shards ingest`: which files make up which subject, with which metadata.

Three kinds of input, detected from the path:

- a CSV/TSV listing: `subject_id`, `image` (one channel named "image") or `image:<channel>` columns, an optional
  `label`; every other column is metadata; relative paths are relative to the listing file;
- a BIDS-like layout with `participants.tsv`: `sub-XX/[ses-YY/]<datatype>/sub-XX[_ses-YY]_..._<suffix>.<ext>`,
  the suffix (T1w, T2w, pet, ct, ...) names the channel; `dseg`/`mask`/`label` files are labels;
- a plain folder: each image file, or each sub-folder holding a DICOM series, is one subject with channel
  "image"; `<name>_label.<ext>` / `<name>_seg.<ext>` is its label.

Problems visible from the listing alone (duplicate ids, missing required metadata) mark the subject bad here.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rafmedia.core.errors import UserError
from rafmedia.shards.formats import image_suffix, strip_suffix

LABEL_SUFFIXES = ("label", "seg")  # plain folder: <name>_label.<ext>, <name>_seg.<ext>
BIDS_LABEL_SUFFIXES = ("dseg", "mask", "label")
MISSING_VALUES = ("", "n/a", "N/A")  # BIDS writes n/a for a missing value
_CHANNEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
LICENCE_COLUMNS = ("licence", "license")  # optional metadata: the licence the subject's data is shared under
SOURCE_COLUMNS = ("source", "dataset")  # optional metadata: the dataset the subject comes from
UNKNOWN_LICENCE = "unknown"


@dataclass
class SubjectSource:
    """One subject's inputs as listed: image paths per channel, an optional label, metadata."""

    subject_id: str
    images: dict[str, Path]
    label: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    where: str = ""  # where the listing names it ("row 4", "sub-01/ses-02")
    problem: str = ""  # a reason known from the listing alone; the subject is then bad
    default_source: str = ""  # the source name when the listing has no source column: the input's name

    def data_source(self) -> dict[str, str]:
        """{"name", "licence"} of the subject's data, from its `source`/`dataset` and `licence`/`license` metadata
        (`default_source` and "unknown" when the listing has no such column or leaves it empty)."""
        def first(columns: tuple[str, ...]) -> str | None:
            values = [self.metadata.get(column) for column in columns]
            return next((str(value) for value in values if value not in (None, "")), None)
        return {"name": first(SOURCE_COLUMNS) or self.default_source, "licence": first(LICENCE_COLUMNS) or UNKNOWN_LICENCE}


@dataclass
class Listing:
    kind: str  # "csv listing" | "bids layout" | "folder"
    path: Path
    subjects: list[SubjectSource]
    columns: list[str]  # metadata columns
    ignored: list[str] = field(default_factory=list)  # entries that are not inputs

    def fingerprint(self) -> str:
        text = json.dumps([[s.subject_id, sorted((k, str(v)) for k, v in s.images.items()), str(s.label)]
                           for s in self.subjects])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def describe(self) -> str:
        channels = sorted({channel for s in self.subjects for channel in s.images})
        labels = sum(s.label is not None for s in self.subjects)
        text = (f"input: {self.path} (detected: {self.kind}; {len(self.subjects)} subjects; channels: "
                f"{', '.join(channels) or '-'}; {labels} with a label; metadata: {', '.join(self.columns) or '-'})")
        if self.ignored:
            text += f"\n  ignored {len(self.ignored)} entries that are not inputs: {', '.join(self.ignored[:5])}" + (
                ", ..." if len(self.ignored) > 5 else "")
        return text


def list_inputs(path: str | Path) -> Listing:
    """Detects the kind of input (file => listing; folder with participants.tsv => BIDS; else plain folder)."""
    path = Path(os.path.abspath(path))
    if path.is_file():
        listing = _table_listing(path)
    elif (path / "participants.tsv").is_file():
        listing = _bids_listing(path)
    elif path.is_dir():
        listing = _folder_listing(path)
    else:
        raise UserError(f"input not found: {path} (give a CSV/TSV listing, a BIDS-like folder or a folder of images)")
    if not listing.subjects:
        raise UserError(f"no subjects found in {path} (detected: {listing.kind}); supported files: "
                        ".nii, .nii.gz, .nrrd, .mha, .mhd or DICOM series folders")
    for subject in listing.subjects:
        subject.default_source = path.stem if path.is_file() else path.name
    return listing


def _read_table(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            columns = [(name or "").strip() for name in reader.fieldnames or []]
            rows = [{column: (value or "").strip() for column, value in zip(columns, row.values())}
                    for row in reader]
    except (UnicodeDecodeError, csv.Error) as error:
        raise UserError(f"{path} is not a readable {'TSV' if delimiter == chr(9) else 'CSV'} text file ({error})") from None
    return columns, rows


def _parse_value(text: str) -> Any:
    if text in MISSING_VALUES:
        return None
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return text


def _table_listing(path: Path) -> Listing:
    columns, rows = _read_table(path)
    image_columns = {column: "image" if column == "image" else column.split(":", 1)[1].strip()
                     for column in columns if column == "image" or column.startswith("image:")}
    if "subject_id" not in columns or not image_columns:
        raise UserError(f"{path}: a listing needs a 'subject_id' column and an 'image' (or 'image:<channel>') "
                        f"column; it has: {', '.join(columns) or 'no header'}")
    for column, channel in image_columns.items():
        if not _CHANNEL.match(channel) or channel == "label":
            raise UserError(f"{path}: column '{column}' names channel '{channel}': use letters, digits, '.', '_', "
                            "'-' (and not 'label')")
    metadata_columns = [c for c in columns if c not in image_columns and c not in ("subject_id", "label")]
    subjects = []
    for number, row in enumerate(rows, start=2):
        if not any(row.values()):
            continue
        images = {channel: path.parent / row[column] for column, channel in image_columns.items() if row[column]}
        missing = [channel for column, channel in image_columns.items() if not row[column]]
        subjects.append(SubjectSource(
            subject_id=row["subject_id"], images=images, where=f"row {number}",
            label=path.parent / row["label"] if row.get("label") else None,
            metadata={column: _parse_value(row[column]) for column in metadata_columns},
            problem=f"no file given for channel(s) {', '.join(missing)}" if missing else ""))
        if not row["subject_id"]:
            subjects[-1].problem = "empty subject_id"
    kind = "tsv listing" if path.suffix.lower() in (".tsv", ".tab") else "csv listing"
    return Listing(kind=kind, path=path, subjects=subjects, columns=metadata_columns)


def _bids_listing(root: Path) -> Listing:
    columns, rows = _read_table(root / "participants.tsv")
    if "participant_id" not in columns:
        raise UserError(f"{root / 'participants.tsv'} has no 'participant_id' column (it has: {', '.join(columns)})")
    participants = {row["participant_id"]: row for row in rows if row.get("participant_id")}
    metadata_columns = ["participant_id"] + [c for c in columns if c != "participant_id"]
    subject_dirs = sorted(p for p in root.glob("sub-*") if p.is_dir())
    has_sessions = any(p.is_dir() for sub in subject_dirs for p in sub.glob("ses-*"))
    if has_sessions:
        metadata_columns.append("session")
    subjects, ignored = [], []
    for subject_dir in subject_dirs:
        sessions = sorted(p for p in subject_dir.glob("ses-*") if p.is_dir()) or [subject_dir]
        for unit in sessions:
            source = _bids_unit(root, subject_dir.name, unit, participants, ignored)
            if has_sessions:
                source.metadata["session"] = unit.name if unit != subject_dir else None
            subjects.append(source)
    for participant in participants:
        if not (root / participant).is_dir():
            subjects.append(SubjectSource(participant, {}, where="participants.tsv", metadata={"participant_id": participant},
                                          problem=f"listed in participants.tsv but there is no folder {participant}/"))
    return Listing(kind="bids layout", path=root, subjects=subjects, columns=metadata_columns, ignored=ignored)


def _bids_unit(root: Path, participant: str, unit: Path, participants: dict, ignored: list[str]) -> SubjectSource:
    """One subject (or subject + session) of a BIDS-like layout: <unit>/<datatype>/<entities>_<suffix>.<ext>."""
    subject_id = participant if unit.name == participant else f"{participant}_{unit.name}"
    prefix = subject_id + "_"
    row = participants.get(participant)
    metadata = {"participant_id": participant,
                **{key: _parse_value(value) for key, value in (row or {}).items() if key != "participant_id"}}
    images, labels = {}, []
    for file in sorted(p for p in unit.glob("*/*") if p.is_file()):
        if image_suffix(file) is None:
            ignored.append(str(file.relative_to(root)))
            continue
        stem = strip_suffix(file)
        name = stem.removeprefix(prefix)
        if name.rsplit("_", 1)[-1] in BIDS_LABEL_SUFFIXES:
            labels.append(file)
        else:
            images.setdefault(name, []).append(file)
    source = SubjectSource(subject_id, {name: files[0] for name, files in images.items()},
                           label=labels[0] if labels else None, metadata=metadata, where=str(unit.relative_to(root)))
    clashes = [name for name, files in images.items() if len(files) > 1]
    if not images:
        source.problem = f"no image files in {unit.relative_to(root)}/<datatype>/"
    elif clashes:
        source.problem = f"several files for channel '{clashes[0]}': " + ", ".join(f.name for f in images[clashes[0]])
    elif len(labels) > 1:
        source.problem = "several label files: " + ", ".join(f.name for f in labels)
    return source


def _folder_listing(root: Path) -> Listing:
    images: dict[str, list[Path]] = {}
    labels: dict[str, list[Path]] = {}
    ignored = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if _looks_like_dicom_folder(entry):
                images.setdefault(entry.name, []).append(entry)
            else:
                ignored.append(entry.name + "/")
        elif image_suffix(entry) is None:
            if entry.suffix.lower() not in (".raw", ".zraw"):  # .mhd payloads are read with their header
                ignored.append(entry.name)
        else:
            base, _, suffix = strip_suffix(entry).rpartition("_")
            is_label = bool(base) and suffix in LABEL_SUFFIXES
            (labels if is_label else images).setdefault(base if is_label else strip_suffix(entry), []).append(entry)
    subjects = []
    for stem, found in images.items():
        own_labels = labels.pop(stem, [])
        source = SubjectSource(stem, {"image": found[0]}, label=own_labels[0] if own_labels else None,
                               where=found[0].name)
        if len(found) > 1:
            source.problem = "several images with this name: " + ", ".join(f.name for f in found)
        elif len(own_labels) > 1:
            source.problem = "several label files: " + ", ".join(f.name for f in own_labels)
        subjects.append(source)
    for stem, orphans in labels.items():
        subjects.append(SubjectSource(stem, {}, where=orphans[0].name,
                                      problem=f"label file {orphans[0].name} has no image named {stem}.<ext>"))
    return Listing(kind="folder", path=root, subjects=subjects, columns=[], ignored=ignored)


def _looks_like_dicom_folder(folder: Path) -> bool:
    """A quick look at a few files: a .dcm name or the 'DICM' magic at byte 128 (the full parse is SimpleITK's)."""
    for file in sorted(p for p in folder.iterdir() if p.is_file())[:5]:
        if file.suffix.lower() == ".dcm":
            return True
        with open(file, "rb") as handle:
            if handle.read(132)[128:] == b"DICM":
                return True
    return False


def check_listing(listing: Listing, require: list[str]) -> Listing:
    """Marks duplicate ids and missing required values as problems; a required column absent is a UserError."""
    absent = [column for column in require if column not in listing.columns]
    if absent:
        raise UserError(f"--require: column '{absent[0]}' is not in {listing.path} (detected: {listing.kind}; its "
                        f"metadata columns: {', '.join(listing.columns) or 'none'})")
    where: dict[str, list[str]] = {}
    for source in listing.subjects:
        where.setdefault(source.subject_id, []).append(source.where)
    for source in listing.subjects:
        if len(where[source.subject_id]) > 1 and source.subject_id:
            source.problem = (f"duplicate subject id: '{source.subject_id}' appears {len(where[source.subject_id])} "
                              f"times ({', '.join(where[source.subject_id])})")
        empty = [column for column in require if source.metadata.get(column) is None]
        if empty and not source.problem:
            source.problem = f"missing value for required metadata column(s) {', '.join(empty)}"
    return listing
