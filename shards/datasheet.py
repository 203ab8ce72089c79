"""The datasheet of a cohort: who is in it, how it was acquired, and what is missing or odd.

Input is a manifest (one row per subject, columns as in `rafmedia.shards.manifest`): the one inside a cohort
store, or a split manifest written by `raf cohort build`. Output, in one folder:

    datasheet.json   every number (the Markdown, HTML and figures are drawn from it, never recomputed)
    datasheet.md     tables, with figures/*.png linked
    datasheet.html   the same, figures embedded as base64 PNG (self-contained, like `raf report`)

Sections: counts per subgroup and per intersection of the attributes (categorical metadata), rare
categories (frequency below `rare_below`) flagged by name, empty and rare intersections, numeric
metadata, missing metadata, quality-flag prevalence, shape and spacing histograms, and intensity
histograms per site. The intensity histograms are of voxels, not of the manifest's summary statistics:
a strided sub-sample (`[::stride]` on each axis) of every subject is read from its store, through the
subject's planted alteration for a split manifest, and histogrammed on bins shared by all groups.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from itertools import combinations, product
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm.auto import tqdm

from rafmedia.core.errors import UserError
from rafmedia.core.files import atomic_write_bytes, atomic_write_text, write_json
from rafmedia.core.registry import did_you_mean
from rafmedia.shards import datasheet_figures
from rafmedia.shards.cohort_reader import split_sample_reader
from rafmedia.shards.manifest import QUALITY_FLAGS
from rafmedia.shards.store import COHORT_STORE, CohortStore, read_rows_csv, resolve_store

MISSING = "(missing)"
MAX_INTEGER_CATEGORIES = 10
_STATISTIC = re.compile(r"^((shape|spacing)_\d+|.+_(mean|std|p01|p99|min|max|noise)|label_foreground|flags)$")
_IDENTIFIERS = {"subject_id", "uid", "store", "alteration_seed"}  # per-subject ids and paths, never attributes
Row = dict[str, Any]


@dataclass
class DatasheetConfig:
    """What the datasheet groups by and how it samples voxels."""

    attributes: list[str] | None = None  # None: every categorical metadata column
    rare_below: float = 0.05  # a category (or intersection) with a smaller share of subjects is flagged rare
    channel: str = "image"
    intensity_by: str | None = None  # histograms of voxel intensities per value of this column; None: "site" if
    # the manifest has it, else one histogram for all subjects
    stride: int = 4  # voxel sub-sample: every stride-th voxel along each axis
    bins: int = 60
    max_categories: int = 20  # more distinct values than this: not a categorical attribute

    def validate(self) -> None:
        if not 0 < self.rare_below < 1:
            raise UserError(f"--rare-below must be a fraction in (0, 1), got {self.rare_below}")
        if self.stride < 1 or self.bins < 2:
            raise UserError(f"--stride must be >= 1 and bins >= 2, got stride={self.stride}, bins={self.bins}")


# ---- columns -------------------------------------------------------------------------------------
def metadata_columns(rows: list[Row]) -> list[str]:
    """Columns that describe subjects (not statistics from `summary_row`, not ids or paths)."""
    columns = dict.fromkeys(key for row in rows for key in row)
    return [c for c in columns if c not in _IDENTIFIERS and not _STATISTIC.match(c)]


def _present(rows: list[Row], column: str) -> list[Any]:
    return [row.get(column, "") for row in rows if row.get(column, "") != ""]


def is_categorical(values: list[Any], num_rows: int, max_categories: int) -> bool:
    """Text with at most `max_categories` values, or integers with at most `MAX_INTEGER_CATEGORIES` (codes such
    as disease 0/1 or severity 0-3, not ages in years); a column unique per subject (an id) is not categorical."""
    if not values or any(isinstance(v, float) for v in values):
        return False
    distinct = len(set(values))
    limit = MAX_INTEGER_CATEGORIES if all(isinstance(v, int) for v in values) else max_categories
    return distinct <= limit and not (distinct == num_rows >= 5)


def default_attributes(rows: list[Row], max_categories: int) -> list[str]:
    return [c for c in metadata_columns(rows) if is_categorical(_present(rows, c), len(rows), max_categories)]


def _label(value: Any) -> str:
    return MISSING if value == "" else str(value)


# ---- sections (each returns plain JSON data) ----------------------------------------------------------
def subgroup_counts(rows: list[Row], attributes: list[str], rare_below: float) -> dict[str, Any]:
    """Counts and shares per value of each attribute; values below `rare_below` listed as rare."""
    total = len(rows)
    counts, rare = {}, {}
    for attribute in attributes:
        counter = Counter(str(v) for v in _present(rows, attribute))
        counts[attribute] = {value: {"count": n, "fraction": n / total} for value, n in sorted(counter.items())}
        rare[attribute] = [value for value, n in sorted(counter.items()) if n / total < rare_below]
    return {"counts": counts, "rare": rare}


def intersection_counts(rows: list[Row], attributes: list[str], rare_below: float) -> list[dict[str, Any]]:
    """For every pair of attributes (and all of them together, when more than two): counts of each cell.

    Pairs list every combination of observed values, empty ones included (an empty cell is the gap a
    datasheet exists to show); the full intersection lists observed cells only.
    """
    total = len(rows)
    tables = []
    sets = [list(pair) for pair in combinations(attributes, 2)] + ([list(attributes)] if len(attributes) > 2 else [])
    for names in sets:
        counter = Counter(tuple(_label(row.get(a, "")) for a in names) for row in rows)
        if len(names) == 2:
            axes = [sorted({key[i] for key in counter}) for i in range(2)]
            keys = list(product(*axes))
        else:
            keys = sorted(counter)
        cells = [{"values": dict(zip(names, key)), "count": counter.get(key, 0),
                  "fraction": counter.get(key, 0) / total} for key in keys]
        tables.append({"attributes": names, "cells": cells,
                       "empty": [c["values"] for c in cells if c["count"] == 0],
                       "rare": [c["values"] for c in cells if 0 < c["fraction"] < rare_below]})
    return tables


def missing_metadata(rows: list[Row], columns: list[str]) -> dict[str, Any]:
    per_column = {c: sum(row.get(c, "") == "" for row in rows) for c in columns}
    return {"per_column": {c: {"count": n, "fraction": n / len(rows)} for c, n in per_column.items()},
            "num_subjects_with_missing": sum(any(row.get(c, "") == "" for c in columns) for row in rows)}


def quality_prevalence(rows: list[Row]) -> dict[str, Any]:
    """Share of subjects carrying each quality flag (every known flag listed, unknown ones added)."""
    counter = Counter(flag for row in rows for flag in str(row.get("flags", "")).split(";") if flag)
    flags = list(QUALITY_FLAGS) + sorted(set(counter) - set(QUALITY_FLAGS))
    return {"flags": {flag: {"count": counter.get(flag, 0), "fraction": counter.get(flag, 0) / len(rows),
                             "rule": QUALITY_FLAGS.get(flag, "not a rafmedia flag")} for flag in flags},
            "num_flagged": sum(bool(str(row.get("flags", ""))) for row in rows)}


def numeric_summary(rows: list[Row], columns: list[str], bins: int = 20) -> dict[str, Any]:
    out = {}
    for column in columns:
        values = np.array(_present(rows, column), dtype=np.float64)
        counts, edges = np.histogram(values, bins=min(bins, max(1, len(np.unique(values)))))
        out[column] = {"count": int(values.size), "min": float(values.min()), "median": float(np.median(values)),
                       "mean": float(values.mean()), "max": float(values.max()),
                       "histogram": {"edges": edges.tolist(), "counts": counts.tolist()}}
    return out


def geometry(rows: list[Row]) -> dict[str, Any]:
    """Histograms (value -> count) of the shape and the voxel spacing along each axis."""
    out = {}
    for kind in ("shape", "spacing"):
        for axis in range(3):
            values = _present(rows, f"{kind}_{axis}")
            if values:
                out[f"{kind}_{axis}"] = {"values": {str(v): n for v, n in sorted(Counter(values).items())},
                                         "min": min(values), "median": float(np.median(values)), "max": max(values)}
    return out


def intensity_histograms(rows: list[Row], read_sample: Callable[[Row], np.ndarray | None], *, group_by: str | None,
                         bins: int, progress: bool) -> dict[str, Any]:
    """Normalised histograms of sub-sampled voxels per group, on bins shared by every group. Subjects without the
    channel (`read_sample` gives None: a missing modality) are left out and counted."""
    samples: dict[str, list[np.ndarray]] = {}
    num_without_channel = 0
    for row in tqdm(rows, desc="datasheet voxels", unit="subject", disable=not progress):
        group = _label(row.get(group_by, "")) if group_by else "all"
        sample = read_sample(row)
        if sample is None:
            num_without_channel += 1
            continue
        samples.setdefault(group, []).append(np.asarray(sample, dtype=np.float64).ravel())
    pooled = np.concatenate([v for values in samples.values() for v in values])
    low, high = np.percentile(pooled, [0.5, 99.5])
    edges = np.linspace(low, high if high > low else low + 1.0, bins + 1)
    groups = {}
    for group, values in sorted(samples.items()):
        voxels = np.concatenate(values)
        density, _ = np.histogram(np.clip(voxels, edges[0], edges[-1]), bins=edges, density=True)
        p01, p50, p99 = np.percentile(voxels, [1, 50, 99])
        groups[group] = {"num_subjects": len(values), "num_voxels": int(voxels.size), "mean": float(voxels.mean()),
                         "std": float(voxels.std()), "p01": float(p01), "median": float(p50), "p99": float(p99),
                         "density": density.tolist()}
    return {"group_by": group_by, "edges": edges.tolist(), "groups": groups, "num_without_channel": num_without_channel,
            "note": "voxels beyond the shared range are counted in the end bins"}


# ---- the whole datasheet ---------------------------------------------------------------------------
def compute_datasheet(rows: list[Row], *, config: DatasheetConfig, title: str,
                      read_sample: Callable[[Row], np.ndarray] | None, progress: bool = True) -> dict[str, Any]:
    """Every number of the datasheet, as JSON-ready data."""
    config.validate()
    if not rows:
        raise UserError(f"{title}: the manifest has no subjects; nothing to describe")
    columns = metadata_columns(rows)
    attributes = config.attributes if config.attributes is not None else default_attributes(rows, config.max_categories)
    all_columns = list(dict.fromkeys(key for row in rows for key in row))
    for attribute in attributes:
        if attribute not in all_columns:
            raise UserError(f"--attributes: '{attribute}' is not a manifest column;{did_you_mean(attribute, columns)} "
                            f"(metadata columns: {', '.join(columns)})")
    numeric = [c for c in columns if c not in attributes and _present(rows, c)
               and all(isinstance(v, (int, float)) for v in _present(rows, c))]
    if config.intensity_by is not None and config.intensity_by not in all_columns:
        raise UserError(f"--intensity-by: '{config.intensity_by}' is not a manifest column;"
                        f"{did_you_mean(config.intensity_by, columns)} (metadata columns: {', '.join(columns)})")
    group_by = config.intensity_by or ("site" if "site" in all_columns else None)
    sheet = {"title": title, "num_subjects": len(rows), "attributes": attributes, "rare_below": config.rare_below,
             "subgroups": subgroup_counts(rows, attributes, config.rare_below),
             "intersections": intersection_counts(rows, attributes, config.rare_below),
             "numeric": numeric_summary(rows, numeric), "missing": missing_metadata(rows, columns),
             "quality": quality_prevalence(rows), "geometry": geometry(rows), "intensity": None}
    if read_sample is not None:
        sheet["intensity"] = {**intensity_histograms(rows, read_sample, group_by=group_by, bins=config.bins,
                                                     progress=progress),
                              "channel": config.channel, "stride": config.stride}
    return sheet


def write_datasheet(rows: list[Row], *, out: str | Path, config: DatasheetConfig, title: str,
                    read_sample: Callable[[Row], np.ndarray] | None, progress: bool = True) -> Path:
    """Writes datasheet.json, datasheet.md (+ figures/*.png) and datasheet.html into `out`; returns the HTML path."""
    out = Path(out)
    sheet = compute_datasheet(rows, config=config, title=title, read_sample=read_sample, progress=progress)
    write_json(out / "datasheet.json", sheet)
    figures = datasheet_figures.all_figures(sheet)
    for name, png in figures.items():
        atomic_write_bytes(out / "figures" / f"{name}.png", png)
    atomic_write_text(out / "datasheet.md", datasheet_figures.render_markdown(sheet, list(figures)))
    return atomic_write_text(out / "datasheet.html", datasheet_figures.render_html(sheet, figures))


def load_manifest(path: str | Path, *, channel: str,
                  stride: int) -> tuple[list[Row], Callable[[Row], np.ndarray], str, Path]:
    """Reads a cohort store's manifest or a split manifest CSV. Returns (rows, voxel reader, title, default out)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".csv":
        rows = read_rows_csv(path)
        if rows and "store" not in rows[0]:
            raise UserError(f"{path} has no 'store' column: give a cohort store, or a split manifest written by "
                            "`raf cohort build`")
        return rows, split_sample_reader(channel, stride), path.stem, path.parent / f"datasheet-{path.stem}"
    if not path.exists():
        raise UserError(f"{path} not found: give a cohort store (or a folder holding {COHORT_STORE}) or a split CSV")
    store = CohortStore(resolve_store(path).resolve())
    region = (slice(None, None, stride),) * 3
    rows = store.read_manifest()
    # A subject's channel statistics are blank in the manifest when it lacks the channel (a missing modality).
    if rows and all(row.get(f"{channel}_mean", "") == "" for row in rows):
        channels = [column.removesuffix("_mean") for column in rows[0] if column.endswith("_mean")]
        raise UserError(f"--channel: no subject of {store.path} has channel '{channel}';"
                        f"{did_you_mean(channel, channels)} pass --channel with one of: {', '.join(channels)}")

    def read_sample(row: Row) -> np.ndarray | None:
        return None if row.get(f"{channel}_mean", "") == "" else store.read(str(row["subject_id"]), channel, region)

    return rows, read_sample, store.attrs().get("name", store.path.name), store.path / "datasheet"
