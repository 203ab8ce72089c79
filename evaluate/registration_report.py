"""The report of a registration study (`evaluate.registration.enabled`, docs/paired.md): one table of registration
scores (target registration error, Dice of the warped label maps) and segmentation Dice per encoder, beside the
identity and raw-intensity baselines, as HTML and Markdown. Every number, per subject too, is in report.json."""
from __future__ import annotations

from typing import Any

from rafmedia.core.render import format_interval, format_value, html_note, html_page, html_table

HEADER = ["encoder", "TRE (mm)", "warped-label Dice", "segmentation Dice", "head fit"]
NOTE = ("TRE: mean distance (mm) between the true exhale landmarks and the inhale landmarks moved by the estimated "
        "field, averaged over each test subject's landmarks. Warped-label Dice: the inhale label map warped by the "
        "estimate against the exhale label map, mean over structures. Segmentation Dice: the segmentation head on the "
        "same frozen features. Brackets: 95% bootstrap intervals over the test subjects. Baselines: the identity (no "
        "registration) and the same head on raw intensities.")


def _scored(section: dict[str, Any] | None, metric: str) -> str:
    if not section or metric not in section.get("mean", {}):
        return "-"
    return f"{format_value(section['mean'][metric])} {format_interval(section['ci95'][metric])}"


def _fit(section: dict[str, Any] | None) -> str:
    attempts = ((section or {}).get("head_fit") or {}).get("attempts")
    return "-" if attempts is None else "first attempt" if attempts == 1 else f"refitted ({attempts} attempts)"


def registration_rows(report: dict[str, Any]) -> list[list[str]]:
    """One row per encoder, then one per baseline."""
    rows = [[name, _scored(cell.get("registration"), "tre_mm"), _scored(cell.get("registration"), "dice"),
             _scored(cell.get("segmentation"), "dice"), _fit(cell.get("registration"))]
            for name, cell in report["encoders"].items()]
    for name, section in (report["cohort"].get("baselines") or {}).items():
        rows.append([f"baseline: {name}", _scored(section, "tre_mm"), _scored(section, "dice"), "-", _fit(section)])
    return rows


def render_registration_html(report: dict[str, Any]) -> str:
    cohort = report["cohort"]
    return html_page("rafmedia registration report", [
        "<h1>rafmedia: paired acquisitions, registration on frozen features</h1>",
        html_note(f"Cohort: {cohort['path']} ({cohort['num_subjects']} subjects; {cohort['num_train']} train the "
                  f"heads, {cohort['num_test']} are scored). Every number is in report.json next to this file."),
        html_table(HEADER, registration_rows(report)), html_note(NOTE)])


def render_registration_markdown(report: dict[str, Any]) -> str:
    lines = ["# rafmedia: registration on frozen features", "", f"Cohort: {report['cohort']['path']}", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in registration_rows(report)]
    return "\n".join([*lines, "", NOTE, ""])
