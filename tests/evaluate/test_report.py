"""The report renderer: every part of report.json reaches report.html and report.md, older files still render,
and null values show as "n/a".

The report dictionary is built from the project's own pieces (datasheet, k-NN OOD score, segmentation fairness,
plausibility by group, degradation, corruption summary) on seeded random inputs, so its layout is the one
`raf evaluate` writes; the checks compare what is shown with independent counts (collections.Counter, numpy,
scipy) or with the input numbers.
"""
from __future__ import annotations

import copy
import html
import re
from collections import Counter

import numpy as np
import pytest
from scipy import stats

from rafmedia.core.files import write_json
from rafmedia.evaluate import figures
from rafmedia.evaluate.fairness import segmentation_fairness
from rafmedia.evaluate.latent import knn_ood_score
from rafmedia.evaluate.group_metrics import summarize_group_values
from rafmedia.evaluate.plausibility import plausibility_by_group
from rafmedia.evaluate.raf import RAF_FORMULA, degradation
from rafmedia.evaluate.rca import estimated_gap
from rafmedia.evaluate.report import render_html, render_report
from rafmedia.evaluate.report_md import render_markdown
from rafmedia.evaluate.robustness import corruption_summary
from rafmedia.shards.datasheet import DatasheetConfig, compute_datasheet

SITES = ("site-a", "site-b", "site-c")
ALTERATIONS = ("gaussian_noise", "bias_field")
SEVERITIES = [1, 2, 3, 4, 5]
ENCODERS = ("enc-a", "random-init")
STRUCTURES = ("heart", "liver")
PNG = "data:image/png;base64,"


def f3(value: float) -> str:
    return f"{value:.3f}"


# ---- building a report.json dictionary ---------------------------------------------------------------------
def make_rows(rng: np.random.Generator, num_subjects: int = 36) -> list[dict]:
    """Manifest rows; the last subject is at a rare fourth site and has no recorded sex."""
    rows = [{"subject_id": f"s{i:02d}", "site": SITES[i % 3], "sex": "F" if rng.random() < 0.4 else "M",
             "age": int(rng.integers(20, 80)), "disease": int(rng.random() < 0.4)} for i in range(num_subjects)]
    rows.append({"subject_id": "s99", "site": "site-d", "sex": "", "age": 50, "disease": 0})
    return rows


def make_fairness_grouping(rng: np.random.Generator, groups: list[str]) -> dict:
    out = {}
    for group in groups:
        accuracy, auroc = rng.uniform(0.4, 0.9, 3).tolist(), rng.uniform(0.4, 0.9, 3).tolist()
        out[group] = {"n_test": 8.0, "accuracy": float(np.mean(accuracy)), "auroc": float(np.mean(auroc)),
                      "accuracy_per_replicate": accuracy, "auroc_per_replicate": auroc,
                      "first_replicate": {"accuracy": accuracy[0], "auroc": auroc[0], "ci95": {
                          "accuracy": [accuracy[0] - 0.2, accuracy[0] + 0.1], "auroc": [auroc[0] - 0.3, auroc[0] + 0.05]}},
                      "small_group": group == groups[-1]}
    return {"groups": out, "accuracy": summarize_group_values({g: v["accuracy"] for g, v in out.items()}),
            "auroc": summarize_group_values({g: v["auroc"] for g, v in out.items()}),
            "first_replicate": {"accuracy_gap": 0.21, "accuracy_gap_p_value": 0.043, "auroc_gap": 0.3,
                                "auroc_gap_p_value": 0.2, "demographic_parity_difference": 0.1,
                                "demographic_parity_p_value": 0.5, "equalized_odds_difference": 0.2,
                                "equalized_odds_p_value": 0.6}}


def make_robustness(rng: np.random.Generator) -> dict:
    clean = float(rng.uniform(0.7, 0.9))
    out = {"clean": {"auroc": clean, "balanced_accuracy": clean - 0.1}}
    for name in ALTERATIONS:
        auroc = np.sort(rng.uniform(0.5, clean, 5))[::-1].tolist()
        out[name] = {"severity": SEVERITIES, "parameter": [0.1] * 5, "auroc": auroc,
                     "balanced_accuracy": [a - 0.1 for a in auroc], "cosine": rng.uniform(0.9, 1, 5).tolist(),
                     "drift": rng.uniform(0, 1, 5).tolist(),
                     "degradation": degradation(clean, dict(zip(SEVERITIES, auroc)))}
    return out


def make_segmentation(rng: np.random.Generator, rows: list[dict], *, mean_form: bool) -> dict:
    """Segmentation results of the regular subjects; `mean_form` writes per-structure values as {"mean",
    "median"} summaries (`aggregate_structures`) instead of bare numbers."""
    rows = rows[:-1]
    dice_N = rng.uniform(0.55, 0.95, len(rows))
    estimated_N = np.clip(dice_N + rng.normal(0, 0.05, len(rows)), 0, 1)
    groups = {a: np.array([row[a] for row in rows]) for a in ("sex", "site")}
    per_structure = {}
    for structure in STRUCTURES:
        dice, hd95, nsd = float(rng.uniform(0.6, 0.9)), float(rng.uniform(2, 9)), float(rng.uniform(0.5, 1))
        per_structure[structure] = ({"dice": {"mean": dice, "median": dice}, "hd95": {"mean": hd95, "median": hd95},
                                     "nsd": {"mean": nsd, "median": nsd}} if mean_form else
                                    {"dice": dice, "hd95": hd95, "nsd": nsd})
        per_structure[structure]["dice_ci95"] = [dice - 0.05, dice + 0.04]
    plausible_N = rng.random(len(rows)) < 0.8
    return {
        "structures": list(STRUCTURES), "per_structure": per_structure,
        "fairness": {a: segmentation_fairness(dice_N, g, seed=0, num_resamples=100, num_permutations=100,
                                              min_group_size=5) for a, g in groups.items()},
        "plausibility": {"topology_share": float(plausible_N.mean()), "shape_prior_share": None,
                         "by_group": {a: plausibility_by_group(plausible_N, g) for a, g in groups.items()}},
        "rca": {"pearson": float(stats.pearsonr(dice_N, estimated_N)[0]), "true_dice": dice_N.tolist(),
                "estimated_dice": estimated_N.tolist(),
                "true_gap": {a: estimated_gap(dice_N, g)["gap"] for a, g in groups.items()},
                "estimated_gap": {a: estimated_gap(estimated_N, g)["gap"] for a, g in groups.items()},
                "sign_right": {"sex": True, "site": False}}}


def make_encoder(rng: np.random.Generator, rows: list[dict], *, extras: bool) -> dict:
    emb_ND = rng.normal(size=(len(rows), 6))
    projection_N2 = (emb_ND - emb_ND.mean(0)) @ np.linalg.svd(emb_ND - emb_ND.mean(0), full_matrices=False)[2][:2].T
    probes = {t: {"auroc": {"mean": float(rng.uniform(0.6, 0.9)), "std": 0.05}, "accuracy": {"mean": 0.7, "std": 0.1},
                  "balanced_accuracy": {"mean": 0.65, "std": 0.1}, "per_seed": []} for t in ("disease", "sex")}
    if extras:
        probes["disease"]["knn"] = {"auroc": {"mean": 0.612, "std": 0.031}}
        probes["disease"]["few_shot"] = {"1.0": {"auroc": {"mean": 0.801, "std": 0.02}},
                                         "0.01": {"auroc": {"mean": 0.523, "std": 0.09}},
                                         "0.1": {"auroc": {"mean": 0.687, "std": 0.04}}}
    latent = {"rankme": 4.2, "embed_dim": 6, "knn_ood": knn_ood_score(emb_ND[:20], emb_ND[20:], k=5)[1],
              "projection": {"x": projection_N2[:, 0].tolist(), "y": projection_N2[:, 1].tolist()}}
    for attribute, groups in (("sex", ["F", "M"]), ("site", list(SITES))):
        latent[attribute] = {"leakage_auroc": float(rng.uniform(0.5, 0.9)), "silhouette": float(rng.uniform(-0.1, 0.3)),
                             "frechet": {"groups": groups, "matrix": np.eye(len(groups)).tolist(),
                                         "mean_to_others": {g: float(rng.uniform(1, 5)) for g in groups},
                                         "farthest": groups[-1]}}
    index = float(rng.uniform(0.3, 0.8))
    return {"source": "x", "probes": probes, "robustness": make_robustness(rng), "latent": latent,
            "fairness": {"sex": make_fairness_grouping(rng, ["F", "M"]), "site": make_fairness_grouping(rng, list(SITES)),
                         "sex x site": make_fairness_grouping(rng, ["F & site-a", "M & site-a"])},
            "raf": {"index": index, "performance": 0.5, "robustness": 0.6, "fairness": 0.7,
                    "index_ci95": [index - 0.11, index + 0.07], "performance_ci95": [0.4, 0.6],
                    "robustness_ci95": [0.5, 0.7], "fairness_ci95": [0.6, 0.8]},
            "segmentation": make_segmentation(rng, rows, mean_form=not extras)}


def make_report(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    rows = make_rows(rng)
    encoders = {name: make_encoder(rng, rows, extras=name == ENCODERS[0]) for name in ENCODERS}
    errors = {n: {a: [1 - v for v in e["robustness"][a]["balanced_accuracy"]] for a in ALTERATIONS}
              for n, e in encoders.items()}
    for name, entry in encoders.items():
        summary = corruption_summary(errors[name], errors[ENCODERS[-1]], clean_error=0.3, baseline_clean_error=0.35)
        entry["robustness_summary"] = {"mce": summary["mce"], "relative_mce": summary["relative_mce"]}
        for alteration in ALTERATIONS:
            entry["robustness"][alteration].update(corruption_error=summary["ce"][alteration],
                                                   relative_corruption_error=summary["relative_ce"][alteration])
    datasheet = compute_datasheet(rows, config=DatasheetConfig(), title="toy", read_sample=None, progress=False)
    return {"cohort": {"path": "/data/toy.zarr", "num_subjects": len(rows), "counts": {}, "planted": None,
                       "subjects": {key: [row[key] for row in rows] for key in ("subject_id", "site", "sex")},
                       "datasheet": datasheet, "rows_for_test": rows},
            "config": {"group_by": ["sex", "site"], "primary_target": "disease",
                       "raf_weights": {"performance": 1.0, "robustness": 1.0, "fairness": 1.0}},
            "encoders": encoders}


def strip_new_keys(report: dict) -> dict:
    """The report as the evaluator wrote it before the projection, datasheet, robustness summary, kNN OOD,
    silhouette, probe variants, degradation and segmentation were added."""
    old = copy.deepcopy(report)
    for key in ("subjects", "datasheet"):
        old["cohort"].pop(key)
    for entry in old["encoders"].values():
        for key in ("robustness_summary", "segmentation"):
            entry.pop(key)
        for key in ("projection", "knn_ood"):
            entry["latent"].pop(key)
        for attribute in ("sex", "site"):
            entry["latent"][attribute].pop("silhouette")
        for probe in entry["probes"].values():
            probe.pop("knn", None)
            probe.pop("few_shot", None)
        for name in ALTERATIONS:
            entry["robustness"][name].pop("degradation")
    return old


@pytest.fixture(scope="module")
def report() -> dict:
    return make_report()


@pytest.fixture(scope="module")
def page(report) -> str:
    return render_html(report)


@pytest.fixture(scope="module")
def markdown(report) -> str:
    return render_markdown(report)


# ---- tests --------------------------------------------------------------------------------------------
def test_html_has_every_new_section_with_its_numbers(report, page):
    for heading in ("2D projection of the embeddings", "Datasheet", "Segmentation (pixel level)", "Few-shot probes",
                    "k-NN out-of-distribution", "Plausibility", "Reverse classification accuracy"):
        assert heading in page, heading
    first, baseline = (report["encoders"][n] for n in ENCODERS)
    for name in ALTERATIONS:
        assert f"<td>{f3(first['robustness'][name]['degradation'])}</td>" in page
    summary = first["robustness_summary"]
    assert f"<td>{f3(summary['mce'])}</td><td>{f3(summary['relative_mce'])}</td>" in page
    assert f"<td>{f3(first['latent']['site']['silhouette'])}</td>" in page
    assert f"<td>{f3(first['latent']['knn_ood']['auroc'])}</td>" in page
    # few-shot columns in numeric order (1%, 10%, 100%), whatever the order of the keys
    assert "AUROC, 1% of labels</th><th>AUROC, 10% of labels</th><th>AUROC, 100% of labels" in page
    assert "<td>0.523 ± 0.090</td><td>0.687 ± 0.040</td><td>0.801 ± 0.020</td>" in page
    assert "<td>0.612 ± 0.031</td>" in page
    # segmentation: a bare-number and a {"mean", "median"} per-structure layout both show the mean
    for entry in (first, baseline):
        heart = entry["segmentation"]["per_structure"]["heart"]
        dice = heart["dice"]["mean"] if isinstance(heart["dice"], dict) else heart["dice"]
        assert f"{f3(dice)} [{f3(heart['dice_ci95'][0])}, {f3(heart['dice_ci95'][1])}]" in page
    site = first["segmentation"]["fairness"]["site"]
    assert f"gap {f3(site['dice']['gap'])} (p {f3(site['dice']['p_value_gap'])})" in page
    assert f"SER {f3(site['skewed_error_rate']['value'])}" in page
    assert f"<td>{f3(first['segmentation']['plausibility']['topology_share'])}</td>" in page
    assert f"<td>{f3(first['segmentation']['rca']['pearson'])}</td>" in page


def test_html_escapes_group_names_once(page):
    assert html.escape("F & site-a") in page
    assert "&amp;amp;" not in page


def test_datasheet_crosstab_matches_the_manifest(report, page):
    rows = report["cohort"]["rows_for_test"]
    counts = Counter((row["site"], row["sex"] or "(missing)") for row in rows)
    sites, sexes = sorted({s for s, _ in counts}), sorted({s for _, s in counts})
    assert "(missing)" in sexes and "site-d" in sites
    assert f"<tr><th>site \\ sex</th>{''.join(f'<th>{s}</th>' for s in sexes)}</tr>" in page
    for site in sites:
        shown = re.search(rf"<tr><td>{site}</td>((?:<td>.*?</td>){{{len(sexes)}}})</tr>", page)
        assert shown is not None, site
        cells = re.findall(r"<td>(.*?)</td>", shown.group(1))
        assert [int(re.match(r"(?:<span class='flag'>)?(\d+)", c).group(1)) for c in cells] == \
               [counts[(site, sex)] for sex in sexes]
    # the one subject at site-d is under 5%: a rare category, flagged by name
    assert "<span class='flag'>site = site-d</span>" in page
    missing_sex = sum(row["sex"] == "" for row in rows)
    assert f"<tr><td>sex</td><td>{missing_sex}</td><td>{f3(missing_sex / len(rows))}</td></tr>" in page


def test_markdown_summary_holds_the_headline_numbers(report, markdown):
    first = report["encoders"][ENCODERS[0]]
    raf = first["raf"]
    assert RAF_FORMULA in markdown
    assert f"| {f3(raf['index'])} [{f3(raf['index_ci95'][0])}, {f3(raf['index_ci95'][1])}] |" in markdown
    assert f"| {f3(first['probes']['disease']['auroc']['mean'])} ± 0.050 |" in markdown
    site = first["fairness"]["site"]
    assert (f"| {ENCODERS[0]} | site | {f3(site['accuracy']['gap'])}, 0.210 (p 0.043) | "
            f"{f3(site['auroc']['gap'])}, 0.300 (p 0.200) | {site['accuracy']['worst_group']} |") in markdown
    degradations = " | ".join(f3(first["robustness"][a]["degradation"]) for a in ALTERATIONS)
    assert f"| {ENCODERS[0]} | {degradations} | {f3(first['robustness_summary']['mce'])} |" in markdown
    latent = first["latent"]["sex"]
    assert f"| {ENCODERS[0]} | sex | {f3(latent['leakage_auroc'])} | {f3(latent['silhouette'])} |" in markdown
    segmentation = first["segmentation"]
    mean_dice = np.mean([s["dice"] for s in segmentation["per_structure"].values()])
    sex = segmentation["fairness"]["sex"]
    assert (f"| {ENCODERS[0]} | {f3(mean_dice)} | {f3(segmentation['plausibility']['topology_share'])} | "
            f"{f3(segmentation['rca']['pearson'])} | sex | {f3(sex['dice']['gap'])} | {f3(sex['dice']['p_value_gap'])} | "
            f"{sex['dice']['worst_group']} | {f3(sex['skewed_error_rate']['value'])} |") in markdown
    assert len(markdown.splitlines()) < 80  # about a page


def test_new_figures_are_embedded_and_old_report_json_still_renders(report, page):
    old = strip_new_keys(report)
    old_page = render_html(old)
    seg_attributes = len(report["encoders"][ENCODERS[0]]["segmentation"]["fairness"])
    # one projection per group_by attribute, one Dice-by-group figure per attribute, one RCA figure
    assert page.count(PNG) == old_page.count(PNG) + 2 + seg_attributes + 1
    for heading in ("RAF index", "Robustness", "Fairness", "Label-free latent tests"):
        assert f"<h2>{heading}" in old_page
    for heading in ("Datasheet", "Segmentation (pixel level)", "2D projection", "Few-shot", "k-NN out-of-distribution"):
        assert heading not in old_page
    assert "mCE</th>" not in old_page
    old_markdown = render_markdown(old)
    assert "## Segmentation" not in old_markdown and "## Robustness" in old_markdown and "mCE" not in old_markdown


def test_null_values_render_as_na_through_report_json(report, tmp_path):
    broken = copy.deepcopy(report)
    first = broken["encoders"][ENCODERS[0]]
    first["raf"]["index"], first["raf"]["index_ci95"] = None, None
    first["robustness"]["gaussian_noise"]["degradation"] = float("nan")  # write_json stores NaN as null
    first["robustness"]["bias_field"]["auroc"][2] = None
    first["robustness_summary"] = {"mce": None, "relative_mce": float("nan")}
    first["latent"]["sex"]["silhouette"] = None
    first["latent"]["site"]["frechet"]["mean_to_others"] = {"site-a": None}
    first["fairness"]["site"]["groups"]["site-a"]["n_test"] = None
    first["fairness"]["site"]["groups"]["site-b"]["first_replicate"]["ci95"]["accuracy"] = [None, None]
    first["probes"]["disease"]["few_shot"]["0.1"] = {"auroc": {"mean": None, "std": None}}
    segmentation = first["segmentation"]
    segmentation["rca"]["pearson"] = None
    segmentation["rca"]["estimated_dice"][0] = None
    segmentation["fairness"]["site"]["dice"]["groups"]["site-a"]["value"] = None
    segmentation["fairness"]["site"]["skewed_error_rate"]["value"] = float("nan")
    segmentation["fairness"]["sex"]["skewed_error_rate"].update(value=float("inf"), infinite=True)  # a perfect group
    segmentation["per_structure"]["liver"]["hd95"] = None
    broken["encoders"][ENCODERS[1]]["latent"]["projection"]["x"][0] = None
    write_json(tmp_path / "report.json", broken)

    page = render_report(tmp_path).read_text(encoding="utf-8")
    markdown = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert (tmp_path / "summary.png").read_bytes().startswith(b"\x89PNG")
    assert f"<tr><td>{ENCODERS[0]}</td><td>n/a [n/a, n/a]</td>" in page
    assert f"<td>n/a</td><td>{f3(first['robustness']['gaussian_noise']['corruption_error'])}</td>" in page
    assert "<td>n/a ± n/a</td>" in page and "RCA" in page and "SER n/a" in page and "SER infinite" in page
    assert f"| {ENCODERS[0]} | n/a [n/a, n/a] |" in markdown
    assert f"| {ENCODERS[0]} | n/a | {f3(first['robustness']['bias_field']['degradation'])} | n/a | n/a |" in markdown
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    for shown in (text, markdown):
        assert not re.search(r"\b(nan|NaN|None|inf|Infinity)\b", shown)


def test_group_bars_use_the_first_replicates_bootstrap_interval(report):
    values, errors, what = figures.group_bars(report, "site", "accuracy")
    assert "bootstrap" in what
    for name, entry in report["encoders"].items():
        groups = entry["fairness"]["site"]["groups"]
        first = [groups[g]["first_replicate"]["accuracy"] for g in SITES]
        low, high = zip(*(groups[g]["first_replicate"]["ci95"]["accuracy"] for g in SITES))
        np.testing.assert_allclose(values[name], first)
        np.testing.assert_allclose(errors[name], [np.subtract(first, low), np.subtract(high, first)])
    # without intervals (older report.json): mean over replicates +- their population std
    old = copy.deepcopy(report)
    for entry in old["encoders"].values():
        for g in entry["fairness"]["site"]["groups"].values():
            g["first_replicate"]["ci95"]["accuracy"] = [None, None]
    values, errors, what = figures.group_bars(old, "site", "accuracy")
    groups = old["encoders"][ENCODERS[0]]["fairness"]["site"]["groups"]
    assert "std" in what
    np.testing.assert_allclose(values[ENCODERS[0]], [groups[g]["accuracy"] for g in SITES])
    np.testing.assert_allclose(errors[ENCODERS[0]], [np.std(groups[g]["accuracy_per_replicate"]) for g in SITES])


def test_interval_errors_clip_outside_values_and_blank_undefined_intervals():
    errors_2N = figures.interval_errors([0.5, 0.9, None, 0.4], [[0.3, 0.6], [0.95, 1.0], [0.1, 0.2], None])
    np.testing.assert_allclose(errors_2N, [[0.2, 0.0, 0.0, 0.0], [0.1, 0.1, 0.0, 0.0]])


def test_optional_figures_are_none_without_their_data(report):
    old = strip_new_keys(report)
    assert figures.projection_figure(old, "site") is None
    assert figures.segmentation_group_figure(old, "site") is None
    assert figures.rca_figure(old) is None
    mismatched = copy.deepcopy(report)
    for entry in mismatched["encoders"].values():
        entry["latent"]["projection"]["x"].pop()
    assert figures.projection_figure(mismatched, "site") is None
    assert figures.projection_figure(report, "site").startswith(b"\x89PNG")
    assert figures.projection_figure(report, "age") is None  # not a column of cohort.subjects
