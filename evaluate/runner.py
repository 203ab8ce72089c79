"""Batch RAF evaluation of one or more encoders on a cohort (`raf evaluate`).

Embeddings are extracted once per model and reused by every probe and test:
clean embeddings of every subject -> probes per replicate (seeded stratified split) -> per-group fairness
-> robustness under alterations x severities (first replicate) -> label-free latent tests -> RAF index.

A replicate is one (model, split seed) pair. A checkpoint is one model scored on every split seed; the
random baseline is a fresh random initialisation per seed, so its numbers average over initialisations too.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from rafmedia.core.errors import UserError
from rafmedia.engine.distributed import Place, gather_objects, init_distributed, place_from_environment
from rafmedia.evaluate import latent, raf, scan_level
from rafmedia.evaluate.cache import CacheKey, EmbeddingCache, cached_embeddings
from rafmedia.evaluate.embed import embed_subjects, embedding_stability, shared_by_rank
from rafmedia.evaluate.encoder_entries import EncoderEntry, build_entries
from rafmedia.evaluate.metrics import (compute_accuracy, compute_auroc, compute_balanced_accuracy, corruption_error,
                                       relative_corruption_error, summarize_groups)
from rafmedia.evaluate.probes import create_probe
from rafmedia.evaluate.results import CellKey, ResultsStore, digest, jsonable
from rafmedia.evaluate.robustness import mean_corruption_error
from rafmedia.evaluate.segmentation import LabelledSet, SegmentationConfig, segmentation_results
from rafmedia.shards.alterations import create_alteration, list_alterations
from rafmedia.shards.store import CohortStore
from rafmedia.shards.volumes import load_volumes

RESULTS_VERSION = 2  # raise when a computation changes, so that results stores never serve cells computed the old way


@dataclass
class EvaluateConfig:
    """What to score and how."""

    cohort: str = ""  # path of a cohort store
    encoders: list[str] = field(default_factory=list)  # exports (.safetensors + .card.json) or SPEC=WEIGHTS
    encoder_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # by spec: factory options
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
    few_shot: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])  # label fractions of the primary target
    ordinal_targets: list[str] = field(default_factory=list)  # graded columns: ordinal probe, QWK and Spearman
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    c_grid: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0])
    bootstrap_resamples: int = 500
    permutations: int = 1000  # label shuffles of each fairness gap's permutation test
    intersections: bool = True  # also score every pair of group_by attributes ("sex x site")
    age_bins: list[float] = field(default_factory=lambda: [0, 40, 60, 200])  # bands of an "age" group_by column
    raf_weights: dict[str, float] = field(default_factory=lambda: {"performance": 1.0, "robustness": 1.0,
                                                                   "fairness": 1.0})
    batch_size: int = 16
    patch_size: int = 0  # > 0: embed each volume as the mean of a grid of patches of this size (large volumes)

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
        unknown = set(self.raf_weights) - set(raf.COMPONENTS)
        if unknown:
            raise UserError(f"evaluate.raf_weights has unknown component(s) {sorted(unknown)}; use "
                            f"{', '.join(raf.COMPONENTS)}")
        self.weights().normalised()
        self.segmentation.validate()
        if any(not 0 < fraction <= 1 for fraction in self.few_shot):
            raise UserError(f"evaluate.few_shot fractions must be in (0, 1], got {self.few_shot}")

    def weights(self) -> raf.RafWeights:
        return raf.RafWeights(**self.raf_weights)

    def settings_digest(self) -> str:
        """Every option that changes a cell's numbers (not which encoders or cohorts, nor batch size)."""
        settings = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("cohort", "encoders", "batch_size")}
        return digest(settings, RESULTS_VERSION)


def binary_labels(rows: list[dict[str, Any]], target: str) -> np.ndarray:
    """0/1 labels for a target column: numbers > 0 are positive; two-valued strings map in sorted order."""
    values = [row[target] for row in rows]
    if all(isinstance(value, (int, float)) for value in values):
        return (np.asarray(values, dtype=float) > 0).astype(int)
    levels = sorted(set(map(str, values)))
    if len(levels) != 2:
        raise UserError(f"target '{target}' must be binary for the linear probe; it has values {levels}")
    return np.array([levels.index(str(value)) for value in values])


def split_indices(labels: np.ndarray, *, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    return train_test_split(indices, test_size=test_fraction, stratify=labels, random_state=seed)


@dataclass
class CohortData:
    """A cohort loaded once for every encoder: manifest rows, raw volumes, labels, the seeded splits, groups."""

    store: CohortStore
    rows: list[dict[str, Any]]
    volumes: torch.Tensor
    labels: dict[str, np.ndarray]
    splits: dict[int, tuple[np.ndarray, np.ndarray]]
    groups: dict[str, np.ndarray]  # grouping name (attributes and their pairs) -> group label per subject
    digest: str
    label_maps: np.ndarray | None = None  # (N, D, H, W) when evaluate.segmentation is on and the cohort has them
    reference: LabelledSet | None = None  # evaluate.segmentation.reference_cohort, loaded
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)


def load_cohort(config: EvaluateConfig, *, progress: bool) -> CohortData:
    from rafmedia.evaluate.fairness import group_labels

    store = CohortStore(config.cohort)
    rows = store.read_manifest()
    targets = list(dict.fromkeys([config.primary_target, *config.targets]))  # ordered: the report is deterministic
    for column in [*targets, *config.group_by, *config.ordinal_targets]:
        if column not in rows[0]:
            raise UserError(f"column '{column}' is not in {store.path / 'manifest.csv'} (columns: {', '.join(rows[0])})")
    volumes = load_volumes(store, [row["subject_id"] for row in rows], normalize=False, progress=progress)
    labels = {target: binary_labels(rows, target) for target in targets}
    splits = {seed: split_indices(labels[config.primary_target], test_fraction=config.test_fraction, seed=seed)
              for seed in config.seeds}
    groups = group_labels(rows, config.group_by, age_bins=config.age_bins, intersections=config.intersections)
    data = CohortData(store, rows, volumes, labels, splits, groups,
                      digest=digest(store.path.name, (store.path / "manifest.csv").read_text(encoding="utf-8")))
    if config.segmentation.enabled:
        data.label_maps = load_label_maps(store, rows, config.segmentation.channel, progress=progress,
                                          required=not config.segmentation.reference_cohort)
        data.spacing = tuple(float(rows[0].get(f"spacing_{axis}", 1.0) or 1.0) for axis in range(3))
        if config.segmentation.reference_cohort:
            reference = CohortStore(config.segmentation.reference_cohort)
            reference_rows = reference.read_manifest()
            data.reference = LabelledSet(
                load_volumes(reference, [row["subject_id"] for row in reference_rows], normalize=False,
                             progress=progress),
                load_label_maps(reference, reference_rows, config.segmentation.channel, progress=progress, required=True))
    return data


def load_label_maps(store: CohortStore, rows: list[dict[str, Any]], channel: str, *, progress: bool,
                    required: bool) -> np.ndarray | None:
    """(N, D, H, W) integer label maps of the store's channel; None when it has none and they are not required."""
    try:
        store.shape(rows[0]["subject_id"], channel)
    except UserError as missing:
        if required:
            raise UserError(f"evaluate.segmentation needs label maps in {store.path}: {missing}; set "
                            "evaluate.segmentation.channel, or evaluate.segmentation.reference_cohort to a labelled "
                            "store") from None
        return None
    return load_volumes(store, [row["subject_id"] for row in rows], channel=channel, normalize=False,
                        progress=progress)[:, 0].numpy().astype(np.int64)


def run_evaluation(config: EvaluateConfig, *, progress: bool = True, results: ResultsStore | None = None,
                   cache: EmbeddingCache | None = None, place: Place | None = None) -> dict[str, Any]:
    """Scores every encoder of `config` on its cohort; returns the report dictionary.

    Each (encoder, cohort, settings) cell already in `results` is read from it instead of computed, and each
    computed cell is written to it as soon as it is complete; `cache` keeps every subject's embeddings, so a cell
    killed half-way re-embeds nothing it had finished. Under torchrun (or srun, mpirun) every rank works on every
    cell and embeds its share of the subjects (subject i on rank i mod world size), gathered by subject index; the
    rest (probes, bootstraps, permutations) is repeated on every rank from the same embeddings, so every rank
    returns the one-process report. Rank 0 reads and writes the results store.
    """
    config.validate()
    place = place or place_from_environment()
    init_distributed(place)
    data = load_cohort(config, progress=progress and place.is_main)
    entries = build_entries(config)
    settings = config.settings_digest()
    scored = {}
    for entry in entries:
        key = CellKey(entry.digest, data.digest, settings)
        cached = gather_objects(results.get(key) if results is not None and place.is_main else None)[0]
        if cached is not None:
            scored[entry.name] = cached.result
            continue
        began = time.perf_counter()
        result = as_json(evaluate_entry(entry, data, config, progress=progress and place.is_main,
                                        embed=Embedder(data, config, cache)))
        if results is not None and place.is_main:
            results.put(key, encoder=entry.name, encoder_source=entry.source, cohort=data.store.path.parent.name,
                        cohort_path=str(data.store.path), seconds=time.perf_counter() - began, result=result)
        scored[entry.name] = result
    add_corruption_errors(scored, baseline=entries[-1].name if config.random_baseline else None)
    return {"cohort": cohort_summary(data.store, data.rows, config), "config": dataclasses.asdict(config),
            "encoders": scored}


@dataclass
class Embedder:
    """Embeddings of one cohort's subjects through the per-subject cache (when there is one): a killed or repeated
    evaluation embeds only the (model, subject, alteration, severity) it has not embedded yet."""

    data: CohortData
    config: EvaluateConfig
    cache: EmbeddingCache | None = None

    def __call__(self, model, model_digest: str, indices: np.ndarray, *, alteration: str = "clean", severity: int = 0,
                 seed: int = 0) -> np.ndarray:
        """Embeddings of subjects `indices` (rows of the cohort), in that order; across ranks, each embeds a share."""
        indices = np.asarray(indices)
        return shared_by_rank(len(indices), lambda rows: self._embed(model, model_digest, indices[rows],
                                                                     alteration=alteration, severity=severity,
                                                                     seed=seed))

    def _embed(self, model, model_digest: str, indices: np.ndarray, *, alteration: str, severity: int,
               seed: int) -> np.ndarray:
        def compute(keys) -> np.ndarray:
            wanted = [position[key.subject] for key in keys]
            altered = None if alteration == "clean" else create_alteration(alteration, severity=severity)
            return embed_subjects(model, self.data.volumes, wanted, batch_size=self.config.batch_size,
                                  alteration=altered, seed=seed, patch_size=self.config.patch_size or None)

        subject_ids = [self.data.rows[i]["subject_id"] for i in indices]
        position = {subject: int(i) for subject, i in zip(subject_ids, indices)}
        if self.cache is None:
            return compute([CacheKey(model_digest, "", subject) for subject in subject_ids])
        keys = [CacheKey(model_digest, self.data.digest, subject, alteration, severity) for subject in subject_ids]
        return cached_embeddings(self.cache, keys, compute)


def model_digests(entry: EncoderEntry) -> dict[int, str]:
    """Cache key of each replicate's model: the entry's digest, per seed when the replicates are different models."""
    shared = len({id(r.model) for r in entry.replicates}) == 1
    return {r.seed: entry.digest if shared else f"{entry.digest}-seed{r.seed}" for r in entry.replicates}


def evaluate_entry(entry: EncoderEntry, data: CohortData, config: EvaluateConfig, *, progress: bool,
                   embed: Embedder | None = None) -> dict[str, Any]:
    """One cell: clean embeddings -> probes per replicate -> fairness -> robustness -> latent tests -> RAF."""
    embed = embed or Embedder(data, config)
    digests = model_digests(entry)
    everyone = np.arange(len(data.rows))
    clean = {id(r.model): embed(r.model, digests[r.seed], everyone) for r in entry.replicates}
    fits = fit_probes(entry, clean, data.labels, data.splits, config)
    first = entry.replicates[0]
    primary = fits[(first.seed, config.primary_target)]
    y = data.labels[config.primary_target]
    robustness, altered_scores = robustness_results(
        primary, lambda name, severity, seed: embed(first.model, digests[first.seed], primary.test_idx, alteration=name,
                                                    severity=severity, seed=seed),
        clean[id(first.model)], y, config, progress=progress, desc=entry.name)
    inputs = [raf.RafInputs(y[fit.test_idx], fit.scores, fit.predictions, altered_scores if seed == first.seed else {},
                            {name: labels[fit.test_idx] for name, labels in data.groups.items() if name in config.group_by})
              for (seed, target), fit in fits.items() if target == config.primary_target]
    emb_by_seed = {r.seed: clean[id(r.model)] for r in entry.replicates}
    probes = probe_results(fits, data.labels, config)
    probes[config.primary_target].update(scan_level.knn_and_few_shot(emb_by_seed, y, data.splits, fractions=config.few_shot,
                                                                     c_grid=config.c_grid))
    for column in config.ordinal_targets:
        probes[column] = scan_level.ordinal_results(emb_by_seed, scan_level.ordinal_values(data.rows, column),
                                                    data.splits, c_grid=config.c_grid)
    result = {
        "source": entry.source,
        "probes": probes,
        "fairness": fairness_results(fits, y, data.groups, config),
        "robustness": robustness,
        "latent": latent.latent_results(clean[id(first.model)], data.rows, config.group_by, seed=first.seed,
                                        ood_split=(primary.train_idx, primary.test_idx)),
        "raf": raf.raf_with_intervals(inputs, config.weights(), num_resamples=config.bootstrap_resamples,
                                      seed=first.seed),
    }
    result["latent"]["projection"] = projection(clean[id(first.model)])
    if config.segmentation.enabled:
        result["segmentation"] = pixel_level(first.model, primary, data, config, seed=first.seed)
    return result


def pixel_level(model, primary: ProbeFit, data: CohortData, config: EvaluateConfig, *, seed: int) -> dict[str, Any]:
    """The segmentation stage: trained on the reference cohort and scored on every subject when there is one, else
    trained and scored on the primary probe's split of the evaluated cohort."""
    if data.reference is not None:
        train, test_idx = data.reference, np.arange(len(data.rows))
        test = LabelledSet(data.volumes, data.label_maps)
    else:
        train = LabelledSet(data.volumes[primary.train_idx], data.label_maps[primary.train_idx])
        test_idx = primary.test_idx
        test = LabelledSet(data.volumes[test_idx], data.label_maps[test_idx])
    return segmentation_results(model, train, test, {name: labels[test_idx] for name, labels in data.groups.items()},
                                config=config.segmentation, spacing=data.spacing, seed=seed,
                                bootstrap_resamples=config.bootstrap_resamples, permutations=config.permutations,
                                min_group_size=config.min_group_size)


def projection(emb_ND: np.ndarray) -> dict[str, list[float]]:
    """2-D PCA of the standardised clean embeddings, one point per subject in manifest order (for the report)."""
    from sklearn.decomposition import PCA

    xy = PCA(n_components=2, random_state=0).fit_transform(latent.standardize(emb_ND))
    return {"x": xy[:, 0].round(5).tolist(), "y": xy[:, 1].round(5).tolist()}


def as_json(value: Any) -> Any:
    """The cell as the results store will return it (plain JSON types), so fresh and stored cells are identical."""
    return json.loads(json.dumps(value, allow_nan=True, default=jsonable))


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


def fairness_results(fits: dict[tuple[int, str], ProbeFit], y: np.ndarray, groups: dict[str, np.ndarray],
                     config: EvaluateConfig) -> dict[str, Any]:
    """Per grouping (each attribute and each pair): per-group AUROC and accuracy of the primary probe, means over
    replicates; on the first replicate, bootstrap CIs, the gaps' permutation p-values, demographic parity and
    equalised odds differences (`rafmedia.evaluate.fairness`)."""
    from rafmedia.evaluate.fairness import classification_fairness

    primary = [fit for (seed, target), fit in fits.items() if target == config.primary_target]
    first = primary[0]
    out: dict[str, dict[str, Any]] = {}
    for grouping, labels in groups.items():
        tests = classification_fairness(y[first.test_idx], first.predictions, first.scores, labels[first.test_idx],
                                        seed=config.seeds[0], num_resamples=config.bootstrap_resamples,
                                        num_permutations=config.permutations, min_group_size=config.min_group_size)
        groups_out = {}
        for group in sorted(set(labels)):
            aurocs, accuracies, sizes = [], [], []
            for fit in primary:
                member = labels[fit.test_idx] == group
                aurocs.append(compute_auroc(fit.scores[member], y[fit.test_idx][member]))
                accuracies.append(compute_accuracy(fit.predictions[member], y[fit.test_idx][member]))
                sizes.append(int(member.sum()))
            replicate0 = {metric: tests[metric]["groups"].get(group, {}) for metric in ("accuracy", "auroc")}
            groups_out[group] = {
                "n_test": float(np.mean(sizes)), "auroc": _nanmean(aurocs), "accuracy": _nanmean(accuracies),
                "auroc_per_replicate": aurocs, "accuracy_per_replicate": accuracies,
                "first_replicate": {"auroc": aurocs[0], "accuracy": accuracies[0],
                                    "ci95": {metric: value.get("ci95", [float("nan")] * 2)
                                             for metric, value in replicate0.items()}},
                "small_group": bool(np.mean(sizes) < config.min_group_size)}
        out[grouping] = {
            "groups": groups_out,
            "auroc": summarize_groups({g: v["auroc"] for g, v in groups_out.items()}),
            "accuracy": summarize_groups({g: v["accuracy"] for g, v in groups_out.items()}),
            "first_replicate": {key: tests[key] for key in (
                "demographic_parity_difference", "demographic_parity_p_value", "equalized_odds_difference",
                "equalized_odds_p_value", "accuracy_gap", "accuracy_gap_p_value", "auroc_gap", "auroc_gap_p_value")
                if key in tests},
        }
    return out


def robustness_results(fit: ProbeFit, embed_altered, clean_emb, y, config, *, progress: bool,
                       desc: str) -> tuple[dict[str, Any], dict[str, dict[int, np.ndarray]]]:
    """Probe metrics and embedding stability under every alteration x severity, on the test split.

    The probe is the one fitted on clean train embeddings: alterations happen at test time only.
    `embed_altered(name, severity, seed)` embeds the test subjects under that alteration.
    """
    from tqdm.auto import tqdm

    test_idx, y_test = fit.test_idx, y[fit.test_idx]
    out = {"clean": {"auroc": compute_auroc(fit.scores, y_test),
                     "balanced_accuracy": compute_balanced_accuracy(fit.predictions, y_test)}}
    altered_scores: dict[str, dict[int, np.ndarray]] = {}
    jobs = [(name, severity) for name in config.alterations for severity in config.severities]
    for name, severity in tqdm(jobs, desc=f"alter+embed {desc}", unit="level", disable=not progress):
        alteration = create_alteration(name, severity=severity)
        altered = embed_altered(name, severity, 1000 * list_alterations().index(name) + severity)
        stability = embedding_stability(clean_emb[test_idx], altered)
        record = out.setdefault(name, {"severity": [], "parameter": [], "auroc": [], "balanced_accuracy": [],
                                       "cosine": [], "drift": []})
        record["severity"].append(severity)
        record["parameter"].append(alteration.parameter)
        scores = fit.probe.scores(altered)
        altered_scores.setdefault(name, {})[severity] = scores
        record["auroc"].append(compute_auroc(scores, y_test))
        record["balanced_accuracy"].append(compute_balanced_accuracy(fit.probe.predict(altered), y_test))
        record["cosine"].append(stability["cosine"])
        record["drift"].append(stability["drift"])
    for name, by_severity in altered_scores.items():
        out[name]["degradation"] = raf.degradation(out["clean"]["auroc"], {
            severity: compute_auroc(scores, y_test) for severity, scores in by_severity.items()})
    return out, altered_scores


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
        records = [record for name, record in robustness.items() if name != "clean"]
        if not records:  # evaluate.alterations=[]: nothing to summarise
            entry["robustness_summary"] = {"mce": None, "relative_mce": None, "mean_degradation": None}
            entry["baseline"] = baseline
            continue
        entry["robustness_summary"] = {  # ImageNet-C mCE / relative mCE: means over alterations
            "mce": mean_corruption_error({i: r["corruption_error"] for i, r in enumerate(records)}),
            "relative_mce": mean_corruption_error({i: r["relative_corruption_error"] for i, r in enumerate(records)}),
            "mean_degradation": float(np.mean([r["degradation"] for r in records])) if records else float("nan")}
        entry["baseline"] = baseline


def cohort_summary(store: CohortStore, rows, config: EvaluateConfig) -> dict[str, Any]:
    from rafmedia.core.files import read_json

    planted = store.path / "planted.json"
    counts = {column: {str(v): sum(str(r[column]) == str(v) for r in rows) for v in sorted({str(r[column]) for r in rows})}
              for column in config.group_by}
    subjects = {column: [str(row[column]) for row in rows] for column in ["subject_id", *config.group_by]}
    return {"path": str(store.path), "num_subjects": len(rows), "counts": counts, "subjects": subjects,
            "datasheet": cohort_datasheet(rows, config.group_by),
            "planted": read_json(planted) if planted.is_file() else None}


def cohort_datasheet(rows: list[dict[str, Any]], attributes: list[str]) -> dict[str, Any]:
    """The cohort's datasheet numbers (subgroups, intersections, rare categories, missing metadata, geometry),
    without the voxel intensity histograms (those are in `raf shards datasheet`)."""
    from rafmedia.shards.datasheet import DatasheetConfig, compute_datasheet

    categorical = [column for column in attributes if not str(rows[0].get(column, "")).replace(".", "").isdigit()]
    return compute_datasheet(rows, config=DatasheetConfig(attributes=categorical or None), title="evaluated cohort",
                             read_sample=None, progress=False)


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")
