"""The one-page Markdown summary of a report (`report.md`), written next to `report.html` by `render_report`."""
from __future__ import annotations

from typing import Any

import numpy as np

from rafmedia.core.render import format_value, markdown_table
from rafmedia.evaluate.figures import lookup
from rafmedia.evaluate.raf import RAF_FORMULA
from rafmedia.evaluate.report_format import (adaptor_cells, adaptor_rows, fairness_metrics, latent_columns, mean_std,
                                             number, other_probes, ser_text, share, with_interval)


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


def _gap_cell(result: dict[str, Any], metric: str) -> str:
    """"mean gap, replicate 0's gap (p its permutation p-value)" of one metric of one grouping."""
    tests = result.get("first_replicate") or {}
    return (f"{format_value(lookup(result, metric, 'gap'))}, {format_value(tests.get(f'{metric}_gap'))} "
            f"(p {format_value(tests.get(f'{metric}_gap_p_value'))})")


def _md_fairness(report: dict[str, Any]) -> list[str]:
    results = [(n, a, r) for n, e in report["encoders"].items() for a, r in e["fairness"].items()]
    metrics = list(dict.fromkeys(m for _, _, r in results for m in fairness_metrics(r)))
    return [(f"## Fairness of the {report['config']['primary_target']} probe (gap between groups: mean over replicates, "
            "replicate 0 with its permutation p)"), "",
            *markdown_table(["encoder", "grouping", *[f"{m} gap" for m in metrics], "worst group (accuracy)"],
                            [[n, a, *[_gap_cell(r, m) for m in metrics], lookup(r, "accuracy", "worst_group")]
                             for n, a, r in results])]


def _md_probes(encoders: dict[str, Any], primary: str) -> list[str]:
    first = next(iter(encoders.values()))
    targets = [t for t, p in first["probes"].items() if "auroc" in p]  # ordinal targets have kappa instead
    others = list(dict.fromkeys(o for e in encoders.values() for o in other_probes(e["probes"].get(primary) or {})))
    return ["## Clean probes (AUROC, mean ± std over replicates)", "",
            *markdown_table(["encoder", *targets, *[f"{o} ({primary})" for o in others]],
                            [[n, *[mean_std(lookup(e, "probes", t, "auroc")) for t in targets],
                              *[mean_std(lookup(e, "probes", primary, o, "auroc")) for o in others]]
                             for n, e in encoders.items()])]


def _md_adaptors(encoders: dict[str, Any]) -> list[str]:
    budgets, rows = adaptor_rows(encoders)
    if not rows:
        return []
    return ["## Adaptors (AUROC by label budget, 95% interval over seeds)", "",
            *markdown_table(["encoder", "adaptor", *[f"{share(b)} of labels" for b in budgets]],
                            [[n, a, *adaptor_cells(r, budgets, ("auroc",))] for n, a, r in rows])]


def _md_latent(encoders: dict[str, Any], attributes: list[str]) -> list[str]:
    columns = {(n, a): latent_columns(e["latent"], a) for n, e in encoders.items() for a in attributes}
    titles = list(dict.fromkeys(title for shown in columns.values() for title in shown))
    return ["## Latent tests", "", *markdown_table(["encoder", "attribute", *titles],
                                                   [[n, a, *map(shown.get, titles)] for (n, a), shown in columns.items()])]


def render_markdown(report: dict[str, Any]) -> str:
    """A one-page summary: RAF with intervals and its formula, clean probes, every group metric's gaps, robustness
    degradation, the latent tests, and the segmentation headline when present."""
    encoders = report["encoders"]
    first = next(iter(encoders.values()))
    attributes = list(report["config"]["group_by"])
    alterations = [a for a in first["robustness"] if a != "clean"]
    summaries = any("robustness_summary" in e for e in encoders.values())
    lines = ["# rafmedia RAF report", "",
             (f"Cohort: `{report['cohort']['path']}` ({format_value(report['cohort'].get('num_subjects'))} subjects). "
             f"Primary target: **{report['config']['primary_target']}**. Every number: report.json; figures: report.html."),
             "", "## RAF index (95% bootstrap interval)", "",
             *markdown_table(["encoder", "RAF", "performance", "robustness", "fairness"],
                        [[n, *[with_interval(e["raf"], k) for k in ("index", "performance", "robustness", "fairness")]]
                         for n, e in encoders.items()]),
             RAF_FORMULA, "", *_md_probes(encoders, report["config"]["primary_target"]), *_md_adaptors(encoders),
             *_md_fairness(report),
             "## Robustness (severity-weighted degradation; 0 = no skill lost)", "",
             *markdown_table(["encoder", *alterations, *(["mCE", "relative mCE"] if summaries else [])],
                        [[n, *[lookup(e, "robustness", a, "degradation") for a in alterations],
                          *([lookup(e, "robustness_summary", k) for k in ("mce", "relative_mce")] if summaries else [])]
                         for n, e in encoders.items()]),
             *_md_latent(encoders, attributes), *_md_segmentation(encoders)]
    return "\n".join(lines)
