"""The scan-level stage of an evaluation cell: probes on frozen embeddings, fitted per replicate.

- The primary probe (`evaluate.probe`, logistic by default) is fitted on every binary target of every replicate's
  clean training split; these fits (`ProbeFit`) are what the fairness, robustness and RAF stages score.
- Every other registered categorical probe (`raf list probes`: kNN, and any probe registered later) is scored on
  the primary target: its AUROC per replicate, mean and standard deviation.
- Few-shot: the primary probe trained on stratified, nested fractions of each replicate's training labels.
- Ordinal targets: the ordinal probe, scored by quadratic weighted kappa and Spearman correlation.

Each runs on every replicate's split (the same train/test subjects as the primary probe) and reports the mean and
population standard deviation over replicates, with the per-replicate values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from rafmedia.core.errors import UserError
from rafmedia.evaluate.metrics import compute_accuracy, compute_auroc, compute_balanced_accuracy
from rafmedia.evaluate.probes import (PROBES, categorical_probes, create_probe, few_shot_indices,
                                      quadratic_weighted_kappa, spearman)

ORDINAL_PROBE = "ordinal"
CLEAN_METRICS = ("auroc", "accuracy", "balanced_accuracy")

Splits = dict[int, tuple[np.ndarray, np.ndarray]]  # replicate seed -> (train indices, test indices)


@dataclass
class ProbeFit:
    """A probe fitted on one replicate's clean train split, with its clean test predictions."""

    probe: Any
    test_idx: np.ndarray
    train_idx: np.ndarray
    scores: np.ndarray
    predictions: np.ndarray


def summary(values: list[float]) -> dict[str, float]:
    """Mean and population std of the finite values (NaN when none is finite)."""
    finite = [value for value in values if np.isfinite(value)]
    return {"mean": float(np.mean(finite)) if finite else float("nan"),
            "std": float(np.std(finite)) if finite else float("nan")}


def build_probe(name: str, *, seed: int, c_grid: Sequence[float]):
    """The registered probe `name` with the evaluation's seed, and its C grid when the probe has one."""
    options = {"seed": seed} if PROBES.accepts(name, "seed") else {}
    if PROBES.accepts(name, "c_grid"):
        options["c_grid"] = tuple(c_grid)
    return create_probe(name, **options)


def other_probe_names(primary: str) -> list[str]:
    """Every registered categorical probe except the primary one."""
    return [name for name in categorical_probes() if name != primary]


def fit_probes(emb_by_seed: dict[int, np.ndarray], labels: dict[str, np.ndarray], splits: Splits, *, probe: str,
               c_grid: Sequence[float]) -> dict[tuple[int, str], ProbeFit]:
    """Fits the primary probe per (replicate, target); everything downstream reuses these fits."""
    fits = {}
    for seed, emb_ND in emb_by_seed.items():
        train_idx, test_idx = splits[seed]
        for target, y in labels.items():
            fitted = build_probe(probe, seed=seed, c_grid=c_grid).fit(emb_ND[train_idx], y[train_idx])
            fits[(seed, target)] = ProbeFit(fitted, test_idx, train_idx, fitted.scores(emb_ND[test_idx]),
                                            fitted.predict(emb_ND[test_idx]))
    return fits


def clean_results(fits: dict[tuple[int, str], ProbeFit], labels: dict[str, np.ndarray]) -> dict[str, Any]:
    """Clean probe AUROC / accuracy / balanced accuracy per target, per replicate and as mean and std."""
    out = {}
    for target, y in labels.items():
        per_seed = [{"seed": seed, "auroc": compute_auroc(y_true=y[fit.test_idx], y_score=fit.scores),
                     "accuracy": compute_accuracy(y_true=y[fit.test_idx], y_pred=fit.predictions),
                     "balanced_accuracy": compute_balanced_accuracy(y_true=y[fit.test_idx], y_pred=fit.predictions)}
                    for (seed, fit_target), fit in fits.items() if fit_target == target]
        out[target] = {metric: summary([s[metric] for s in per_seed]) for metric in CLEAN_METRICS}
        out[target]["per_seed"] = per_seed
    return out


def other_probe_results(emb_by_seed: dict[int, np.ndarray], labels_N: np.ndarray, splits: Splits, *,
                        names: Sequence[str], c_grid: Sequence[float]) -> dict[str, Any]:
    """AUROC of each probe in `names` on every replicate's split (kNN: k chosen from {10, 20} by CV, clipped to
    the training size)."""
    out = {}
    for name in names:
        per_seed = []
        for seed, emb_ND in emb_by_seed.items():
            train, test = splits[seed]
            fitted = build_probe(name, seed=seed, c_grid=c_grid).fit(emb_ND[train], labels_N[train])
            per_seed.append(compute_auroc(y_true=labels_N[test], y_score=fitted.scores(emb_ND[test])))
        out[name] = {"auroc": summary(per_seed), "per_seed": per_seed}
    return out


def few_shot_results(emb_by_seed: dict[int, np.ndarray], labels_N: np.ndarray, splits: Splits, *,
                     fractions: Sequence[float], probe: str, c_grid: Sequence[float]) -> dict[str, Any]:
    """AUROC of the probe trained on a stratified `fraction` of each replicate's training labels (at least one per
    class; the subsets are nested)."""
    few = {str(fraction): [] for fraction in fractions}
    for seed, emb_ND in emb_by_seed.items():
        train, test = splits[seed]
        for fraction in fractions:
            subset = train[few_shot_indices(labels_N[train], fraction, seed=seed)]
            fitted = build_probe(probe, seed=seed, c_grid=c_grid).fit(emb_ND[subset], labels_N[subset])
            few[str(fraction)].append(compute_auroc(y_true=labels_N[test], y_score=fitted.scores(emb_ND[test])))
    return {fraction: {"auroc": summary(values), "per_seed": values, "num_train": None}
            for fraction, values in few.items()}


def ordinal_values(rows: list[dict[str, Any]], column: str) -> np.ndarray:
    try:
        return np.array([int(float(row[column])) for row in rows])
    except (TypeError, ValueError):
        raise UserError(f"ordinal target '{column}' must hold whole numbers (grades such as 0-5); "
                        f"it has values like {rows[0][column]!r}") from None


def ordinal_results(emb_by_seed: dict[int, np.ndarray], grades_N: np.ndarray, splits: Splits, *,
                    c_grid: Sequence[float]) -> dict[str, Any]:
    """The ordinal probe (one logistic model per threshold) on each replicate: quadratic weighted kappa of its
    predicted grades and Spearman correlation of its expected grade with the true grade, on the test split."""
    kappas, rhos = [], []
    levels = np.unique(grades_N)
    for seed, emb_ND in emb_by_seed.items():
        train, test = splits[seed]
        fitted = build_probe(ORDINAL_PROBE, seed=seed, c_grid=c_grid).fit(emb_ND[train], grades_N[train])
        kappas.append(quadratic_weighted_kappa(grades_N[test], fitted.predict(emb_ND[test]), labels=levels))
        rhos.append(spearman(grades_N[test], fitted.scores(emb_ND[test])))
    return {"quadratic_weighted_kappa": summary(kappas), "spearman": summary(rhos),
            "per_seed": [{"quadratic_weighted_kappa": k, "spearman": r} for k, r in zip(kappas, rhos)],
            "levels": levels.tolist()}


def scan_level_results(fits: dict[tuple[int, str], ProbeFit], emb_by_seed: dict[int, np.ndarray],
                       labels: dict[str, np.ndarray], splits: Splits, *, rows: list[dict[str, Any]],
                       primary_target: str, probe: str, few_shot: Sequence[float], ordinal_targets: Sequence[str],
                       c_grid: Sequence[float]) -> dict[str, Any]:
    """The cell's "probes" section: clean metrics per target; on the primary target also every other registered
    categorical probe (their names under "other_probes") and the few-shot fractions; one entry per ordinal target."""
    out = clean_results(fits, labels)
    y = labels[primary_target]
    others = other_probe_names(probe)
    out[primary_target].update(other_probe_results(emb_by_seed, y, splits, names=others, c_grid=c_grid))
    out[primary_target]["other_probes"] = others
    out[primary_target]["few_shot"] = few_shot_results(emb_by_seed, y, splits, fractions=few_shot, probe=probe,
                                                       c_grid=c_grid)
    for column in ordinal_targets:
        out[column] = ordinal_results(emb_by_seed, ordinal_values(rows, column), splits, c_grid=c_grid)
    return out


def headline(probes: dict[str, Any], *, primary_target: str, probe: str) -> dict[str, float]:
    """The leaderboard's scan-level columns: the mean AUROC of the primary probe and of every other probe on the
    primary target."""
    results = probes[primary_target]
    return {f"{name} AUROC ({primary_target})": (results if name == probe else results[name])["auroc"]["mean"]
            for name in [probe, *results.get("other_probes", [])]}
