"""RCA validation: does reverse classification accuracy recover per-case Dice and a planted subgroup Dice gap?

For each seed a synthetic cohort (`rafmedia.shards.synth`, three sites, sexes 1:1) is generated; its first
`--references` subjects are the reference set (images and ground truth), the next `--test` are test cases. Each
test case gets a "predicted" label map: its ground truth damaged by `corrupt_label_map` (erosion/dilation, shift,
erased blocks, label swaps) at a severity drawn U(0, 0.7) for males and U(0.2, 1.0) for females: a planted
segmentation-quality bias against F. The true Dice of each prediction is known; RCA never sees the test ground truth.

Per (seed, method) the table prints: Pearson and Spearman correlation between the estimated and true case Dice
(the mean over heart, liver and kidney; estimate = max over references, Valindria et al. 2017), Pearson r of the
mean-of-top-3 estimate, the true and estimated group gap (mean M - mean F, signed: > 0 means F is worse), whether
the two signs agree, and the wall time of the estimation. Methods:

- voxel_classifier: random-forest reverse classifier on every reference;
- atlas_forwarding: the prediction propagated to every reference by a moment-based diagonal affine;
- neighbours_k3: voxel_classifier on the 3 references nearest in embedding space (`estimate_dice_by_neighbours`);
  the embedding is the z-scored image average-pooled to 8^3 (a stand-in for an encoder's embedding).

There is no peer library for RCA to run side by side; the methods are each other's comparison.

Run:  python benchmarks/rca_validation.py [--seeds 0,1,2] [--test 60] [--references 10] [--size 48] [--quick]
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from rafmedia.evaluate.rca import (aggregate_reference_dice, corrupt_label_map, dice_per_structure, nearest_references,
                                   reverse_dice_matrix)
from rafmedia.shards.store import StoreConfig
from rafmedia.shards.synth import LABELS, CohortConfig, SiteProfile, generate_cohort
from rafmedia.shards.volumes import load_volumes

STRUCTURES = {name: LABELS[name] for name in ("heart", "liver", "kidney")}
SEVERITY = {"M": (0.0, 0.7), "F": (0.2, 1.0)}  # the planted bias: females' predictions are damaged more
METHODS = ("voxel_classifier", "atlas_forwarding", "neighbours_k3")


@dataclass
class Row:
    seed: int
    method: str
    num_test: int
    num_references: int
    pearson_r: float
    spearman_r: float
    pearson_r_top3: float
    true_gap_m_minus_f: float
    estimated_gap_m_minus_f: float
    sign_right: bool
    wall_s: float


@dataclass
class Cohort:
    images: np.ndarray  # (N, D, H, W) z-scored
    labels: np.ndarray  # (N, D, H, W) ground truth
    sexes: np.ndarray


def build_cohort(out: Path, *, seed: int, num_subjects: int, size: int) -> Cohort:
    noise = {"site-a": 0.02, "site-b": 0.04, "site-c": 0.12}
    sites = [SiteProfile(name=name, scanner=f"scanner-{name[-1]}", noise_std=value) for name, value in noise.items()]
    config = CohortConfig(num_subjects=num_subjects, shape=[size] * 3, seed=seed, sex_ratio=1.0, workers=1,
                          lesion_radius=[2.0, 3.0], sites=sites)
    store = generate_cohort(config, store_config=StoreConfig(chunk_size=16), out=out / f"cohort_s{seed}_{size}.zarr",
                            progress=False, overwrite=True)
    ids = store.subject_ids()
    images = load_volumes(store, ids, normalize=True, progress=False)[:, 0].numpy()
    labels = np.stack([store.read_label(subject) for subject in ids])
    sex_of = {row["subject_id"]: row["sex"] for row in store.read_manifest()}
    sexes = np.array([sex_of[subject] for subject in ids])
    return Cohort(images, labels, sexes)


def damaged_predictions(labels_NDHW: np.ndarray, sexes_N: np.ndarray, *, seed: int) -> np.ndarray:
    """Each ground truth damaged at a severity drawn from its sex's planted range."""
    rng = np.random.default_rng([seed, 7])
    return np.stack([corrupt_label_map(label, severity=rng.uniform(*SEVERITY[sex]), rng=rng,
                                       structures=list(STRUCTURES.values()))
                     for label, sex in zip(labels_NDHW, sexes_N)])


def pooled_embeddings(images_NDHW: np.ndarray, side: int = 8) -> np.ndarray:
    pooled = torch.nn.functional.adaptive_avg_pool3d(torch.from_numpy(images_NDHW)[:, None], side)
    return pooled.flatten(1).numpy()


def signed_gap(values_N: np.ndarray, sexes_N: np.ndarray) -> float:
    return float(np.mean(values_N[sexes_N == "M"]) - np.mean(values_N[sexes_N == "F"]))


def evaluate_method(method: str, cohort: Cohort, *, num_references: int, seed: int) -> Row:
    reference, test = slice(0, num_references), slice(num_references, None)
    predictions = damaged_predictions(cohort.labels[test], cohort.sexes[test], seed=seed)
    true_NS = np.stack([dice_per_structure(p, g, list(STRUCTURES.values()))
                        for p, g in zip(predictions, cohort.labels[test])])
    options, neighbours = {"method": method}, None
    if method == "neighbours_k3":
        embeddings = pooled_embeddings(cohort.images)
        options["method"] = "voxel_classifier"
        neighbours = nearest_references(embeddings[test], embeddings[reference], 3)
    start = time.perf_counter()
    dice_NRS = reverse_dice_matrix(cohort.images[test], predictions, cohort.images[reference], cohort.labels[reference],
                                   structures=STRUCTURES, seed=seed, neighbours_NK=neighbours, **options)
    wall = time.perf_counter() - start
    estimate = {how: np.stack([aggregate_reference_dice(d, aggregate=how, top_k=3) for d in dice_NRS]).mean(axis=1)
                for how in ("max", "top_k_mean")}
    true_N, sexes = true_NS.mean(axis=1), cohort.sexes[test]
    true_gap, estimated_gap = signed_gap(true_N, sexes), signed_gap(estimate["max"], sexes)
    return Row(seed, method, len(true_N), num_references, float(stats.pearsonr(estimate["max"], true_N)[0]),
               float(stats.spearmanr(estimate["max"], true_N)[0]),
               float(stats.pearsonr(estimate["top_k_mean"], true_N)[0]), true_gap, estimated_gap,
               bool(np.sign(true_gap) == np.sign(estimated_gap)), wall)


def print_table(rows: list[Row]) -> None:
    print("| seed | method | n test | n ref | Pearson r | Spearman | r (top-3 mean) | true gap M-F | est. gap M-F "
          "| sign right? | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.seed} | {r.method} | {r.num_test} | {r.num_references} | {r.pearson_r:.3f} | {r.spearman_r:.3f} "
              f"| {r.pearson_r_top3:.3f} | {r.true_gap_m_minus_f:+.3f} | {r.estimated_gap_m_minus_f:+.3f} "
              f"| {'yes' if r.sign_right else 'NO'} | {r.wall_s:.1f} |")
    for method in dict.fromkeys(r.method for r in rows):
        mine = [r for r in rows if r.method == method]
        print(f"{method}: mean Pearson r {np.mean([r.pearson_r for r in mine]):.3f}, "
              f"sign right {sum(r.sign_right for r in mine)}/{len(mine)}")


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (cohort and damage)")
    parser.add_argument("--test", type=int, help="test cases per seed (default 60; --quick 16)")
    parser.add_argument("--references", type=int, help="reference cases with ground truth (default 10; --quick 5)")
    parser.add_argument("--size", type=int, help="volume side (default 48; --quick 32)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--out", default="runs/bench_rca", help="folder for the generated cohorts")
    parser.add_argument("--quick", action="store_true", help="one seed, 16 test cases, 5 references, 32^3")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    num_test = args.test or (16 if args.quick else 60)
    num_references = args.references or (5 if args.quick else 10)
    size = args.size or (32 if args.quick else 48)
    seeds = [int(s) for s in args.seeds.split(",")][: 1 if args.quick else None]
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    rows = []
    for seed in seeds:
        cohort = build_cohort(Path(args.out), seed=seed, num_subjects=num_test + num_references, size=size)
        rows.extend(evaluate_method(method, cohort, num_references=num_references, seed=seed) for method in methods)
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(row) for row in rows], indent=2))
    return rows


if __name__ == "__main__":
    main()
