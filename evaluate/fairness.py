"""Fairness analyses of the evaluator, and the fairness stage of an evaluation cell.

Definitions (MISSION.md, "Where the numbers come from"; the group statistics are those of
`rafmedia.evaluate.group_metrics`: gap = max_g - min_g, ratio = min_g / max_g, population std over groups, worst
group, bootstrap CIs, permutation p-values):

- every registered classification metric (`group_metrics.classification_metrics()`: accuracy, AUROC, selection
  rate, true and false positive rates, and any metric registered later) per group, with its gap;
- demographic parity difference = gap of the selection rate P[h(X)=1 | A=a], equalised odds difference =
  max(gap of TPR, gap of FPR) (fairlearn's `demographic_parity_difference` / `equalized_odds_difference`);
- skewed error rate SER = max_g(1 - DSC_g) / min_g(1 - DSC_g) for segmentation.

Where we differ from fairlearn on purpose: a group whose TPR (no positives), FPR (no negatives) or AUROC (one class)
is undefined gets NaN, is listed under "undefined_groups" and is left out of the gap; fairlearn scores it 0.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from rafmedia.core.errors import UserError
from rafmedia.evaluate.group_metrics import (GROUP_METRICS, analyse_groups, as_groups, classification_metrics,
                                             gap_per_row, permutation_p_value, summarize_group_values, weighted_mean)
from rafmedia.evaluate.scan_level import ProbeFit

DEMOGRAPHIC_PARITY = "selection_rate"  # its gap is the demographic parity difference
EQUALIZED_ODDS = ("true_positive_rate", "false_positive_rate")  # the larger of their gaps is the equalised odds


# --------------------------------------------------------------------------------- classification fairness
def classification_fairness(y_true_N: Sequence[int], y_pred_N: Sequence[int], y_score_N: Sequence[float] | None,
                            groups_N: Sequence[Any], *, seed: int = 0, num_resamples: int = 1000,
                            num_permutations: int = 1000, min_group_size: int = 10,
                            exclude_small: bool = False) -> dict[str, Any]:
    """Group fairness of a binary classifier: every registered classification metric per group, each gap with its
    permutation p-value (shuffles shared by all metrics, so combined statistics are tested jointly).

    - `<metric>`: a `group_metrics.group_metric`-style entry per registered classification metric; metrics on
      scores (AUROC) are skipped when `y_score_N` is None;
    - demographic parity difference: the selection-rate gap (fairlearn `demographic_parity_difference`);
    - equalised odds difference: max(TPR gap, FPR gap) (fairlearn `equalized_odds_difference`, agg="worst_case");
    - `<metric>_gap` and `<metric>_gap_p_value` for every metric, and the group sizes by class.

    Args:
        y_true_N: reference labels 0/1.
        y_pred_N: predicted labels 0/1.
        y_score_N: scores for the positive class, or None to skip the metrics on scores.
        groups_N: group label of each subject.
        seed, num_resamples, num_permutations, min_group_size, exclude_small: as in `group_metrics.group_metric`.
    """
    scored = () if y_score_N is None else (y_score_N,)
    names, codes_N, (y_true, y_pred, *y_score) = as_groups(groups_N, (y_true_N, y_pred_N, *scored), binary=(0, 1),
                                                          array_names=("y_true", "y_pred", "y_score"))
    arrays = {"y_true": y_true, "y_pred": y_pred, **({"y_score": y_score[0]} if y_score else {})}
    out: dict[str, Any] = {"metrics": []}
    permuted = {}
    for name in classification_metrics():
        tags = GROUP_METRICS.tags(name)
        if not all(array in arrays for array in tags["inputs"]):
            continue
        out[name], permuted[name] = analyse_groups(
            GROUP_METRICS.get(name), names, codes_N, tuple(arrays[array] for array in tags["inputs"]), seed=seed,
            num_resamples=num_resamples, num_permutations=num_permutations, min_group_size=min_group_size,
            exclude_small=exclude_small, higher_is_better=tags["higher_is_better"])
        out["metrics"].append(name)
        out.update({f"{name}_gap": out[name]["gap"], f"{name}_gap_p_value": out[name]["p_value_gap"]})
    out["groups"] = {str(name): {"n": int(np.sum(codes_N == code)),
                                 "n_positive": int(np.sum((codes_N == code) & (y_true == 1))),
                                 "n_negative": int(np.sum((codes_N == code) & (y_true == 0))),
                                 "small": bool(np.sum(codes_N == code) < min_group_size)}
                     for code, name in enumerate(names)}
    if DEMOGRAPHIC_PARITY in out:
        out.update({"demographic_parity_difference": out[DEMOGRAPHIC_PARITY]["gap"],
                    "demographic_parity_p_value": out[DEMOGRAPHIC_PARITY]["p_value_gap"]})
    if all(name in out for name in EQUALIZED_ODDS):
        equalized_odds = float(np.fmax(*(out[name]["gap"] for name in EQUALIZED_ODDS)))
        equalized_odds_P = np.fmax(*(gap_per_row(permuted[name]) for name in EQUALIZED_ODDS))
        out.update({"equalized_odds_difference": equalized_odds,
                    "equalized_odds_p_value": permutation_p_value(equalized_odds, equalized_odds_P)})
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
        seed, num_resamples, num_permutations, min_group_size, exclude_small: as in `group_metrics.group_metric`.
    """
    dice_N = np.asarray(dice_N, dtype=np.float64)
    bad = np.flatnonzero(~((dice_N >= 0) & (dice_N <= 1)))
    if len(bad):
        raise UserError(f"dice_N must be in [0, 1] for every subject; subjects {bad[:5].tolist()} have "
                        f"{dice_N[bad[:5]].tolist()}: score empty masks upstream (an empty prediction of a "
                        f"non-empty reference is 0) instead of passing NaN")
    names, codes_N, arrays = as_groups(groups_N, (dice_N,))
    dice, permuted_PG = analyse_groups(weighted_mean, names, codes_N, arrays, seed=seed, num_resamples=num_resamples,
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


# --------------------------------------------------------------------------------------------- the stage
def fairness_results(fits: list[ProbeFit], y: np.ndarray, groups: dict[str, np.ndarray], *, seed: int,
                     num_resamples: int, num_permutations: int, min_group_size: int) -> dict[str, Any]:
    """The cell's "fairness" section: per grouping (each attribute and each pair), every registered classification
    metric of the primary probe per group, as means over the replicates `fits` (each on its own test split), with
    their gaps; on the first replicate, bootstrap CIs, every gap's permutation p-value, and the demographic parity
    and equalised odds differences (`classification_fairness`).

    Args:
        fits: the primary probe's fit of each replicate, the first one first.
        y: the primary target's 0/1 label of every subject of the cohort.
        groups: grouping name -> group label of every subject of the cohort.
        seed, num_resamples, num_permutations, min_group_size: as in `classification_fairness`.
    """
    first = fits[0]
    arrays = [{"y_true": y[fit.test_idx].astype(np.float64), "y_pred": fit.predictions.astype(np.float64),
               "y_score": np.asarray(fit.scores, dtype=np.float64)} for fit in fits]
    out: dict[str, dict[str, Any]] = {}
    for grouping, labels in groups.items():
        tests = classification_fairness(y[first.test_idx], first.predictions, first.scores, labels[first.test_idx],
                                        seed=seed, num_resamples=num_resamples, num_permutations=num_permutations,
                                        min_group_size=min_group_size)
        metrics = tests["metrics"]
        members = {group: [labels[fit.test_idx] == group for fit in fits] for group in sorted(set(labels))}
        groups_out = {group: group_entry(member_N, arrays, metrics, tests, group=group, min_group_size=min_group_size)
                      for group, member_N in members.items()}
        out[grouping] = {"metrics": metrics, "groups": groups_out,
                         **{metric: summarize_group_values({g: v[metric] for g, v in groups_out.items()},
                                                           higher_is_better=GROUP_METRICS.tags(metric)["higher_is_better"])
                            for metric in metrics},
                         "first_replicate": {key: value for key, value in tests.items()
                                             if key.endswith(("_gap", "_gap_p_value", "_difference", "_p_value"))}}
    return out


def group_entry(member_RN: list[np.ndarray], arrays: list[dict[str, np.ndarray]], metrics: list[str],
                tests: dict[str, Any], *, group: str, min_group_size: int) -> dict[str, Any]:
    """One group's values: every metric per replicate (its members among that replicate's test subjects) and their
    mean, the first replicate's bootstrap interval (from `tests`, the first replicate's `classification_fairness`),
    the mean test size and the small-group flag."""
    per_replicate: dict[str, list[float]] = {metric: [] for metric in metrics}
    for member_N, replicate in zip(member_RN, arrays):
        weights_1N = member_N.astype(np.float64)[None]
        for metric in metrics:
            inputs = [replicate[name] for name in GROUP_METRICS.tags(metric)["inputs"]]
            per_replicate[metric].append(float(GROUP_METRICS.get(metric)(weights_1N, *inputs)[0]))
    size = float(np.mean([member_N.sum() for member_N in member_RN]))
    return {"n_test": size, **{metric: finite_mean(values) for metric, values in per_replicate.items()},
            **{f"{metric}_per_replicate": values for metric, values in per_replicate.items()},
            "first_replicate": {**{metric: values[0] for metric, values in per_replicate.items()},
                                "ci95": {metric: tests[metric]["groups"].get(group, {}).get("ci95", [float("nan")] * 2)
                                         for metric in metrics}},
            "small_group": bool(size < min_group_size)}


def finite_mean(values: list[float]) -> float:
    """The mean of the finite values (an undefined replicate, a one-class group's AUROC, is left out); NaN if none."""
    finite = [value for value in values if np.isfinite(value)]
    return float(np.mean(finite)) if finite else float("nan")


def headline(fairness: dict[str, Any], attributes: list[str]) -> dict[str, float]:
    """The leaderboard's fairness columns: every metric's gap between the groups of each `group_by` attribute (mean
    over replicates), e.g. "accuracy gap (sex)"."""
    return {f"{metric} gap ({attribute})": fairness[attribute][metric]["gap"]
            for attribute in attributes for metric in fairness[attribute]["metrics"]}
