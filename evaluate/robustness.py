"""The robustness stage of an evaluation cell, and the robustness summaries it uses.

`robustness_results` scores the primary probe on altered test scans (every alteration x severity) and the
embeddings' stability; `add_corruption_errors` adds CE / mCE against the random baseline once every encoder of a
cohort is scored. The summaries below are pure functions (numpy in, floats and dicts out).

Definitions (MISSION.md, "Where the numbers come from"):
- corruption error CE_c = sum_s E_{s,c} / sum_s E^base_{s,c} and relative CE (Hendrycks & Dietterich 2019,
  ImageNet-C), mCE = mean of CE_c over alterations c; MedMNIST-C uses E = 1 - balanced accuracy;
- severity-weighted degradation with weights proportional to (2/3)^s (ROOD-MRI, Boone et al. 2023).

Label-free embedding stability under an alteration (cosine similarity and normalised drift of clean vs
altered embeddings) is `rafmedia.evaluate.embed.embedding_stability`; it is not repeated here.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from rafmedia.core.errors import UserError
from rafmedia.evaluate import raf
from rafmedia.evaluate.embed import embedding_stability
from rafmedia.evaluate.metrics import (compute_auroc, compute_balanced_accuracy, corruption_error,
                                       relative_corruption_error, severity_weights)
from rafmedia.evaluate.scan_level import ProbeFit
from rafmedia.shards.alterations import create_alteration


def mean_corruption_error(ce_by_alteration: Mapping[str, float]) -> float:
    """mCE = mean of the corruption errors over alterations (ImageNet-C). Works the same on relative CEs.

    An undefined CE (NaN) makes the mean NaN rather than being dropped; `corruption_summary` lists which.
    """
    if not ce_by_alteration:
        raise UserError("mean_corruption_error needs at least one alteration's corruption error; got none")
    return float(np.mean(np.asarray(list(ce_by_alteration.values()), dtype=np.float64)))


def corruption_summary(errors_by_alteration: Mapping[str, Sequence[float]],
                       baseline_errors_by_alteration: Mapping[str, Sequence[float]], *,
                       clean_error: float | None = None, baseline_clean_error: float | None = None) -> dict:
    """Per-alteration CE (and relative CE when both clean errors are given) against a baseline model, their
    means (mCE, relative mCE) and the alterations whose CE is undefined (baseline error sum 0).

    Args:
        errors_by_alteration: alteration -> the model's error at severities 1..S.
        baseline_errors_by_alteration: alteration -> the baseline's errors at the same severities.
        clean_error: the model's error on unaltered data (for relative CE).
        baseline_clean_error: the baseline's error on unaltered data (for relative CE).
    """
    missing = sorted(set(errors_by_alteration) ^ set(baseline_errors_by_alteration))
    if missing:
        raise UserError(f"corruption errors need the model and the baseline on the same alterations; {missing} "
                        "appear in only one of them")
    for name, errors in errors_by_alteration.items():
        if len(errors) != len(baseline_errors_by_alteration[name]):
            raise UserError(f"alteration '{name}': {len(errors)} model errors but "
                            f"{len(baseline_errors_by_alteration[name])} baseline errors; give one per severity")
    ce = {name: corruption_error(errors, baseline_errors_by_alteration[name])
          for name, errors in errors_by_alteration.items()}
    out = {"ce": ce, "mce": mean_corruption_error(ce), "undefined": sorted(n for n, v in ce.items() if np.isnan(v))}
    if clean_error is not None and baseline_clean_error is not None:
        relative = {name: relative_corruption_error(errors, clean_error, baseline_errors_by_alteration[name],
                                                    baseline_clean_error)
                    for name, errors in errors_by_alteration.items()}
        out.update(relative_ce=relative, relative_mce=mean_corruption_error(relative),
                   relative_undefined=sorted(n for n, v in relative.items() if np.isnan(v)))
    return out


def severity_weighted_degradation(clean_metric: float, metric_by_severity: Sequence[float],
                                  severities: Sequence[int], *, floor: float = 0.0) -> dict[str, float]:
    """ROOD-MRI severity-weighted degradation of a higher-is-better metric (pass 1 - error for errors).

    With w_s = (2/3)^s / sum_t (2/3)^t (`metrics.severity_weights`) and drop_s = max(0, clean - metric_s):

    - `absolute` = sum_s w_s drop_s, in the metric's units;
    - `degradation` = absolute / clean (the ROOD-MRI form; NaN when clean <= 0);
    - `normalised` = clip(absolute / (clean - floor), 0, 1): the share of above-floor skill lost, where
      `floor` is the metric's no-skill value (0 by default, 0.5 for AUROC); NaN when clean <= floor.
      With floor 0 and a non-negative metric it equals `degradation`.

    A gain at a severity counts as no drop, so gains never offset losses at other severities.
    """
    metric_S, severities_S = np.asarray(metric_by_severity, dtype=np.float64), np.asarray(severities)
    if metric_S.shape != severities_S.shape or metric_S.ndim != 1 or len(metric_S) == 0:
        raise UserError(f"severity_weighted_degradation needs one metric value per severity; got "
                        f"{metric_S.shape} values for severities {severities_S.tolist()}")
    absolute = float(np.sum(severity_weights(severities_S) * np.maximum(0.0, clean_metric - metric_S)))
    return {"absolute": absolute,
            "degradation": absolute / clean_metric if clean_metric > 0 else float("nan"),
            "normalised": float(np.clip(absolute / (clean_metric - floor), 0.0, 1.0))
            if clean_metric > floor else float("nan")}


def robustness_results(fit: ProbeFit, embed_altered: Callable[[str, int], np.ndarray], clean_emb_ND: np.ndarray,
                       y: np.ndarray, *, alterations: Sequence[str], severities: Sequence[int], progress: bool,
                       desc: str) -> tuple[dict[str, Any], dict[str, dict[int, np.ndarray]]]:
    """Probe metrics and embedding stability under every alteration x severity, on the fit's test split.

    The probe is the one fitted on clean train embeddings: alterations happen at test time only.
    `embed_altered(name, severity)` embeds the test subjects under that alteration (drawn from its own seed,
    `alteration_seed`). Returns the cell's "robustness" section and the altered scores (alteration -> severity ->
    scores) the RAF index needs.
    """
    test_idx, y_test = fit.test_idx, y[fit.test_idx]
    out = {"clean": {"auroc": compute_auroc(y_true=y_test, y_score=fit.scores),
                     "balanced_accuracy": compute_balanced_accuracy(y_true=y_test, y_pred=fit.predictions)}}
    altered_scores: dict[str, dict[int, np.ndarray]] = {}
    jobs = [(name, severity) for name in alterations for severity in severities]
    for name, severity in tqdm(jobs, desc=f"alter+embed {desc}", unit="level", disable=not progress):
        altered = embed_altered(name, severity)
        stability = embedding_stability(clean_emb_ND[test_idx], altered)
        record = out.setdefault(name, {"severity": [], "parameter": [], "auroc": [], "balanced_accuracy": [],
                                       "cosine": [], "drift": []})
        record["severity"].append(severity)
        record["parameter"].append(create_alteration(name, severity=severity).parameter)
        scores = fit.probe.scores(altered)
        altered_scores.setdefault(name, {})[severity] = scores
        record["auroc"].append(compute_auroc(y_true=y_test, y_score=scores))
        record["balanced_accuracy"].append(compute_balanced_accuracy(y_true=y_test, y_pred=fit.probe.predict(altered)))
        record["cosine"].append(stability["cosine"])
        record["drift"].append(stability["drift"])
    for name, by_severity in altered_scores.items():
        out[name]["degradation"] = raf.degradation(out["clean"]["auroc"], {
            severity: compute_auroc(y_true=y_test, y_score=scores) for severity, scores in by_severity.items()})
    return out, altered_scores


def add_corruption_errors(results: dict[str, Any], *, baseline: str | None) -> None:
    """CE and relative CE per alteration against the baseline entry, error = 1 - balanced accuracy (MedMNIST-C),
    their means (mCE, relative mCE) in each entry's "robustness_summary". A sweep-level step: it needs every entry of
    the cohort, so it is not part of a stored cell."""
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
