"""Scan-level probes beyond the primary logistic probe: kNN, few-shot label fractions and ordinal targets.

Each runs on every replicate's split (the same train/test subjects as the primary probe) and reports the mean and
standard deviation over replicates, with the per-replicate values.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from rafmedia.core.errors import UserError
from rafmedia.evaluate.metrics import compute_auroc
from rafmedia.evaluate.probes import create_probe, few_shot_indices, quadratic_weighted_kappa, spearman


def _summary(values: list[float]) -> dict[str, float]:
    finite = [value for value in values if np.isfinite(value)]
    return {"mean": float(np.mean(finite)) if finite else float("nan"),
            "std": float(np.std(finite)) if finite else float("nan")}


def knn_and_few_shot(emb_by_seed: dict[int, np.ndarray], labels_N: np.ndarray,
                     splits: dict[int, tuple[np.ndarray, np.ndarray]], *, fractions: Sequence[float],
                     c_grid: Sequence[float]) -> dict[str, Any]:
    """kNN probe AUROC (k chosen from {10, 20} by CV, clipped to the training size), and the logistic probe's
    AUROC trained on a stratified `fraction` of each replicate's training labels (at least one per class)."""
    knn, few = [], {str(fraction): [] for fraction in fractions}
    for seed, emb_ND in emb_by_seed.items():
        train, test = splits[seed]
        probe = create_probe("knn", seed=seed).fit(emb_ND[train], labels_N[train])
        knn.append(compute_auroc(probe.scores(emb_ND[test]), labels_N[test]))
        for fraction in fractions:
            subset = train[few_shot_indices(labels_N[train], fraction, seed=seed)]
            logistic = create_probe("logistic", c_grid=tuple(c_grid), seed=seed).fit(emb_ND[subset], labels_N[subset])
            few[str(fraction)].append(compute_auroc(logistic.scores(emb_ND[test]), labels_N[test]))
    return {"knn": {"auroc": _summary(knn), "per_seed": knn},
            "few_shot": {fraction: {"auroc": _summary(values), "per_seed": values, "num_train": None}
                         for fraction, values in few.items()}}


def ordinal_values(rows: list[dict[str, Any]], column: str) -> np.ndarray:
    try:
        return np.array([int(float(row[column])) for row in rows])
    except (TypeError, ValueError):
        raise UserError(f"ordinal target '{column}' must hold whole numbers (grades such as 0-5); "
                        f"it has values like {rows[0][column]!r}") from None


def ordinal_results(emb_by_seed: dict[int, np.ndarray], grades_N: np.ndarray,
                    splits: dict[int, tuple[np.ndarray, np.ndarray]], *, c_grid: Sequence[float]) -> dict[str, Any]:
    """The ordinal probe (one logistic model per threshold) on each replicate: quadratic weighted kappa of its
    predicted grades and Spearman correlation of its expected grade with the true grade, on the test split."""
    kappas, rhos = [], []
    levels = np.unique(grades_N)
    for seed, emb_ND in emb_by_seed.items():
        train, test = splits[seed]
        probe = create_probe("ordinal", c_grid=tuple(c_grid), seed=seed).fit(emb_ND[train], grades_N[train])
        kappas.append(quadratic_weighted_kappa(grades_N[test], probe.predict(emb_ND[test]), labels=levels))
        rhos.append(spearman(grades_N[test], probe.scores(emb_ND[test])))
    return {"quadratic_weighted_kappa": _summary(kappas), "spearman": _summary(rhos),
            "per_seed": [{"quadratic_weighted_kappa": k, "spearman": r} for k, r in zip(kappas, rhos)],
            "levels": levels.tolist()}
