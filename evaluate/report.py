"""Renders a results folder (its `report.json`) into a self-contained `report.html` with figures.

`report.json` holds every number; the HTML embeds its figures as base64 PNG so it can be mailed or
opened offline. `summary.png` (the README's picture) is written next to them.
"""
from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import numpy as np

from rafmedia.engine.errors import UserError
from rafmedia.engine.files import atomic_write_bytes, atomic_write_text, read_json
from rafmedia.evaluate import figures
from rafmedia.evaluate.raf import RAF_FORMULA

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"

STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:0.6em 0 1.4em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.flag{color:#b00;font-weight:600}
.ok{color:#070;font-weight:600}img{max-width:100%}h2{border-bottom:1px solid #ddd;padding-bottom:3px}
.note{color:#555;font-size:0.92em}"""


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "n/a" if not np.isfinite(value) else f"{value:.{digits}f}"
    return html.escape(str(value))


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c) if not str(c).startswith('<') else c}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(png: bytes, alt: str) -> str:
    return f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}"></p>'


def _planted_section(report: dict[str, Any]) -> str:
    planted = report["cohort"].get("planted")
    if not planted:
        return ""
    rows = [[name, s["num_subjects"], s["num_diseased"], s["noise_std"], s["bias_field"], s["gamma"], s["blur_sigma"]]
            for name, s in planted["sites"].items()]
    checks = []
    for noisy in planted.get("noisy_sites", []):
        for name, entry in report["encoders"].items():
            site_latent = entry["latent"].get("site")
            if not site_latent:
                continue
            farthest = site_latent["frechet"]["farthest"]
            css = "ok" if farthest == noisy else "flag"
            checks.append(f"<li>{html.escape(name)}: farthest site in embedding space is "
                          f"<span class='{css}'>{html.escape(str(farthest))}</span> (planted noisy site: {html.escape(noisy)})</li>")
    return ("<h2>Cohort and planted biases</h2>"
            f"<p>{planted['num_subjects']} subjects, shape {planted['shape']}, sex counts {planted['sex_counts']} "
            f"(planted females per male: {planted['sex_ratio_planted']}). {html.escape(planted['disease_definition'])}.</p>"
            + _table(["site", "subjects", "diseased", "noise std", "bias field", "gamma", "blur"], rows)
            + (f"<ul>{''.join(checks)}</ul>" if checks else ""))


def _with_interval(values: dict[str, Any], key: str) -> str:
    low, high = values.get(f"{key}_ci95", [None, None])
    return f"{_fmt(values[key])} [{_fmt(low)}, {_fmt(high)}]"


def _raf_section(report: dict[str, Any]) -> str:
    encoders = report["encoders"]
    return "".join([
        "<h2>RAF index</h2>",
        _table(["encoder", "RAF index", "performance", "robustness", "fairness"],
               [[n, *[_with_interval(e["raf"], key) for key in ("index", "performance", "robustness", "fairness")]]
                for n, e in encoders.items()]),
        f"<p class='note'>{html.escape(RAF_FORMULA)} Weights: {html.escape(str(report['config']['raf_weights']))}. "
        "Brackets: 95% bootstrap intervals over the test subjects (first replicate), resampled jointly.</p>",
        _img(figures.raf_figure(report), "RAF components"),
        "<h2>Scan-level probes (clean)</h2>",
        _table(["encoder", "target", "AUROC mean", "AUROC std", "accuracy mean", "balanced acc."],
               [[n, t, p["auroc"]["mean"], p["auroc"]["std"], p["accuracy"]["mean"], p["balanced_accuracy"]["mean"]]
                for n, e in encoders.items() for t, p in e["probes"].items()]),
        _img(figures.probe_figure(report), "probe AUROC")])


def _robustness_section(report: dict[str, Any]) -> str:
    rows, severities = [], []
    for name, entry in report["encoders"].items():
        for alteration, record in entry["robustness"].items():
            if alteration != "clean":
                severities = record["severity"]
                rows.append([name, alteration, *record["auroc"], record.get("corruption_error"),
                             record.get("relative_corruption_error")])
    return "".join([
        "<h2>Robustness</h2>", _img(figures.degradation_figure(report), "degradation curves"),
        _table(["encoder", "alteration", *[f"AUROC s={s}" for s in severities], "CE", "relative CE"], rows),
        "<p class='note'>Robustness is measured on the first replicate (its test split; for the random baseline, its "
        "first initialisation): the probe fitted on clean training scans scores altered test scans. CE and relative "
        "CE use error = 1 - balanced accuracy against the random-init baseline (ImageNet-C / MedMNIST-C).</p>"])


def _fairness_section(report: dict[str, Any], attributes: list[str]) -> str:
    parts = ["<h2>Fairness</h2>"]
    for attribute in attributes:
        rows = []
        for name, entry in report["encoders"].items():
            result = entry["fairness"][attribute]
            for group, g in result["groups"].items():
                replicate0 = g["first_replicate"]
                ci = replicate0["ci95"]["accuracy"]
                flag = "<span class='flag'>small group</span>" if g["small_group"] else "-"
                rows.append([name, group, f"{g['n_test']:.0f}", g["accuracy"], g["auroc"],
                             f"{_fmt(replicate0['accuracy'])} [{_fmt(ci[0])}, {_fmt(ci[1])}]", flag])
            rows.append([name, "<b>gap / worst group</b>", "",
                         f"{_fmt(result['accuracy']['gap'])} / {_fmt(result['accuracy']['worst_group'])}",
                         f"{_fmt(result['auroc']['gap'])} / {_fmt(result['auroc']['worst_group'])}", "", ""])
            tests = result.get("first_replicate", {})
            if tests:
                rows.append([name, "<b>replicate 0: gap (permutation p)</b>", "",
                             f"{_fmt(tests.get('accuracy_gap'))} (p {_fmt(tests.get('accuracy_gap_p_value'))})",
                             f"{_fmt(tests.get('auroc_gap'))} (p {_fmt(tests.get('auroc_gap_p_value'))})",
                             f"DP diff {_fmt(tests.get('demographic_parity_difference'))} (p "
                             f"{_fmt(tests.get('demographic_parity_p_value'))}); EO diff "
                             f"{_fmt(tests.get('equalized_odds_difference'))} (p "
                             f"{_fmt(tests.get('equalized_odds_p_value'))})", ""])
        parts += [f"<h3>by {html.escape(attribute)}</h3>",
                  _table(["encoder", "group", "n test", "accuracy (mean)", "AUROC (mean)",
                          "accuracy, replicate 0 [bootstrap 95% CI]", "note"], rows),
                  _img(figures.group_figure(report, attribute), f"groups by {attribute}")]
    return "".join(parts)


def _latent_section(report: dict[str, Any], attributes: list[str]) -> str:
    rows = [[name, attribute, entry["latent"][attribute]["leakage_auroc"], entry["latent"][attribute]["frechet"]["farthest"],
             max(entry["latent"][attribute]["frechet"]["mean_to_others"].values()), entry["latent"]["rankme"]]
            for name, entry in report["encoders"].items() for attribute in attributes]
    parts = ["<h2>Label-free latent tests</h2>",
             _table(["encoder", "attribute", "leakage AUROC", "farthest group", "its mean Frechet distance", "RankMe"], rows),
             "<p class='note'>Leakage AUROC: how well the attribute is predicted from embeddings (0.5 = not at all); a "
             "high site leakage means the encoder encodes acquisition, a bias the probes can exploit. Frechet distances "
             "are between the groups' standardised embeddings.</p>"]
    if "site" in attributes:
        parts.append(_img(figures.frechet_figure(report, "site"), "Frechet distances between sites"))
    return "".join(parts)


def render_html(report: dict[str, Any]) -> str:
    attributes = list(report["config"]["group_by"])
    primary = report["config"]["primary_target"]
    return "\n".join([
        f"<!doctype html><html><head><meta charset='utf-8'><title>rafmedia RAF report</title><style>{STYLE}</style></head><body>",
        "<h1>rafmedia: robustness and fairness report</h1>",
        f"<p class='note'>Cohort: {html.escape(report['cohort']['path'])}. Primary target: <b>{html.escape(primary)}</b>. "
        "Every number is in report.json next to this file.</p>",
        _raf_section(report), _robustness_section(report),
        _fairness_section(report, list(next(iter(report["encoders"].values()))["fairness"])),
        _latent_section(report, attributes), _planted_section(report), "</body></html>"])


def render_report(results_dir: str | Path) -> Path:
    """Writes `report.html` and `summary.png` for a results folder holding `report.json`; returns the HTML path."""
    results_dir = Path(results_dir)
    source = results_dir / REPORT_JSON
    if not source.is_file():
        raise UserError(f"{source} not found: point `raf report` at a folder written by `raf evaluate`")
    report = read_json(source)
    atomic_write_bytes(results_dir / "summary.png", figures.summary_figure(report))
    return atomic_write_text(results_dir / REPORT_HTML, render_html(report))
