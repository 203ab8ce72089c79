"""Does paired-acquisition SSL beat single-acquisition SSL on what paired data is for: registration and segmentation?

One synthetic cohort with the breathing pair (`cohort.paired_channel=exhale`: "image" is end-inhale, "exhale" the
same body moved by a known breathing field, in another contrast, with landmarks) is split once by subject into a
pretraining/training pool and held-out test subjects. Per pretraining seed:

1. single-acquisition SSL on the inhale image of the pool: `contrastive_two_crop`, `dino_3d`;
2. paired SSL on inhale + exhale of the pool: `contrastive_paired`, `dino_paired`;
3. a random-init encoder (the same architecture, seeded).

Every encoder is frozen and scored by `rafmedia.evaluate.registration.registration_study`: a registration head on
its features (trained on the pool's pairs with their known fields), target registration error on the test
subjects' landmarks and Dice of the warped label maps; and the segmentation head's Dice on the inhale image. The
identity and the same head on raw intensities are the baselines. Per method, each test subject's score is averaged
over the pretraining seeds, then the mean and a subject-bootstrap 95% interval are reported; paired-minus-single
differences pair the test subjects.

Run:  python benchmarks/paired_ssl.py [--quick] [--seeds 3] [--steps 200] [--subjects 120] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

warnings.filterwarnings("ignore")

PAIRED_CHANNEL = "exhale"
SPLIT_SEED = 0
TEST_FRACTION = 1 / 3
STRONG_APPEARANCE = {"noise_std": 0.5, "blur_sigma": 1.0, "gamma": 0.4}  # as benchmarks/pretraining_helps.py
DINO_VIEWS = {"global_size": 32, "local_size": 16, "num_local_crops": 2, "noise_std": 0.3}
TASKS = {  # task -> options; single-acquisition first, then its paired counterpart
    "contrastive_two_crop": {"temperature": 0.1, "crop_size": 36, "max_shift": 12, **STRONG_APPEARANCE},
    "contrastive_paired": {"temperature": 0.1, "crop_size": 36, "max_shift": 0, **STRONG_APPEARANCE},
    "dino_3d": dict(DINO_VIEWS),
    "dino_paired": dict(DINO_VIEWS),
}
PAIRS = [("contrastive_paired", "contrastive_two_crop"), ("dino_paired", "dino_3d")]
RANDOM = "random-init"
METRICS = (("registration", "tre_mm", "TRE (mm)"), ("registration", "dice", "warped Dice"),
           ("segmentation", "dice", "segmentation Dice"))


@dataclass
class Preset:
    num_subjects: int = 120
    shape: int = 48
    displacement: float = 5.0  # voxels: the diaphragm's largest exhale motion (15 mm at 3 mm voxels)
    seeds: int = 3
    steps: int = 150
    batch_size: int = 8
    lr: float = 2e-3
    width: int = 16
    head_steps: int = 200
    segmentation_steps: int = 100
    bootstrap: int = 1000
    task_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> options overriding TASKS'


QUICK = Preset(num_subjects=16, shape=24, displacement=3.0, seeds=1, steps=2, batch_size=4, width=4, head_steps=20,
               segmentation_steps=10, bootstrap=200,
               task_options={"contrastive_two_crop": {"crop_size": 16, "max_shift": 4},
                             "contrastive_paired": {"crop_size": 16},
                             "dino_3d": {"global_size": 16, "local_size": 8, "num_local_crops": 1},
                             "dino_paired": {"global_size": 16, "local_size": 8, "num_local_crops": 1}})


def prepare_cohort(out: Path, preset: Preset) -> Path:
    """Generates (or resumes) the breathing-pair cohort: the default config's sites and biases at the preset size."""
    from rafmedia.launch.config import load_config
    from rafmedia.shards.synth import generate_cohort

    side = preset.shape
    config = load_config(None, [f"cohort.num_subjects={preset.num_subjects}", f"cohort.shape=[{side},{side},{side}]",
                                f"cohort.paired_channel={PAIRED_CHANNEL}",
                                f"cohort.paired_displacement={preset.displacement}"])
    path = out / "cohort"
    began = time.perf_counter()
    generate_cohort(config.cohort, store_config=config.store, out=path, progress=False)
    print(f"cohort: {path} ({preset.num_subjects} subjects of {side}^3, breathing up to {preset.displacement} voxels, "
          f"{time.perf_counter() - began:.0f} s)", flush=True)
    return path


def pretrain(task: str, preset: Preset, *, store, pool_ids: list[str], seed: int, out_dir: Path):
    """Pretrains cnn3d_small on the pool only (the building blocks of `raf pretrain`); returns (the encoder
    `raf pretrain` exports, final loss, seconds)."""
    from rafmedia.engine.batches import DataConfig, view_batches
    from rafmedia.engine.encoders import create_encoder
    from rafmedia.engine.pretrain import load_task_inputs
    from rafmedia.engine.tasks import create_task, task_data_kind
    from rafmedia.engine.train import TrainConfig, train

    began = time.perf_counter()
    kind = task_data_kind(task)
    data = DataConfig(cohort=str(store.path), channels=["image", PAIRED_CHANNEL] if kind == "paired" else [])
    train_config = TrainConfig(steps=preset.steps, batch_size=preset.batch_size, lr=preset.lr, seed=seed,
                               warmup_steps=max(1, preset.steps // 10), checkpoint_every=preset.steps,
                               log_every=max(1, preset.steps // 5), tensorboard=False)
    shutil.rmtree(out_dir, ignore_errors=True)  # a fresh run: train() would resume a finished one
    torch.manual_seed(seed)
    model = create_encoder("cnn3d_small", width=preset.width)
    pretext = create_task(task, encoder=model, **{**TASKS[task], **preset.task_options.get(task, {})})
    volumes = load_task_inputs(store, pool_ids, data, kind, progress=False)
    batches = view_batches(volumes, pretext.views, batch_size=preset.batch_size, seed=seed)
    result = train(pretext, batches, config=train_config, out_dir=out_dir, progress=False)
    exported = pretext.exported_encoder() if hasattr(pretext, "exported_encoder") else model
    encoder = result.ema if result.ema is not None else exported
    return encoder.cpu().eval(), (result.losses[-1] if result.losses else None), time.perf_counter() - began


def seed_averaged(studies: list[dict[str, Any]], part: str, metric: str) -> np.ndarray:
    """Each test subject's score averaged over the pretraining seeds (N,)."""
    return np.mean([study[part]["per_subject"][metric] for study in studies], axis=0)


def summary(studies_by_method: dict[str, list[dict[str, Any]]], baselines: dict[str, Any], bootstrap: int):
    """Per method and metric: mean and 95% interval of the seed-averaged per-subject scores; paired - single and
    each method - random differences."""
    from rafmedia.evaluate.registration import paired_difference, summarise

    methods: dict[str, Any] = {}
    for method, studies in studies_by_method.items():
        if not studies:
            continue
        per_subject = {f"{part}.{metric}": seed_averaged(studies, part, metric).tolist() for part, metric, _ in METRICS}
        methods[method] = {**summarise(per_subject, seed=0, bootstrap_resamples=bootstrap),
                           "seeds": [study["encoder"].rsplit("seed ", 1)[-1] for study in studies]}
    for name, scores in baselines.items():
        methods[name] = summarise({f"registration.{metric}": scores["per_subject"][metric]
                                   for metric in ("tre_mm", "dice")}, seed=0, bootstrap_resamples=bootstrap)
    differences = {}
    comparisons = [*PAIRS, *[(method, RANDOM) for method in studies_by_method if method != RANDOM]]
    for a, b in comparisons:
        if a in methods and b in methods:
            differences[f"{a} - {b}"] = {
                key: paired_difference(methods[a]["per_subject"][key], methods[b]["per_subject"][key], seed=0,
                                       bootstrap_resamples=bootstrap)
                for key in methods[a]["per_subject"]}
    return methods, differences


def _cell(scores: dict[str, Any], key: str) -> str:
    if key not in scores["mean"]:
        return "-"
    low, high = scores["ci95"][key]
    return f"{scores['mean'][key]:.3f} [{low:.3f}, {high:.3f}]"


def _seeds(scores: dict[str, Any]) -> str:
    return f" (seeds {', '.join(map(str, scores['seeds']))})" if "seeds" in scores else ""


def table(methods: dict[str, Any], differences: dict[str, Any]) -> str:
    keys = [f"{part}.{metric}" for part, metric, _ in METRICS]
    lines = ["| encoder | " + " | ".join(title for *_, title in METRICS) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {name}{_seeds(scores)} | " + " | ".join(_cell(scores, key) for key in keys) + " |"
              for name, scores in methods.items()]
    lines += ["", "| difference (same test subjects) | " + " | ".join(title for *_, title in METRICS) + " |",
              "|---" * (len(keys) + 1) + "|"]
    for name, diff in differences.items():
        cells = [f"{diff[key]['mean']:+.3f} [{diff[key]['ci95'][0]:+.3f}, {diff[key]['ci95'][1]:+.3f}]" for key in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from rafmedia.evaluate.mil import one_thread

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="16 subjects of 24^3, 2 steps, 1 seed: a smoke test")
    parser.add_argument("--seeds", type=int, help="pretraining seeds per task (default 3; 0: the baselines only)")
    parser.add_argument("--steps", type=int, help="pretraining steps per run (default 200)")
    parser.add_argument("--subjects", type=int, help="cohort size (default 120)")
    parser.add_argument("--tasks", default="", help="comma-separated subset of " + ", ".join(TASKS))
    parser.add_argument("--cohort", help="reuse this breathing-pair store instead of generating one under --out")
    parser.add_argument("--out", default="runs/bench_paired_ssl", help="run folder (cohort, pretraining, results)")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1 (to "
                        "run seeds in parallel processes, then --combine their folders)")
    parser.add_argument("--skip-baselines", action="store_true", help="do not score the identity and raw-intensity "
                        "baselines (a run of more seeds to --combine with one that did)")
    parser.add_argument("--combine", default="", help="comma-separated run folders of one cohort and split: pool "
                        "their studies (seeds) into one table under --out, without running anything")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else Preset()
    preset = replace(preset, seeds=preset.seeds if args.seeds is None else args.seeds, steps=args.steps or preset.steps,
                     num_subjects=args.subjects or preset.num_subjects)
    tasks = [t for t in args.tasks.split(",") if t] or list(TASKS)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.combine:
        return combine([Path(folder) for folder in args.combine.split(",")], out=out)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, 1 thread", flush=True)
    with one_thread():  # small fits on a shared box: one thread each is fastest (restored after, for tests)
        return run(preset, tasks, out=out, cohort_path=args.cohort, first_seed=args.first_seed,
                   baselines=not args.skip_baselines)


def combine(folders: list[Path], *, out: Path) -> dict[str, Any]:
    """One table from runs of other seeds on the same cohort and split (their test subjects must agree); the
    baselines are the first folder's."""
    from rafmedia.core.errors import UserError

    parts = [json.loads((folder / "results.json").read_text()) for folder in folders]
    studies: dict[str, list[dict[str, Any]]] = {}
    for part in parts:
        for method, runs in part["studies"].items():
            studies.setdefault(method, []).extend(runs)
    subjects = {tuple(study["test_subjects"]) for runs in studies.values() for study in runs}
    if len(subjects) != 1:
        raise UserError(f"--combine: the runs in {', '.join(map(str, folders))} were scored on different test "
                        "subjects; combine only runs of one cohort (--cohort) and split")
    preset = parts[0]["preset"]
    methods, differences = summary(studies, parts[0]["baselines"], preset["bootstrap"])
    result = {**parts[0], "combined_from": [str(f) for f in folders], "runs": [r for p in parts for r in p["runs"]],
              "seeds_done": sum(p["seeds_done"] for p in parts), "methods": methods, "differences": differences,
              "studies": studies, "wall_s": sum(p["wall_s"] for p in parts)}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print(table(methods, differences))
    return result


def write_results(out: Path, preset: Preset, tasks: list[str], *, seeds_done: int, num_pool: int, num_test: int,
                  runs: list[dict[str, Any]], studies: dict[str, list[dict[str, Any]]], baselines: dict[str, Any],
                  began: float) -> dict[str, Any]:
    """The summary of what is done so far, written to `out`/results.json (atomically) and returned."""
    from rafmedia.core.files import write_json

    methods, differences = summary(studies, baselines, preset.bootstrap)
    result = {"preset": asdict(preset), "seeds_done": seeds_done, "num_pool": num_pool, "num_test": num_test,
              "tasks": {t: {**TASKS[t], **preset.task_options.get(t, {})} for t in tasks}, "runs": runs,
              "methods": methods, "differences": differences, "baselines": baselines, "studies": studies,
              "wall_s": time.perf_counter() - began}
    write_json(out / "results.json", result)
    return result


def run(preset: Preset, tasks: list[str], *, out: Path, cohort_path: str | None, first_seed: int,
        baselines: bool = True) -> dict[str, Any]:
    from rafmedia.engine.encoders import create_encoder
    from rafmedia.evaluate.encoder_entries import EncoderEntry, Replicate
    from rafmedia.evaluate.registration import (RegistrationConfig, load_paired_cohort, registration_baselines,
                                                registration_study, split_subjects)
    from rafmedia.shards.store import CohortStore

    began = time.perf_counter()
    store = CohortStore(cohort_path if cohort_path else prepare_cohort(out, preset))
    ids = store.subject_ids()
    pool, test = split_subjects(len(ids), seed=SPLIT_SEED, test_fraction=TEST_FRACTION)
    config = RegistrationConfig(head_steps=preset.head_steps, segmentation_steps=preset.segmentation_steps)
    cohort = load_paired_cohort(store, ids, config)
    options = {"train_idx": pool, "test_idx": test, "bootstrap_resamples": preset.bootstrap}
    print(f"split: pool {len(pool)} (pretraining and heads), test {len(test)}; seeds {preset.seeds}, "
          f"{preset.steps} steps", flush=True)
    baselines = (registration_baselines(cohort, pool, test, config, seed=0, bootstrap_resamples=preset.bootstrap)
                 if baselines else {})
    if baselines:
        fit = baselines["raw_intensity"]["head_fit"]
        print(f"  baselines: identity TRE {baselines['identity']['mean']['tre_mm']:.2f} mm; raw-intensity head TRE "
              f"{baselines['raw_intensity']['mean']['tre_mm']:.2f} mm (fit {fit['train_mse']:.3g} vs "
              f"{fit['train_mse_zero']:.3g} at u=0, {fit['attempts']} attempt(s))", flush=True)
    write_results(out, preset, tasks, seeds_done=0, num_pool=len(pool), num_test=len(test), runs=[],
                  studies={}, baselines=baselines, began=began)
    studies: dict[str, list[dict[str, Any]]] = {name: [] for name in [*tasks, RANDOM]}
    runs = []
    for seed in range(first_seed, first_seed + preset.seeds):
        for task in [*tasks, RANDOM]:
            if task == RANDOM:
                torch.manual_seed(seed)
                encoder, loss, seconds = create_encoder("cnn3d_small", width=preset.width).eval(), None, 0.0
            else:
                encoder, loss, seconds = pretrain(task, preset, store=store, pool_ids=[ids[i] for i in pool],
                                                  seed=seed, out_dir=out / "pretrain" / f"{task}-{seed}")
            entry = EncoderEntry(name=f"{task} seed {seed}", source=task, digest="", replicates=[Replicate(seed, encoder)])
            study = registration_study(entry, cohort, config, seed=seed, **options)
            studies[task].append(study)
            runs.append({"task": task, "seed": seed, "final_loss": loss, "pretrain_s": seconds})
            registration = study["registration"]["mean"]
            fit = study["registration"]["head_fit"]
            print(f"  {task} seed {seed}: pretrain {seconds:.0f} s (loss {loss}), head fit {fit['train_mse']:.3g} vs "
                  f"{fit['train_mse_zero']:.3g} at u=0 ({fit['attempts']} attempt(s)), TRE {registration['tre_mm']:.2f} mm, "
                  f"warped Dice {registration['dice']:.3f}, segmentation Dice {study['segmentation']['mean']['dice']:.3f}"
                  f" ({time.perf_counter() - began:.0f} s so far)", flush=True)
            # after every encoder, so an interrupted run keeps what it finished (`runs` says which seeds)
            write_results(out, preset, tasks, seeds_done=seed - first_seed, num_pool=len(pool), num_test=len(test),
                          runs=runs, studies=studies, baselines=baselines, began=began)
    result = write_results(out, preset, tasks, seeds_done=preset.seeds, num_pool=len(pool), num_test=len(test),
                           runs=runs, studies=studies, baselines=baselines, began=began)
    methods, differences = result["methods"], result["differences"]
    print()
    print(table(methods, differences))
    print(f"\nwall time {result['wall_s']:.0f} s; results: {out / 'results.json'}")
    return result


if __name__ == "__main__":
    main()
