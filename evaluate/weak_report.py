"""The report of a weak-label evaluation (`evaluate.weak_labels`): HTML with figures and overlays, and Markdown.

Tables: the main comparison (attention MIL vs the one-embedding-per-scan probe, per encoder, with patient-bootstrap
intervals), the same against the planted grades, the MIL - pooled difference, the ablations (ordinal heads and
label smoothing, fusions, the rater-noise curve, the curriculum) and the localisation scores against their chance
levels. Figures: QWK per encoder and probe, the noise curve, pointing-game rates against chance, and overlays of a few
patients per grade (each channel with the planted lesion's outline, then the attention, occlusion and anomaly maps).
"""
from __future__ import annotations

import html
from typing import Any

import numpy as np

from rafmedia.core.render import (Markup, bold, flag, format_interval, format_value, html_image, html_note, html_page,
                                  html_table, markdown_table, png, subplots)

PROBE_TITLES = {"attention_mil": "attention MIL", "pooled": "one embedding per scan"}
MAP_TITLES = {"attention": "MIL attention", "occlusion": "occlusion", "anomaly": "kNN anomaly"}


def interval_text(value: dict[str, Any] | None, key: str = "mean") -> str:
    """"value [low, high]" of a {mean|rate, low, high} summary."""
    if not isinstance(value, dict):
        return format_value(value)
    return f"{format_value(value.get(key, value.get('rate')))} {format_interval([value.get('low'), value.get('high')])}"


def _studies(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: entry["weak_labels"] for name, entry in report["encoders"].items() if "weak_labels" in entry}


def _metric_row(label: list[Any], scores: dict[str, Any]) -> list[Any]:
    return [*label, interval_text(scores["qwk"]), interval_text(scores["spearman"]), interval_text(scores["mae"]),
            interval_text(scores["balanced_accuracy"])]


METRIC_HEADER = ["QWK [95% CI]", "Spearman", "MAE (grades)", "balanced accuracy"]


def main_rows(studies: dict[str, dict[str, Any]], section: str = "probes") -> list[list[Any]]:
    return [_metric_row([name, PROBE_TITLES.get(probe, probe)], scores)
            for name, study in studies.items() for probe, scores in (study.get(section) or {}).items()]


def difference_rows(studies: dict[str, dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for name, study in studies.items():
        qwk = study["mil_minus_pooled"]["qwk"]
        verdict = "MIL better" if qwk["low"] > 0 else ("pooled better" if qwk["high"] < 0 else "no clear difference")
        rows.append([name, interval_text(qwk), interval_text(study["mil_minus_pooled"]["mae"]), verdict])
    return rows


def localisation_rows(studies: dict[str, dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for name, study in studies.items():
        for kind, scores in (study.get("localisation") or {}).items():
            if not isinstance(scores, dict):
                continue
            pointing, auroc, mass = scores["pointing"], scores["auroc"], scores.get("mass_in_lesion")
            above = pointing["low"] > pointing["chance"]
            by_grade = "; ".join(f"{g}: {format_value(v['rate'], 2)} (n {v['n']})"
                                 for g, v in (pointing.get("by_grade") or {}).items())
            rows.append([name, MAP_TITLES.get(kind, kind), interval_text(pointing, "rate"),
                         format_value(pointing["chance"]), Markup("yes") if above else flag("no"), by_grade,
                         interval_text(mass) if mass else "", format_value(mass["chance"]) if mass else "",
                         interval_text(auroc)])
    return rows


LOCALISATION_HEADER = ["encoder", "map", "pointing game [95% CI]", "chance", "above chance?", "pointing by grade",
                       "attention mass in lesion", "mass chance", "voxel AUROC"]


def ablation_tables(name: str, ablations: dict[str, Any]) -> list[tuple[str, list[str], list[list[Any]]]]:
    """(title, header, rows) of each ablation of one encoder."""
    tables = [(f"Ordinal heads and label smoothing ({name})", ["head", *METRIC_HEADER],
               [_metric_row([head], scores) for head, scores in ablations["heads"].items()]),
              (f"Fusion of the channels ({name})", ["fusion", "patients", *METRIC_HEADER],
               [_metric_row([fusion, scores["num_patients"]], scores) for fusion, scores in ablations["fusions"].items()])]
    if ablations.get("noise_curve"):
        tables.append((f"Rater noise (training grades re-drawn from the planted grade; scored against it) ({name})",
                       ["rater noise", "realised flips", "MIL QWK", "pooled QWK"],
                       [[point["level"], point["flip_rate"], interval_text(point["attention_mil"]["qwk"]),
                         interval_text(point["pooled"]["qwk"])] for point in ablations["noise_curve"]]))
    curriculum = ablations.get("curriculum")
    if curriculum:
        tables.append((f"Curriculum, easy to hard ({name})", ["", "QWK [95% CI]", "MAE"],
                       [["with curriculum", interval_text(curriculum["with"]["qwk"]),
                         interval_text(curriculum["with"]["mae"])],
                        ["without", interval_text(curriculum["without"]["qwk"]), interval_text(curriculum["without"]["mae"])],
                        [bold("difference (paired)"), interval_text(curriculum["difference"]["qwk"]),
                         interval_text(curriculum["difference"]["mae"])]]))
    return tables


# ---- figures ------------------------------------------------------------------------------------------------------
def qwk_figure(studies: dict[str, dict[str, Any]]) -> bytes:
    labels, means, errors = [], [], []
    for name, study in studies.items():
        for probe, scores in study["probes"].items():
            labels.append(f"{name}\n{PROBE_TITLES.get(probe, probe)}")
            q = scores["qwk"]
            means.append(q["mean"])
            errors.append([q["mean"] - q["low"], q["high"] - q["mean"]])
    figure, ax = subplots(figsize=(7, 0.6 * len(labels) + 1.2))
    y = np.arange(len(labels))
    ax.errorbar(means, y, xerr=np.nan_to_num(np.array(errors).T), fmt="o", color="#1f77b4", capsize=4)
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="#999", lw=0.8)
    ax.set_xlabel("quadratic weighted kappa (95% patient-bootstrap interval)")
    return png(figure)


def noise_figure(name: str, curve: list[dict[str, Any]]) -> bytes:
    figure, ax = subplots(figsize=(6, 3.4))
    levels = [point["level"] for point in curve]
    for probe, colour in (("attention_mil", "#1f77b4"), ("pooled", "#ff7f0e")):
        values = [point[probe]["qwk"] for point in curve]
        ax.plot(levels, [v["mean"] for v in values], "o-", color=colour, label=PROBE_TITLES[probe])
        ax.fill_between(levels, [v["low"] for v in values], [v["high"] for v in values], color=colour, alpha=0.15)
    ax.set_xlabel("rater noise (probability a training grade moves by one)")
    ax.set_ylabel("QWK vs planted grade")
    ax.set_title(f"Label-noise robustness: {name}", fontsize=10)
    ax.legend(fontsize=8)
    return png(figure)


def pointing_figure(studies: dict[str, dict[str, Any]]) -> bytes | None:
    bars = [(f"{name}\n{MAP_TITLES.get(kind, kind)}", scores["pointing"])
            for name, study in studies.items() for kind, scores in (study.get("localisation") or {}).items()
            if isinstance(scores, dict)]
    if not bars:
        return None
    figure, ax = subplots(figsize=(7, 0.45 * len(bars) + 1.2))
    y = np.arange(len(bars))
    rates = [p["rate"] for _, p in bars]
    ax.barh(y, rates, xerr=np.nan_to_num(np.array([[p["rate"] - p["low"], p["high"] - p["rate"]] for _, p in bars]).T),
            color="#2ca02c", alpha=0.7, capsize=3)
    ax.scatter([p["chance"] for _, p in bars], y, marker="|", s=300, color="#d62728", label="chance", zorder=3)
    ax.set_yticks(y, [label for label, _ in bars], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("pointing game: share of patients whose map's maximum is in the lesion")
    ax.legend(fontsize=8)
    return png(figure)


def overlay_figure(name: str, overlays: list[dict[str, Any]]) -> bytes | None:
    """One row per patient: each channel in grey with the planted lesion's outline, then each voxel map."""
    if not overlays:
        return None
    channels, maps = list(overlays[0]["channels"]), list(overlays[0]["maps"])
    columns = len(channels) + len(maps)
    figure, axes = subplots(len(overlays), columns, figsize=(1.7 * columns, 1.8 * len(overlays)), squeeze=False)
    for row, overlay in enumerate(overlays):
        lesion = np.asarray(overlay["lesion"])
        background = next((np.asarray(v) for v in overlay["channels"].values() if v is not None), np.zeros_like(lesion))
        panels = [(c, overlay["channels"][c], "gray") for c in channels] + [(m, overlay["maps"][m], "inferno") for m in maps]
        for column, (title, plane, cmap) in enumerate(panels):
            ax = axes[row, column]
            ax.axis("off")
            if plane is None:
                ax.text(0.5, 0.5, f"{title}\nmissing", ha="center", va="center", fontsize=7, transform=ax.transAxes)
                continue
            if cmap == "gray":
                ax.imshow(np.asarray(plane), cmap="gray")
            else:
                ax.imshow(background, cmap="gray")
                ax.imshow(np.asarray(plane), cmap=cmap, alpha=0.55)
            if lesion.any():
                ax.contour(lesion, levels=[0.5], colors="#00e5ff", linewidths=0.8)
            if row == 0:
                ax.set_title(MAP_TITLES.get(title, title), fontsize=8)
        axes[row, 0].text(-0.08, 0.5, f"{overlay['subject_id']}\ngrade {overlay['grade']} (true {overlay['grade_true']})",
                          ha="right", va="center", fontsize=7, transform=axes[row, 0].transAxes)
    figure.suptitle(f"{name}: slice through the lesion; cyan = planted lesion (hidden from the methods)", fontsize=9)
    return png(figure, dpi=90)


# ---- pages ---------------------------------------------------------------------------------------------------------
def _summary(report: dict[str, Any], studies: dict[str, dict[str, Any]]) -> str:
    study = next(iter(studies.values()))
    counts = ", ".join(f"grade {g}: {n}" for g, n in study["grade_counts"].items())
    missing = ", ".join(f"{c}: {n}" for c, n in study["missing"].items() if n) or "none"
    return (f"<p class='note'>Cohort: {html.escape(report['cohort']['path'])}: {study['num_patients']} patients "
            f"({html.escape(counts)}); channels {html.escape(', '.join(study['channels']))}; missing channels: "
            f"{html.escape(missing)}. Instances: {study['num_instances']} patches of {study['patch_size']}^3 (stride "
            f"{study['stride']}). Main setting: {html.escape(study['main']['fusion'])} fusion, "
            f"{html.escape(study['main']['head'])} head; repeated stratified {html.escape(str(report['config']['weak_labels']['folds']))}"
            f"-fold CV over {len(report['config']['weak_labels']['seeds'])} seeds, weight decay by nested CV. Every "
            "number is in report.json next to this file.</p>")


def render_weak_html(report: dict[str, Any]) -> str:
    studies = _studies(report)
    body = ["<h1>rafmedia: weak-label report</h1>", _summary(report, studies),
            "<h2>Attention MIL vs one embedding per scan (rated grades)</h2>",
            html_table(["encoder", "probe", *METRIC_HEADER], main_rows(studies)),
            html_image(qwk_figure(studies), "QWK per encoder and probe"),
            html_table(["encoder", "MIL - pooled QWK [95% CI]", "MIL - pooled MAE", "verdict"], difference_rows(studies)),
            html_note("Intervals: 95% percentile patient bootstrap of the mean over seeds; differences are paired (the "
                      "same resampled patients for both probes).")]
    truth = main_rows(studies, "vs_truth")
    if truth:
        body += ["<h3>Against the planted grades</h3>", html_table(["encoder", "probe", *METRIC_HEADER], truth)]
    localisation = localisation_rows(studies)
    if localisation:
        body += ["<h2>Where the evidence is</h2>", html_table(LOCALISATION_HEADER, localisation),
                 html_image(pointing_figure(studies), "pointing game vs chance"),
                 html_note("Pointing game: the map's maximum within the tolerance of the planted lesion; chance = a point "
                           "drawn uniformly in the brain. Mass chance: uniform attention over the patches. Maps are "
                           "cross-fitted: each patient's map comes from the probe of the fold it was tested in.")]
        for name, entry in report["encoders"].items():
            body.append(html_image(overlay_figure(name, entry.get("weak_labels", {}).get("overlays") or []),
                                   f"overlays {name}"))
    for name, study in studies.items():
        if study.get("ablations"):
            body.append(f"<h2>Ablations: {html.escape(name)}</h2>")
            for title, header, rows in ablation_tables(name, study["ablations"]):
                body += [f"<h3>{html.escape(title)}</h3>", html_table(header, rows)]
            if study["ablations"].get("noise_curve"):
                body.append(html_image(noise_figure(name, study["ablations"]["noise_curve"]), "noise curve"))
    return html_page("rafmedia weak-label report", body)


def render_weak_markdown(report: dict[str, Any]) -> str:
    studies = _studies(report)
    lines = ["# rafmedia: weak-label report", "", f"Cohort: {report['cohort']['path']}", "",
             "## Attention MIL vs one embedding per scan", ""]
    lines += markdown_table(["encoder", "probe", *METRIC_HEADER], main_rows(studies))
    lines += markdown_table(["encoder", "MIL - pooled QWK [95% CI]", "MIL - pooled MAE", "verdict"],
                            difference_rows(studies))
    localisation = [[str(c) for c in row] for row in localisation_rows(studies)]
    if localisation:
        lines += ["## Where the evidence is", ""] + markdown_table(LOCALISATION_HEADER, localisation)
    for name, study in studies.items():
        for title, header, rows in ablation_tables(name, study.get("ablations") or {"heads": {}, "fusions": {}}):
            if rows:
                lines += [f"### {title}", ""] + markdown_table(header, [[str(c) for c in row] for row in rows])
    return "\n".join(lines) + "\n"


def weak_summary_figure(report: dict[str, Any]) -> bytes:
    """summary.png of a weak-label report: the QWK comparison."""
    return qwk_figure(_studies(report))
