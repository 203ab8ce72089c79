"""Small, weakly labelled cohorts: does attention MIL on patch embeddings beat one embedding per scan, and do its
maps point into the planted lesions? (issue 16; docs/weak-labels.md)

Builds what is missing under --out, then runs the weak-label study of `raf evaluate` on the default weak-label cohort:

1. `raf synth --kind brain` (50 patients, the defaults) as the evaluated cohort;
2. a separate unlabelled brain cohort (200 subjects, another seed, no missing channel) and a contrastive encoder
   pretrained on its FLAIR channel (the SSL never sees the evaluated patients);
3. the study for that encoder, any --encoder given (e.g. the quickstart's body-pretrained encoder, as a transfer
   case) and the random-init baseline, at the settings below (reduced from the defaults to fit a 2-core box).

Prints, per encoder, QWK [95% CI] of the MIL and pooled probes, their paired difference, and the pointing-game rate of
each map against its chance rate. report.html in --out has the rest (ablations, overlays).

    python benchmarks/weak_labels.py --out runs/weak-bench --encoder runs/quickstart/pretrain/encoder.safetensors
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rafmedia.core.files import write_json
from rafmedia.evaluate.config import EvaluateConfig, WeakLabelsConfig
from rafmedia.evaluate.report import render_report
from rafmedia.evaluate.results import ResultsStore
from rafmedia.evaluate.runner import run_evaluation
from rafmedia.launch.cli import main as raf

PRETRAIN_OPTIONS = "task.options={temperature: 0.2, crop_size: 32, max_shift: 8, noise_std: 0.2, blur_sigma: 0.5, gamma: 0.2}"


def build(out: Path) -> Path:
    """The evaluated cohort and the brain-pretrained encoder, each made once (re-runs reuse them)."""
    if not (out / "brain" / "cohort.zarr" / "manifest.csv").is_file():
        assert raf(["synth", "--kind", "brain", "--out", str(out / "brain")]) == 0
    if not (out / "brain-pretrain" / "cohort.zarr" / "manifest.csv").is_file():
        assert raf(["synth", "--kind", "brain", "--out", str(out / "brain-pretrain"), "brain_cohort.num_subjects=200",
                    "brain_cohort.seed=1", "brain_cohort.missing={t1: 0.0, flair: 0.0, pet: 0.0}"]) == 0
    weights = out / "pretrain-flair" / "encoder.safetensors"
    if not weights.is_file():
        assert raf(["pretrain", "--cohort", str(out / "brain-pretrain"), "--out", str(weights.parent),
                    "data.channel=flair", PRETRAIN_OPTIONS]) == 0
    return weights


def table(report: dict) -> list[str]:
    lines = [("| encoder | MIL QWK [95% CI] | pooled QWK [95% CI] | MIL - pooled [95% CI] | attention pointing (chance) "
              "| anomaly pointing | anomaly voxel AUROC |"), "|---|---|---|---|---|---|---|"]

    def ci(value, key="mean"):
        return f"{value[key]:.3f} [{value['low']:.3f}, {value['high']:.3f}]"

    for name, entry in report["encoders"].items():
        study = entry["weak_labels"]
        local = study.get("localisation") or {}
        attention, anomaly = local.get("attention"), local.get("anomaly")
        lines.append(f"| {name} | {ci(study['probes']['attention_mil']['qwk'])} | {ci(study['probes']['pooled']['qwk'])} "
                     f"| {ci(study['mil_minus_pooled']['qwk'])} | "
                     + (f"{ci(attention['pointing'], 'rate')} ({attention['pointing']['chance']:.3f}) | "
                        f"{ci(anomaly['pointing'], 'rate')} | {ci(anomaly['auroc'])} |" if attention else "| | |"))
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/weak-bench")
    parser.add_argument("--encoder", action="append", default=[], help="more encoders to score (exports)")
    parser.add_argument("--seeds", type=int, default=3, help="repetitions of the outer CV (default 3; the study's 5)")
    parser.add_argument("--full", action="store_true", help="every default ablation (slower: about 4x)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    weights = build(out)
    weak = WeakLabelsConfig(enabled=True, seeds=list(range(args.seeds)))
    if not args.full:
        weak.inner_folds, weak.fusions, weak.noise_levels = 2, ["late", "early"], [0.0, 0.2, 0.4]
    config = EvaluateConfig(cohort=str(out / "brain" / "cohort.zarr"), encoders=[str(weights), *args.encoder],
                            weak_labels=weak, seeds=[0])
    began = time.perf_counter()
    report = run_evaluation(config, progress=True, results=ResultsStore(out / "study" / "results.sqlite"))
    write_json(out / "study" / "report.json", report)
    html = render_report(out / "study")
    print("\n".join(table(report)))
    print(f"\n{time.perf_counter() - began:.0f} s; report: {html}")
    print(json.dumps({name: e["headline"] for name, e in report["encoders"].items()}, indent=1))
    return report


if __name__ == "__main__":
    main()
