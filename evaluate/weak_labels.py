"""The weak-label study of one encoder on a small multimodal cohort with one ordinal grade per patient
(`evaluate.weak_labels`, docs/weak-labels.md).

Stages, all at patient level and all seeded:

1. Patch embeddings: every channel of every patient cut into a regular grid of patches (MONAI's
   `SlidingWindowSplitter`), each patch z-scored with its volume and embedded by the frozen encoder; "early" fusion
   embeds the stacked channels with the encoder's first convolution inflated (`mil.inflate_input_channels`).
2. Repeated stratified cross-validation: for each seed an outer stratified K-fold over patients; on each outer
   training set a nested stratified CV picks the MIL probe's weight decay by quadratic weighted kappa (QWK); the
   refitted probe predicts the outer test patients. Every patient gets one out-of-fold prediction per seed.
3. The same folds score the one-embedding-per-scan baseline: each channel's patch embeddings averaged into one scan
   embedding (as `extract_patch_embeddings(pooling="mean")`), channels fused late, and the ordinal logistic probe
   (its C chosen by its own inner CV).
4. Metrics: QWK over the full grade scale, Spearman of the expected grade, MAE in grades and balanced accuracy, each
   averaged over seeds, with a 95% percentile interval from a patient bootstrap (the same resampled patients for every
   seed); differences between two methods are bootstrapped paired.
5. Ablations (for encoders other than the random baseline): ordinal heads with and without label smoothing, fusions,
   rater-noise levels (training grades re-drawn from the planted grade with `rate_grades`, scored against the planted
   grade), and an easy-to-hard curriculum; each with the weight decay the main nested CV chose most often.
6. Localisation (seed `seeds[0]`, cross-fitted: maps of each outer test patient come from its fold's probe): MIL
   attention, instance occlusion and a kNN patch anomaly score against the low-grade patients of the training fold,
   mapped to voxels (`rafmedia.evaluate.localisation`) and scored against the planted lesion masks, which nothing
   above reads.
"""
from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.inferers import SlidingWindowSplitter
from sklearn.model_selection import StratifiedKFold
from tqdm.auto import tqdm

from rafmedia.core.errors import UserError
from rafmedia.evaluate.config import EvaluateConfig, WeakLabelsConfig
from rafmedia.evaluate.encoder_entries import RANDOM_SOURCE, EncoderEntry
from rafmedia.evaluate.localisation import localisation_scores, overlay_slices
from rafmedia.evaluate.metrics import bootstrap_ci, bootstrap_cis, compute_balanced_accuracy
from rafmedia.evaluate.mil import bag_names, inflate_input_channels, late_fusion_bags
from rafmedia.evaluate.probes import create_probe, quadratic_weighted_kappa, spearman
from rafmedia.evaluate.results import digest
from rafmedia.shards.store import CohortStore
from rafmedia.shards.synth_brain import brain_masks, lesion_masks, rate_grades
from rafmedia.shards.volumes import normalize_intensity

METRICS = ("qwk", "spearman", "mae", "balanced_accuracy")
POOLED = "pooled"
MIL = "attention_mil"


# ---- the cohort -------------------------------------------------------------------------------------
@dataclass
class WeakCohort:
    """A weak-label cohort described once for every encoder: rows, channels and who has them, grades."""

    store: CohortStore
    subject_ids: list[str]
    channels: list[str]
    present: dict[str, np.ndarray]  # channel -> (N,) bool: the patient has that channel
    grades: np.ndarray  # (N,) the rated grade 0..K-1: what the probes train on
    truth: np.ndarray | None  # (N,) the planted grade, when the cohort has one
    num_grades: int
    digest: str
    has_masks: bool  # the store holds label maps with planted lesions (synthetic): localisation can be scored

    def volume(self, index: int, channel: str) -> np.ndarray | None:
        return self.store.read(self.subject_ids[index], channel) if self.present[channel][index] else None


def _grade_column(rows: list[dict[str, Any]], column: str, path) -> np.ndarray:
    values = [row.get(column) for row in rows]
    if any(value is None or value == "" or float(value) != int(float(value)) or float(value) < 0 for value in values):
        raise UserError(f"column '{column}' of {path} must hold a whole grade >= 0 for every subject; set "
                        "evaluate.weak_labels.target to the ordinal grade column")
    return np.array([int(float(value)) for value in values])


def load_weak_cohort(config: EvaluateConfig) -> WeakCohort:
    """The cohort of `config.cohort` for the weak-label study; reads the manifest and subject attributes only."""
    weak = config.weak_labels
    store = CohortStore(config.cohort)
    rows = store.read_manifest()
    manifest = store.path / "manifest.csv"
    if weak.target not in rows[0]:
        raise UserError(f"column '{weak.target}' is not in {manifest} (columns: {', '.join(rows[0])}); set "
                        "evaluate.weak_labels.target to the ordinal grade column")
    subject_ids = [row["subject_id"] for row in rows]
    attrs = [store.subject_attrs(subject) for subject in subject_ids]
    stored = list(dict.fromkeys(channel for a in attrs for channel in a.get("channels", [])))
    channels = list(weak.channels) or stored
    for channel in channels:
        if channel not in stored:
            raise UserError(f"evaluate.weak_labels.channels names '{channel}', which no subject of {store.path} has "
                            f"(channels: {', '.join(stored)})")
    present = {channel: np.array([channel in a.get("channels", []) for a in attrs]) for channel in channels}
    if not np.all(np.any(np.stack(list(present.values())), axis=0)):
        raise UserError(f"some subjects of {store.path} have none of the channels {channels}")
    grades = _grade_column(rows, weak.target, manifest)
    truth = _grade_column(rows, weak.truth_target, manifest) if weak.truth_target and weak.truth_target in rows[0] \
        else None
    num_grades = int(max(grades.max(), truth.max() if truth is not None else 0)) + 1
    has_masks = all(a.get("has_label") for a in attrs) and truth is not None
    return WeakCohort(store, subject_ids, channels, present, grades, truth, num_grades,
                      digest(store.path.name, manifest.read_text(encoding="utf-8")), has_masks)


# ---- patch embeddings ---------------------------------------------------------------------------------
@dataclass
class PatchGrid:
    """The instance grid: patch side, start voxel of every patch (P, 3), volume shape."""

    patch_size: int
    locations: np.ndarray
    shape: tuple[int, int, int]

    @property
    def stride(self) -> int:
        steps = np.unique(self.locations[:, 0])
        return int(np.diff(steps).min()) if len(steps) > 1 else self.patch_size


@torch.no_grad()
def grid_embeddings(encoder: torch.nn.Module, volume_CDHW: np.ndarray, splitter: SlidingWindowSplitter, *,
                    batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """(P, D) embeddings of the grid patches of one z-scored volume, and the patches' start voxels (P, 3)."""
    pieces = list(splitter(torch.from_numpy(np.ascontiguousarray(volume_CDHW, dtype=np.float32))[None]))
    patches = torch.cat([patch for patch, _ in pieces])
    rows = [encoder(patches[start:start + batch_size]).double() for start in range(0, len(patches), batch_size)]
    return torch.cat(rows).numpy(), np.array([location for _, location in pieces])


def _zscored(volume: np.ndarray) -> np.ndarray:
    return normalize_intensity(torch.from_numpy(np.asarray(volume, dtype=np.float32))[None, None])[0, 0].numpy()


def embed_cohort(encoder: torch.nn.Module, cohort: WeakCohort, weak: WeakLabelsConfig, *, early: bool,
                 progress: bool) -> tuple[dict[str, np.ndarray], PatchGrid]:
    """Patch embeddings (N, P, D) of every channel ("late" inputs), plus those of the stacked channels under
    "early" when `early`. A missing channel gives zeros (late: replaced in `late_fusion_bags`; early: a zero volume,
    its mean after the z-score)."""
    encoder.eval()
    splitter = SlidingWindowSplitter(patch_size=(weak.patch_size,) * 3, overlap=weak.overlap, pad_mode="constant",
                                     pad_value=0.0)
    stacked = inflate_input_channels(encoder, len(cohort.channels)).eval() if early else None
    out: dict[str, list[np.ndarray]] = {name: [] for name in [*cohort.channels, *(["early"] if early else [])]}
    locations, shape = None, None
    for index in tqdm(range(len(cohort.subject_ids)), desc="patch embeddings", unit="patient", disable=not progress,
                      leave=False):
        volumes = {channel: cohort.volume(index, channel) for channel in cohort.channels}
        shape = shape or next(v.shape for v in volumes.values() if v is not None)
        zscored = {channel: (_zscored(v) if v is not None else np.zeros(shape, np.float32)) for channel, v in
                   volumes.items()}
        for channel in cohort.channels:
            if volumes[channel] is None:
                out[channel].append(None)
                continue
            emb, locations = grid_embeddings(encoder, zscored[channel][None], splitter)
            out[channel].append(emb)
        if stacked is not None:
            out["early"].append(grid_embeddings(stacked, np.stack(list(zscored.values())), splitter)[0])
    dims = {name: next(e for e in embs if e is not None).shape for name, embs in out.items()}
    result = {name: np.stack([e if e is not None else np.zeros(dims[name]) for e in embs]) for name, embs in out.items()}
    return result, PatchGrid(weak.patch_size, np.asarray(locations), tuple(shape))


def bags_by_name(patches: dict[str, np.ndarray], cohort: WeakCohort, names: list[str]
                 ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each bag kind (`mil.bag_names`) as (bags (M, P, F), patient indices (M,)): "late" fuses the channels,
    "early" is the stacked-channel embedding, "channel:<c>" holds the patients that have channel c."""
    everyone = np.arange(len(cohort.subject_ids))
    channel_patches = {channel: patches[channel] for channel in cohort.channels}
    bags = {}
    for name in names:
        if name == "late":
            bags[name] = (late_fusion_bags(channel_patches, cohort.present), everyone)
        elif name == "early":
            bags[name] = (patches["early"], everyone)
        else:
            channel = name.split(":", 1)[1]
            have = np.flatnonzero(cohort.present[channel])
            bags[name] = (patches[channel][have], have)
    return bags


def pooled_features(patches: dict[str, np.ndarray], cohort: WeakCohort) -> np.ndarray:
    """The one-embedding-per-scan baseline's features: each channel's patch embeddings averaged, fused late."""
    pooled = {channel: patches[channel].mean(axis=1, keepdims=True) for channel in cohort.channels}
    return late_fusion_bags(pooled, cohort.present)[:, 0]


# ---- cross-validation ---------------------------------------------------------------------------------
@dataclass
class FoldOutput:
    predictions: np.ndarray  # grade per test patient
    scores: np.ndarray  # expected grade per test patient
    probe: Any = None


Predictor = Callable[[np.ndarray, np.ndarray, int], FoldOutput]  # (train positions, test positions, seed)


def stratified_folds(labels_N: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Seeded stratified K-fold of patient positions (K lowered to the rarest grade's count, at least 2)."""
    counts = np.bincount(labels_N)
    k = max(2, min(folds, int(counts[counts > 0].min())))
    with warnings.catch_warnings():  # a grade held by one patient cannot be in every fold; sklearn says so each time
        warnings.filterwarnings("ignore", message="The least populated class")
        return list(StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(labels_N)), labels_N))


@dataclass
class CrossValidated:
    """Out-of-fold predictions (S, N) and expected grades (S, N), one row per seed; the fold outputs of each seed."""

    predictions: np.ndarray
    scores: np.ndarray
    folds: dict[int, list[tuple[np.ndarray, FoldOutput]]]


def cross_validate(predict: Predictor, stratify_N: np.ndarray, *, folds: int, seeds: list[int],
                   bar: tqdm | None = None) -> CrossValidated:
    """Repeated stratified K-fold at patient level: `predict` each test fold from its training fold, per seed."""
    predictions = np.zeros((len(seeds), len(stratify_N)), dtype=np.int64)
    scores = np.zeros((len(seeds), len(stratify_N)))
    kept: dict[int, list] = {}
    for row, seed in enumerate(seeds):
        kept[seed] = []
        for train, test in stratified_folds(stratify_N, folds, seed):
            output = predict(train, test, seed)
            predictions[row, test], scores[row, test] = output.predictions, output.scores
            kept[seed].append((test, output))
            if bar is not None:
                bar.update()
    return CrossValidated(predictions, scores, kept)


def ordinal_values(y_N: np.ndarray, predictions_N: np.ndarray, scores_N: np.ndarray, num_grades: int
                   ) -> dict[str, float]:
    """QWK (over the full scale 0..K-1), Spearman of the expected grade, MAE in grades, balanced accuracy."""
    return {"qwk": quadratic_weighted_kappa(y_N, predictions_N, labels=np.arange(num_grades)),
            "spearman": spearman(y_N, scores_N),
            "mae": float(np.mean(np.abs(y_N - predictions_N))),
            "balanced_accuracy": compute_balanced_accuracy(y_true=y_N, y_pred=predictions_N)}


def _seed_mean(y_N: np.ndarray, run: CrossValidated, num_grades: int, index: np.ndarray) -> dict[str, float]:
    values = [ordinal_values(y_N[index], p[index], s[index], num_grades) for p, s in zip(run.predictions, run.scores)]
    return {metric: float(np.nanmean([v[metric] for v in values])) for metric in METRICS}


def scored(y_N: np.ndarray, run: CrossValidated, num_grades: int, *, resamples: int, seed: int) -> dict[str, Any]:
    """Every metric's mean over seeds with a patient-bootstrap 95% interval (`metrics.bootstrap_cis`: the four metrics
    on the same resampled patients), and the per-seed values."""
    intervals = bootstrap_cis(lambda idx: _seed_mean(y_N, run, num_grades, idx), len(y_N), seed=seed,
                              num_resamples=resamples)
    result: dict[str, Any] = {"per_seed": [ordinal_values(y_N, p, s, num_grades)
                                           for p, s in zip(run.predictions, run.scores)]}
    for metric, value in _seed_mean(y_N, run, num_grades, np.arange(len(y_N))).items():
        low, high = intervals[metric]
        result[metric] = {"mean": value, "low": low, "high": high}
    return result


def paired_difference(y_N: np.ndarray, a: CrossValidated, b: CrossValidated, num_grades: int, *, metric: str,
                      resamples: int, seed: int) -> dict[str, float]:
    """metric(a) - metric(b) on the same patients, with a paired patient-bootstrap 95% interval."""
    def difference(idx):
        return _seed_mean(y_N, a, num_grades, idx)[metric] - _seed_mean(y_N, b, num_grades, idx)[metric]

    low, high = bootstrap_ci(difference, len(y_N), seed=seed, num_resamples=resamples)
    return {"mean": difference(np.arange(len(y_N))), "low": low, "high": high}


# ---- predictors ---------------------------------------------------------------------------------------
def pooled_predictor(features_ND: np.ndarray, labels_N: np.ndarray, c_grid: list[float]) -> Predictor:
    """The ordinal logistic probe (Frank & Hall) on one embedding per patient; C by its own inner CV."""
    def predict(train, test, seed):
        probe = create_probe("ordinal", c_grid=tuple(c_grid), seed=seed).fit(features_ND[train], labels_N[train])
        return FoldOutput(probe.predict(features_ND[test]), probe.scores(features_ND[test]), probe)
    return predict


def difficulty(features_ND: np.ndarray, labels_N: np.ndarray, *, folds: int, seed: int, c_grid: list[float]
               ) -> np.ndarray:
    """Per-patient difficulty for the curriculum: |expected grade - grade| of the pooled ordinal probe, out of fold
    within the given (training) patients."""
    probe = create_probe("ordinal", c_grid=tuple(c_grid), seed=seed)
    scores = np.zeros(len(labels_N))
    for train, test in stratified_folds(labels_N, folds, seed):
        scores[test] = probe.fit(features_ND[train], labels_N[train]).scores(features_ND[test])
    return np.abs(scores - labels_N)


def mil_predictor(bags_NPF: np.ndarray, labels_N: np.ndarray, weak: WeakLabelsConfig, num_grades: int, *,
                  head: str, smoothing: float = 0.0, weight_decay: float | None = None,
                  curriculum_features: np.ndarray | None = None, c_grid: list[float] = (1.0,),
                  chosen: list[float] | None = None, bar: tqdm | None = None) -> Predictor:
    """The attention-MIL probe on each training fold; weight decay by nested stratified CV (QWK) unless given
    (`chosen` collects the picks). With `curriculum_features`, bags are ordered easy to hard by `difficulty`."""
    def fit(train, decay, seed):
        order = None if curriculum_features is None else difficulty(curriculum_features[train], labels_N[train],
                                                                    folds=weak.inner_folds, seed=seed, c_grid=c_grid)
        probe = create_probe(MIL, num_classes=num_grades, head=head, epochs=weak.epochs, weight_decay=decay,
                             label_smoothing=smoothing, curriculum=order is not None, seed=seed)
        return probe.fit(bags_NPF[train], labels_N[train], difficulty_N=order)

    def select(train, seed) -> float:
        if weight_decay is not None or len(weak.weight_decay_grid) == 1:
            return weak.weight_decay_grid[0] if weight_decay is None else weight_decay
        inner = stratified_folds(labels_N[train], weak.inner_folds, seed)
        kappas = []
        for decay in weak.weight_decay_grid:
            predicted = np.zeros(len(train), dtype=np.int64)
            for inner_train, inner_test in inner:
                predicted[inner_test] = fit(train[inner_train], decay, seed).predict(bags_NPF[train[inner_test]])
            kappas.append(quadratic_weighted_kappa(labels_N[train], predicted, labels=np.arange(num_grades)))
        return weak.weight_decay_grid[int(np.nanargmax(kappas))]

    def predict(train, test, seed):
        decay = select(train, seed)
        if chosen is not None:
            chosen.append(decay)
        probe = fit(train, decay, seed)
        if bar is not None:
            bar.set_postfix_str(f"{head}, wd {decay:g}")
        return FoldOutput(probe.predict(bags_NPF[test]), probe.scores(bags_NPF[test]), probe)

    return predict


# ---- the study ----------------------------------------------------------------------------------------
def weak_label_results(entry: EncoderEntry, cohort: WeakCohort, config: EvaluateConfig, *, progress: bool
                       ) -> dict[str, Any]:
    """One encoder's weak-label cell (module docstring): the main comparison with intervals, the ablations, the
    localisation scores and the overlays' slices."""
    weak = config.weak_labels
    model = entry.replicates[0].model
    ablations = entry.source != RANDOM_SOURCE
    names = bag_names(weak.fusions if ablations else [weak.fusion], cohort.channels)
    names = list(dict.fromkeys([*bag_names([weak.fusion], cohort.channels), *names]))
    patches, grid = embed_cohort(model, cohort, weak, early="early" in names, progress=progress)
    bags = bags_by_name(patches, cohort, names)
    pooled = pooled_features(patches, cohort)
    y, k = cohort.grades, cohort.num_grades
    resamples, seed0 = weak.bootstrap_resamples, weak.seeds[0]
    main_name = bag_names([weak.fusion], cohort.channels)[0]
    main_bags = bags[main_name][0]
    runs_per_cv = len(weak.seeds) * weak.folds
    total = runs_per_cv * (2 + (len(weak.heads) * 2 + len(names) - 1 + 2 * len(weak.noise_levels) + 2 * weak.curriculum
                                if ablations else 0))
    bar = tqdm(total=total, desc=f"weak labels {entry.name}", unit="fit", disable=not progress, leave=False)

    def cv(predict, labels=y):
        return cross_validate(predict, labels, folds=weak.folds, seeds=weak.seeds, bar=bar)

    def score(run, reference=y):
        return scored(reference, run, k, resamples=resamples, seed=seed0)

    chosen: list[float] = []
    mil_run = cv(mil_predictor(main_bags, y, weak, k, head=weak.head, chosen=chosen, c_grid=config.c_grid, bar=bar))
    pooled_run = cv(pooled_predictor(pooled, y, config.c_grid))
    decay = Counter(chosen).most_common(1)[0][0]
    result: dict[str, Any] = {
        "target": weak.target, "num_grades": k, "num_patients": len(y),
        "grade_counts": {str(g): int((y == g).sum()) for g in range(k)},
        "channels": cohort.channels, "missing": {c: int((~p).sum()) for c, p in cohort.present.items()},
        "patch_size": weak.patch_size, "stride": grid.stride, "num_instances": len(grid.locations),
        "main": {"fusion": weak.fusion, "head": weak.head, "weight_decay_chosen": dict(Counter(map(str, chosen)))},
        "probes": {MIL: score(mil_run), POOLED: score(pooled_run)},
        "mil_minus_pooled": {metric: paired_difference(y, mil_run, pooled_run, k, metric=metric, resamples=resamples,
                                                       seed=seed0) for metric in ("qwk", "mae")},
    }
    if cohort.truth is not None:
        result["vs_truth"] = {MIL: score(mil_run, cohort.truth), POOLED: score(pooled_run, cohort.truth)}
    if ablations:
        result["ablations"] = ablation_results(bags, pooled, cohort, weak, config, main_name=main_name, decay=decay,
                                               main=mil_run, cv=cv, score=score, bar=bar)
    bar.close()
    if cohort.has_masks:
        result["localisation"], result["overlays"] = localisation_results(mil_run, main_bags, cohort, grid, weak)
    return result


def ablation_results(bags, pooled: np.ndarray, cohort: WeakCohort, weak: WeakLabelsConfig, config: EvaluateConfig,
                     *, main_name: str, decay: float, main: CrossValidated, cv, score, bar: tqdm | None = None
                     ) -> dict[str, Any]:
    """Heads (with and without smoothing), fusions, the rater-noise curve and the curriculum, at weight decay `decay`;
    `main` is the main run, on the bags `main_name`."""
    y, k = cohort.grades, cohort.num_grades
    main_bags = bags[main_name][0]
    heads = {}
    for head in weak.heads:
        for smoothing in (0.0, weak.label_smoothing):
            name = head if smoothing == 0 else f"{head} + smoothing {smoothing:g}"
            run = main if (head, smoothing) == (weak.head, 0.0) else cv(
                mil_predictor(main_bags, y, weak, k, head=head, smoothing=smoothing, weight_decay=decay))
            heads[name] = score(run)
    fusions = {}
    for name, (bag_NPF, members) in bags.items():
        run = main if name == main_name else cv(
            mil_predictor(bag_NPF, y[members], weak, k, head=weak.head, weight_decay=decay), y[members])
        fusions[name] = {**scored(y[members], run, k, resamples=weak.bootstrap_resamples, seed=weak.seeds[0]),
                         "num_patients": len(members)}
    noise = []
    if cohort.truth is not None:
        for level in weak.noise_levels:
            mil, base, flips = noisy_runs(main_bags, pooled, cohort.truth, level, weak, config, k, decay=decay,
                                          bar=bar)
            noise.append({"level": level, "flip_rate": flips, MIL: score(mil, cohort.truth),
                          POOLED: score(base, cohort.truth)})
    result = {"weight_decay": decay, "heads": heads, "fusions": fusions, "noise_curve": noise}
    if weak.curriculum:
        run = cv(mil_predictor(main_bags, y, weak, k, head=weak.head, weight_decay=decay, curriculum_features=pooled,
                               c_grid=config.c_grid))
        # the main run chose its weight decay per fold; the comparison needs both arms at the same one
        plain = main if len(weak.weight_decay_grid) == 1 else cv(mil_predictor(main_bags, y, weak, k, head=weak.head,
                                                                                weight_decay=decay))
        result["curriculum"] = {"with": score(run), "without": score(plain), "difference": {
            metric: paired_difference(y, run, plain, k, metric=metric, resamples=weak.bootstrap_resamples,
                                      seed=weak.seeds[0]) for metric in ("qwk", "mae")}}
    return result


def noisy_runs(bags_NPF: np.ndarray, pooled_ND: np.ndarray, truth_N: np.ndarray, level: float,
               weak: WeakLabelsConfig, config: EvaluateConfig, num_grades: int, *, decay: float, bar: tqdm | None
               ) -> tuple[CrossValidated, CrossValidated, float]:
    """MIL and pooled runs trained on grades re-drawn from the planted ones by the rater model at `level`, a fresh
    draw for each seed (so the curve averages over raters too, not one unlucky draw); returns the runs and the
    realised share of moved grades over the seeds."""
    mil, base, flips = [], [], []
    for seed in weak.seeds:
        noisy = rate_grades(truth_N, level, num_grades, np.random.default_rng([seed, round(level * 1000)]))
        flips.append(float(np.mean(noisy != truth_N)))
        mil.append(cross_validate(mil_predictor(bags_NPF, noisy, weak, num_grades, head=weak.head,
                                                weight_decay=decay), noisy, folds=weak.folds, seeds=[seed], bar=bar))
        base.append(cross_validate(pooled_predictor(pooled_ND, noisy, config.c_grid), noisy, folds=weak.folds,
                                   seeds=[seed], bar=bar))
    return stacked(mil), stacked(base), float(np.mean(flips))


def stacked(runs: list[CrossValidated]) -> CrossValidated:
    """One run of several single-seed runs (rows in order)."""
    return CrossValidated(np.concatenate([r.predictions for r in runs]), np.concatenate([r.scores for r in runs]),
                          {seed: folds for r in runs for seed, folds in r.folds.items()})


def localisation_results(run: CrossValidated, bags_NPF: np.ndarray, cohort: WeakCohort, grid: PatchGrid,
                         weak: WeakLabelsConfig) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Attention, occlusion and kNN-anomaly patch maps of every patient (first seed, cross-fitted), scored against
    the planted lesions; plus the overlay slices of a few patients per planted grade."""
    n = len(cohort.subject_ids)
    maps = {name: np.zeros((n, len(grid.locations))) for name in ("attention", "occlusion", "anomaly")}
    seed = weak.seeds[0]
    for test, output in run.folds[seed]:
        train = np.setdiff1d(np.arange(n), test)
        reference = train[cohort.grades[train] == 0]
        if len(reference) == 0:
            raise UserError(f"the weak-label cohort has no grade-0 patient in a training fold; the anomaly and "
                            f"occlusion maps need some (grade counts: {np.bincount(cohort.grades).tolist()})")
        maps["attention"][test] = output.probe.attention(bags_NPF[test])
        maps["occlusion"][test] = output.probe.occlusion(bags_NPF[test], bags_NPF[reference].mean(axis=0))
        maps["anomaly"][test] = knn_anomaly(bags_NPF[test], bags_NPF[reference], k=weak.knn_k)
    lesions = lesion_masks(cohort.store, cohort.subject_ids)
    brains = brain_masks(cohort.store, cohort.subject_ids)
    tolerance = weak.pointing_tolerance if weak.pointing_tolerance >= 0 else grid.stride / 2
    truth = cohort.truth if cohort.truth is not None else cohort.grades
    scores = localisation_scores(maps, lesions, brains, grid.locations, grid.patch_size, tolerance=tolerance,
                                 resamples=weak.bootstrap_resamples, seed=seed, grades=truth)
    chosen = [int(i) for g in range(cohort.num_grades) for i in np.flatnonzero(truth == g)[:weak.overlays_per_grade]]
    overlays = [overlay_slices({c: cohort.volume(i, c) for c in cohort.channels}, {name: m[i] for name, m in
                               maps.items()}, lesions[i], grid.locations, grid.patch_size,
                               subject=cohort.subject_ids[i], grade=int(cohort.grades[i]), truth=int(truth[i]))
                for i in chosen]
    return scores, overlays


def knn_anomaly(test_MPF: np.ndarray, reference_RPF: np.ndarray, *, k: int) -> np.ndarray:
    """(M, P) patch anomaly: the mean Euclidean distance of each test patch to its k nearest reference patches at the
    same grid position (the volumes are co-registered), features standardised over the reference patches."""
    mean = reference_RPF.reshape(-1, reference_RPF.shape[-1]).mean(axis=0)
    std = reference_RPF.reshape(-1, reference_RPF.shape[-1]).std(axis=0) + 1e-6
    test, reference = (test_MPF - mean) / std, (reference_RPF - mean) / std
    k = min(k, len(reference))
    out = np.zeros(test.shape[:2])
    for m, bag_PF in enumerate(test):
        distance_RP = np.sqrt(((reference - bag_PF[None]) ** 2).sum(axis=-1))
        out[m] = np.sort(distance_RP, axis=0)[:k].mean(axis=0)
    return out


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """The leaderboard's numbers of a weak-label cell."""
    probes = result["probes"]
    row = {"MIL QWK": probes[MIL]["qwk"]["mean"], "pooled QWK": probes[POOLED]["qwk"]["mean"]}
    for name, scores in (result.get("localisation") or {}).items():
        if isinstance(scores, dict):
            row[f"{name} pointing"] = scores["pointing"]["rate"]
    return row
