"""Batch RAF evaluation of one or more encoders on a cohort (`raf evaluate`).

Embeddings are extracted once per model and reused by every probe and test:
clean embeddings of every subject -> probes per replicate (seeded stratified split) -> per-group fairness
-> robustness under alterations x severities (first replicate) -> label-free latent tests -> RAF index.

A replicate is one (model, split seed) pair. A checkpoint is one model scored on every split seed; the
random baseline is a fresh random initialisation per seed, so its numbers average over initialisations too.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rafmedia.engine.encoders import create_encoder
from rafmedia.engine.errors import UserError
from rafmedia.engine.export import load_encoder
from rafmedia.evaluate import latent, raf
from rafmedia.evaluate.embed import embedding_stability, extract_embeddings
from rafmedia.evaluate.metrics import (bootstrap_ci, compute_accuracy, compute_auroc, compute_balanced_accuracy,
                                       corruption_error, relative_corruption_error, summarize_groups)
from rafmedia.evaluate.probes import create_probe
from rafmedia.shards.alterations import create_alteration, list_alterations
from rafmedia.shards.store import CohortStore
from rafmedia.shards.stream import load_volumes


@dataclass
class EvaluateConfig:
    """What to score and how."""

    cohort: str = ""  # path of a cohort store
    encoders: list[str] = field(default_factory=list)  # exported encoders (.safetensors with a .card.json)
    random_baseline: bool = True  # also score a randomly initialised encoder of the same architecture
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # one replicate (split, random init) per seed
    test_fraction: float = 0.5
    primary_target: str = "disease"  # the scan-level label of the fairness, robustness and RAF analyses
    targets: list[str] = field(default_factory=lambda: ["disease", "sex"])  # binary probe targets
    group_by: list[str] = field(default_factory=lambda: ["sex", "site"])
    min_group_size: int = 10  # smaller groups are reported and flagged, not merged
    alterations: list[str] = field(default_factory=lambda: ["gaussian_noise", "bias_field"])
    severities: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    probe: str = "logistic"
    c_grid: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0])
    bootstrap_resamples: int = 500
    batch_size: int = 16

    def validate(self) -> None:
        if not self.cohort:
            raise UserError("evaluate.cohort is not set: pass --cohort PATH (a store made by `raf synth`)")
        if not self.encoders:
            raise UserError("no encoder to evaluate: pass --encoder PATH.safetensors (one or more)")
        if not 0 < self.test_fraction < 1:
            raise UserError(f"evaluate.test_fraction must be in (0, 1), got {self.test_fraction}")
        for name in self.alterations:
            create_alteration(name)  # unknown names raise with "did you mean"
        if not self.seeds:
            raise UserError("evaluate.seeds is empty: give at least one seed")


@dataclass
class Replicate:
    seed: int
    model: torch.nn.Module


@dataclass
class EncoderEntry:
    name: str
    source: str
    replicates: list[Replicate]


def binary_labels(rows: list[dict[str, Any]], target: str) -> np.ndarray:
    """0/1 labels for a target column: numbers > 0 are positive; two-valued strings map in sorted order."""
    values = [row[target] for row in rows]
    if all(isinstance(value, (int, float)) for value in values):
        return (np.asarray(values, dtype=float) > 0).astype(int)
    levels = sorted(set(map(str, values)))
    if len(levels) != 2:
        raise UserError(f"target '{target}' must be binary for the linear probe; it has values {levels}")
    return np.array([levels.index(str(value)) for value in values])


def build_entries(config: EvaluateConfig) -> list[EncoderEntry]:
    """One entry per exported encoder (named by its card; by card and file when cards share a name), plus the
    random baseline of the first encoder's architecture."""
    if len(set(config.encoders)) != len(config.encoders):
        raise UserError(f"an encoder is given twice: {config.encoders}")
    loaded = [(path, *load_encoder(path)) for path in config.encoders]
    names = [card.get("name", Path(path).stem) for path, _, card in loaded]
    entries = []
    for (path, model, card), name in zip(loaded, names):
        if names.count(name) > 1:
            name = f"{name} ({Path(path).parent.name}/{Path(path).name})"
        entries.append(EncoderEntry(name=name, source=str(path), replicates=[Replicate(seed, model) for seed in config.seeds]))
    if config.random_baseline:
        card = loaded[0][2]
        replicates = []
        for seed in config.seeds:
            torch.manual_seed(seed)
            replicates.append(Replicate(seed, create_encoder(card["architecture"], **card.get("options", {})).eval()))
        entries.append(EncoderEntry(name=f"random-init {card['architecture']}", source="random initialisation",
                                    replicates=replicates))
    return entries


def split_indices(labels: np.ndarray, *, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    return train_test_split(indices, test_size=test_fraction, stratify=labels, random_state=seed)


def run_evaluation(config: EvaluateConfig, *, progress: bool = True) -> dict[str, Any]:
    """Scores every encoder of `config` on its cohort; returns the report dictionary."""
    from tqdm.auto import tqdm

    config.validate()
    store = CohortStore(config.cohort)
    rows = store.read_manifest()
    targets = list(dict.fromkeys([config.primary_target, *config.targets]))  # ordered: the report is deterministic
    for column in [*targets, *config.group_by]:
        if column not in rows[0]:
            raise UserError(f"column '{column}' is not in {store.path / 'manifest.csv'} (columns: {', '.join(rows[0])})")
    volumes = load_volumes(store, [row["subject_id"] for row in rows], normalize=False, progress=progress)
    entries = build_entries(config)
    labels = {target: binary_labels(rows, target) for target in targets}
    splits = {seed: split_indices(labels[config.primary_target], test_fraction=config.test_fraction, seed=seed)
              for seed in config.seeds}

    models = {id(r.model): r.model for entry in entries for r in entry.replicates}
    clean = {key: extract_embeddings(model, volumes, batch_size=config.batch_size)
             for key, model in tqdm(models.items(), desc="embed clean", unit="model", disable=not progress)}

    results = {}
    for entry in entries:
        fits = fit_probes(entry, clean, labels, splits, config)
        first = entry.replicates[0]
        results[entry.name] = {
            "source": entry.source,
            "probes": probe_results(fits, labels, config),
            "fairness": fairness_results(fits, labels[config.primary_target], rows, config),
            "robustness": robustness_results(fits[(first.seed, config.primary_target)], first.model, volumes,
                                             clean[id(first.model)], labels[config.primary_target], config,
                                             progress=progress, desc=entry.name),
            "latent": latent.latent_results(clean[id(first.model)], rows, config.group_by, seed=first.seed),
        }
    add_corruption_errors(results, baseline=entries[-1].name if config.random_baseline else None)
    for entry_results in results.values():
        entry_results["raf"] = raf_summary(entry_results, config.primary_target)
    return {"cohort": cohort_summary(store, rows, config), "config": dataclasses.asdict(config), "encoders": results}


@dataclass
class ProbeFit:
    """A probe fitted on one replicate's clean train split, with its clean test predictions."""

    probe: Any
    test_idx: np.ndarray
    train_idx: np.ndarray
    scores: np.ndarray
    predictions: np.ndarray


def fit_probes(entry: EncoderEntry, clean, labels, splits, config) -> dict[tuple[int, str], ProbeFit]:
    """Fits one probe per (replicate, target); everything downstream reuses these fits."""
    fits = {}
    for replicate in entry.replicates:
        train_idx, test_idx = splits[replicate.seed]
        emb = clean[id(replicate.model)]
        for target, y in labels.items():
            probe = create_probe(config.probe, c_grid=tuple(config.c_grid), seed=replicate.seed)
            probe.fit(emb[train_idx], y[train_idx])
            fits[(replicate.seed, target)] = ProbeFit(probe, test_idx, train_idx, probe.scores(emb[test_idx]),
                                                      probe.predict(emb[test_idx]))
    return fits


def probe_results(fits: dict[tuple[int, str], ProbeFit], labels, config) -> dict[str, Any]:
    """Clean probe AUROC / accuracy per target, per replicate and as mean and std over replicates."""
    out = {}
    for target, y in labels.items():
        per_seed = []
        for (seed, fit_target), fit in fits.items():
            if fit_target != target:
                continue
            y_test = y[fit.test_idx]
            per_seed.append({"seed": seed, "auroc": compute_auroc(fit.scores, y_test),
                             "accuracy": compute_accuracy(fit.predictions, y_test),
                             "balanced_accuracy": compute_balanced_accuracy(fit.predictions, y_test)})
        out[target] = {metric: {"mean": float(np.mean([s[metric] for s in per_seed])),
                                "std": float(np.std([s[metric] for s in per_seed]))}
                       for metric in ("auroc", "accuracy", "balanced_accuracy")}
        out[target]["per_seed"] = per_seed
    return out


def fairness_results(fits: dict[tuple[int, str], ProbeFit], y: np.ndarray, rows, config) -> dict[str, Any]:
    """Per-group AUROC and accuracy of the primary probe on each replicate's test split; gaps and worst groups.

    Group values are means over replicates; bootstrap CIs (resampling subjects) are on the first replicate.
    """
    primary = [fit for (seed, target), fit in fits.items() if target == config.primary_target]
    per_attribute: dict[str, dict[str, Any]] = {}
    for attribute in config.group_by:
        groups = np.array([str(row[attribute]) for row in rows])
        groups_out = {}
        for group in sorted(set(groups)):
            aurocs, accuracies, sizes = [], [], []
            for fit in primary:
                member = groups[fit.test_idx] == group
                aurocs.append(compute_auroc(fit.scores[member], y[fit.test_idx][member]))
                accuracies.append(compute_accuracy(fit.predictions[member], y[fit.test_idx][member]))
                sizes.append(int(member.sum()))
            first = primary[0]
            member = groups[first.test_idx] == group
            groups_out[group] = {
                "n_test": float(np.mean(sizes)), "auroc": _nanmean(aurocs), "accuracy": _nanmean(accuracies),
                "auroc_per_replicate": aurocs, "accuracy_per_replicate": accuracies,
                "first_replicate": {"auroc": aurocs[0], "accuracy": accuracies[0],
                                    "ci95": group_cis(first.scores[member], first.predictions[member],
                                                      y[first.test_idx][member], config, seed=0)},
                "small_group": bool(np.mean(sizes) < config.min_group_size)}
        per_attribute[attribute] = {
            "groups": groups_out,
            "auroc": summarize_groups({g: v["auroc"] for g, v in groups_out.items()}),
            "accuracy": summarize_groups({g: v["accuracy"] for g, v in groups_out.items()}),
        }
    return per_attribute


def group_cis(scores, predictions, labels, config, *, seed: int) -> dict[str, list[float]]:
    """Bootstrap 95% CIs of a group's AUROC and accuracy, resampling the group's test subjects."""
    return {"auroc": list(bootstrap_ci(lambda idx: compute_auroc(scores[idx], labels[idx]), len(labels), seed=seed,
                                       num_resamples=config.bootstrap_resamples)),
            "accuracy": list(bootstrap_ci(lambda idx: compute_accuracy(predictions[idx], labels[idx]), len(labels),
                                          seed=seed, num_resamples=config.bootstrap_resamples))}


def robustness_results(fit: ProbeFit, model, volumes, clean_emb, y, config, *, progress: bool,
                       desc: str) -> dict[str, Any]:
    """Probe metrics and embedding stability under every alteration x severity, on the test split.

    The probe is the one fitted on clean train embeddings: alterations happen at test time only.
    """
    from tqdm.auto import tqdm

    test_idx, y_test = fit.test_idx, y[fit.test_idx]
    out = {"clean": {"auroc": compute_auroc(fit.scores, y_test),
                     "balanced_accuracy": compute_balanced_accuracy(fit.predictions, y_test)}}
    jobs = [(name, severity) for name in config.alterations for severity in config.severities]
    for name, severity in tqdm(jobs, desc=f"alter+embed {desc}", unit="level", disable=not progress):
        alteration = create_alteration(name, severity=severity)
        altered = extract_embeddings(model, volumes[test_idx], batch_size=config.batch_size, alteration=alteration,
                                     seed=1000 * list_alterations().index(name) + severity)
        stability = embedding_stability(clean_emb[test_idx], altered)
        record = out.setdefault(name, {"severity": [], "parameter": [], "auroc": [], "balanced_accuracy": [],
                                       "cosine": [], "drift": []})
        record["severity"].append(severity)
        record["parameter"].append(alteration.parameter)
        record["auroc"].append(compute_auroc(fit.probe.scores(altered), y_test))
        record["balanced_accuracy"].append(compute_balanced_accuracy(fit.probe.predict(altered), y_test))
        record["cosine"].append(stability["cosine"])
        record["drift"].append(stability["drift"])
    return out


def add_corruption_errors(results: dict[str, Any], *, baseline: str | None) -> None:
    """CE and relative CE per alteration against the baseline entry, error = 1 - balanced accuracy (MedMNIST-C)."""
    if baseline is None:
        return
    base = results[baseline]["robustness"]
    for entry in results.values():
        robustness = entry["robustness"]
        for name, record in robustness.items():
            if name == "clean":
                continue
            errors = 1 - np.asarray(record["balanced_accuracy"])
            base_errors = 1 - np.asarray(base[name]["balanced_accuracy"])
            record["corruption_error"] = corruption_error(errors, base_errors)
            record["relative_corruption_error"] = relative_corruption_error(
                errors, 1 - robustness["clean"]["balanced_accuracy"], base_errors, 1 - base["clean"]["balanced_accuracy"])
        entry["baseline"] = baseline


def raf_summary(entry: dict[str, Any], primary_target: str) -> dict[str, float]:
    clean_auroc = entry["probes"][primary_target]["auroc"]["mean"]
    robustness = entry["robustness"]
    by_alteration = {name: dict(zip(record["severity"], record["auroc"]))
                     for name, record in robustness.items() if name != "clean"}
    gaps = {attribute: result["accuracy"]["gap"] for attribute, result in entry["fairness"].items()}
    performance = raf.performance_component(clean_auroc)
    robust = raf.robustness_component(robustness["clean"]["auroc"], by_alteration)
    fairness = raf.fairness_component(gaps)
    return {"index": raf.raf_index(performance, robust, fairness), "performance": performance,
            "robustness": robust, "fairness": fairness}


def cohort_summary(store: CohortStore, rows, config: EvaluateConfig) -> dict[str, Any]:
    from rafmedia.engine.files import read_json

    planted = store.path / "planted.json"
    counts = {column: {str(v): sum(str(r[column]) == str(v) for r in rows) for v in sorted({str(r[column]) for r in rows})}
              for column in config.group_by}
    return {"path": str(store.path), "num_subjects": len(rows), "counts": counts,
            "planted": read_json(planted) if planted.is_file() else None}


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")
