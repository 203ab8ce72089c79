"""Count-exact allocation of units (subjects, or groups of subjects) to splits, stratified.

The cohort builder asks one question again and again: "put these units into K bins with fractions f,
keeping every stratum's proportions". Rounding each stratum on its own (largest remainder per stratum)
keeps the strata exact but lets the bin totals drift by up to one unit per stratum; rounding the totals
alone loses the strata. `controlled_rounding` does both at once, as statistical agencies round
two-way tables: every cell of the (stratum x bin) table is the floor or the ceiling of its quota
`f_k * n_s`, every stratum keeps its size, and each bin total is the largest-remainder rounding of
`f_k * N` (`exact_counts`). The +1s are placed by a max-flow over the cells with a fractional quota,
so such a table is found whenever one exists; in the rare case none does for the chosen totals, the
totals are relaxed to any rounding of `f_k * N` (a flow is then guaranteed by integrality).

Randomness comes only from the `numpy.random.Generator` passed in: which cells of a tie get the +1 and
which units of a stratum go to which bin.
"""
from __future__ import annotations

from collections import deque
from typing import Hashable, Sequence

import numpy as np

_EPSILON = 1e-9


def exact_counts(total: int, weights: list[float]) -> list[int]:
    """Splits `total` into integer counts proportional to `weights` (largest remainder method)."""
    shares = np.asarray(weights, dtype=np.float64) / np.sum(weights) * total
    counts = np.floor(shares).astype(int)
    for index in np.argsort(-(shares - counts), kind="stable")[: total - counts.sum()]:
        counts[index] += 1
    return counts.tolist()


def controlled_rounding(stratum_sizes: Sequence[int], fractions: Sequence[float],
                        rng: np.random.Generator) -> np.ndarray:
    """An integer (strata x bins) table with exact row sums and near-exact column sums.

    Args:
        stratum_sizes: units in each stratum (row sums of the result).
        fractions: one share per bin, non-negative, summing to 1.
        rng: breaks ties between cells with equal fractional quota.

    Returns:
        int array (S, K): cell (s, k) is floor or ceil of `fractions[k] * stratum_sizes[s]`; row s sums to
        `stratum_sizes[s]`; column k sums to `exact_counts(sum(stratum_sizes), fractions)[k]` whenever some
        table allows it (else to a floor or ceil of `fractions[k] * N`).
    """
    sizes = np.asarray(stratum_sizes, dtype=np.int64)
    shares = np.asarray(fractions, dtype=np.float64)
    quotas = sizes[:, None] * shares[None, :]
    table = np.floor(quotas + _EPSILON).astype(np.int64)
    fractional = np.where(quotas - table > _EPSILON, quotas - table, 0.0)
    row_need = sizes - table.sum(axis=1)
    if sizes.sum() == 0:
        return table
    column_target = np.asarray(exact_counts(int(sizes.sum()), shares.tolist())) - table.sum(axis=0)
    extra = _place_ones(fractional, row_need, column_target, rng)
    if extra is None:  # no table meets these exact totals: any rounding of f_k * N is then reachable
        relaxed = np.maximum(column_target, np.ceil(fractional.sum(axis=0) - _EPSILON).astype(np.int64))
        extra = _place_ones(fractional, row_need, relaxed, rng, exact_columns=False)
        assert extra is not None, "controlled rounding: the fractional table is itself a feasible flow"
    return table + extra


def _place_ones(fractional: np.ndarray, row_need: np.ndarray, column_capacity: np.ndarray,
                rng: np.random.Generator, exact_columns: bool = True) -> np.ndarray | None:
    """Max-flow: rows send `row_need` units, one per cell with a fractional quota, into capacity-limited columns.

    Returns the 0/1 table of +1s, or None when the rows cannot all be served (or, with `exact_columns`,
    when the columns cannot all be filled to capacity).
    """
    num_rows, num_columns = fractional.shape
    # Preference: larger fractional part first, random among equals. BFS visits edges in this order.
    tie_break = rng.random(fractional.shape)
    preferred = {row: sorted(np.flatnonzero(fractional[row]), key=lambda k, r=row: (-fractional[r, k], tie_break[r, k]))
                 for row in range(num_rows)}
    chosen = np.zeros(fractional.shape, dtype=np.int64)
    column_load = np.zeros(num_columns, dtype=np.int64)
    for row in range(num_rows):
        for _ in range(int(row_need[row])):
            if not _augment(row, preferred, chosen, column_load, column_capacity):
                return None
    if exact_columns and not np.array_equal(column_load, column_capacity):
        return None
    return chosen


def _augment(start: int, preferred: dict[int, list[int]], chosen: np.ndarray, column_load: np.ndarray,
             column_capacity: np.ndarray) -> bool:
    """Finds one augmenting path from row `start` to a column with spare capacity (BFS) and applies it."""
    parent: dict[tuple[str, int], tuple[str, int] | None] = {("row", start): None}
    queue = deque([("row", start)])
    while queue:
        kind, node = queue.popleft()
        if kind == "row":
            for column in preferred[node]:
                if not chosen[node, column] and ("column", column) not in parent:
                    parent[("column", column)] = (kind, node)
                    if column_load[column] < column_capacity[column]:
                        _apply_path(("column", column), parent, chosen, column_load)
                        return True
                    queue.append(("column", column))
        else:  # move a +1 that another row placed in this column to one of that row's other cells
            for row in np.flatnonzero(chosen[:, node]):
                if ("row", int(row)) not in parent:
                    parent[("row", int(row))] = (kind, node)
                    queue.append(("row", int(row)))
    return False


def _apply_path(end: tuple[str, int], parent: dict, chosen: np.ndarray, column_load: np.ndarray) -> None:
    column_load[end[1]] += 1
    node = end
    while parent[node] is not None:
        previous = parent[node]
        if previous[0] == "row":  # row -> column: a new +1
            chosen[previous[1], node[1]] = 1
        else:  # column -> row: that row gives up its +1 in the column
            chosen[node[1], previous[1]] = 0
        node = previous


def stratified_assign(strata: Sequence[Hashable], fractions: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """Assigns each unit to a bin: counts per (stratum, bin) from `controlled_rounding`, units drawn at random.

    Args:
        strata: the stratum key of each unit, in a fixed (e.g. sorted) order.
        fractions: one share per bin, summing to 1.
        rng: the only source of randomness.

    Returns:
        int array, the bin index of each unit.
    """
    keys = sorted(set(strata), key=repr)
    members = {key: [index for index, stratum in enumerate(strata) if stratum == key] for key in keys}
    table = controlled_rounding([len(members[key]) for key in keys], fractions, rng)
    assignment = np.empty(len(strata), dtype=np.int64)
    for row, key in enumerate(keys):
        bins = np.repeat(np.arange(len(fractions)), table[row])
        assignment[members[key]] = rng.permutation(bins)
    return assignment
