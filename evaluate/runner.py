"""Batch RAF evaluation of one or more encoders on a cohort (`raf evaluate`): the runner orchestrates the stages,
each stage assembles its own part of a cell.

One cell (encoder x cohort x settings): clean embeddings of every subject (once per model) -> scan-level probes per
replicate (`scan_level`) -> robustness under alterations x severities on the first replicate (`robustness`) ->
fairness per subgroup (`fairness`) -> label-free latent tests (`latent`) -> adaptors when asked
(`adaptors`: every adaptor x label budget x seed on the cached embeddings or the volumes) -> pixel level when asked
(`segmentation`) -> RAF index (`raf`). Every stage takes the embeddings and probe fits it needs and returns its
section of the cell's JSON plus the leaderboard's headline numbers, so a new registered metric, probe, latent test
or alteration reaches the results store, the report and the leaderboard without an edit here.

With `evaluate.weak_labels.enabled` a cell is instead the weak-label study of a small multimodal cohort with one
ordinal grade per patient (`weak_labels`): attention-MIL and pooled probes under nested cross-validation, ablations,
localisation scores; every rank computes it whole (it is small), rank 0 stores it.

A replicate is one (model, split seed) pair. A checkpoint is one model scored on every split seed; the random
baseline is a fresh random initialisation per seed, so its numbers average over initialisations too.
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import sklearn

from rafmedia.core.files import read_json
from rafmedia.core.profiling import StageClock
from rafmedia.engine.distributed import Place, gather_objects, init_distributed, place_from_environment
from rafmedia.evaluate import adaptors, fairness, latent, raf, scan_level, weak_labels
from rafmedia.evaluate.cache import EmbeddingCache
from rafmedia.evaluate.cohort_data import CohortData, cohort_summary, load_cohort
from rafmedia.evaluate.config import EvaluateConfig
from rafmedia.evaluate.embed import Embedder
from rafmedia.evaluate.encoder_entries import EncoderEntry, build_entries
from rafmedia.evaluate.registration import (load_paired_cohort, registration_baselines, registration_study,
                                            split_subjects)
from rafmedia.evaluate.results import CellKey, ResultsStore, digest, jsonable
from rafmedia.evaluate.robustness import add_corruption_errors, robustness_results
from rafmedia.evaluate.segmentation import pixel_level_results
from rafmedia.evaluate.weak_labels import load_weak_cohort
from rafmedia.shards.store import CohortStore

SKLEARN_WORKING_MEMORY_MB = 32  # scikit-learn's default, 1024, held 3,200 x 3,200 distances (82 MB) at once


def run_evaluation(config: EvaluateConfig, *, progress: bool = True, results: ResultsStore | None = None,
                   cache: EmbeddingCache | None = None, place: Place | None = None,
                   entries: list[EncoderEntry] | None = None, clock: StageClock | None = None) -> dict[str, Any]:
    """Scores every encoder of `config` on its cohort; returns the report dictionary.

    Each (encoder, cohort, settings) cell already in `results` is read from it instead of computed, and each
    computed cell is written to it as soon as it is complete; `cache` keeps every subject's embeddings, so a cell
    killed half-way re-embeds nothing it had finished. Under torchrun (or srun, mpirun) every rank works on every
    cell and embeds its share of the subjects (subject i on rank i mod world size), gathered by subject index; the
    rest (probes, bootstraps, permutations) is repeated on every rank from the same embeddings, so every rank
    returns the one-process report. Rank 0 reads and writes the results store. `entries`, when given, are scored
    instead of the entries `config.encoders` would build (the portal's sandboxed encoders).

    Volumes are streamed from the store in batches (`config.num_workers` DataLoader workers read the next batches
    while the encoder embeds this one), for every pass: memory holds a few batches, not the cohort.

    `clock`, when given, accumulates the evaluator's stages (`rafmedia.core.profiling.StageClock`): "read" (the
    time this process waits for the next batch of volumes, with the volumes, voxels and bytes read: the reads run
    in the workers, so this is the read time the forward passes do not hide; with `num_workers=0` it is the whole
    read), "alter", "embed" (z-score and encoder forward), "probe" (probe fits and scan-level scores), "bootstrap"
    (fairness intervals and permutation tests, RAF intervals), "latent", "adaptors" (the adaptor protocol, its
    fits and reads) and "segmentation" (the whole pixel-level stage, its reads included) when they are on. Stages
    do not nest: their seconds add up to at most the run's.

    scikit-learn's pairwise computations (kNN probes, silhouette, the kNN out-of-distribution score) work in chunks
    of at most `SKLEARN_WORKING_MEMORY_MB`, so no N x N matrix is ever held whole.
    """
    with sklearn.config_context(working_memory=SKLEARN_WORKING_MEMORY_MB):
        return evaluate_cells(config, progress=progress, results=results, cache=cache, place=place, entries=entries,
                              clock=clock)


def evaluate_cells(config: EvaluateConfig, *, progress: bool, results: ResultsStore | None,
                   cache: EmbeddingCache | None, place: Place | None, entries: list[EncoderEntry] | None,
                   clock: StageClock | None) -> dict[str, Any]:
    """`run_evaluation`'s body: every cell of `config`, read from `results` or computed."""
    config.validate()
    place = place or place_from_environment()
    init_distributed(place)
    if config.weak_labels.enabled:
        return weak_label_cells(config, progress=progress and place.is_main, results=results, place=place,
                                entries=entries)
    if config.registration.enabled:
        return registration_cells(config, results=results, place=place, entries=entries)
    data = load_cohort(config, progress=progress and place.is_main)
    entries = entries or build_entries(config.encoders, options=config.encoder_options, seeds=config.seeds,
                                       random_baseline=config.random_baseline, cohort=config.cohort)
    clock = clock if clock is not None else StageClock()
    embed = Embedder(data.volumes, [row["subject_id"] for row in data.rows], data.digest,
                     batch_size=config.batch_size, patch_size=config.patch_size, cache=cache, clock=clock,
                     progress=progress and place.is_main)
    scored = cells_through_store(
        entries, lambda entry: evaluate_entry(entry, data, config, embed=embed, progress=progress and place.is_main,
                                              clock=clock),
        cohort_digest=data.digest, cohort_path=data.store.path, settings=config.settings_digest(), results=results,
        place=place)
    add_corruption_errors(scored, baseline=entries[-1].name if config.random_baseline else None)
    return {"cohort": cohort_summary(data.store, data.rows, config), "config": dataclasses.asdict(config),
            "encoders": scored}


def cells_through_store(entries: list[EncoderEntry], compute: Callable[[EncoderEntry], dict[str, Any]], *,
                        cohort_digest: str, cohort_path: Path, settings: str, results: ResultsStore | None,
                        place: Place) -> dict[str, Any]:
    """Each entry's cell read from `results`, or computed (`compute(entry)`) and written there as soon as it is done;
    rank 0 reads and writes the store and shares what it read."""
    scored = {}
    for entry in entries:
        key = CellKey(entry.digest, cohort_digest, settings)
        cached = gather_objects(results.get(key) if results is not None and place.is_main else None)[0]
        if cached is not None:
            scored[entry.name] = cached.result
            continue
        began = time.perf_counter()
        result = as_json(compute(entry))
        if results is not None and place.is_main:
            results.put(key, encoder=entry.name, encoder_source=entry.source, cohort=cohort_path.parent.name,
                        cohort_path=str(cohort_path), seconds=time.perf_counter() - began, result=result)
        scored[entry.name] = result
    return scored


def weak_label_cells(config: EvaluateConfig, *, progress: bool, results: ResultsStore | None, place: Place,
                     entries: list[EncoderEntry] | None) -> dict[str, Any]:
    """`evaluate_cells` when `evaluate.weak_labels.enabled`: one weak-label study per encoder, through the store."""
    cohort = load_weak_cohort(config)
    entries = entries or build_entries(config.encoders, options=config.encoder_options, seeds=config.seeds[:1],
                                       random_baseline=config.random_baseline, cohort=config.cohort, channel=None)
    def study(entry: EncoderEntry) -> dict[str, Any]:
        result = weak_labels.weak_label_results(entry, cohort, config, progress=progress)
        return {"source": entry.source, "weak_labels": result, "headline": weak_labels.headline(result),
                **entry_card_notes(entry)}

    scored = cells_through_store(entries, study, cohort_digest=cohort.digest, cohort_path=cohort.store.path,
                                 settings=config.settings_digest(), results=results, place=place)
    planted = cohort.store.path / "planted.json"
    summary = {"path": str(cohort.store.path), "num_subjects": len(cohort.subject_ids), "kind": "weak_labels",
               "planted": read_json(planted) if planted.is_file() else None}
    return {"kind": "weak_labels", "cohort": summary, "config": dataclasses.asdict(config), "encoders": scored}


def registration_cells(config: EvaluateConfig, *, results: ResultsStore | None, place: Place,
                       entries: list[EncoderEntry] | None) -> dict[str, Any]:
    """`evaluate_cells` when `evaluate.registration.enabled`: one registration study per encoder on the breathing
    pairs of the cohort (docs/paired.md), through the results store, plus the identity and raw-intensity baselines."""
    store = CohortStore(config.cohort)
    ids = store.subject_ids()
    cohort = load_paired_cohort(store, ids, config.registration)
    train_idx, test_idx = split_subjects(len(ids), seed=config.seeds[0], test_fraction=config.test_fraction)
    entries = entries or build_entries(config.encoders, options=config.encoder_options, seeds=config.seeds[:1],
                                       random_baseline=config.random_baseline, cohort=config.cohort,
                                       channel=config.registration.moving_channel)
    options = {"seed": config.seeds[0], "bootstrap_resamples": config.bootstrap_resamples}

    def study(entry: EncoderEntry) -> dict[str, Any]:
        result = registration_study(entry, cohort, config.registration, train_idx=train_idx, test_idx=test_idx,
                                    **options)
        return {**result, **entry_card_notes(entry)}

    scored = cells_through_store(entries, study, cohort_digest=digest(str(store.path), ids), cohort_path=store.path,
                                 settings=config.settings_digest(), results=results, place=place)
    summary = {"path": str(store.path), "num_subjects": len(ids), "kind": "registration",
               "num_train": len(train_idx), "num_test": len(test_idx),
               "baselines": registration_baselines(cohort, train_idx, test_idx, config.registration, **options)}
    return {"kind": "registration", "cohort": summary, "config": dataclasses.asdict(config), "encoders": scored}


def entry_card_notes(entry: EncoderEntry) -> dict[str, Any]:
    """How the cohort was prepared for the entry's encoder (its card) and the weights' licence, for the report."""
    return {"preparation": entry.info.get("preparation"), "licence": entry.info.get("licence")}


def model_digests(entry: EncoderEntry) -> dict[int, str]:
    """Cache key of each replicate's model: the entry's digest, per seed when the replicates are different models."""
    shared = len({id(r.model) for r in entry.replicates}) == 1
    return {r.seed: entry.digest if shared else f"{entry.digest}-seed{r.seed}" for r in entry.replicates}


def clean_embeddings(entry: EncoderEntry, embed: Embedder, num_subjects: int) -> dict[int, np.ndarray]:
    """Every subject's clean embedding per replicate seed; a model shared by replicates is embedded once."""
    digests, by_model = model_digests(entry), {}
    for replicate in entry.replicates:
        if id(replicate.model) not in by_model:
            by_model[id(replicate.model)] = embed(replicate.model, digests[replicate.seed], np.arange(num_subjects))
    return {replicate.seed: by_model[id(replicate.model)] for replicate in entry.replicates}


def evaluate_entry(entry: EncoderEntry, data: CohortData, config: EvaluateConfig, *, embed: Embedder,
                   progress: bool, clock: StageClock | None = None) -> dict[str, Any]:
    """One cell: the stages of the module docstring, in order (timed into `clock`, see `run_evaluation`)."""
    clock = clock if clock is not None else StageClock()
    emb_by_seed = clean_embeddings(entry, embed, len(data.rows))
    first, digest = entry.replicates[0], model_digests(entry)[entry.replicates[0].seed]
    with clock.stage("probe"):
        fits = scan_level.fit_probes(emb_by_seed, data.labels, data.splits, probe=config.probe, c_grid=config.c_grid)
        primary_fits = [fits[(replicate.seed, config.primary_target)] for replicate in entry.replicates]
        primary, y = primary_fits[0], data.labels[config.primary_target]
        probes = scan_level.scan_level_results(fits, emb_by_seed, data.labels, data.splits, rows=data.rows,
                                               primary_target=config.primary_target, probe=config.probe,
                                               few_shot=config.few_shot, ordinal_targets=config.ordinal_targets,
                                               c_grid=config.c_grid)
    robustness, altered_scores = robustness_results(
        primary, lambda name, severity: embed(first.model, digest, primary.test_idx, alteration=name,
                                              severity=severity),
        emb_by_seed[first.seed], y, alterations=config.alterations, severities=config.severities, progress=progress,
        desc=entry.name)
    with clock.stage("bootstrap"):
        fairness_result = fairness.fairness_results(primary_fits, y, data.groups, seed=config.seeds[0],
                                                    num_resamples=config.bootstrap_resamples,
                                                    num_permutations=config.permutations,
                                                    min_group_size=config.min_group_size)
    with clock.stage("latent"):
        latent_result = latent.latent_results(emb_by_seed[first.seed], data.rows, config.group_by, seed=first.seed,
                                              split=(primary.train_idx, primary.test_idx))
    with clock.stage("bootstrap"):
        raf_result = raf.raf_with_intervals(raf_inputs(primary_fits, y, data, config, altered_scores),
                                            config.weights(), num_resamples=config.bootstrap_resamples,
                                            seed=first.seed, with_draws=True)
    result = {"source": entry.source, "probes": probes, "fairness": fairness_result, "robustness": robustness,
              "latent": latent_result, "raf": raf_result, **entry_card_notes(entry)}
    result["raf_draws"] = result["raf"].pop("draws")  # per-draw values: rank intervals across encoders
    if config.adaptors.enabled:
        with clock.stage("adaptors"):
            result["adaptors"] = adaptors.adaptor_results(first.model, emb_by_seed[first.seed], data.volumes, y,
                                                          data.splits[first.seed], config=config.adaptors,
                                                          c_grid=config.c_grid)
    if config.segmentation.enabled:
        with clock.stage("segmentation"):
            result["segmentation"] = pixel_level_results(first.model, primary, data, config, seed=first.seed)
    result["headline"] = {
        **scan_level.headline(probes, primary_target=config.primary_target, probe=config.probe),
        **fairness.headline(fairness_result, config.group_by), **latent.headline(latent_result)}
    return result


def raf_inputs(primary_fits: list[scan_level.ProbeFit], y: np.ndarray, data: CohortData, config: EvaluateConfig,
               altered_scores: dict[str, dict[int, np.ndarray]]) -> list[raf.RafInputs]:
    """The RAF index's inputs of every replicate; robustness is measured on the first one only."""
    return [raf.RafInputs(y[fit.test_idx], fit.scores, fit.predictions, altered_scores if index == 0 else {},
                          {name: labels[fit.test_idx] for name, labels in data.groups.items() if name in config.group_by})
            for index, fit in enumerate(primary_fits)]


def as_json(value: Any) -> Any:
    """The cell as the results store will return it (plain JSON types), so fresh and stored cells are identical."""
    return json.loads(json.dumps(value, allow_nan=True, default=jsonable))
