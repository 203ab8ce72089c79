"""Fairness analysis of the evaluator: subgroups, per-group metrics with CIs, gaps and their permutation tests.

Pure functions (numpy in, dicts out). Definitions (MISSION.md, "Where the numbers come from"):

- fairness gap = max_g - min_g of a per-group metric, ratio = min_g / max_g (fairlearn's `MetricFrame.difference()`
  and `.ratio()` with method="between_groups"), std = population std over groups, worst group = argmin_g
  (argmax_g for a metric where lower is better);
- demographic parity difference = gap of the selection rate P[h(X)=1 | A=a], equalised odds difference =
  max(gap of TPR, gap of FPR) (fairlearn's `demographic_parity_difference` / `equalized_odds_difference`);
- skewed error rate SER = max_g(1 - DSC_g) / min_g(1 - DSC_g).

Uncertainty: 95% percentile-bootstrap CIs resampling subjects within each group; p-values of gaps from a
permutation test that shuffles group labels across subjects, p = (1 + #{perm >= observed}) / (1 + #perms).

Every registered metric is *weighted*: `fn(weights_RN, *arrays_N) -> values_R` evaluates R weightings of the N
subjects at once. Bootstrap resamples are multinomial counts and permuted groups are 0/1 masks, so a resample is
one row of weights and thousands of them cost a few matrix products.

Where we differ from fairlearn on purpose: a group whose TPR (no positives), FPR (no negatives) or AUROC (one class)
is undefined gets NaN, is listed under "undefined_groups" and is left out of the gap; fairlearn scores it 0.
"""
from __future__ import annotations

import difflib
import itertools
from typing import Any, Callable, Sequence

import numpy as np

from rafmedia.core.errors import UserError

MISSING = "missing"  # the group of subjects whose attribute is empty: reported, never dropped
_CHUNK_ELEMENTS = 2_000_000  # weights per block of resamples/permutations: bounds memory at ~16 MB

WeightedMetric = Callable[..., np.ndarray]
_GROUP_METRICS: dict[str, tuple[WeightedMetric, int]] = {}


# ---------------------------------------------------------------------------------------------------- groups
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


# --------------------------------------------------------------------------------------- weighted metrics
def register_group_metric(name: str, num_arrays: int):
    """Register a weighted metric `fn(weights_RN, *arrays_N) -> values_R` under `name`."""
    def decorator(fn: WeightedMetric) -> WeightedMetric:
        _GROUP_METRICS[name] = (fn, num_arrays)
        return fn
    return decorator


def list_group_metrics() -> list[str]:
    return sorted(_GROUP_METRICS)


def create_group_metric(name: str) -> tuple[WeightedMetric, int]:
    """The weighted metric registered as `name` and the number of arrays it takes."""
    if name not in _GROUP_METRICS:
        close = difflib.get_close_matches(name, list(_GROUP_METRICS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UserError(f"unknown group metric '{name}' (known: {', '.join(list_group_metrics())}){hint}")
    return _GROUP_METRICS[name]


def _ratio(numerator_R: np.ndarray, denominator_R: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator_R > 0, numerator_R / np.where(denominator_R > 0, denominator_R, 1), np.nan)


@register_group_metric("mean", 1)
def weighted_mean(weights_RN: np.ndarray, values_N: np.ndarray) -> np.ndarray:
    """Mean of per-subject values (e.g. Dice) over the weighted subjects."""
    return _ratio(weights_RN @ values_N, weights_RN.sum(axis=1))


@register_group_metric("accuracy", 2)
def weighted_accuracy(weights_RN: np.ndarray, y_true_N: np.ndarray, y_pred_N: np.ndarray) -> np.ndarray:
    return weighted_mean(weights_RN, (y_true_N == y_pred_N).astype(np.float64))


@register_group_metric("selection_rate", 2)
def weighted_selection_rate(weights_RN: np.ndarray, y_true_N: np.ndarray, y_pred_N: np.ndarray) -> np.ndarray:
    """P[h(X)=1] (fairlearn `selection_rate`); y_true is ignored, as there."""
    return weighted_mean(weights_RN, (y_pred_N == 1).astype(np.float64))


@register_group_metric("true_positive_rate", 2)
def weighted_true_positive_rate(weights_RN: np.ndarray, y_true_N: np.ndarray, y_pred_N: np.ndarray) -> np.ndarray:
    """P[h(X)=1 | Y=1] (recall); NaN without positives."""
    positive_N = (y_true_N == 1).astype(np.float64)
    return _ratio(weights_RN @ (positive_N * (y_pred_N == 1)), weights_RN @ positive_N)


@register_group_metric("false_positive_rate", 2)
def weighted_false_positive_rate(weights_RN: np.ndarray, y_true_N: np.ndarray, y_pred_N: np.ndarray) -> np.ndarray:
    """P[h(X)=1 | Y=0]; NaN without negatives."""
    negative_N = (y_true_N == 0).astype(np.float64)
    return _ratio(weights_RN @ (negative_N * (y_pred_N == 1)), weights_RN @ negative_N)


@register_group_metric("auroc", 2)
def weighted_auroc(weights_RN: np.ndarray, y_true_N: np.ndarray, y_score_N: np.ndarray) -> np.ndarray:
    """AUROC as the Mann-Whitney U / (n_pos n_neg) with ties counted half (as `roc_auc_score`); NaN with one class.

    With integer weights this is the AUROC of the data with each subject repeated `weight` times.
    """
    order = np.argsort(y_score_N, kind="stable")
    sorted_scores = y_score_N[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    positive_N = (y_true_N[order] == 1).astype(np.float64)
    weights_sorted = weights_RN[:, order]
    positive_RK = np.add.reduceat(weights_sorted * positive_N, starts, axis=1)  # per distinct score
    negative_RK = np.add.reduceat(weights_sorted * (1.0 - positive_N), starts, axis=1)
    negative_below_RK = np.cumsum(negative_RK, axis=1) - negative_RK
    wins_R = np.sum(positive_RK * (negative_below_RK + 0.5 * negative_RK), axis=1)
    return _ratio(wins_R, positive_RK.sum(axis=1) * negative_RK.sum(axis=1))


def weighted_from_scalar(metric_fn: Callable[..., float]) -> WeightedMetric:
    """Turn `metric_fn(*arrays) -> float` into a weighted metric by repeating subjects (one call per row)."""
    def weighted(weights_RN: np.ndarray, *arrays_N: np.ndarray) -> np.ndarray:
        out_R = np.empty(len(weights_RN))
        for row, weights_N in enumerate(weights_RN):
            index = np.repeat(np.arange(len(weights_N)), weights_N.astype(np.int64))
            out_R[row] = metric_fn(*(array[index] for array in arrays_N)) if len(index) else np.nan
        return out_R
    return weighted


def _resolve_metric(metric_fn: str | Callable[..., float], arrays: tuple) -> WeightedMetric:
    if not callable(metric_fn):
        metric, num_arrays = create_group_metric(metric_fn)
        if len(arrays) != num_arrays:
            raise UserError(f"group metric '{metric_fn}' takes {num_arrays} arrays, got {len(arrays)}")
        return metric
    return weighted_from_scalar(metric_fn)


# ------------------------------------------------------------------------------------- resampling engines
def _block_sizes(total: int, num_subjects: int) -> list[int]:
    block = max(1, _CHUNK_ELEMENTS // max(num_subjects, 1))
    return [min(block, total - start) for start in range(0, total, block)]


def bootstrap_values(metric: WeightedMetric, arrays_N: tuple[np.ndarray, ...], *, rng: np.random.Generator,
                     num_resamples: int) -> np.ndarray:
    """Metric of `num_resamples` bootstrap resamples of the N subjects (with replacement), as multinomial counts."""
    num_subjects = len(arrays_N[0])
    values = []
    for block in _block_sizes(num_resamples, num_subjects):
        draws_BN = rng.integers(0, num_subjects, (block, num_subjects))
        flat = (draws_BN + num_subjects * np.arange(block)[:, None]).ravel()
        counts_BN = np.bincount(flat, minlength=block * num_subjects).reshape(block, num_subjects)
        values.append(metric(counts_BN.astype(np.float64), *arrays_N))
    return np.concatenate(values) if values else np.empty(0)


def permuted_values(metric: WeightedMetric, codes_N: np.ndarray, num_groups: int, arrays_N: tuple[np.ndarray, ...],
                    *, seed: np.random.SeedSequence, num_permutations: int) -> np.ndarray:
    """Per-group metric under `num_permutations` shuffles of the group labels across subjects, shape (P, G).

    The same `seed` gives the same shuffles for every metric, so statistics that combine metrics (equalised odds)
    are tested jointly.
    """
    rng = np.random.default_rng(seed)
    values_PG = np.empty((num_permutations, num_groups))
    start = 0
    for block in _block_sizes(num_permutations, len(codes_N)):
        shuffled_BN = rng.permuted(np.tile(codes_N, (block, 1)), axis=1)
        for group in range(num_groups):
            values_PG[start:start + block, group] = metric((shuffled_BN == group).astype(np.float64), *arrays_N)
        start += block
    return values_PG


def permutation_p_value(observed: float, permuted_P: np.ndarray) -> float:
    """p = (1 + #{perm >= observed}) / (1 + #perms) over the permutations where the statistic is defined."""
    permuted_P = np.asarray(permuted_P, dtype=np.float64)
    permuted_P = permuted_P[~np.isnan(permuted_P)]
    if not np.isfinite(observed) or len(permuted_P) == 0:
        return float("nan")
    # Relative tolerance: the identity shuffle must count as a tie despite BLAS summation order.
    num_extreme = np.sum(permuted_P >= observed - 1e-9 * max(1.0, abs(observed)))
    return float((1 + num_extreme) / (1 + len(permuted_P)))


def gap_per_row(values_PG: np.ndarray) -> np.ndarray:
    """max_g - min_g over the finite entries of each row; NaN where fewer than two groups are defined."""
    finite_PG = np.isfinite(values_PG)
    high_P = np.where(finite_PG, values_PG, -np.inf).max(axis=1)
    low_P = np.where(finite_PG, values_PG, np.inf).min(axis=1)
    return np.where(finite_PG.sum(axis=1) >= 2, high_P - low_P, np.nan)


# ----------------------------------------------------------------------------------------- group summaries
def summarize_group_values(values: dict[str, float], *, higher_is_better: bool = True) -> dict[str, Any]:
    """Gap = max - min, ratio = min / max, std (population), worst and best group over the finite values.

    Fewer than two finite groups leave nothing to compare: gap, ratio and std are NaN.
    """
    finite = {group: float(value) for group, value in values.items() if np.isfinite(value)}
    if len(finite) < 2:
        only = next(iter(finite), None)
        return {"gap": float("nan"), "ratio": float("nan"), "std": float("nan"), "worst_group": only,
                "best_group": only, "num_groups_compared": len(finite)}
    array = np.array(list(finite.values()))
    low, high = min(finite, key=finite.get), max(finite, key=finite.get)
    return {"gap": float(array.max() - array.min()),
            "ratio": float(array.min() / array.max()) if array.max() > 0 else float("nan"),
            "std": float(array.std()), "worst_group": low if higher_is_better else high,
            "best_group": high if higher_is_better else low, "num_groups_compared": len(finite)}


def _as_groups(groups_N: Sequence[Any], arrays: tuple, *,
               binary: Sequence[int] = (), array_names: Sequence[str] = ()) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Validated (group names, integer code per subject, float64 arrays)."""
    groups_N = np.asarray(groups_N).astype(str)
    arrays = tuple(np.asarray(array, dtype=np.float64) for array in arrays)
    for position, array in enumerate(arrays):
        label = array_names[position] if position < len(array_names) else f"array {position}"
        if array.shape != groups_N.shape or groups_N.ndim != 1:
            raise UserError(f"{label} has shape {array.shape} but groups_N has shape {groups_N.shape}: "
                            f"pass one value per subject, in the same order as the groups")
        if position in binary and not np.isin(array, (0.0, 1.0)).all():
            bad = np.unique(array[~np.isin(array, (0.0, 1.0))])[:5]
            raise UserError(f"{label} must hold binary labels 0/1, found {bad.tolist()}: map the positive "
                            f"class to 1 and the others to 0")
    if len(groups_N) == 0:
        raise UserError("no subjects: groups_N is empty")
    names, codes_N = np.unique(groups_N, return_inverse=True)
    return names, codes_N, arrays


def _analyse(metric: WeightedMetric, names: np.ndarray, codes_N: np.ndarray, arrays: tuple, *, seed: int,
             num_resamples: int, num_permutations: int, min_group_size: int, exclude_small: bool,
             higher_is_better: bool, level: float = 0.95) -> tuple[dict[str, Any], np.ndarray]:
    """Per-group values with bootstrap CIs, their summary and the gap's permutation p-value; also the (P, G)
    permuted values of the compared groups (other columns NaN), for joint statistics."""
    bootstrap_seed, permutation_seed = np.random.SeedSequence(seed).spawn(2)
    group_seeds = bootstrap_seed.spawn(len(names))
    values_G = metric((codes_N[None, :] == np.arange(len(names))[:, None]).astype(np.float64), *arrays)
    alpha = (1.0 - level) / 2.0
    groups = {}
    for code, name in enumerate(names):
        member_N = codes_N == code
        resampled_R = bootstrap_values(metric, tuple(a[member_N] for a in arrays),
                                       rng=np.random.default_rng(group_seeds[code]), num_resamples=num_resamples)
        finite_R = resampled_R[np.isfinite(resampled_R)]
        # As metrics.bootstrap_ci: a CI from under half the resamples (e.g. AUROC on one class) is not reported.
        ci = ([float(np.quantile(finite_R, alpha)), float(np.quantile(finite_R, 1 - alpha))]
              if num_resamples and len(finite_R) >= num_resamples / 2 else [float("nan"), float("nan")])
        groups[str(name)] = {"value": float(values_G[code]), "ci95": ci, "n": int(member_N.sum()),
                             "small": bool(member_N.sum() < min_group_size),
                             "undefined": bool(not np.isfinite(values_G[code])),
                             "ci_undefined_resamples": int(len(resampled_R) - len(finite_R))}
    compared = [name for name, group in groups.items() if not (exclude_small and group["small"])]
    summary = summarize_group_values({name: groups[name]["value"] for name in compared},
                                     higher_is_better=higher_is_better)
    permuted_PG = permuted_values(metric, codes_N, len(names), arrays, seed=permutation_seed,
                                  num_permutations=num_permutations)
    permuted_PG[:, [name not in compared for name in groups]] = np.nan
    result = {"groups": groups, **summary,
              "p_value_gap": permutation_p_value(summary["gap"], gap_per_row(permuted_PG)),
              "small_groups": [name for name, group in groups.items() if group["small"]],
              "undefined_groups": [name for name, group in groups.items() if group["undefined"]],
              "excluded_small": bool(exclude_small), "higher_is_better": bool(higher_is_better),
              "num_resamples": int(num_resamples), "num_permutations": int(num_permutations)}
    return result, permuted_PG


def group_metric(metric_fn: str | Callable[..., float], groups_N: Sequence[Any], *arrays_N: Sequence[float], seed: int,
                 num_resamples: int = 1000, num_permutations: int = 1000, min_group_size: int = 10,
                 exclude_small: bool = False, higher_is_better: bool = True) -> dict[str, Any]:
    """A metric per group with subject-bootstrap 95% CIs, its fairness summary and the gap's permutation p-value.

    Gap = max_g - min_g, ratio = min_g / max_g, std over groups, worst group = argmin_g (argmax_g when lower is
    better), as in MISSION.md and fairlearn's `MetricFrame.difference()` / `.ratio()`. CIs are percentile
    bootstrap intervals resampling the subjects of each group with replacement. The p-value of the gap shuffles
    group labels across subjects: p = (1 + #{perm gap >= observed}) / (1 + #perms).

    Args:
        metric_fn: a registered metric name (`list_group_metrics()`, vectorised) or `fn(*arrays) -> float`.
        groups_N: group label of each subject (a value of `group_labels`).
        *arrays_N: the metric's per-subject inputs, e.g. y_true, y_pred.
        seed: seeds the bootstrap and the permutations.
        num_resamples: bootstrap resamples per group (0: no CIs).
        num_permutations: label shuffles of the permutation test (0: no p-value).
        min_group_size: groups with fewer subjects are flagged `small` (never merged).
        exclude_small: leave small groups out of gap/ratio/std/worst/p-value; by default they are kept, flagged.
        higher_is_better: False for error-like metrics, so the worst group is the one with the largest value.

    Returns:
        {"groups": {g: {"value", "ci95", "n", "small", "undefined", ...}}, "gap", "ratio", "std", "worst_group",
        "best_group", "p_value_gap", "small_groups", "undefined_groups", ...}. Undefined group values are NaN,
        flagged and left out of the summary.
    """
    metric = _resolve_metric(metric_fn, arrays_N)
    names, codes_N, arrays = _as_groups(groups_N, arrays_N)
    result, _ = _analyse(metric, names, codes_N, arrays, seed=seed, num_resamples=num_resamples,
                         num_permutations=num_permutations, min_group_size=min_group_size,
                         exclude_small=exclude_small, higher_is_better=higher_is_better)
    return {"metric": metric_fn if isinstance(metric_fn, str) else getattr(metric_fn, "__name__", "custom"), **result}


# --------------------------------------------------------------------------------- classification fairness
def classification_fairness(y_true_N: Sequence[int], y_pred_N: Sequence[int], y_score_N: Sequence[float] | None,
                            groups_N: Sequence[Any], *, seed: int = 0, num_resamples: int = 1000,
                            num_permutations: int = 1000, min_group_size: int = 10,
                            exclude_small: bool = False) -> dict[str, Any]:
    """Group fairness of a binary classifier, each gap with its permutation p-value (shared shuffles).

    - demographic parity difference: max_g - min_g of P[h(X)=1 | A=g] (fairlearn `demographic_parity_difference`);
    - equalised odds difference: max(TPR gap, FPR gap) (fairlearn `equalized_odds_difference`, agg="worst_case");
    - accuracy and AUROC per group (AUROC as `roc_auc_score`) with their gaps.

    Args:
        y_true_N: reference labels 0/1.
        y_pred_N: predicted labels 0/1.
        y_score_N: scores for the positive class, or None to skip AUROC.
        groups_N: group label of each subject.
        seed, num_resamples, num_permutations, min_group_size, exclude_small: as in `group_metric`.

    Returns:
        One `group_metric`-style entry per metric ("selection_rate", "true_positive_rate", "false_positive_rate",
        "accuracy", "auroc") plus the headline numbers and their p-values, and group sizes by class.
    """
    scored = () if y_score_N is None else (y_score_N,)
    names, codes_N, (y_true, y_pred, *y_score) = _as_groups(groups_N, (y_true_N, y_pred_N, *scored), binary=(0, 1),
                                                    array_names=("y_true", "y_pred", "y_score"))
    inputs = {name: (y_true, y_pred) for name in ("selection_rate", "true_positive_rate", "false_positive_rate",
                                                  "accuracy")}
    if y_score:
        inputs["auroc"] = (y_true, y_score[0])
    out: dict[str, Any] = {}
    permuted = {}
    for name, arrays in inputs.items():
        out[name], permuted[name] = _analyse(
            create_group_metric(name)[0], names, codes_N, arrays, seed=seed, num_resamples=num_resamples,
            num_permutations=num_permutations, min_group_size=min_group_size, exclude_small=exclude_small,
            higher_is_better=name != "false_positive_rate")
    out["groups"] = {str(name): {"n": int(np.sum(codes_N == code)),
                                 "n_positive": int(np.sum((codes_N == code) & (y_true == 1))),
                                 "n_negative": int(np.sum((codes_N == code) & (y_true == 0))),
                                 "small": bool(np.sum(codes_N == code) < min_group_size)}
                     for code, name in enumerate(names)}
    equalized_odds = float(np.fmax(out["true_positive_rate"]["gap"], out["false_positive_rate"]["gap"]))
    equalized_odds_P = np.fmax(gap_per_row(permuted["true_positive_rate"]),
                               gap_per_row(permuted["false_positive_rate"]))
    out.update({"demographic_parity_difference": out["selection_rate"]["gap"],
                "demographic_parity_p_value": out["selection_rate"]["p_value_gap"],
                "equalized_odds_difference": equalized_odds,
                "equalized_odds_p_value": permutation_p_value(equalized_odds, equalized_odds_P),
                "accuracy_gap": out["accuracy"]["gap"], "accuracy_gap_p_value": out["accuracy"]["p_value_gap"]})
    if "auroc" in out:
        out.update({"auroc_gap": out["auroc"]["gap"], "auroc_gap_p_value": out["auroc"]["p_value_gap"]})
    return out


# ----------------------------------------------------------------------------------- segmentation fairness
def skewed_error_rate(dice_by_group: dict[str, float]) -> dict[str, Any]:
    """SER = max_g(1 - DSC_g) / min_g(1 - DSC_g) (MISSION.md) over the groups with a finite Dice.

    A perfect group (min error 0) makes SER infinite (`infinite` flag); when every group is perfect, or fewer than
    two groups are defined, SER is NaN (`undefined` flag).
    """
    errors = {group: 1.0 - float(dice) for group, dice in dice_by_group.items() if np.isfinite(dice)}
    if len(errors) < 2:
        return {"value": float("nan"), "highest_error_group": None, "lowest_error_group": None,
                "infinite": False, "undefined": True}
    highest, lowest = max(errors, key=errors.get), min(errors, key=errors.get)
    return {"value": float(_error_ratio(errors[highest], errors[lowest])), "highest_error_group": highest,
            "lowest_error_group": lowest, "infinite": bool(errors[lowest] == 0 and errors[highest] > 0),
            "undefined": bool(errors[highest] == 0)}


def _error_ratio(highest: np.ndarray | float, lowest: np.ndarray | float) -> np.ndarray | float:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(highest > 0, np.asarray(highest, dtype=np.float64) / lowest, np.nan)[()]


def segmentation_fairness(dice_N: Sequence[float], groups_N: Sequence[Any], *, seed: int = 0,
                          num_resamples: int = 1000, num_permutations: int = 1000, min_group_size: int = 10,
                          exclude_small: bool = False) -> dict[str, Any]:
    """Dice per group (mean over subjects) with CIs, gap/std/worst group, and the skewed error rate, each with a
    permutation p-value.

    Args:
        dice_N: per-subject Dice in [0, 1]; how empty masks score is decided upstream (Metrics Reloaded), so NaN
            is refused rather than dropped.
        groups_N: group label of each subject.
        seed, num_resamples, num_permutations, min_group_size, exclude_small: as in `group_metric`.
    """
    dice_N = np.asarray(dice_N, dtype=np.float64)
    bad = np.flatnonzero(~((dice_N >= 0) & (dice_N <= 1)))
    if len(bad):
        raise UserError(f"dice_N must be in [0, 1] for every subject; subjects {bad[:5].tolist()} have "
                        f"{dice_N[bad[:5]].tolist()}: score empty masks upstream (an empty prediction of a "
                        f"non-empty reference is 0) instead of passing NaN")
    names, codes_N, arrays = _as_groups(groups_N, (dice_N,))
    dice, permuted_PG = _analyse(weighted_mean, names, codes_N, arrays, seed=seed, num_resamples=num_resamples,
                                 num_permutations=num_permutations, min_group_size=min_group_size,
                                 exclude_small=exclude_small, higher_is_better=True)
    compared = {name: group["value"] for name, group in dice["groups"].items()
                if not (exclude_small and group["small"])}
    ser = skewed_error_rate(compared)
    errors_PG = 1.0 - permuted_PG  # NaN columns (excluded groups) stay NaN
    finite_PG = np.isfinite(errors_PG)
    highest_P = np.where(finite_PG, errors_PG, -np.inf).max(axis=1)
    lowest_P = np.where(finite_PG, errors_PG, np.inf).min(axis=1)
    ser_P = np.where(finite_PG.sum(axis=1) >= 2, _error_ratio(highest_P, lowest_P), np.nan)
    ser["p_value"] = permutation_p_value(ser["value"], ser_P)
    return {"dice": dice, "skewed_error_rate": ser}
