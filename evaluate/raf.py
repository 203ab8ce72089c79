"""The RAF index: one number per encoder and cohort, with its three components, each in [0, 1].

- performance P = clip(2 (AUROC_clean - 0.5), 0, 1): skill above chance of the primary probe on clean scans;
- robustness R = mean over alterations of sum_s w_s clip((AUROC_{c,s} - 0.5) / (AUROC_clean - 0.5), 0, 1),
  the severity-weighted share of that skill kept under alteration, with ROOD-MRI weights w_s ~ (2/3)^s;
- fairness F = clip(1 - max over attributes of the accuracy gap (max_g - min_g), 0, 1);
- RAF = (P R F)^(1/3), their geometric mean: an encoder must do well on all three to score well.

Components are means over the evaluation's replicates (robustness: over the replicates it was run on).
"""
from __future__ import annotations

import numpy as np

from rafmedia.evaluate.metrics import severity_weights


def performance_component(clean_auroc: float) -> float:
    return float(np.clip(2.0 * (clean_auroc - 0.5), 0.0, 1.0)) if np.isfinite(clean_auroc) else 0.0


def robustness_component(clean_auroc: float, auroc_by_alteration: dict[str, dict[int, float]]) -> float:
    """Severity-weighted retained skill, averaged over alterations; 0 when there is no clean skill to keep."""
    skill = clean_auroc - 0.5
    if not np.isfinite(skill) or skill <= 0 or not auroc_by_alteration:
        return 0.0
    retained = []
    for by_severity in auroc_by_alteration.values():
        severities = sorted(by_severity)
        kept = np.clip((np.array([by_severity[s] for s in severities]) - 0.5) / skill, 0.0, 1.0)
        retained.append(float(np.sum(severity_weights(severities) * np.nan_to_num(kept))))
    return float(np.mean(retained))


def fairness_component(accuracy_gaps: dict[str, float]) -> float:
    gaps = [gap for gap in accuracy_gaps.values() if np.isfinite(gap)]
    return float(np.clip(1.0 - max(gaps), 0.0, 1.0)) if gaps else 0.0


def raf_index(performance: float, robustness: float, fairness: float) -> float:
    return float(np.cbrt(performance * robustness * fairness))
