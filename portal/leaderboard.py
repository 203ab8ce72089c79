"""Leaderboards with intervals everywhere: every number with its bootstrap 95% interval, every rank with the
interval of the ranks it takes over the same bootstrap draws, and entries that cannot be told apart shown as tied.

Every submission of a phase is scored on the same subjects with the same split seeds and bootstrap seed, so the
b-th bootstrap draw of every entry resamples the same subjects (`raf_with_intervals(with_draws=True)`): ranking
the entries within each draw gives each entry a distribution of ranks, whose 2.5% and 97.5% quantiles are its rank
interval. Ties: walking down the table sorted by RAF index, an entry starts a new tie group unless its RAF
interval overlaps the interval of the first entry of the current group; every member shows that entry's rank
("=2"). Each participant's best entry is listed (or every entry, `best_only=False`).
"""
from __future__ import annotations

import csv
import io
import math
from typing import Any

import numpy as np

COMPONENTS = ("index", "performance", "robustness", "fairness")
LABELS = {"index": "RAF", "performance": "P", "robustness": "R", "fairness": "F"}


def rank_intervals(draws_ED: np.ndarray, level: float = 0.95) -> np.ndarray:
    """(E, 2) rank intervals (1 = best) from per-draw values of E entries over D shared draws (higher is better;
    a NaN draw ranks last). Ties within a draw share the best rank."""
    values = np.where(np.isfinite(draws_ED), draws_ED, -np.inf)
    ranks_ED = 1 + (values[None, :, :] > values[:, None, :]).sum(axis=1)  # how many entries beat each entry
    alpha = (1 - level) / 2
    low = np.floor(np.quantile(ranks_ED, alpha, axis=1, method="lower"))
    high = np.ceil(np.quantile(ranks_ED, 1 - alpha, axis=1, method="higher"))
    return np.stack([low, high], axis=1).astype(int)


def tie_groups(points: list[float], intervals: list[list[float]]) -> list[int]:
    """For entries sorted by `points` (best first), the position (0-based) of the first entry of each one's tie
    group: an entry joins the current group when its interval overlaps the group leader's."""
    leaders: list[int] = []
    for position, interval in enumerate(intervals):
        if position and _overlap(interval, intervals[leaders[-1]]):
            leaders.append(leaders[-1])
        else:
            leaders.append(position)
    return leaders


def _overlap(a: list[float], b: list[float]) -> bool:
    if any(v is None or not math.isfinite(v) for v in (*a, *b)):
        return True  # an entry without an interval cannot be told apart from anything
    return a[0] <= b[1] and b[0] <= a[1]


def leaderboard(entries: list[dict[str, Any]], *, best_only: bool = True) -> list[dict[str, Any]]:
    """Rows of a leaderboard from scored entries: dicts with `participant`, `name`, `submission`, `created_at` and
    `score` (the worker's: point values, `<component>_ci95`, `draws`). Sorted best first, each with `rank`, `tied`
    (rank shown as "=k" when shared), `rank_ci95` and the point values and intervals of every component."""
    if best_only:
        best: dict[str, dict[str, Any]] = {}
        for entry in entries:
            mine = best.get(entry["participant"])
            if mine is None or _key(entry) < _key(mine):
                best[entry["participant"]] = entry
        entries = list(best.values())
    entries = sorted(entries, key=_key)
    if not entries:
        return []
    sizes = {len(e["score"].get("draws", {}).get("index", [])) for e in entries}
    ranks = (rank_intervals(np.array([e["score"]["draws"]["index"] for e in entries], dtype=np.float64))
             if len(sizes) == 1 and 0 not in sizes else None)
    intervals = [e["score"].get("index_ci95", [math.nan, math.nan]) for e in entries]
    leaders = tie_groups([e["score"]["index"] for e in entries], intervals)
    rows = []
    for position, entry in enumerate(entries):
        shared = leaders.count(leaders[position]) > 1
        row = {"rank": leaders[position] + 1, "tied": shared,
               "rank_label": f"={leaders[position] + 1}" if shared else str(position + 1),
               "rank_ci95": ranks[position].tolist() if ranks is not None else None,
               "participant": entry["participant"], "name": entry["name"], "submission": entry["submission"],
               "created_at": entry["created_at"]}
        for key in COMPONENTS:
            row[key] = entry["score"].get(key)
            row[f"{key}_ci95"] = entry["score"].get(f"{key}_ci95")
        rows.append(row)
    return rows


def _key(entry: dict[str, Any]) -> tuple[float, float]:
    value = entry["score"].get("index")
    return (-value if value is not None and math.isfinite(value) else math.inf, entry["created_at"])


def to_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = ["rank", "tied", "rank_low", "rank_high", "participant", "name"]
    for key in COMPONENTS:
        header += [LABELS[key], f"{LABELS[key]}_low", f"{LABELS[key]}_high"]
    writer.writerow(header)
    for row in rows:
        ranks = row["rank_ci95"] or ["", ""]
        line = [row["rank"], int(row["tied"]), *ranks, _csv_text(row["participant"]), _csv_text(row["name"])]
        for key in COMPONENTS:
            line += [_number(row[key]), *(_number(v) for v in (row[f"{key}_ci95"] or [None, None]))]
        writer.writerow(line)
    return buffer.getvalue()


def _number(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.4f}"


def _csv_text(text: str) -> str:
    """A spreadsheet never runs a participant's text as a formula (CSV injection)."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text
