"""The adaptor protocol (`evaluate.adaptors`): every adaptor x label budget x seed, on one split, with intervals.

Adaptors are registered probes (`raf list probes`): embedding probes (logistic, knn, mlp, ...) fitted on the cell's
cached clean embeddings, which are computed once per encoder and re-used for every seed and budget (nothing is
re-embedded), and volume adaptors (finetune_partial, finetune_full, lora: `rafmedia.evaluate.finetune`) trained on
the volumes under one fixed compute budget (steps x batch size, augmentation, threads). A volume adaptor that does
not apply to the architecture (LoRA on a CNN without Linear layers) is reported as not applicable, with the reason.

Protocol, on the cell's first replicate (its split, its model):
- label budgets: stratified nested fractions of the training split, at least one subject per class
  (`few_shot_indices`), drawn per seed;
- seeds: each seed draws its own label subset and its own initialisation (probe seed, head init, batch order);
- score: AUROC and balanced accuracy of the primary target on the whole test split; per budget the mean over
  seeds, the sample std and a 95% Student-t interval over seeds (mean +- t_{0.975, n-1} s / sqrt(n), clipped to
  [0, 1]), plus the wall time of every fit.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch import nn

from rafmedia.evaluate.config import AdaptorsConfig
from rafmedia.evaluate.metrics import compute_auroc, compute_balanced_accuracy
from rafmedia.evaluate.probes import PROBES, create_probe, few_shot_indices, probe_inputs
from rafmedia.shards.volumes import VolumeSource, as_volume_source

INTERVAL = "95% Student-t interval over seeds, clipped to [0, 1]"
SCORES = ("auroc", "balanced_accuracy")


def t_interval(values: Sequence[float], level: float = 0.95,
               bounds: tuple[float, float] = (-np.inf, np.inf)) -> dict[str, Any]:
    """Mean, sample std and the Student-t interval of the mean of the finite `values` (NaN bounds with fewer than
    two; a zero-width interval when they are all equal), clipped to the metric's range `bounds`: with few seeds the
    t quantile is large (12.7 for two) and an AUROC interval would otherwise reach past 0 and 1."""
    finite = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if len(finite) == 0:
        return {"mean": float("nan"), "std": float("nan"), "ci95": [float("nan"), float("nan")], "n": 0}
    mean = float(finite.mean())
    if len(finite) < 2:
        return {"mean": mean, "std": float("nan"), "ci95": [float("nan"), float("nan")], "n": 1}
    std = float(finite.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, len(finite) - 1)) * std / np.sqrt(len(finite))
    low, high = max(mean - half, bounds[0]), min(mean + half, bounds[1])
    return {"mean": mean, "std": std, "ci95": [float(low), float(high)], "n": len(finite)}


def label_subsets(labels_N: np.ndarray, train_idx: np.ndarray, *, budgets: Sequence[float],
                  seeds: Sequence[int]) -> dict[tuple[int, float], np.ndarray]:
    """(seed, budget) -> the labelled training subjects (indices into the cohort): `few_shot_indices` of the
    training split, stratified, at least one per class, nested across budgets for one seed."""
    return {(seed, budget): train_idx[few_shot_indices(labels_N[train_idx], budget, seed=seed)]
            for seed in seeds for budget in budgets}


def adaptor_options(name: str, config: AdaptorsConfig, *, seed: int, c_grid: Sequence[float]) -> dict[str, Any]:
    """The factory options of adaptor `name`: a volume adaptor's shared compute budget, or an embedding probe's C grid
    (when it has one), then its own `evaluate.adaptors.options`, then its seed."""
    if probe_inputs(name) == "volumes":
        shared = {"steps": config.steps, "batch_size": config.batch_size, "augmentation": config.augmentation,
                  "threads": config.threads}
    else:
        shared = {"c_grid": tuple(c_grid)} if PROBES.accepts(name, "c_grid") else {}
    seeded = {"seed": seed} if PROBES.accepts(name, "seed") else {}
    return {**shared, **config.options.get(name, {}), **seeded}


class VolumeTable:
    """The split's volumes, read from the source once, on first use (only when a volume adaptor runs)."""

    def __init__(self, volumes: VolumeSource | torch.Tensor, indices: np.ndarray, batch_size: int):
        self.source, self.indices, self.batch_size = as_volume_source(volumes), np.asarray(indices), batch_size
        self.rows_NCDHW: torch.Tensor | None = None
        self.position: dict[int, int] = {}

    def __getitem__(self, indices: np.ndarray) -> torch.Tensor:
        if self.rows_NCDHW is None:
            wanted = sorted(int(i) for i in self.indices)
            self.rows_NCDHW = torch.cat([x for _, x in self.source.batches(wanted, self.batch_size)])
            self.position = {index: row for row, index in enumerate(wanted)}
        return self.rows_NCDHW[[self.position[int(i)] for i in indices]]


def fit_and_score(name: str, *, seed: int, subset: np.ndarray, test_idx: np.ndarray, labels_N: np.ndarray,
                  emb_ND: np.ndarray, encoder: nn.Module, table: VolumeTable, config: AdaptorsConfig,
                  c_grid: Sequence[float]) -> dict[str, Any]:
    """One fit of adaptor `name` on `subset`, scored on the test split: the per-seed record."""
    began = time.perf_counter()
    y_test = labels_N[test_idx]
    adaptor = create_probe(name, **adaptor_options(name, config, seed=seed, c_grid=c_grid))
    if probe_inputs(name) == "volumes":
        adaptor.fit(encoder, table[subset], labels_N[subset])
        test = table[test_idx]
        scores, predictions = adaptor.scores(test), adaptor.predict(test)
        extra = {"steps": adaptor.steps_taken_, "samples_seen": adaptor.samples_seen_,
                 "num_trainable": adaptor.num_trainable_}
    else:
        adaptor.fit(emb_ND[subset], labels_N[subset])
        scores, predictions, extra = adaptor.scores(emb_ND[test_idx]), adaptor.predict(emb_ND[test_idx]), {}
    return {"seed": seed, "num_train": len(subset), "auroc": compute_auroc(y_true=y_test, y_score=scores),
            "balanced_accuracy": compute_balanced_accuracy(y_true=y_test, y_pred=predictions),
            "seconds": time.perf_counter() - began, **extra}


def not_applicable_reason(name: str, encoder: nn.Module, config: AdaptorsConfig) -> str | None:
    """Why adaptor `name` does not apply to `encoder` (None: it does; embedding probes always do)."""
    if probe_inputs(name) != "volumes":
        return None
    return create_probe(name, **adaptor_options(name, config, seed=0, c_grid=())).not_applicable(encoder)


def budget_summary(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean, std and interval of every score over the seeds of one budget, the fits' seconds, the per-seed records."""
    seconds = [record["seconds"] for record in per_seed]
    return {**{score: t_interval([record[score] for record in per_seed], bounds=(0.0, 1.0)) for score in SCORES},
            "seconds": {"mean": float(np.mean(seconds)), "total": float(np.sum(seconds))},
            "num_train": [record["num_train"] for record in per_seed], "per_seed": per_seed}


def adaptor_results(encoder: nn.Module, emb_ND: np.ndarray, volumes: VolumeSource | torch.Tensor,
                    labels_N: np.ndarray, split: tuple[np.ndarray, np.ndarray], *, config: AdaptorsConfig,
                    c_grid: Sequence[float]) -> dict[str, Any]:
    """The cell's "adaptors" block: every adaptor of `config` x label budget x seed on `split` (train, test).

    Args:
        encoder: the model `emb_ND` came from (volume adaptors train copies of it).
        emb_ND: every subject's clean embedding (the cell's cached ones).
        volumes: the cohort's raw volumes (read only when a volume adaptor applies).
        labels_N: the primary target's binary labels.
        split: the train and test indices (the first replicate's split).
        config: `evaluate.adaptors`.
        c_grid: the logistic probe's C grid.
    """
    train_idx, test_idx = split
    subsets = label_subsets(labels_N, train_idx, budgets=config.budgets, seeds=config.seeds)
    table = VolumeTable(volumes, np.concatenate([train_idx, test_idx]), config.batch_size)
    results = {}
    for name in config.adaptors:
        reason = not_applicable_reason(name, encoder, config)
        if reason:
            results[name] = {"applicable": False, "reason": reason, "inputs": probe_inputs(name)}
            continue
        budgets = {}
        for budget in config.budgets:
            per_seed = [fit_and_score(name, seed=seed, subset=subsets[(seed, budget)], test_idx=test_idx,
                                      labels_N=labels_N, emb_ND=emb_ND, encoder=encoder, table=table, config=config,
                                      c_grid=c_grid) for seed in config.seeds]
            budgets[str(budget)] = budget_summary(per_seed)
        results[name] = {"applicable": True, "inputs": probe_inputs(name), "budgets": budgets}
    return {"adaptors": list(config.adaptors), "budgets": [str(budget) for budget in config.budgets],
            "seeds": list(config.seeds), "num_train_split": len(train_idx), "num_test": len(test_idx),
            "compute_budget": {"steps": config.steps, "batch_size": config.batch_size,
                               "samples_seen": config.steps * config.batch_size, "augmentation": config.augmentation,
                               "threads": config.threads, "options": config.options},
            "interval": INTERVAL, "results": results}

