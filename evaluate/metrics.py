"""Pure metric functions (numpy in, floats out). Definitions follow MISSION.md and are cited per function.

Undefined values (an AUROC on a group with one class) are NaN and are reported as such with a flag,
never silently dropped from an average.
"""
from __future__ import annotations

import warnings
from typing import Callable, Sequence

import numpy as np
from scipy import linalg, stats

from rafmedia.core.errors import UserError


def _binary(y_true: Sequence[int], what: str) -> np.ndarray:
    """`y_true` as a bool array; anything but 0/1 (or True/False) labels is refused, so that scores passed where
    labels belong fail loudly instead of returning a silent NaN or a wrong number."""
    labels = np.asarray(y_true)
    values = np.unique(labels)
    if labels.ndim != 1 or not np.isin(values, (0, 1)).all():
        raise UserError(f"{what}: y_true must be one binary label (0/1) per item, got {labels.ndim}-d values "
                        f"{values[:5].tolist()}{'...' if len(values) > 5 else ''}; pass keywords, e.g. "
                        f"{what}(y_true=labels, y_score=scores)")
    return labels.astype(bool)


def compute_auroc(*, y_true: Sequence[int], y_score: Sequence[float]) -> float:
    """Area under the ROC curve = Mann-Whitney U / (n_pos n_neg), ties counted half (scikit-learn's
    `roc_auc_score(y_true, y_score)`). NaN with one class. Keyword-only: swapped arguments cannot pass unnoticed."""
    labels, scores = _binary(y_true, "compute_auroc"), np.asarray(y_score, dtype=np.float64)
    if scores.shape != labels.shape:
        raise UserError(f"compute_auroc: y_score has shape {scores.shape} but y_true has {labels.shape}")
    num_pos, num_neg = int(labels.sum()), int((~labels).sum())
    if num_pos == 0 or num_neg == 0:
        return float("nan")
    ranks = stats.rankdata(scores)  # average ranks handle ties
    u = ranks[labels].sum() - num_pos * (num_pos + 1) / 2
    return float(u / (num_pos * num_neg))


def compute_accuracy(*, y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Share of items whose prediction equals the label (scikit-learn's `accuracy_score`); NaN with no items."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float(np.mean(y_pred == y_true)) if len(y_true) else float("nan")


def compute_balanced_accuracy(*, y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Mean recall over the classes present in `y_true` (scikit-learn's `balanced_accuracy_score`; MedMNIST-C
    scores 1 - balanced accuracy)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    recalls = [np.mean(y_pred[y_true == c] == c) for c in np.unique(y_true)]
    return float(np.mean(recalls)) if recalls else float("nan")


def bootstrap_ci(metric: Callable[[np.ndarray], float], num_items: int, *, seed: int, num_resamples: int = 500,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of `metric(indices)` resampling items (subjects) with replacement."""
    return bootstrap_cis(lambda indices: {"value": metric(indices)}, num_items, seed=seed,
                         num_resamples=num_resamples, level=level)["value"]


def bootstrap_cis(metrics: Callable[[np.ndarray], dict[str, float]], num_items: int, *, seed: int,
                  num_resamples: int = 500, level: float = 0.95) -> dict[str, tuple[float, float]]:
    """`bootstrap_ci` of several metrics on the same resamples: `metrics(indices)` gives every metric at once, so
    each resample is scored once. A metric finite in fewer than half the resamples gets (NaN, NaN)."""
    rng = np.random.default_rng(seed)
    draws = [metrics(rng.integers(0, num_items, num_items)) for _ in range(num_resamples)]
    alpha = (1 - level) / 2
    intervals = {}
    for name in draws[0] if draws else []:
        values = np.array([draw[name] for draw in draws], dtype=float)
        values = values[np.isfinite(values)]
        intervals[name] = ((float("nan"), float("nan")) if len(values) < num_resamples // 2 else
                           (float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))))
    return intervals


def frechet_distance(emb_x_ND: np.ndarray, emb_y_MD: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two embedding sets (as FID; MONAI's FIDMetric):

    ||mu_x - mu_y||^2 + Tr(S_x + S_y - 2 (S_x S_y)^{1/2}), computed in float64.
    """
    x, y = np.asarray(emb_x_ND, dtype=np.float64), np.asarray(emb_y_MD, dtype=np.float64)
    mu_x, mu_y = x.mean(axis=0), y.mean(axis=0)
    sigma_x, sigma_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    with warnings.catch_warnings():
        # With fewer samples than dimensions the covariances are singular; sqrtm still returns the PSD root.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma_x @ sigma_y)
    if np.iscomplexobj(covmean):
        covmean = covmean.real  # imaginary parts are numerical noise for PSD products
    return float(np.sum((mu_x - mu_y) ** 2) + np.trace(sigma_x) + np.trace(sigma_y) - 2 * np.trace(covmean))


def rankme(emb_ND: np.ndarray, eps: float = 1e-7) -> float:
    """RankMe effective rank (Garrido et al. 2023): exp of the entropy of the normalised singular values."""
    singular = np.linalg.svd(np.asarray(emb_ND, dtype=np.float64), compute_uv=False)
    p = singular / singular.sum() + eps
    return float(np.exp(-np.sum(p * np.log(p))))


def severity_weights(severities: Sequence[int]) -> np.ndarray:
    """ROOD-MRI severity weights (2/3)^s, normalised to sum to 1."""
    weights = (2.0 / 3.0) ** np.asarray(severities, dtype=np.float64)
    return weights / weights.sum()


def corruption_error(errors: Sequence[float], baseline_errors: Sequence[float]) -> float:
    """ImageNet-C corruption error CE_c = sum_s E_{s,c} / sum_s E^base_{s,c} over severities."""
    return float(np.sum(errors) / np.sum(baseline_errors)) if np.sum(baseline_errors) > 0 else float("nan")


def relative_corruption_error(errors: Sequence[float], clean_error: float, baseline_errors: Sequence[float],
                              baseline_clean_error: float) -> float:
    """ImageNet-C relative CE: sum_s (E_{s,c} - E_clean) / sum_s (E^base_{s,c} - E^base_clean)."""
    denominator = np.sum(np.asarray(baseline_errors) - baseline_clean_error)
    numerator = np.sum(np.asarray(errors) - clean_error)
    return float(numerator / denominator) if denominator != 0 else float("nan")
