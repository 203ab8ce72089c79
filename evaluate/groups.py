"""Subgroups of a cohort for fairness analyses: one label per subject for each attribute (sex, site, age band...)
and, if asked, for each pair of attributes ("sex x site")."""
from __future__ import annotations

import itertools
from typing import Any, Sequence

import numpy as np

from rafmedia.core.errors import UserError

MISSING = "missing"  # the group of subjects whose attribute is empty: reported, never dropped


def group_labels(rows: list[dict[str, Any]], attributes: Sequence[str], *, age_bins: Sequence[float] = (0, 40, 60, 200),
                 bin_edges: dict[str, Sequence[float]] | None = None, max_categories: int = 10,
                 intersections: bool = True) -> dict[str, np.ndarray]:
    """Group label of every subject for each attribute and, if asked, each pair of attributes.

    A numeric column named "age" is cut into half-open bands [lo, hi) by `age_bins`, labelled "40-59" for integer
    edges; a column named in `bin_edges` is cut the same way by its edges. Other columns are categories. Empty
    values form the group "missing". Pairs are named "sex x site" with labels like "F & site-a".

    Args:
        rows: one dict per subject (a manifest row).
        attributes: columns to group by.
        age_bins: increasing band edges of the "age" column.
        bin_edges: band edges of other numeric columns, by column name.
        max_categories: a numeric column with more distinct values than this needs edges in `bin_edges`.
        intersections: also return every pairwise intersection.

    Returns:
        Grouping name -> array of N string labels.
    """
    if not rows:
        raise UserError("group_labels got no rows: pass one dict per subject (the cohort manifest)")
    edges_by_column = {"age": age_bins, **(bin_edges or {})}
    labels = {}
    for attribute in attributes:
        if attribute not in rows[0]:
            raise UserError(f"group attribute '{attribute}' is not a column (columns: {', '.join(rows[0])})")
        values = [row.get(attribute) for row in rows]
        edges = edges_by_column.get(attribute)
        labels[attribute] = (_binned(attribute, values, edges) if edges is not None and _is_numeric(values)
                             else _categories(attribute, values, max_categories))
    if intersections:
        for first, second in itertools.combinations(attributes, 2):
            labels[f"{first} x {second}"] = np.char.add(np.char.add(labels[first], " & "), labels[second])
    return labels


_MISSING_TEXT = {"", "nan", "na", "n/a", "none", "null"}


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in _MISSING_TEXT) or (
        isinstance(value, float) and np.isnan(value))


def _is_numeric(values: list[Any]) -> bool:
    try:
        [float(v) for v in values if not _is_missing(v)]
    except (TypeError, ValueError):
        return False
    return True


def _categories(attribute: str, values: list[Any], max_categories: int) -> np.ndarray:
    present = {str(v) for v in values if not _is_missing(v)}
    if _is_numeric(values) and len(present) > max_categories:
        raise UserError(f"column '{attribute}' is numeric with {len(present)} distinct values (> max_categories="
                        f"{max_categories}): pass band edges, e.g. bin_edges={{'{attribute}': [0, 20, 30, 100]}}")
    return np.array([MISSING if _is_missing(v) else str(v) for v in values], dtype=str)


def _band_names(edges: np.ndarray) -> list[str]:
    if np.all(edges == np.round(edges)):
        return [f"{int(lo)}-{int(hi) - 1}" for lo, hi in zip(edges[:-1], edges[1:])]
    return [f"[{lo:g}, {hi:g})" for lo, hi in zip(edges[:-1], edges[1:])]


def _binned(attribute: str, values: list[Any], edges: Sequence[float]) -> np.ndarray:
    edges = np.asarray(edges, dtype=np.float64)
    if edges.ndim != 1 or len(edges) < 2 or np.any(np.diff(edges) <= 0):
        raise UserError(f"band edges of '{attribute}' must be increasing with at least two values, got {list(edges)}")
    names = _band_names(edges)
    out = []
    for index, value in enumerate(values):
        if _is_missing(value):
            out.append(MISSING)
            continue
        number = float(value)
        if not edges[0] <= number < edges[-1]:
            raise UserError(f"row {index}: {attribute}={value} is outside the band edges {edges.tolist()}; "
                            f"widen the first/last edge")
        out.append(names[int(np.searchsorted(edges, number, side="right")) - 1])
    return np.array(out, dtype=str)
