"""Is the evaluator's fairness test calibrated end to end? Control cohorts (no bias planted) over many seeds.

For each seed a synthetic cohort of three sites scanned alike (same noise, same disease prevalence) is generated,
a random-init `cnn3d_small` is exported, and `raf evaluate`'s runner scores it (linear probe on disease, no
alterations, fairness by site and by sex, permutation test of each gap). Nothing was planted, so a calibrated test
gives p <= 0.05 in about 5% of seeds; the issue asks for p > 0.05 in at least 95%. With `--planted K`, K more
seeds plant a noisy site (`site-c`, noise 0.5) and the power is reported: the share of seeds with p < 0.05 and
site-c the worst group.

Everything runs through `rafmedia.evaluate.runner.run_evaluation`, embeddings included: the probe's predictions,
the groups, the bootstraps and the permutations are the evaluator's own. There is no peer library that runs this
pipeline; the reference is the nominal 5% level (a binomial interval is printed with the share).

Run:  python benchmarks/fairness_calibration.py [--seeds 40] [--planted 10] [--subjects 150]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from scipy import stats
from tqdm.auto import tqdm

from rafmedia.engine.encoders import create_encoder
from rafmedia.engine.export import export_encoder
from rafmedia.evaluate.config import EvaluateConfig
from rafmedia.evaluate.runner import run_evaluation
from rafmedia.shards.store import StoreConfig
from rafmedia.shards.synth import CohortConfig, SiteProfile, generate_cohort

METRICS = ("accuracy", "auroc")


def fairness_of(folder: Path, *, seed: int, subjects: int, noise_c: float, permutations: int) -> dict:
    sites = [SiteProfile(name=name, scanner=f"scanner-{name}", noise_std=noise, disease_prevalence=0.5)
             for name, noise in (("site-a", 0.02), ("site-b", 0.02), ("site-c", noise_c))]
    config = CohortConfig(num_subjects=subjects, shape=[32, 32, 32], seed=1000 + seed, sex_ratio=1.0, workers=1,
                          lesion_radius=[2.0, 3.0], sites=sites)
    store = generate_cohort(config, store_config=StoreConfig(chunk_size=16), out=folder / f"cohort{seed}.zarr",
                            progress=False)
    torch.manual_seed(seed)
    weights = export_encoder(create_encoder("cnn3d_small", width=16), folder / f"encoder{seed}.safetensors",
                             architecture="cnn3d_small", options={"width": 16}, card={"name": "random"})
    evaluation = EvaluateConfig(cohort=str(store.path), encoders=[str(weights)], random_baseline=False, seeds=[seed],
                                alterations=[], bootstrap_resamples=100, permutations=permutations,
                                group_by=["site", "sex"])
    return run_evaluation(evaluation, progress=False)["encoders"]["random"]["fairness"]


def p_values(fairness: dict) -> dict[str, float]:
    return {f"{attribute} {metric}": fairness[attribute]["first_replicate"][f"{metric}_gap_p_value"]
            for attribute in ("site", "sex") for metric in METRICS}


def share_line(name: str, values: list[float], *, significant: bool) -> str:
    hits = sum((p < 0.05) if significant else (p > 0.05) for p in values)
    low, high = stats.binomtest(hits, len(values)).proportion_ci(0.95)
    return f"| {name} | {hits}/{len(values)} = {hits / len(values):.1%} | [{low:.1%}, {high:.1%}] |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=40, help="control cohorts (nothing planted)")
    parser.add_argument("--planted", type=int, default=10, help="cohorts with a noisy site-c (power)")
    parser.add_argument("--subjects", type=int, default=150)
    parser.add_argument("--permutations", type=int, default=199)
    parser.add_argument("--json", type=Path, help="write every p-value here")
    args = parser.parse_args()
    torch.set_num_threads(2)

    control, planted, worst = [], [], []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        for seed in tqdm(range(args.seeds), desc="control cohorts", unit="seed"):
            control.append(p_values(fairness_of(Path(folder), seed=seed, subjects=args.subjects, noise_c=0.02,
                                                permutations=args.permutations)))
        for seed in tqdm(range(args.seeds, args.seeds + args.planted), desc="planted cohorts", unit="seed"):
            fairness = fairness_of(Path(folder), seed=seed, subjects=args.subjects, noise_c=0.5,
                                   permutations=args.permutations)
            planted.append(p_values(fairness))
            worst.append(fairness["site"]["accuracy"]["worst_group"])
    seconds = time.perf_counter() - start

    print(f"\n{args.seeds} control + {args.planted} planted cohorts, {args.subjects} subjects at 32^3, "
          f"{args.permutations} permutations; {seconds:.0f} s\n")
    print("| test (control cohorts: nothing planted) | p > 0.05 | 95% interval |\n|---|---|---|")
    for name in control[0] if control else []:
        print(share_line(name, [row[name] for row in control], significant=False))
    if planted:
        print("\n| test (planted noisy site-c) | p < 0.05 | 95% interval |\n|---|---|---|")
        for name in planted[0]:
            print(share_line(name, [row[name] for row in planted], significant=True))
        print(f"\nsite-c the worst group by accuracy: {worst.count('site-c')}/{len(worst)}")
    if args.json:
        args.json.write_text(json.dumps({"control": control, "planted": planted, "worst": worst}, indent=1))


if __name__ == "__main__":
    main()
