"""Report values, shared by the HTML report (`report.py`) and the Markdown summary (`report_md.py`): what a section
lists (read from report.json, older layouts included) and how a value is written.

The lists come from report.json itself (the metrics, probes and latent tests the evaluation registered and ran),
never from the registries, so a report renders the same wherever it is opened. report.json stores undefined values
as null: every formatter writes them as "n/a" (`core.render.format_value`).
"""
from __future__ import annotations

from typing import Any

from rafmedia.core.render import format_interval, format_value
from rafmedia.evaluate.latent import farthest_group_columns

LEGACY_FAIRNESS_METRICS = ("accuracy", "auroc")  # what report.json held before its groupings listed their metrics
LEGACY_KNN_OOD = {"title": "k-NN out-of-distribution scores (test vs training scans)",
                  "note": "Mean distance to the k nearest training embeddings over the training scans' own (left-out) "
                          "mean: about 1 in distribution. AUROC test vs training about 0.5 in distribution."}


# ---- what a section lists -------------------------------------------------------------------------------------
def other_probes(probes: dict[str, Any]) -> list[str]:
    """The probes scored beside the primary one on a target (kNN in report.json files that do not list them)."""
    return list(probes.get("other_probes") or (["knn"] if isinstance(probes.get("knn"), dict) else []))


def fairness_metrics(grouping: dict[str, Any]) -> list[str]:
    """The group metrics of one grouping's fairness results, in the order the evaluation listed them."""
    return list(grouping.get("metrics") or [m for m in LEGACY_FAIRNESS_METRICS if m in grouping])


def latent_columns(latent: dict[str, Any], attribute: str) -> dict[str, Any]:
    """The latent tests' report columns for one attribute ("summary"; rebuilt for older report.json files)."""
    if isinstance(latent.get("summary"), dict):
        return dict(latent["summary"].get(attribute) or {})
    values = latent.get(attribute) or {}
    frechet = values.get("frechet") or {"mean_to_others": {}, "farthest": None}
    return {"leakage AUROC": values.get("leakage_auroc"), "silhouette": values.get("silhouette"),
            **farthest_group_columns(frechet), "RankMe": latent.get("rankme")}


def latent_tables(latent: dict[str, Any]) -> dict[str, dict[str, str]]:
    """The cohort-wide latent tests shown as tables of their own: test name -> {"title", "note"}."""
    if isinstance(latent.get("tables"), dict):
        return dict(latent["tables"])
    return {"knn_ood": LEGACY_KNN_OOD} if isinstance(latent.get("knn_ood"), dict) else {}


def adaptor_rows(encoders: dict[str, Any]) -> tuple[list[str], list[tuple[str, str, dict[str, Any]]]]:
    """The adaptor protocol's label budgets (in the evaluation's order) and (encoder, adaptor, result) of every
    encoder with an "adaptors" block."""
    blocks = {name: entry["adaptors"] for name, entry in encoders.items() if isinstance(entry.get("adaptors"), dict)}
    budgets = list(dict.fromkeys(budget for block in blocks.values() for budget in block.get("budgets") or []))
    rows = [(name, adaptor, result) for name, block in blocks.items()
            for adaptor, result in (block.get("results") or {}).items()]
    return budgets, rows


def adaptor_cells(result: dict[str, Any], budgets: list[str], metrics: tuple[str, ...]) -> list[str]:
    """"mean [low, high]" of each metric at each budget; "not applicable: reason" once for an adaptor that is not."""
    if not result.get("applicable", True):
        return [f"not applicable: {result.get('reason')}", *[""] * (len(budgets) * len(metrics) - 1)]
    cells = []
    for budget in budgets:
        at = (result.get("budgets") or {}).get(budget) or {}
        for metric in metrics:
            value = at.get(metric) if isinstance(at.get(metric), dict) else {}
            interval = f" {format_interval(value.get('ci95'))}" if "ci95" in value else ""
            cells.append(f"{format_value(value.get('mean'))}{interval}")
    return cells


# ---- values as text ---------------------------------------------------------------------------------------------


def with_interval(values: dict[str, Any], key: str) -> str:
    """"value [low, high]" of `values[key]` and its interval `values[key + "_ci95"]`."""
    return f"{format_value(values.get(key))} {format_interval(values.get(f'{key}_ci95'))}"


def mean_std(value: Any) -> str:
    """"mean ± std" from a {"mean", "std"} summary; a bare number as itself."""
    if isinstance(value, dict):
        return f"{format_value(value.get('mean'))} ± {format_value(value.get('std'))}"
    return format_value(value)


def number(value: Any) -> Any:
    """A bare number, or the mean of a {"mean", ...} summary."""
    return value.get("mean") if isinstance(value, dict) else value


def p_value_text(value: Any) -> str:
    return f"p {format_value(value)}"


def share(value: Any) -> str:
    """A fraction ("0.1", 0.05) as a percentage; anything else as text."""
    try:
        return f"{float(value):.1%}".replace(".0%", "%")
    except (TypeError, ValueError):
        return format_value(value)


def ser_text(ser: dict[str, Any]) -> str:
    # JSON has no infinity: a perfect group's infinite SER arrives as null with the `infinite` flag
    return "infinite" if ser.get("infinite") else format_value(ser.get("value"))
