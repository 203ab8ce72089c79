"""Group metrics: a metric evaluated per subgroup, with subject-bootstrap intervals and the permutation test of the
gap between groups. Pure functions (numpy in, dicts out).

Every registered metric is *weighted*: `fn(weights_RN, *arrays_N) -> values_R` evaluates R weightings of the N
subjects at once. Bootstrap resamples are multinomial counts and permuted groups are 0/1 masks, so a resample is
one row of weights and thousands of them cost a few matrix products. A metric is registered once
(`register_group_metric`) with the names of the arrays it takes and whether higher is better; a classification
metric (inputs y_true and y_pred, or y_true and y_score) is then scored per group by every fairness analysis
(`rafmedia.evaluate.fairness`), reported in report.json, report.html, report.md and the leaderboard with no other
edit.

Definitions (MISSION.md, "Where the numbers come from"): gap = max_g - min_g of the per-group values, ratio =
min_g / max_g (fairlearn's `MetricFrame.difference()` and `.ratio()` with method="between_groups"), std = the
population standard deviation over groups (numpy's default, ddof=0), worst group = argmin_g (argmax_g for a metric
where lower is better). Uncertainty: 95% percentile-bootstrap CIs resampling subjects within each group; the p-value
of a gap from a permutation test that shuffles group labels across subjects, p = (1 + #{perm >= observed}) /
(1 + #perms). A group whose value is undefined (no positives for a TPR, one class for an AUROC) gets NaN, is listed
under "undefined_groups" and left out of the gap (fairlearn scores it 0).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from rafmedia.core.errors import UserError
from rafmedia.core.registry import Registry

_CHUNK_ELEMENTS = 2_000_000  # weights per block of resamples/permutations: bounds memory at ~16 MB

WeightedMetric = Callable[..., np.ndarray]
GROUP_METRICS: Registry[np.ndarray] = Registry("group metric")
CLASSIFICATION_INPUTS = (("y_true", "y_pred"), ("y_true", "y_score"))


def register_group_metric(name: str, *, inputs: Sequence[str], higher_is_better: bool = True,
                          classification: bool = True):
    """Registers a weighted metric `fn(weights_RN, *arrays_N) -> values_R` under `name`.

    Args:
        name: the metric's name in results and reports.
        inputs: the names of the per-subject arrays it takes, in order: ("y_true", "y_pred") or ("y_true",
            "y_score") for a classification metric, ("values",) for a per-subject value such as Dice.
        higher_is_better: False for error-like metrics (the worst group is then the one with the largest value).
        classification: score it in every classification fairness analysis (needs classification inputs).
    """
    inputs = tuple(inputs)
    if classification and inputs not in CLASSIFICATION_INPUTS:
        raise UserError(f"group metric '{name}': a classification metric takes {' or '.join(map(str, CLASSIFICATION_INPUTS))}, "
                        f"got {inputs}")
    return GROUP_METRICS.register(name, inputs=inputs, higher_is_better=higher_is_better,
                                  classification=classification)


def list_group_metrics() -> list[str]:
    return GROUP_METRICS.names()


def classification_metrics() -> list[str]:
    """The registered metrics every classification fairness analysis scores, in name order."""
    return [name for name in GROUP_METRICS.names() if GROUP_METRICS.tags(name)["classification"]]


def _ratio(numerator_R: np.ndarray, denominator_R: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator_R > 0, numerator_R / np.where(denominator_R > 0, denominator_R, 1), np.nan)


@register_group_metric("mean", inputs=("values",), classification=False)
def weighted_mean(weights_RN: np.ndarray, values_N: np.ndarray) -> np.ndarray:
    """Mean of per-subject values (e.g. Dice) over the weighted subjects."""
    return _ratio(weights_RN @ values_N, weights_RN.sum(axis=1))


@register_group_metric("accuracy", inputs=("y_true", "y_pred"))
def weighted_accuracy(weights_RN: np.ndarray, y_true_N: np.ndarray, y_pred_N: np.ndarray) -> np.ndarray:
    return weighted_mean(weights_RN, (y_true_N == y_pred_N).astype(np.float64))


@register_group_metric("selection_rate", inputs=("y_true", "y_pred"))
def weighted_selection_rate(weights_RN: np.ndarray, y_true_N: np.ndarray, y_pred_N: np.ndarray) -> np.ndarray:
    """P[h(X)=1] (fairlearn `selection_rate`); y_true is ignored, as there."""
    return weighted_mean(weights_RN, (y_pred_N == 1).astype(np.float64))


@register_group_metric("true_positive_rate", inputs=("y_true", "y_pred"))
def weighted_true_positive_rate(weights_RN: np.ndarray, y_true_N: np.ndarray, y_pred_N: np.ndarray) -> np.ndarray:
    """P[h(X)=1 | Y=1] (recall); NaN without positives."""
    positive_N = (y_true_N == 1).astype(np.float64)
    return _ratio(weights_RN @ (positive_N * (y_pred_N == 1)), weights_RN @ positive_N)


@register_group_metric("false_positive_rate", inputs=("y_true", "y_pred"), higher_is_better=False)
def weighted_false_positive_rate(weights_RN: np.ndarray, y_true_N: np.ndarray, y_pred_N: np.ndarray) -> np.ndarray:
    """P[h(X)=1 | Y=0]; NaN without negatives."""
    negative_N = (y_true_N == 0).astype(np.float64)
    return _ratio(weights_RN @ (negative_N * (y_pred_N == 1)), weights_RN @ negative_N)


@register_group_metric("auroc", inputs=("y_true", "y_score"))
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
        inputs = GROUP_METRICS.tags(metric_fn)["inputs"]
        if len(arrays) != len(inputs):
            raise UserError(f"group metric '{metric_fn}' takes {len(inputs)} arrays ({', '.join(inputs)}), got "
                            f"{len(arrays)}")
        return GROUP_METRICS.get(metric_fn)
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
    """Gap = max - min, ratio = min / max, std (population), the worst group and its value ("worst"), the best group,
    over the finite values.

    Fewer than two finite groups leave nothing to compare: gap, ratio and std are NaN.
    """
    finite = {group: float(value) for group, value in values.items() if np.isfinite(value)}
    if len(finite) < 2:
        only = next(iter(finite), None)
        return {"gap": float("nan"), "ratio": float("nan"), "std": float("nan"), "worst_group": only,
                "worst": finite.get(only, float("nan")), "best_group": only, "num_groups_compared": len(finite)}
    array = np.array(list(finite.values()))
    low, high = min(finite, key=finite.get), max(finite, key=finite.get)
    worst = low if higher_is_better else high
    return {"gap": float(array.max() - array.min()),
            "ratio": float(array.min() / array.max()) if array.max() > 0 else float("nan"),
            "std": float(array.std()), "worst_group": worst, "worst": finite[worst],
            "best_group": high if higher_is_better else low, "num_groups_compared": len(finite)}


def as_groups(groups_N: Sequence[Any], arrays: tuple, *,
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


def analyse_groups(metric: WeightedMetric, names: np.ndarray, codes_N: np.ndarray, arrays: tuple, *, seed: int,
             num_resamples: int, num_permutations: int, min_group_size: int, exclude_small: bool,
             higher_is_better: bool, level: float = 0.95) -> tuple[dict[str, Any], np.ndarray]:
    """Per-group values with bootstrap CIs, their summary and the gap's permutation p-value; also the (P, G)
    permuted values of the compared groups (other columns NaN), for joint statistics.

    Args:
        metric: a weighted metric `fn(weights_RN, *arrays_N) -> values_R`.
        names, codes_N, arrays: the groups and inputs as `as_groups` returns them.
        seed, num_resamples, num_permutations, min_group_size, exclude_small, higher_is_better: as in `group_metric`.
        level: the confidence level of the bootstrap intervals.
    """
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
    names, codes_N, arrays = as_groups(groups_N, arrays_N)
    result, _ = analyse_groups(metric, names, codes_N, arrays, seed=seed, num_resamples=num_resamples,
                         num_permutations=num_permutations, min_group_size=min_group_size,
                         exclude_small=exclude_small, higher_is_better=higher_is_better)
    return {"metric": metric_fn if isinstance(metric_fn, str) else getattr(metric_fn, "__name__", "custom"), **result}
