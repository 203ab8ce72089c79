"""Leaderboards with intervals everywhere: every number with its bootstrap 95% interval, every rank with the
interval of the ranks it takes over the same bootstrap draws, and entries that cannot be told apart shown as tied.

Every submission of a phase is scored on the same subjects with the same split seeds and bootstrap seed, so the
b-th bootstrap draw of every entry resamples the same subjects (`raf_with_intervals(with_draws=True)`): ranking
the entries within each draw gives each entry a distribution of ranks, whose 2.5% and 97.5% quantiles are its rank
interval. Ties: walking down the table sorted by RAF index, an entry starts a new tie group unless its RAF
interval overlaps the interval of the first entry of the current group; every member shows that entry's rank
("=2"). Each participant's best entry is listed (or every entry, `best_only=False`).

What participants see of a score (`release`, run by the worker when it records a score; `visible_score`, run by
every page) is bounded so that repeated submissions cannot read the hidden labels out of the scores (docs/portal.md,
"What the leaderboard releases"): numbers rounded to the precision their bootstrap interval supports (`digits_for`),
and with a phase's Ladder (Blum and Hardt, 2015) a score only when it beats the best score released to the
submitter's team by more than a step. Organisers always see exact scores.
"""
from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable
from typing import Any

import numpy as np

COMPONENTS = ("index", "performance", "robustness", "fairness")
LABELS = {"index": "RAF", "performance": "P", "robustness": "R", "fairness": "F"}
MAX_DIGITS = 4  # no interval supports more decimals than the exact CSV gives
UNSURE_DIGITS = 2  # a number without a finite interval
HIDDEN_NOTE = "scores of this phase are private until the organisers reveal the leaderboard"


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
               "created_at": entry["created_at"], "digits": entry["score"].get("digits")}
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
        line = ["" if row["rank"] is None else row["rank"], "" if row["tied"] is None else int(row["tied"]), *ranks,
                _csv_text(row["participant"]), _csv_text(row["name"])]
        for key in COMPONENTS:
            digits = (row.get("digits") or {}).get(key, MAX_DIGITS)  # a released number: only the digits it has
            line += [_number(row[key], digits), *(_number(v, digits) for v in (row[f"{key}_ci95"] or [None, None]))]
        writer.writerow(line)
    return buffer.getvalue()


def _number(value: Any, digits: int = MAX_DIGITS) -> str:
    return "" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def _csv_text(text: str) -> str:
    """A spreadsheet never runs a participant's text as a formula (CSV injection)."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


# ---- what participants see ----------------------------------------------------------------------------------------
def digits_for(ci: Any) -> int:
    """Decimals of a number whose 95% interval is `ci`: the decimal place of the first significant digit of the
    interval's half-width h = (high - low) / 2, i.e. the smallest d >= 0 with 10**-d <= h (h = 0.034 -> 2 decimals,
    0.1 -> 1, 0.0099 -> 3, 1.5 -> 0), at most MAX_DIGITS (also when h = 0); UNSURE_DIGITS when there is no finite
    interval. The last decimal shown is thus never finer than the half-width: rounding removes only differences
    that the interval cannot resolve anyway."""
    if not ci or len(ci) != 2 or not all(_finite(v) for v in ci):
        return UNSURE_DIGITS
    half = (ci[1] - ci[0]) / 2
    if half <= 0:
        return MAX_DIGITS
    return max(0, min(MAX_DIGITS, math.ceil(-math.log10(half) - 1e-9)))  # the tolerance: 0.01 as 0.0100000001


def rounded(score: dict[str, Any]) -> dict[str, Any]:
    """The score at the precision its intervals support: each component and both ends of its interval rounded
    (Python's `round`, half to even) at `digits_for(its interval)`, the RAF index's bootstrap draws at the index's
    digits (so that the rank intervals and ties participants see come from rounded numbers only), and `digits`
    per component. Headline numbers and the other components' draws are left out."""
    out: dict[str, Any] = {"digits": {}}
    for key in COMPONENTS:
        ci = score.get(f"{key}_ci95")
        digits = out["digits"][key] = digits_for(ci)
        out[key] = _round(score.get(key), digits)
        out[f"{key}_ci95"] = [_round(v, digits) for v in ci] if ci else None
    draws = (score.get("draws") or {}).get("index")
    if draws:
        out["draws"] = {"index": [_round(v, out["digits"]["index"]) for v in draws]}
    return out


def derived_step(best: dict[str, Any]) -> float:
    """The Ladder's step when the phase sets none: the half-width of the best released score's RAF interval (its
    released, rounded ends), rounded up to that score's last decimal; at least one unit of that decimal. It is
    taken from the released best, not from the new score, so that the step itself says nothing new."""
    digits = (best.get("digits") or {}).get("index", UNSURE_DIGITS)
    unit = 10.0 ** -digits
    ci = best.get("index_ci95")
    half = (ci[1] - ci[0]) / 2 if ci and all(_finite(v) for v in ci) else 0.0
    return round(max(unit, math.ceil(half / unit - 1e-9) * unit), digits)


def release(score: dict[str, Any], *, previous: Iterable[dict[str, Any]], ladder: bool, step: float = 0.0,
            team: str = "") -> dict[str, Any]:
    """What participants may see of a new score: the worker stores it as the submission's `released_json`.

    Without the Ladder: the score `rounded`, with `released: True`. With it (Blum and Hardt, 2015, "The Ladder: a
    reliable leaderboard for machine learning competitions"): the rounded score only when its exact RAF index beats
    the best RAF index released before to the submitter's team by more than the step (`step` when above 0,
    else `derived_step(best)`); otherwise no number at all, `released: False` and a message naming the best
    and the step. `previous`: what was released of the team's earlier scored submissions to the phase (a user
    without a team is a team of one, `team` ""). The team, not the user, so that its members cannot each climb a
    ladder of their own; the first score of a team is always released."""
    shown = {**rounded(score), "released": True}
    if not ladder:
        return shown
    best = max((p for p in previous if p.get("released") and _finite(p.get("index"))), key=lambda p: p["index"],
               default=None)
    if best is None:
        return shown
    step = step if step > 0 else derived_step(best)
    if _finite(score.get("index")) and score["index"] > best["index"] + step:
        return shown
    digits = (best.get("digits") or {}).get("index", UNSURE_DIGITS)
    whose = f"your team's best {best['index']:.{digits}f} (team '{team}')" if team else \
        f"your best {best['index']:.{digits}f}"
    return {"released": False, "best": best["index"], "step": step,
            "message": f"not better than {whose} by more than {_plain(step)}"}


def visible_score(score: dict[str, Any], released: dict[str, Any] | None, *, exact: bool, private: bool,
                  revealed: bool) -> tuple[str, dict[str, Any], str]:
    """(kind, numbers, note) of a scored submission as one viewer may see it:

    - "exact" for organisers: the score as the worker recorded it, without its draws;
    - "hidden" on a private phase before the organisers reveal it: no number (note: why);
    - "rounded": what was released; after a private phase's reveal every entry's score `rounded` (the phase closed
      at the reveal, so the Ladder has no later submission left to guard against);
    - "withheld": the Ladder withheld it; no number, the note says why.
    `released` None (a score recorded before releases existed) counts as released, rounded. The numbers of
    "rounded" keep the rounded index draws (for rank intervals); pages and API answers drop them."""
    if exact:
        return "exact", {k: v for k, v in score.items() if k != "draws"}, ""
    if private and not revealed:
        return "hidden", {}, HIDDEN_NOTE
    if private or released is None:
        return "rounded", rounded(score), ""
    if not released.get("released"):
        return "withheld", {}, f"the Ladder withheld this score: {released.get('message', '')}"
    return "rounded", {k: v for k, v in released.items() if k != "released"}, ""


def hidden_rows(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A private leaderboard before its reveal: every scored entry (participant, name, time) in the order they were
    submitted, with no rank and no number, not even which entry is a participant's best."""
    rows = []
    for entry in sorted(entries, key=lambda e: e["created_at"]):
        row = {"rank": None, "tied": None, "rank_label": "", "rank_ci95": None, "participant": entry["participant"],
               "name": entry["name"], "submission": entry["submission"], "created_at": entry["created_at"],
               "digits": None}
        row.update({key: None for key in COMPONENTS})
        row.update({f"{key}_ci95": None for key in COMPONENTS})
        rows.append(row)
    return rows


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _round(value: Any, digits: int) -> float | None:
    return round(float(value), digits) if _finite(value) else None


def _plain(value: float) -> str:
    return f"{value:.6f}".rstrip("0").rstrip(".")
