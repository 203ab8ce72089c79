"""Renders a results folder (its `report.json`) into a self-contained `report.html`, a one-page `report.md`
and `summary.png`.

`report.json` holds every number; the HTML embeds its figures as base64 PNG so it can be mailed or opened
offline. Undefined values are stored as null and shown as "n/a". Parts that older report.json files lack
(projection, datasheet, robustness summary, kNN OOD, probe variants, segmentation) are left out when absent.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from rafmedia.core.errors import UserError
from rafmedia.core.files import atomic_write_bytes, atomic_write_text, read_json
from rafmedia.core.render import bold, flag, format_interval, format_value, html_image, html_note, html_page, html_table
from rafmedia.evaluate import figures
from rafmedia.evaluate.figures import lookup
from rafmedia.evaluate.raf import RAF_FORMULA
from rafmedia.evaluate.registration_report import render_registration_html, render_registration_markdown
from rafmedia.evaluate.report_format import (adaptor_cells, adaptor_rows, fairness_metrics, latent_columns,
                                             latent_tables, mean_std, number, other_probes, p_value_text, ser_text,
                                             share, with_interval)
from rafmedia.evaluate.report_md import render_markdown
from rafmedia.evaluate.weak_report import render_weak_html, render_weak_markdown, weak_summary_figure

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
REPORT_MD = "report.md"

# ---- sections ----------------------------------------------------------------------------------------------
def _planted_section(report: dict[str, Any]) -> str:
    planted = report["cohort"].get("planted")
    if not planted:
        return ""
    rows = [[name, s["num_subjects"], s["num_diseased"], s["noise_std"], s["bias_field"], s["gamma"], s["blur_sigma"]]
            for name, s in planted["sites"].items()]
    checks = []
    for noisy in planted.get("noisy_sites", []):
        for name, entry in report["encoders"].items():
            farthest = lookup(entry, "latent", "site", "frechet", "farthest")
            if farthest is None:
                continue
            css = "ok" if farthest == noisy else "flag"
            checks.append(f"<li>{html.escape(name)}: farthest site in embedding space is "
                          f"<span class='{css}'>{html.escape(str(farthest))}</span> (planted noisy site: {html.escape(noisy)})</li>")
    return ("<h2>Cohort and planted biases</h2>"
            f"<p>{planted['num_subjects']} subjects, shape {planted['shape']}, sex counts {planted['sex_counts']} "
            f"(planted females per male: {planted['sex_ratio_planted']}). {html.escape(planted['disease_definition'])}.</p>"
            + html_table(["site", "subjects", "diseased", "noise std", "bias field", "gamma", "blur"], rows)
            + (f"<ul>{''.join(checks)}</ul>" if checks else ""))


def _encoders_section(report: dict[str, Any]) -> str:
    """Each encoder's source, weights licence and how the cohort was prepared for it (its card)."""
    rows = [[name, entry.get("source", ""), entry.get("licence") or "unknown",
             (entry.get("preparation") or {}).get("note", "")] for name, entry in report["encoders"].items()]
    return "<h2>Encoders</h2>" + html_table(["encoder", "source", "weights licence", "cohort preparation"], rows)


def _raf_section(report: dict[str, Any]) -> str:
    return "".join([
        "<h2>RAF index</h2>",
        html_table(["encoder", "RAF index", "performance", "robustness", "fairness"],
               [[n, *[with_interval(e["raf"], key) for key in ("index", "performance", "robustness", "fairness")]]
                for n, e in report["encoders"].items()]),
        html_note(f"{RAF_FORMULA} Weights: {report['config'].get('raf_weights')}. Brackets: 95% bootstrap intervals over "
              "every replicate's test subjects, resampled jointly (percentile intervals: a gap-based "
              "component can lie outside its own interval when its bootstrap distribution is skewed)."),
        html_image(figures.raf_figure(report), "RAF components")])


def _fraction_order(fraction: str) -> tuple[int, float, str]:
    try:
        return 0, float(fraction), ""
    except ValueError:
        return 1, 0.0, fraction


def _few_shot_rows(report: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Fractions (sorted numerically) and rows "AUROC mean +- std" per encoder and target with few-shot results."""
    probes = [(n, t, p["few_shot"]) for n, e in report["encoders"].items() for t, p in e["probes"].items()
              if isinstance(p.get("few_shot"), dict)]
    fractions = sorted({f for _, _, shots in probes for f in shots}, key=_fraction_order)
    return fractions, [[n, t, *[mean_std(lookup(shots, f, "auroc")) for f in fractions]] for n, t, shots in probes]


def _probe_section(report: dict[str, Any]) -> str:
    encoders = report["encoders"]
    others = list(dict.fromkeys(name for e in encoders.values() for p in e["probes"].values() for name in other_probes(p)))
    rows = [[n, t, lookup(p, "auroc", "mean"), lookup(p, "auroc", "std"), lookup(p, "accuracy", "mean"),
             lookup(p, "balanced_accuracy", "mean"), *[mean_std(lookup(p, name, "auroc")) for name in others]]
            for n, e in encoders.items() for t, p in e["probes"].items() if "auroc" in p]
    ordinal = [[n, t, mean_std(p["quadratic_weighted_kappa"]), mean_std(p["spearman"])]
               for n, e in encoders.items() for t, p in e["probes"].items() if "quadratic_weighted_kappa" in p]
    parts = ["<h2>Scan-level probes (clean)</h2>",
             html_table(["encoder", "target", "AUROC mean", "AUROC std", "accuracy mean", "balanced acc.",
                         *[f"{name} AUROC (mean ± std)" for name in others]], rows),
             html_image(figures.probe_figure(report), "probe AUROC")]
    if others:
        parts.append(html_note(f"Other probes ({', '.join(others)}) are fitted on the primary target only, on the same "
                               "splits; mean ± std over replicates."))
    if ordinal:
        parts += ["<h3>Ordinal targets</h3>",
                  html_table(["encoder", "target", "quadratic weighted kappa", "Spearman"], ordinal),
                  html_note("Ordinal probe (one logistic model per threshold); kappa of its predicted grade, Spearman "
                            "correlation of its expected grade with the true grade; mean ± std over replicates.")]
    fractions, few_shot = _few_shot_rows(report)
    if few_shot:
        parts += ["<h3>Few-shot probes</h3>",
                  html_table(["encoder", "target", *[f"AUROC, {share(f)} of labels" for f in fractions]], few_shot),
                  html_note("The probe is fitted on a stratified, nested subset of the training labels; mean ± std "
                            "over replicates.")]
    return "".join(parts)


def _adaptor_section(report: dict[str, Any]) -> str:
    budgets, rows = adaptor_rows(report["encoders"])
    if not rows:
        return ""
    block = next(entry["adaptors"] for entry in report["encoders"].values() if isinstance(entry.get("adaptors"), dict))
    budget = block.get("compute_budget") or {}
    header = [f"{what}, {share(b)} of labels" for b in budgets
              for what in ("AUROC [95% CI]", "balanced acc. [95% CI]", "s per fit")]
    table = [[name, adaptor, (result.get("inputs") or ""),
              *adaptor_cells(result, budgets, ("auroc", "balanced_accuracy", "seconds"))]
             for name, adaptor, result in rows]
    return "".join([
        "<h2>Adaptors under one protocol</h2>",
        html_table(["encoder", "adaptor", "inputs", *header], table),
        html_image(figures.adaptor_figure(report), "AUROC by label budget per adaptor"),
        html_note(f"Each adaptor is fitted on a stratified share of the first replicate's training split (at least one "
                  f"subject per class) and scored on its whole test split for the primary target; seeds "
                  f"{block.get('seeds')} each draw their own label subset and initialisation; brackets: "
                  f"{block.get('interval', 'intervals')}. Embedding adaptors run on the cached clean embeddings; "
                  f"volume adaptors train under one compute budget: {budget.get('steps')} AdamW steps x "
                  f"{budget.get('batch_size')} volumes, augmentation {budget.get('augmentation')}, "
                  f"{budget.get('threads')} torch thread(s). Seconds: wall time of one fit, mean over seeds.")])


def _robustness_section(report: dict[str, Any]) -> str:
    rows, severities = [], []
    for name, entry in report["encoders"].items():
        for alteration, record in entry["robustness"].items():
            if alteration != "clean":
                severities = record["severity"]
                rows.append([name, alteration, *record["auroc"], record.get("degradation"),
                             record.get("corruption_error"), record.get("relative_corruption_error")])
    summaries = [[n, lookup(e, "robustness_summary", "mce"), lookup(e, "robustness_summary", "relative_mce")]
                 for n, e in report["encoders"].items() if "robustness_summary" in e]
    return "".join([
        "<h2>Robustness</h2>", html_image(figures.degradation_figure(report), "degradation curves"),
        html_table(["encoder", "alteration", *[f"AUROC s={s}" for s in severities], "degradation", "CE", "relative CE"], rows),
        html_table(["encoder", "mCE", "relative mCE"], summaries) if summaries else "",
        html_note("Robustness is measured on the first replicate (its test split; for the random baseline, its first "
              "initialisation): the probe fitted on clean training scans scores altered test scans. Degradation: the "
              "severity-weighted share of the clean skill (AUROC - 0.5) lost, weights (2/3)^s (ROOD-MRI), 0 = none "
              "lost, 1 = all. CE and relative CE use error = 1 - balanced accuracy against the random-init baseline "
              "(ImageNet-C / MedMNIST-C); mCE is their mean over alterations.")])


def _group_row(name: str, group: str, g: dict[str, Any], metrics: list[str]) -> list[Any]:
    replicate0 = g.get("first_replicate") or {}
    note = flag("small group") if g.get("small_group") else "-"
    n_test = g.get("n_test")
    return [name, group, n_test if n_test is None else f"{n_test:.0f}", *[g.get(metric) for metric in metrics],
            *[f"{format_value(replicate0.get(metric))} {format_interval(lookup(replicate0, 'ci95', metric))}"
              for metric in metrics], note]


def _fairness_rows(name: str, result: dict[str, Any], metrics: list[str]) -> list[list[Any]]:
    """One row per group, then the gaps (means over replicates) and replicate 0's gaps with permutation p-values."""
    rows = [_group_row(name, group, g, metrics) for group, g in result["groups"].items()]
    rows.append([name, bold("gap / worst group"), "", *[
        f"{format_value(lookup(result, metric, 'gap'))} / {format_value(lookup(result, metric, 'worst_group'))}"
        for metric in metrics], *[""] * len(metrics), ""])
    tests = result.get("first_replicate")
    if tests:
        rows.append([name, bold("replicate 0: gap (permutation p)"), "", *[""] * len(metrics), *[
            f"{format_value(tests.get(f'{metric}_gap'))} ({p_value_text(tests.get(f'{metric}_gap_p_value'))})"
            for metric in metrics],
            (f"DP diff {format_value(tests.get('demographic_parity_difference'))} "
            f"({p_value_text(tests.get('demographic_parity_p_value'))}); EO diff "
            f"{format_value(tests.get('equalized_odds_difference'))} "
            f"({p_value_text(tests.get('equalized_odds_p_value'))})")])
    return rows


def _fairness_section(report: dict[str, Any], attributes: list[str]) -> str:
    parts = ["<h2>Fairness</h2>"]
    for attribute in attributes:
        results = {name: entry["fairness"][attribute] for name, entry in report["encoders"].items()}
        metrics = list(dict.fromkeys(m for result in results.values() for m in fairness_metrics(result)))
        rows = [row for name, result in results.items() for row in _fairness_rows(name, result, metrics)]
        parts += [f"<h3>by {html.escape(attribute)}</h3>",
                  html_table(["encoder", "group", "n test", *[f"{metric} (mean)" for metric in metrics],
                              *[f"{metric}, replicate 0 [bootstrap 95% CI]" for metric in metrics], "note"], rows),
                  html_image(figures.group_figure(report, attribute), f"groups by {attribute}")]
    parts.append(html_note("Means over the replicates (split seeds) of each metric of the primary probe per group; "
                           "gap = max - min over the groups, worst group the lowest (the highest for an error rate). "
                           "Replicate 0 carries bootstrap 95% intervals and each gap's permutation p-value; DP diff = "
                           "the selection-rate gap (demographic parity), EO diff = max(TPR gap, FPR gap) (equalised "
                           "odds)."))
    return "".join(parts)


def _latent_section(report: dict[str, Any], attributes: list[str]) -> str:
    encoders = report["encoders"]
    columns = {(name, attribute): latent_columns(entry["latent"], attribute)
               for name, entry in encoders.items() for attribute in attributes}
    titles = list(dict.fromkeys(title for shown in columns.values() for title in shown))
    parts = ["<h2>Label-free latent tests</h2>",
             html_table(["encoder", "attribute", *titles],
                        [[name, attribute, *map(shown.get, titles)] for (name, attribute), shown in columns.items()]),
             html_note("Leakage AUROC: how well the attribute is predicted from embeddings (0.5 = not at all); a high "
                       "site leakage means the encoder encodes acquisition, a bias the probes can exploit. Silhouette "
                       "(in [-1, 1], about 0 = no clustering) of the standardised embeddings by the attribute's groups. "
                       "Frechet distances are between the groups' standardised embeddings.")]
    tables = {test: table for entry in encoders.values() for test, table in latent_tables(entry["latent"]).items()}
    for test, table in tables.items():
        values = {name: summary for name, entry in encoders.items()
                  if isinstance(summary := lookup(entry, "latent", test), dict)}
        keys = list(dict.fromkeys(key for summary in values.values() for key in summary))
        parts += [f"<h3>{html.escape(table['title'])}</h3>",
                  html_table(["encoder", *keys], [[name, *map(summary.get, keys)] for name, summary in values.items()]),
                  html_note(table["note"]) if table.get("note") else ""]
    if "site" in attributes:
        parts.append(html_image(figures.frechet_figure(report, "site"), "Frechet distances between sites"))
    projections = [html_image(figures.projection_figure(report, attribute), f"embedding projection by {attribute}")
                   for attribute in attributes]
    if any(projections):
        parts += ["<h3>2D projection of the embeddings</h3>", *projections,
                  html_note("First two principal components of each encoder's clean embeddings, one point per "
                            "subject.")]
    return "".join(parts)


def _crosstab(table: dict[str, Any], rare_below: float | None) -> str:
    """A pair of attributes as a table of counts (rows: values of the first, columns: of the second)."""
    first, second = table["attributes"]
    counts = {(c["values"][first], c["values"][second]): c for c in table["cells"]}
    rows_values = list(dict.fromkeys(a for a, _ in counts))
    columns = list(dict.fromkeys(b for _, b in counts))

    def cell(a: str, b: str) -> Any:
        c = counts.get((a, b))
        if c is None or not c.get("count"):
            return flag("0 (empty)")
        rare = rare_below is not None and c.get("fraction", 1.0) < rare_below
        return flag(f"{c['count']} (rare)") if rare else c["count"]

    return html_table([f"{first} \\ {second}", *columns], [[a, *[cell(a, b) for b in columns]] for a in rows_values])


def _datasheet_section(report: dict[str, Any]) -> str:
    sheet = lookup(report, "cohort", "datasheet")
    if not isinstance(sheet, dict):
        return ""
    rare_below = sheet.get("rare_below")
    rare = lookup(sheet, "subgroups", "rare") or {}
    counts = lookup(sheet, "subgroups", "counts") or {}
    parts = ["<h2>Datasheet</h2>",
             f"<p>{html.escape(format_value(sheet.get('num_subjects')))} subjects; attributes: "
             f"{html.escape(', '.join(sheet.get('attributes') or []) or 'none')}. <b>Rare categories</b> (below "
             f"{html.escape(share(rare_below))} of the subjects): "
             + (", ".join(flag(f"{a} = {v}") for a, values in rare.items() for v in values) or "none") + ".</p>"]
    if counts:
        parts.append(html_table(["attribute", "value", "subjects", "share", "note"],
                            [[a, v, c.get("count"), c.get("fraction"), flag("rare") if v in rare.get(a, []) else "-"]
                             for a, values in counts.items() for v, c in values.items()]))
    for table in sheet.get("intersections") or []:
        names = table.get("attributes") or []
        if len(names) == 2:
            parts += [f"<h3>Intersection {html.escape(' x '.join(names))}</h3>", _crosstab(table, rare_below)]
        else:
            rare_cells = [" & ".join(f"{k}={v}" for k, v in c.items()) for c in table.get("rare") or []]
            parts.append(html_note(f"Intersection {' x '.join(names)}: {len(table.get('cells') or [])} observed "
                               f"combinations; rare: {', '.join(rare_cells) or 'none'}."))
    missing = sheet.get("missing") or {}
    gaps = [[c, m.get("count"), m.get("fraction")] for c, m in (missing.get("per_column") or {}).items() if m.get("count")]
    parts += ["<h3>Missing metadata</h3>", html_table(["column", "missing", "share"], gaps) if gaps else "",
              html_note(f"{format_value(missing.get('num_subjects_with_missing'))} of {format_value(sheet.get('num_subjects'))} "
                    "subjects miss at least one metadata value.")]
    flags = [f"{f} {q.get('count')}" for f, q in (lookup(sheet, "quality", "flags") or {}).items() if q.get("count")]
    if "quality" in sheet:
        parts.append(html_note(f"Quality flags: {', '.join(flags) or 'none raised'}. "
                           "The full datasheet: `raf shards datasheet`."))
    return "".join(parts)


def _structure_rows(name: str, segmentation: dict[str, Any]) -> list[list[Any]]:
    per_structure = segmentation.get("per_structure") or {}
    return [[name, structure, f"{format_value(number(s.get('dice')))} {format_interval(s.get('dice_ci95'))}",
             number(s.get("hd95")), number(s.get("nsd"))]
            for structure in segmentation.get("structures") or list(per_structure)
            if isinstance(s := per_structure.get(structure), dict)]


def _segmentation_fairness_rows(name: str, segmentation: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for attribute, result in (segmentation.get("fairness") or {}).items():
        dice = result.get("dice") or {}
        for group, g in (dice.get("groups") or {}).items():
            rows.append([name, attribute, group, g.get("n"), f"{format_value(g.get('value'))} {format_interval(g.get('ci95'))}",
                         flag("small group") if g.get("small") else "-"])
        ser = result.get("skewed_error_rate") or {}
        rows.append([name, attribute, bold("gap / worst group / SER"), "",
                     (f"gap {format_value(dice.get('gap'))} ({p_value_text(dice.get('p_value_gap'))}), worst "
                     f"{format_value(dice.get('worst_group'))}"), f"SER {ser_text(ser)} ({p_value_text(ser.get('p_value'))})"])
    return rows


def _plausibility_rows(name: str, segmentation: dict[str, Any]) -> list[list[Any]]:
    plausibility = segmentation.get("plausibility") or {}
    rows = [[name, bold("all"), "", plausibility.get("topology_share"), plausibility.get("shape_prior_share")]]
    for attribute, by_group in (plausibility.get("by_group") or {}).items():
        rows += [[name, f"{attribute} = {group}", g.get("n"), g.get("share"), ""] for group, g in by_group.items()]
    return rows if plausibility else []


def _rca_rows(name: str, segmentation: dict[str, Any]) -> list[list[Any]]:
    rca = segmentation.get("rca")
    if not isinstance(rca, dict):
        return []
    attributes = list(dict.fromkeys([*(rca.get("true_gap") or {}), *(rca.get("estimated_gap") or {})]))
    sign = rca.get("sign_right") or {}
    return [[name, rca.get("pearson"), attribute, lookup(rca, "true_gap", attribute),
             lookup(rca, "estimated_gap", attribute),
             "-" if sign.get(attribute) is None else ("yes" if sign[attribute] else flag("no"))]
            for attribute in attributes] or [[name, rca.get("pearson"), "", None, None, "-"]]


def _segmentation_section(report: dict[str, Any]) -> str:
    entries = {n: e["segmentation"] for n, e in report["encoders"].items() if isinstance(e.get("segmentation"), dict)}
    if not entries:
        return ""
    attributes = list(dict.fromkeys(a for s in entries.values() for a in (s.get("fairness") or {})))
    plausibility = [row for n, s in entries.items() for row in _plausibility_rows(n, s)]
    rca = [row for n, s in entries.items() for row in _rca_rows(n, s)]
    return "".join([
        "<h2>Segmentation (pixel level)</h2>",
        html_table(["encoder", "structure", "Dice [95% CI]", "HD95 (mm)", "NSD"],
               [row for n, s in entries.items() for row in _structure_rows(n, s)]),
        html_note("Dice, HD95 and normalised surface distance as in Metrics Reloaded; an empty prediction of a non-empty "
              "reference scores the worst case."),
        "<h3>Dice by group</h3>" if attributes else "",
        html_table(["encoder", "attribute", "group", "n", "Dice [95% CI]", "note"],
               [row for n, s in entries.items() for row in _segmentation_fairness_rows(n, s)]) if attributes else "",
        *[html_image(figures.segmentation_group_figure(report, a), f"Dice by {a}") for a in attributes],
        html_note("Gap = max - min of the groups' mean Dice (permutation p-value); SER = max_g(1 - Dice_g) / "
              "min_g(1 - Dice_g).") if attributes else "",
        html_note("This cohort has no label maps: the Dice by group above is RCA's estimate (the head and the RCA "
              "references come from evaluate.segmentation.reference_cohort).")
        if any(s.get("fairness_source") == "rca_estimate" for s in entries.values()) else "",
        "<h3>Plausibility</h3>" if plausibility else "",
        html_table(["encoder", "subjects", "n", "topologically plausible share", "shape-prior plausible share"],
               plausibility) if plausibility else "",
        "<h3>Reverse classification accuracy (Dice without labels)</h3>" if rca else "",
        html_table(["encoder", "Pearson r (estimated vs true Dice)", "attribute", "true Dice gap", "estimated Dice gap",
                "sign right"], rca) if rca else "",
        html_image(figures.rca_figure(report), "RCA estimated vs true Dice")])


def render_html(report: dict[str, Any]) -> str:
    attributes = list(report["config"]["group_by"])
    primary = report["config"]["primary_target"]
    return html_page("rafmedia RAF report", [
        "<h1>rafmedia: robustness and fairness report</h1>",
        (f"<p class='note'>Cohort: {html.escape(report['cohort']['path'])}. Primary target: <b>{html.escape(primary)}</b>. "
        "Every number is in report.json next to this file.</p>"),
        _encoders_section(report), _raf_section(report), _probe_section(report), _adaptor_section(report),
        _robustness_section(report),
        _fairness_section(report, list(next(iter(report["encoders"].values()))["fairness"])),
        _latent_section(report, attributes), _segmentation_section(report), _datasheet_section(report),
        _planted_section(report)])


def render_report(results_dir: str | Path) -> Path:
    """Writes `report.html`, `report.md` and `summary.png` for a results folder holding `report.json`; returns the
    HTML path."""
    results_dir = Path(results_dir)
    source = results_dir / REPORT_JSON
    if not source.is_file():
        raise UserError(f"{source} not found: point `raf report` at a folder written by `raf evaluate`")
    report = read_json(source)
    if report.get("kind") == "weak_labels":  # evaluate.weak_labels: a study of its own (evaluate/weak_report.py)
        atomic_write_bytes(results_dir / "summary.png", weak_summary_figure(report))
        atomic_write_text(results_dir / REPORT_MD, render_weak_markdown(report))
        return atomic_write_text(results_dir / REPORT_HTML, render_weak_html(report))
    if report.get("kind") == "registration":  # evaluate.registration: the breathing-pair study (docs/paired.md)
        atomic_write_text(results_dir / REPORT_MD, render_registration_markdown(report))
        return atomic_write_text(results_dir / REPORT_HTML, render_registration_html(report))
    atomic_write_bytes(results_dir / "summary.png", figures.summary_figure(report))
    atomic_write_text(results_dir / REPORT_MD, render_markdown(report))
    return atomic_write_text(results_dir / REPORT_HTML, render_html(report))
