"""Robustness summaries over per-severity metric arrays (pure functions: numpy in, floats and dicts out).

Definitions (MISSION.md, "Where the numbers come from"):
- corruption error CE_c = sum_s E_{s,c} / sum_s E^base_{s,c} and relative CE (Hendrycks & Dietterich 2019,
  ImageNet-C), mCE = mean of CE_c over alterations c; MedMNIST-C uses E = 1 - balanced accuracy;
- severity-weighted degradation with weights proportional to (2/3)^s (ROOD-MRI, Boone et al. 2023).

Label-free embedding stability under an alteration (cosine similarity and normalised drift of clean vs
altered embeddings) is `rafmedia.evaluate.embed.embedding_stability`; it is not repeated here.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from rafmedia.core.errors import UserError
from rafmedia.evaluate.metrics import corruption_error, relative_corruption_error, severity_weights


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
