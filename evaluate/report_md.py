"""The one-page Markdown summary of a report (`report.md`), written next to `report.html` by `render_report`."""
from __future__ import annotations

from typing import Any

import numpy as np

from rafmedia.core.render import format_value, markdown_table
from rafmedia.evaluate.figures import lookup
from rafmedia.evaluate.raf import RAF_FORMULA
from rafmedia.evaluate.report_format import mean_std, number, ser_text, with_interval


def _md_segmentation(encoders: dict[str, Any]) -> list[str]:
    rows = []
    for name, entry in encoders.items():
        segmentation = entry.get("segmentation")
        if not isinstance(segmentation, dict):
            continue
        dice = _finite_mean([number(s.get("dice")) for s in (segmentation.get("per_structure") or {}).values()
                                if isinstance(s, dict)])
        for attribute, result in (segmentation.get("fairness") or {}).items() or [("-", {})]:
            rows.append([name, dice, lookup(segmentation, "plausibility", "topology_share"),
                         lookup(segmentation, "rca", "pearson"), attribute, lookup(result, "dice", "gap"), lookup(result, "dice", "p_value_gap"),
                         lookup(result, "dice", "worst_group"), ser_text(result.get("skewed_error_rate") or {})])
    if not rows:
        return []
    return ["## Segmentation", "", *markdown_table(["encoder", "mean Dice over structures", "plausible share", "RCA r",
                                               "attribute", "Dice gap", "p", "worst group", "SER"], rows)]


def _finite_mean(values: list[Any]) -> float | None:
    finite = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def render_markdown(report: dict[str, Any]) -> str:
    """A one-page summary: RAF with intervals and its formula, clean probes, worst groups and gaps, robustness
    degradation, latent leakage and silhouette, and the segmentation headline when present."""
    encoders = report["encoders"]
    first = next(iter(encoders.values()))
    targets = [t for t, p in first["probes"].items() if "auroc" in p]  # ordinal targets have kappa instead
    attributes = list(report["config"]["group_by"])
    alterations = [a for a in first["robustness"] if a != "clean"]
    summaries = any("robustness_summary" in e for e in encoders.values())
    lines = ["# rafmedia RAF report", "",
             f"Cohort: `{report['cohort']['path']}` ({format_value(report['cohort'].get('num_subjects'))} subjects). "
             f"Primary target: **{report['config']['primary_target']}**. Every number: report.json; figures: report.html.",
             "", "## RAF index (95% bootstrap interval)", "",
             *markdown_table(["encoder", "RAF", "performance", "robustness", "fairness"],
                        [[n, *[with_interval(e["raf"], k) for k in ("index", "performance", "robustness", "fairness")]]
                         for n, e in encoders.items()]),
             RAF_FORMULA, "", "## Clean probes (AUROC, mean ± std over replicates)", "",
             *markdown_table(["encoder", *targets], [[n, *[mean_std(lookup(e, "probes", t, "auroc")) for t in targets]]
                                               for n, e in encoders.items()]),
             f"## Fairness of the {report['config']['primary_target']} probe (accuracy)", "",
             *markdown_table(["encoder", "grouping", "gap (mean)", "worst group", "replicate 0 gap", "p"],
                        [[n, a, lookup(r, "accuracy", "gap"), lookup(r, "accuracy", "worst_group"),
                          *[lookup(r, "first_replicate", key) for key in ("accuracy_gap", "accuracy_gap_p_value")]]
                         for n, e in encoders.items() for a, r in e["fairness"].items()]),
             "## Robustness (severity-weighted degradation; 0 = no skill lost)", "",
             *markdown_table(["encoder", *alterations, *(["mCE", "relative mCE"] if summaries else [])],
                        [[n, *[lookup(e, "robustness", a, "degradation") for a in alterations],
                          *([lookup(e, "robustness_summary", k) for k in ("mce", "relative_mce")] if summaries else [])]
                         for n, e in encoders.items()]),
             "## Latent tests", "",
             *markdown_table(["encoder", "attribute", "leakage AUROC", "silhouette"],
                        [[n, a, lookup(e, "latent", a, "leakage_auroc"), lookup(e, "latent", a, "silhouette")]
                         for n, e in encoders.items() for a in attributes]),
             *_md_segmentation(encoders)]
    return "\n".join(lines)
