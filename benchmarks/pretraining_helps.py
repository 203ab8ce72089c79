"""Does pretraining help? A linear probe at 10% of the labels on each pretext task's encoder vs a random encoder.

One synthetic cohort (the default config, 300 subjects of 64^3, plus the paired second channel when the
generator has that option) is split once by subject into a train pool and a test set, stratified by disease.
For each task of `SETTINGS`:

1. pretrain its encoder on the train pool only (the same building blocks as `raf pretrain`, fed only the pool's
   volumes; the test subjects are never read by the pretext task);
2. embed the pool and the test set with the pretrained encoder and with a random encoder of the same
   architecture, built with the same seed (so it is exactly the pretraining's starting point);
3. per draw (`--repeats`, seeded), fit the logistic probe (`create_probe("logistic")`) on a stratified 10% of the
   pool's labels and score AUROC on the test set, for disease (primary) and sex;
4. compare pretrained with random over the draws: mean, sd, difference and a two-sided Wilcoxon signed-rank test
   of the paired per-draw differences (the draws are the only randomness: one pretraining seed, one test set).

What a task embeds for the probe follows its data tag: "image" and "paired" tasks embed the image channel
(z-scored per volume, `extract_embeddings`); "label" tasks embed the one-hot label maps.

Run:  python benchmarks/pretraining_helps.py [--tasks a,b] [--cohort STORE] [--out DIR] [--repeats 10] [--steps N] [--quick]
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

LABEL_FRACTION = 0.1
MIN_LABELLED_PER_CLASS = 3  # the probe's inner 3-fold CV needs a few of each class (matters only for --quick)
TEST_FRACTION = 1 / 3
SPLIT_SEED = 0
PAIRED_CHANNEL = "exhale"
TARGETS = ("disease", "sex")


@dataclass
class TaskSettings:
    """How one pretext task is pretrained for this benchmark (the per-task settings table)."""

    encoder: str = "cnn3d_small"
    encoder_options: dict[str, Any] = field(default_factory=lambda: {"width": 16})
    options: dict[str, Any] = field(default_factory=dict)
    steps: int = 300
    batch_size: int = 16
    lr: float = 2e-3
    warmup_steps: int = 30


# Strong per-view appearance augmentation recurs below: with light augmentation the contrastive encoders matched
# each site's noise and contrast instead of anatomy (configs/default.yaml, benchmarks/RESULTS.md).
STRONG_APPEARANCE = {"noise_std": 0.5, "blur_sigma": 1.0, "gamma": 0.4}

# Steps and batch sizes fit the whole run in about 20-40 min on the shared 2-core CPU box; patch-based tasks (jigsaw,
# CPC) encode 8-9 patches per sample, so they get batches of 8. What was tried per task, and which tasks still do not
# beat the random encoder: benchmarks/RESULTS.md, "Does pretraining help? (linear probe at 10% labels)".
SETTINGS: dict[str, TaskSettings] = {
    "contrastive_two_crop": TaskSettings(
        # the quickstart's options; at 150 and 400 steps it did not beat random at 10% labels, at 800 it does
        options={"temperature": 0.1, "crop_size": 44, "max_shift": 20, **STRONG_APPEARANCE}, steps=800),
    "rotation": TaskSettings(options={"crop_size": 40, "noise_std": 0.3}, steps=300),
    "relative_patch_location": TaskSettings(options={"patch_size": 16, "gap": 3, "jitter": 2, "noise_std": 0.2},
                                            steps=150),
    "jigsaw_3d": TaskSettings(options={"grid": 2, "cell_size": 24, "jitter": 4, "noise_std": 0.5}, steps=150,
                              batch_size=8),
    "cpc_3d": TaskSettings(options={"grid": 3, "patch_size": 20, "stride": 20, "noise_std": 0.5,
                                    "intensity_scale": 0.3, "intensity_shift": 0.3}, steps=150, batch_size=8),
    "exemplar": TaskSettings(options={"crop_size": 44, "max_shift": 20, **STRONG_APPEARANCE}, steps=120),
    "dino_3d": TaskSettings(options={"global_size": 32, "local_size": 16, "num_local_crops": 2, "noise_std": 0.3},
                            steps=120),
    # The ViT takes whole 64^3 volumes (img_size is fixed), so the probe embeds exactly what MAE trained on.
    # 16^3 patches (64 tokens): 8^3 patches (512 tokens) cost 5 s a step here.
    "mae_3d": TaskSettings(encoder="vit_3d",
                           encoder_options={"img_size": 64, "patch_size": 16, "hidden_size": 96, "num_layers": 4,
                                            "num_heads": 3},
                           options={"mask_ratio": 0.75}, steps=250, lr=1e-3),
    "contrastive_paired": TaskSettings(
        options={"temperature": 0.1, "crop_size": 44, "max_shift": 20, **STRONG_APPEARANCE}, steps=300),
    "shape_prior_dae": TaskSettings(encoder_options={"width": 16, "in_channels": 6},
                                    options={"num_classes": 6, "crop_size": 32}, steps=400),
}


@dataclass
class Preset:
    num_subjects: int = 300
    shape: int = 64
    steps: int | None = None  # None: each task's own
    batch_size: int | None = None
    repeats: int = 10
    tasks: tuple[str, ...] = tuple(SETTINGS)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> options overriding SETTINGS'


# Crops that fit 32^3 volumes; the figures of a --quick run mean nothing.
QUICK = Preset(num_subjects=36, shape=32, steps=3, batch_size=4, repeats=3, tasks=("rotation", "contrastive_two_crop"),
               options={"rotation": {"crop_size": 24}, "contrastive_two_crop": {"crop_size": 24, "max_shift": 4}})


@dataclass
class Row:
    task: str
    encoder: str
    steps: int
    pretrain_s: float
    final_loss: float | None
    auroc: dict[str, dict[str, list[float]]]  # target -> {"pretrained": per-draw AUROCs, "random": ...}
    settings: dict[str, Any]

    def summary(self, target: str) -> dict[str, float]:
        from scipy.stats import wilcoxon

        pretrained, random = np.asarray(self.auroc[target]["pretrained"]), np.asarray(self.auroc[target]["random"])
        differences = pretrained - random
        p_value = float("nan") if np.allclose(differences, 0) else float(wilcoxon(pretrained, random).pvalue)
        return {"pretrained": pretrained.mean(), "pretrained_sd": pretrained.std(ddof=1) if len(pretrained) > 1 else 0.0,
                "random": random.mean(), "random_sd": random.std(ddof=1) if len(random) > 1 else 0.0,
                "difference": differences.mean(), "p_value": p_value,
                "beats": bool(differences.mean() > 0 and p_value < 0.05)}


# ---- cohort and split ------------------------------------------------------------------------------
def prepare_cohort(out: Path, preset: Preset) -> Path:
    """Generates (or resumes) the benchmark's cohort: the default config's sites and biases at the preset size."""
    import dataclasses

    from rafmedia.launch.config import load_config
    from rafmedia.shards.synth import CohortConfig, generate_cohort

    overrides = [f"cohort.num_subjects={preset.num_subjects}", f"cohort.shape=[{preset.shape},{preset.shape},{preset.shape}]"]
    if "paired_channel" in {f.name for f in dataclasses.fields(CohortConfig)}:
        overrides.append(f"cohort.paired_channel={PAIRED_CHANNEL}")
    config = load_config(None, overrides)
    path = out / "cohort"
    began = time.perf_counter()
    generate_cohort(config.cohort, store_config=config.store, out=path, progress=False)
    print(f"cohort: {path} ({preset.num_subjects} subjects of {preset.shape}^3, ready in "
          f"{time.perf_counter() - began:.0f} s)", flush=True)
    return path


def split_pool_and_test(rows: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    from rafmedia.evaluate.cohort_data import binary_labels

    indices = np.arange(len(rows))
    return train_test_split(indices, test_size=TEST_FRACTION, stratify=binary_labels(rows, "disease"),
                            random_state=SPLIT_SEED)


def channels_of(store, subject_id: str) -> list[str]:
    from rafmedia.core.errors import UserError

    present = []
    for channel in ("image", PAIRED_CHANNEL):
        try:
            store.shape(subject_id, channel)
            present.append(channel)
        except (KeyError, UserError, FileNotFoundError):
            pass
    return present


# ---- pretraining on the pool -----------------------------------------------------------------------
def pretrain_on_pool(task: str, settings: TaskSettings, *, store, pool_ids: list[str], out_dir: Path,
                     seed: int = 0, monitor_every: int = 0,
                     monitor_subjects: int = 32) -> tuple[torch.nn.Module, float | None]:
    """`pretrain_encoder`'s memory path, fed the pool's volumes only. Returns (trained encoder, final loss).

    `monitor_every` > 0 logs the collapse / site-shortcut monitors (`rafmedia.engine.monitors`) of a fixed set of
    `monitor_subjects` pool subjects to out_dir/metrics.jsonl every so many steps."""
    from rafmedia.engine.batches import DataConfig, view_batches
    from rafmedia.engine.encoders import EncoderConfig, create_encoder
    from rafmedia.engine.monitors import build_monitor
    from rafmedia.engine.pretrain import load_task_inputs, validate_pretraining
    from rafmedia.engine.tasks import TaskConfig, create_task, task_data_kind
    from rafmedia.engine.train import TrainConfig, train

    kind = task_data_kind(task)
    data = DataConfig(cohort=str(store.path), channels=["image", PAIRED_CHANNEL] if kind == "paired" else [])
    train_config = TrainConfig(steps=settings.steps, batch_size=settings.batch_size, lr=settings.lr, seed=seed,
                               warmup_steps=min(settings.warmup_steps, settings.steps // 4),
                               checkpoint_every=settings.steps, log_every=max(1, settings.steps // 10),
                               tensorboard=False, monitor_every=monitor_every, monitor_subjects=monitor_subjects)
    encoder_config = EncoderConfig(name=settings.encoder, options=settings.encoder_options)
    validate_pretraining(data, encoder_config, TaskConfig(name=task, options=settings.options), train_config)
    shutil.rmtree(out_dir, ignore_errors=True)  # a fresh run: train() would resume a finished one and skip it
    torch.manual_seed(seed)
    model = create_encoder(settings.encoder, **settings.encoder_options)
    pretext = create_task(task, encoder=model, **settings.options)
    volumes = load_task_inputs(store, pool_ids, data, kind, progress=False)
    batches = view_batches(volumes, pretext.views, batch_size=settings.batch_size, seed=seed)
    monitor = build_monitor(store, every=monitor_every, count=monitor_subjects, seed=seed, subject_ids=pool_ids,
                            num_classes=getattr(pretext, "num_classes", None) if kind == "label" else None)
    result = train(pretext, batches, config=train_config, out_dir=out_dir, progress=False, monitor=monitor)
    encoder = result.ema if result.ema is not None else model
    return encoder.cpu().eval(), (result.losses[-1] if result.losses else None)


def random_encoder(settings: TaskSettings, seed: int = 0) -> torch.nn.Module:
    """The pretraining's starting point: same architecture, options and seed, never trained."""
    from rafmedia.engine.encoders import create_encoder

    torch.manual_seed(seed)
    return create_encoder(settings.encoder, **settings.encoder_options).eval()


# ---- embeddings and probes -------------------------------------------------------------------------
def probe_inputs(store, subject_ids: list[str], kind: str) -> torch.Tensor:
    """What the probe's encoder sees: raw image volumes (z-scored in `embed`), or label maps for label tasks."""
    from rafmedia.shards.volumes import load_volumes

    if kind == "label":
        return torch.stack([torch.from_numpy(np.asarray(store.read_label(s), dtype=np.int64)) for s in subject_ids])
    return load_volumes(store, subject_ids, normalize=False, progress=False)


@torch.no_grad()
def embed(encoder: torch.nn.Module, inputs: torch.Tensor, kind: str, num_classes: int,
          batch_size: int = 16) -> np.ndarray:
    from rafmedia.evaluate.embed import extract_embeddings

    if kind != "label":
        return extract_embeddings(encoder, inputs, batch_size=batch_size)
    encoder.eval()
    chunks = []
    for start in range(0, len(inputs), batch_size):  # one-hot per batch: the whole cohort would not fit
        onehot = torch.nn.functional.one_hot(inputs[start:start + batch_size].clamp(0, num_classes - 1), num_classes)
        chunks.append(encoder(onehot.movedim(-1, 1).float()).double())
    return torch.cat(chunks).numpy()


def labelled_draw(labels_N: np.ndarray, seed: int) -> np.ndarray:
    """Indices of a stratified LABEL_FRACTION of the pool (at least MIN_LABELLED_PER_CLASS of each class)."""
    from sklearn.model_selection import train_test_split

    count = max(round(LABEL_FRACTION * len(labels_N)), MIN_LABELLED_PER_CLASS * len(np.unique(labels_N)))
    chosen, _ = train_test_split(np.arange(len(labels_N)), train_size=count, stratify=labels_N, random_state=seed)
    return chosen


def probe_aurocs(pool_ND: np.ndarray, test_ND: np.ndarray, pool_labels: np.ndarray, test_labels: np.ndarray,
                 draws: list[np.ndarray]) -> list[float]:
    from threadpoolctl import threadpool_limits

    from rafmedia.evaluate.metrics import compute_auroc
    from rafmedia.evaluate.probes import create_probe

    scores = []
    # One BLAS thread: on 2 busy cores OpenBLAS's threads made each tiny L-BFGS fit 20x slower (0.13 s vs 0.006 s).
    with threadpool_limits(limits=1, user_api="blas"):
        for seed, chosen in enumerate(draws):
            probe = create_probe("logistic", seed=seed).fit(pool_ND[chosen], pool_labels[chosen])
            scores.append(float(compute_auroc(y_true=test_labels, y_score=probe.scores(test_ND))))
    return scores


# ---- one task --------------------------------------------------------------------------------------
def run_task(task: str, settings: TaskSettings, *, store, rows, pool, test, out: Path, repeats: int,
             random_cache: dict[str, tuple[np.ndarray, np.ndarray]]) -> Row:
    from rafmedia.engine.tasks import task_data_kind
    from rafmedia.evaluate.cohort_data import binary_labels

    kind = task_data_kind(task)
    ids = [row["subject_id"] for row in rows]
    pool_ids, test_ids = [ids[i] for i in pool], [ids[i] for i in test]
    began = time.perf_counter()
    pretrained, final_loss = pretrain_on_pool(task, settings, store=store, pool_ids=pool_ids,
                                              out_dir=out / "pretrain" / task)
    pretrain_s = time.perf_counter() - began
    num_classes = int(settings.options.get("num_classes", 6))
    pool_inputs, test_inputs = probe_inputs(store, pool_ids, kind), probe_inputs(store, test_ids, kind)
    embeddings = {"pretrained": (embed(pretrained, pool_inputs, kind, num_classes),
                                 embed(pretrained, test_inputs, kind, num_classes))}
    # Tasks sharing an architecture, options and input kind share one random encoder: embed it once per run.
    random_key = json.dumps([settings.encoder, settings.encoder_options, kind == "label"], sort_keys=True)
    if random_key not in random_cache:
        model = random_encoder(settings)
        random_cache[random_key] = (embed(model, pool_inputs, kind, num_classes),
                                    embed(model, test_inputs, kind, num_classes))
    embeddings["random"] = random_cache[random_key]
    auroc = {}
    for target in TARGETS:
        labels = binary_labels(rows, target)
        draws = [labelled_draw(labels[pool], seed) for seed in range(repeats)]
        auroc[target] = {name: probe_aurocs(pool_ND, test_ND, labels[pool], labels[test], draws)
                         for name, (pool_ND, test_ND) in embeddings.items()}
    return Row(task=task, encoder=f"{settings.encoder} {settings.encoder_options}", steps=settings.steps,
               pretrain_s=pretrain_s, final_loss=final_loss, auroc=auroc, settings=asdict(settings))


# ---- table -----------------------------------------------------------------------------------------
def table(rows: list[Row]) -> str:
    header = ("| task | encoder | steps | pretrain time | disease AUROC pretrained | random | difference | p (Wilcoxon) "
              "| beats random? | sex AUROC pretrained | random |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        disease, sex = row.summary("disease"), row.summary("sex")
        lines.append(
            f"| {row.task} | {row.encoder} | {row.steps} | {row.pretrain_s:.0f} s "
            f"| {disease['pretrained']:.3f} ± {disease['pretrained_sd']:.3f} | {disease['random']:.3f} ± "
            f"{disease['random_sd']:.3f} | {disease['difference']:+.3f} | {disease['p_value']:.3g} "
            f"| {'yes' if disease['beats'] else '**no**'} | {sex['pretrained']:.3f} ± {sex['pretrained_sd']:.3f} "
            f"| {sex['random']:.3f} ± {sex['random_sd']:.3f} |")
    return "\n".join(lines)


def select_tasks(requested: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(tasks to run, notes on skipped ones). Unknown names are an error; unregistered ones are skipped."""
    from rafmedia.core.errors import UserError
    from rafmedia.core.registry import did_you_mean
    from rafmedia.engine.tasks import list_tasks

    registered, run, notes = set(list_tasks()), [], []
    for name in requested:
        if name not in SETTINGS:
            raise UserError(f"no benchmark settings for task '{name}';{did_you_mean(name, list(SETTINGS))} "
                            f"(known: {', '.join(SETTINGS)})")
        if name in registered:
            run.append(name)
        else:
            notes.append(f"{name}: not registered in this checkout (list_tasks()), skipped")
    return run, notes


def main(argv: list[str] | None = None) -> list[Row]:
    from rafmedia.engine.tasks import task_data_kind
    from rafmedia.shards.store import CohortStore

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="", help="comma-separated task names (default: every task in SETTINGS)")
    parser.add_argument("--cohort", help="reuse this cohort store instead of generating one under --out")
    parser.add_argument("--out", default="runs/bench_pretraining", help="run folder (cohort, pretraining, results)")
    parser.add_argument("--repeats", type=int, help="seeded draws of the labelled 10%% (default 10; --quick 3)")
    parser.add_argument("--steps", type=int, help="override every task's pretraining steps")
    parser.add_argument("--quick", action="store_true", help="36 subjects of 32^3, 3 steps, 2 tasks: a smoke test")
    args = parser.parse_args(argv)

    preset = QUICK if args.quick else Preset()
    preset = replace(preset, repeats=args.repeats or preset.repeats, steps=args.steps or preset.steps,
                     tasks=tuple(t for t in args.tasks.split(",") if t) or preset.tasks)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}", flush=True)
    tasks, notes = select_tasks(preset.tasks)
    store = CohortStore(args.cohort if args.cohort else prepare_cohort(out, preset))
    rows = store.read_manifest()
    pool, test = split_pool_and_test(rows)
    present = channels_of(store, rows[0]["subject_id"])
    print(f"split: train pool {len(pool)}, test {len(test)} (stratified by disease, seed {SPLIT_SEED}); probe on "
          f"{LABEL_FRACTION:.0%} of the pool x {preset.repeats} draws; channels {present}", flush=True)
    results, random_cache = [], {}
    for task in tasks:
        if task_data_kind(task) == "paired" and PAIRED_CHANNEL not in present:
            notes.append(f"{task}: the cohort has no '{PAIRED_CHANNEL}' channel, skipped")
            continue
        settings = SETTINGS[task]
        settings = replace(settings, steps=preset.steps or settings.steps,
                           batch_size=preset.batch_size or settings.batch_size,
                           options={**settings.options, **preset.options.get(task, {})})
        began = time.perf_counter()
        row = run_task(task, settings, store=store, rows=rows, pool=pool, test=test, out=out, repeats=preset.repeats,
                       random_cache=random_cache)
        disease = row.summary("disease")
        print(f"  {task}: pretrain {row.pretrain_s:.0f} s (loss {row.final_loss}), disease AUROC "
              f"{disease['pretrained']:.3f} vs random {disease['random']:.3f}, total {time.perf_counter() - began:.0f} s",
              flush=True)
        results.append(row)
        (out / "results.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
        (out / "results").mkdir(exist_ok=True)  # one file per task too, so runs of --tasks subsets add up
        (out / "results" / f"{task}.json").write_text(json.dumps(asdict(row), indent=1))
    print()
    print(table(results))
    for note in notes:
        print(f"note: {note}")
    return results


if __name__ == "__main__":
    main()
