"""The RAF index: one number per encoder and cohort, from three components in [0, 1], each with a bootstrap interval.

With m the task metric of the primary probe on the test split (AUROC by default), c its chance level (0.5 for
AUROC) and w_s the ROOD-MRI severity weights (2/3)^s normalised to sum to 1:

- performance   P = clip((m_clean - c) / (1 - c), 0, 1): skill above chance, on a [0, 1] scale;
- robustness    R = 1 - mean_a D_a with D_a = clip(sum_s w_s max(0, m_clean - m_{a,s}) / (m_clean - c), 0, 1),
                the severity-weighted share of the clean skill lost under alteration a (0 when there is no skill);
- fairness      F = 1 - mean_g clip(gap_g / r, 0, 1) over the grouping attributes g, gap_g = max - min over the
                groups of g of the per-group accuracy, r = 1 the range of accuracy;
- RAF           = (w_P P + w_R R + w_F F) / (w_P + w_R + w_F), weights from `evaluate.raf_weights` (default 1, 1, 1).

P and F are means over the replicates (split seeds; for a random baseline also initialisations), R comes from
the first replicate, on which robustness is measured. Intervals: percentile bootstrap, each draw resampling every
replicate's test subjects with replacement, jointly for all components (the interval of RAF accounts for their
correlation).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from rafmedia.core.errors import UserError
from rafmedia.evaluate.metrics import compute_auroc, severity_weights

COMPONENTS = ("performance", "robustness", "fairness")
RAF_FORMULA = ("P = clip((AUROC - 0.5) / 0.5, 0, 1), the primary probe's skill above chance on clean test scans; "
               "R = 1 - mean over alterations of the severity-weighted share of that skill lost, weights (2/3)^s "
               "(ROOD-MRI); F = 1 - mean over the group_by attributes of the accuracy gap between groups (max - min); "
               "P and F are means over the replicates, R is measured on the first; "
               "RAF = the weighted mean of P, R and F.")


@dataclass
class RafWeights:
    performance: float = 1.0
    robustness: float = 1.0
    fairness: float = 1.0

    def normalised(self) -> np.ndarray:
        weights = np.array([self.performance, self.robustness, self.fairness], dtype=np.float64)
        if (weights < 0).any() or weights.sum() <= 0:
            raise UserError(f"evaluate.raf_weights must be >= 0 and not all 0, got {weights.tolist()}")
        return weights / weights.sum()


def performance_component(metric: float, chance: float = 0.5) -> float:
    if not np.isfinite(metric):
        return 0.0
    return float(np.clip((metric - chance) / (1.0 - chance), 0.0, 1.0))


def degradation(clean: float, by_severity: Mapping[int, float], chance: float = 0.5) -> float:
    """D_a: the severity-weighted loss of the clean skill under one alteration, in [0, 1] (1: all skill lost)."""
    skill = clean - chance
    if not np.isfinite(skill) or skill <= 0:
        return 1.0
    severities = sorted(by_severity)
    drops = np.maximum(0.0, clean - np.nan_to_num(np.array([by_severity[s] for s in severities]), nan=chance))
    return float(np.clip(np.sum(severity_weights(severities) * drops) / skill, 0.0, 1.0))


def robustness_component(clean: float, metric_by_alteration: Mapping[str, Mapping[int, float]],
                         chance: float = 0.5) -> float:
    if not metric_by_alteration:
        return float("nan")
    return float(1.0 - np.mean([degradation(clean, by_severity, chance) for by_severity in metric_by_alteration.values()]))


def fairness_component(gaps: Mapping[str, float], metric_range: float = 1.0) -> float:
    finite = [gap for gap in gaps.values() if np.isfinite(gap)]
    if not finite:
        return float("nan")
    return float(1.0 - np.mean(np.clip(np.asarray(finite) / metric_range, 0.0, 1.0)))


def raf_index(performance: float, robustness: float, fairness: float, weights: RafWeights | None = None) -> float:
    """The weighted mean of the components that are defined (a cohort without groups has no F)."""
    values = np.array([performance, robustness, fairness], dtype=np.float64)
    w = (weights or RafWeights()).normalised()
    defined = np.isfinite(values)
    return float(np.sum(w[defined] * values[defined]) / np.sum(w[defined])) if defined.any() else float("nan")


def group_gap(values_N: np.ndarray, groups_N: np.ndarray) -> float:
    """max - min over groups of the mean of `values_N` (per-subject correctness gives the accuracy gap)."""
    means = [values_N[groups_N == g].mean() for g in np.unique(groups_N)]
    return float(max(means) - min(means)) if len(means) > 1 else float("nan")


@dataclass
class RafInputs:
    """Per-test-subject arrays of one replicate: everything the index and its bootstrap need."""

    labels_N: np.ndarray
    clean_scores_N: np.ndarray
    clean_predictions_N: np.ndarray
    altered_scores: dict[str, dict[int, np.ndarray]]  # alteration -> severity -> scores_N
    groups: dict[str, np.ndarray]  # attribute -> group label per subject


def _components(inputs: RafInputs, idx: np.ndarray, chance: float) -> np.ndarray:
    """(P, R, F) of one replicate on its test subjects `idx`; R is NaN for a replicate without altered scores."""
    y = inputs.labels_N[idx]
    clean = compute_auroc(y_true=y, y_score=inputs.clean_scores_N[idx])
    by_alteration = {name: {s: compute_auroc(y_true=y, y_score=scores[idx]) for s, scores in by_severity.items()}
                     for name, by_severity in inputs.altered_scores.items()}
    correct = (inputs.clean_predictions_N[idx] == y).astype(np.float64)
    gaps = {attribute: group_gap(correct, labels[idx]) for attribute, labels in inputs.groups.items()}
    return np.array([performance_component(clean, chance), robustness_component(clean, by_alteration, chance),
                     fairness_component(gaps)])


def raf_point(inputs: RafInputs | list[RafInputs], weights: RafWeights | None = None,
              idx: list[np.ndarray] | np.ndarray | None = None, chance: float = 0.5) -> dict[str, float]:
    """The components, averaged over replicates (each on its own test subjects, `idx[r]` or all), and the index.

    A component a replicate cannot measure (robustness, measured on the first replicate only) is averaged over the
    replicates that have it."""
    replicates = [inputs] if isinstance(inputs, RafInputs) else list(inputs)
    if idx is None:
        idx = [np.arange(len(r.labels_N)) for r in replicates]
    elif isinstance(idx, np.ndarray):
        idx = [idx]
    values = np.array([_components(r, i, chance) for r, i in zip(replicates, idx)])
    with np.errstate(all="ignore"):
        finite = np.isfinite(values)
        means = np.where(finite.any(axis=0), np.nansum(values, axis=0) / np.maximum(finite.sum(axis=0), 1), np.nan)
    out = dict(zip(COMPONENTS, map(float, means)))
    out["index"] = raf_index(out["performance"], out["robustness"], out["fairness"], weights)
    return out


def raf_with_intervals(inputs: RafInputs | list[RafInputs], weights: RafWeights | None = None, *,
                       num_resamples: int = 500, seed: int = 0, level: float = 0.95,
                       with_draws: bool = False) -> dict[str, Any]:
    """Point values plus `<component>_ci95` percentile-bootstrap intervals: each draw resamples every replicate's
    test subjects with replacement, and all components come from the same draw.

    With `with_draws`, `draws` holds every draw's index and components (lists of `num_resamples` values): two
    encoders scored on one cohort with the same seeds and `seed` share their resamples, so their draws compare
    pairwise (the portal's rank intervals)."""
    replicates = [inputs] if isinstance(inputs, RafInputs) else list(inputs)
    point = raf_point(replicates, weights)
    rng = np.random.default_rng(seed)
    sizes = [len(r.labels_N) for r in replicates]
    draws = [raf_point(replicates, weights, [rng.integers(0, n, n) for n in sizes]) for _ in range(num_resamples)]
    alpha = (1 - level) / 2
    out: dict[str, float | list[float]] = dict(point)
    for key in ("index", *COMPONENTS):
        values = np.array([draw[key] for draw in draws], dtype=np.float64)
        values = values[np.isfinite(values)]
        out[f"{key}_ci95"] = ([float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))]
                              if len(values) >= num_resamples // 2 else [float("nan"), float("nan")])
    if with_draws:
        out["draws"] = {key: [round(float(draw[key]), 6) for draw in draws] for key in ("index", *COMPONENTS)}
    return out
