"""Evaluation benchmark: the evaluator's throughput against a raw encoder forward, and the wall time of a full
`raf evaluate` of one encoder under every registered alteration, with a per-stage breakdown.

Part 1, throughput (same process, same encoder, same batches of 16). Each pass embeds the same subjects:
- raw: a hand-written `with torch.no_grad(): encoder(x)` over batches z-scored beforehand (outside the timing);
- `extract_embeddings`: the evaluator's embedding path on the raw volumes (per-volume z-score, encoder forward,
  float64 output); and `embed_subjects` (per-subject alteration and z-score, what the runner calls), where
  rafmedia.evaluate.embed has it;
- each "+ metrics": the same plus the per-subject work `robustness_results` does at every alteration level
  (probe scores and predictions, AUROC, balanced accuracy, embedding stability against the clean embeddings);
  the logistic probe is fitted once, before the timing (fitting is per evaluation, see part 2);
- each "+ metrics, gaussian_noise s3": under an alteration, for information (the alteration is work, not overhead).
Passes alternate in a rotating order, one warm-up pass each first; figures are medians over `--rounds`, the
ratios the medians of per-round ratios. Overhead = (path + metrics) / raw - 1 (the issue's target: at most 10%).

Part 2, a full evaluation: `run_evaluation(EvaluateConfig(...), progress=False)` of one exported
cnn3d_small (width 16) on N subjects at 64^3 of the default synthetic cohort (`raf synth`'s three sites), under
every alteration of `list_alterations()` x severities 1-5, with the evaluator's defaults otherwise (random
baseline, seeds [0, 1, 2], 500 bootstrap resamples, 1000 permutations). The stages are timed from outside: the
runner's stage functions are wrapped for the duration of the run (nothing in rafmedia is changed) and each
stage's time excludes the stages it calls; the alterations' calls are also timed per alteration. A second run
with `alterations=[]` separates the alterations' cost independently of the wrappers. The machine's load average
is printed at the start and the end: on a shared machine other people's work slows every figure.

Run:  python benchmarks/evaluate.py                          # both parts, N=200 (tens of minutes on 2 cores)
      python benchmarks/evaluate.py --subjects 100 --parts 2
      python benchmarks/evaluate.py --quick                  # N=24, 3 alterations, severities [1, 3]; the tests
"""
from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

warnings.filterwarnings("ignore")

ENCODER, ENCODER_OPTIONS = "cnn3d_small", {"width": 16}
QUICK_ALTERATIONS = ["gaussian_noise", "bias_field", "motion"]


# ---- the cohort and the encoder ----------------------------------------------------------------------------------
def make_cohort(folder: Path, *, num_subjects: int, workers: int) -> Path:
    """The default `raf synth` cohort (64^3, three sites) with `num_subjects` subjects; returns the store path."""
    from rafmedia.launch.config import load_config
    from rafmedia.shards.synth import generate_cohort

    config = load_config(overrides=[f"cohort.num_subjects={num_subjects}", f"cohort.workers={workers}"])
    return generate_cohort(config.cohort, store_config=config.store, out=folder / "cohort.zarr", progress=False,
                           overwrite=True).path


def build_encoder(seed: int = 0) -> torch.nn.Module:
    from rafmedia.engine.encoders import create_encoder

    torch.manual_seed(seed)
    return create_encoder(ENCODER, **ENCODER_OPTIONS).eval()


def export(folder: Path, seed: int = 0) -> Path:
    from rafmedia.engine.export import export_encoder

    return export_encoder(build_encoder(seed), folder / "encoder.safetensors", architecture=ENCODER,
                          options=ENCODER_OPTIONS, card={"name": f"{ENCODER} w16 seed {seed}"})


def cohort_arrays(store_path: Path, num_subjects: int) -> tuple[torch.Tensor, np.ndarray]:
    """The first `num_subjects` raw (un-normalised) volumes and their disease labels."""
    from rafmedia.evaluate.cohort_data import binary_labels
    from rafmedia.shards.store import CohortStore
    from rafmedia.shards.volumes import load_volumes

    store = CohortStore(store_path)
    rows = store.read_manifest()[:num_subjects]
    volumes = load_volumes(store, [row["subject_id"] for row in rows], normalize=False, progress=False)
    return volumes, binary_labels(rows, "disease")


# ---- part 1: throughput ------------------------------------------------------------------------------------------
def raw_pass(encoder: torch.nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [encoder(x_BCDHW) for x_BCDHW in batches]


def metric_work(emb_ND: np.ndarray, *, probe, labels_N: np.ndarray, clean_ND: np.ndarray) -> dict[str, float]:
    """What `robustness.robustness_results` computes per subject at one alteration level, given its embeddings."""
    from rafmedia.evaluate.embed import embedding_stability
    from rafmedia.evaluate.metrics import compute_auroc, compute_balanced_accuracy

    return {"auroc": compute_auroc(y_true=labels_N, y_score=probe.scores(emb_ND)),
            "balanced_accuracy": compute_balanced_accuracy(y_true=labels_N, y_pred=probe.predict(emb_ND)),
            **embedding_stability(clean_ND, emb_ND)}


def embedding_paths(encoder, volumes_NCDHW, *, batch_size: int) -> dict[str, Callable]:
    """The evaluator's embedding functions, each as `embed(alteration) -> (N, D) float64`: `extract_embeddings`,
    and `embed_subjects` (per-subject alteration and z-score, what the runner calls) where embed.py has it."""
    from rafmedia.evaluate import embed

    paths = {"extract_embeddings": lambda alteration=None: embed.extract_embeddings(
        encoder, volumes_NCDHW, batch_size=batch_size, alteration=alteration, seed=3)}
    if hasattr(embed, "embed_subjects"):
        paths["embed_subjects"] = lambda alteration=None: embed.embed_subjects(
            encoder, volumes_NCDHW, range(len(volumes_NCDHW)), batch_size=batch_size, alteration=alteration, seed=3)
    return paths


def throughput(store_path: Path, *, num_subjects: int, batch_size: int, rounds: int) -> dict[str, Any]:
    """Seconds per pass of each path (median of `rounds`), per-round ratios to raw, and the embedding check."""
    from rafmedia.evaluate.probes import create_probe
    from rafmedia.shards.alterations import create_alteration
    from rafmedia.shards.volumes import normalize_intensity

    volumes, labels = cohort_arrays(store_path, num_subjects)
    encoder = build_encoder()
    batches = [normalize_intensity(volumes[start:start + batch_size]) for start in range(0, len(volumes), batch_size)]
    raw_ND = torch.cat(raw_pass(encoder, batches)).double().numpy()
    probe = create_probe("logistic", seed=0).fit(raw_ND, labels)
    noise = create_alteration("gaussian_noise", severity=3)
    passes: dict[str, Callable[[], object]] = {"raw": lambda: raw_pass(encoder, batches)}
    difference = {}
    for path, embed in embedding_paths(encoder, volumes, batch_size=batch_size).items():
        difference[path] = float(np.abs(embed() - raw_ND).max())
        passes[f"{path}"] = embed
        passes[f"{path} + metrics"] = lambda embed=embed: metric_work(embed(), probe=probe, labels_N=labels,
                                                                       clean_ND=raw_ND)
        passes[f"{path} + metrics, gaussian_noise s3"] = lambda embed=embed: metric_work(
            embed(noise), probe=probe, labels_N=labels, clean_ND=raw_ND)
    seconds = alternating_seconds(passes, rounds)
    return {"subjects": len(volumes), "batch_size": batch_size, "rounds": rounds,
            "seconds": {name: statistics.median(times) for name, times in seconds.items()},
            "over_raw": {name: statistics.median(t / r for t, r in zip(times, seconds["raw"]))
                         for name, times in seconds.items()},
            "max_abs_embedding_difference": difference}


def alternating_seconds(passes: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds of each pass in each round, after one warm-up pass each; the order rotates from round to round."""
    for run in passes.values():
        run()  # warm-up: allocations, oneDNN kernel selection, lazy imports
    seconds: dict[str, list[float]] = {name: [] for name in passes}
    names = list(passes)
    for index in range(rounds):
        for name in names[index % len(names):] + names[:index % len(names)]:
            began = time.perf_counter()
            passes[name]()
            seconds[name].append(time.perf_counter() - began)
    return seconds


def throughput_table(result: dict[str, Any]) -> str:
    lines = ["| path | s / pass | subjects / s | time / raw |", "|---|---|---|---|"]
    for name, seconds in result["seconds"].items():
        label = "raw `with torch.no_grad(): encoder(x)`, pre-normalised" if name == "raw" else f"`{name}`"
        lines.append(f"| {label} | {seconds:.3f} | {result['subjects'] / seconds:.1f} | "
                     f"{result['over_raw'][name]:.3f} |")
    return "\n".join(lines)


# ---- part 2: a full evaluation, timed by stage -------------------------------------------------------------------
class StageClock:
    """Exclusive seconds and call counts per stage label: a stage's time excludes the timed stages it calls.

    Stages timed with `counts_subjects` also count the subjects they return (the length of the returned array or
    batch), which does not depend on how the evaluator batches them.
    """

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: Counter = Counter()
        self.subjects: Counter = Counter()
        self.by_alteration: dict[str, float] = defaultdict(float)  # seconds of each alteration's calls
        self._children: list[float] = []  # per open call: seconds spent in timed calls below it

    def timed(self, label: Callable[[tuple, dict], str] | str, function: Callable, *,
              counts_subjects: bool = False) -> Callable:
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            name = label(args, kwargs) if callable(label) else label
            self._children.append(0.0)
            began = time.perf_counter()
            try:
                out = function(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - began
                self.seconds[name] += elapsed - self._children.pop()
                self.calls[name] += 1
                if self._children:
                    self._children[-1] += elapsed
            if counts_subjects:
                self.subjects[name] += len(out)
            return out
        return wrapper


class _TimedAlteration:
    """An alteration whose calls are timed; every other attribute is the alteration's own."""

    def __init__(self, alteration, clock: StageClock):
        self._alteration = alteration
        self._clock = clock
        self._call = clock.timed("alter volumes", alteration.__call__, counts_subjects=True)

    def __call__(self, *args, **kwargs):
        began = time.perf_counter()
        try:
            return self._call(*args, **kwargs)
        finally:
            self._clock.by_alteration[self._alteration.name] += time.perf_counter() - began

    def __getattr__(self, name):
        return getattr(self._alteration, name)


def _embed_label(args, kwargs) -> str:
    return "embed altered" if kwargs.get("alteration") is not None else "embed clean"


# (module path, attribute, stage label): where the runner and its stages look each step up, so a wrapper set there
# times every call; attributes a module lacks are skipped.
STAGES = [
    ("rafmedia.evaluate.runner", "load_cohort", "load cohort volumes"),
    ("rafmedia.evaluate.runner", "build_entries", "load encoders"),
    ("rafmedia.evaluate.embed", "embed_subjects", _embed_label),
    ("rafmedia.evaluate.scan_level", "fit_probes", "probe fits (CV over C)"),
    ("rafmedia.evaluate.scan_level", "clean_results", "probe metrics"),
    ("rafmedia.evaluate.scan_level", "other_probe_results", "kNN + few-shot probes"),
    ("rafmedia.evaluate.scan_level", "few_shot_results", "kNN + few-shot probes"),
    ("rafmedia.evaluate.scan_level", "ordinal_results", "ordinal probes"),
    ("rafmedia.evaluate.fairness", "fairness_results", "fairness (bootstrap CIs, permutation tests)"),
    ("rafmedia.evaluate.runner", "robustness_results", "robustness scoring (probe on altered, stability)"),
    ("rafmedia.evaluate.latent", "latent_results", "latent tests"),
    ("rafmedia.evaluate.raf", "raf_with_intervals", "RAF bootstrap"),
    ("rafmedia.evaluate.runner", "pixel_level_results", "segmentation"),
]


def timed_evaluation(config, clock: StageClock | None = None) -> tuple[float, str | None]:
    """Seconds of `run_evaluation(config, progress=False)`; with a clock, its stages are timed into it.

    Returns (seconds, None), or (seconds until the error, its message) when the run raises a `UserError`: the time
    of the work before it is still the figure wanted.
    """
    import importlib

    from rafmedia.core.errors import UserError
    from rafmedia.evaluate.runner import run_evaluation

    patched = []
    if clock is not None:
        for module_path, attribute, label in STAGES:
            module = importlib.import_module(module_path)
            if hasattr(module, attribute):
                patched.append((module, attribute, getattr(module, attribute)))
                setattr(module, attribute, clock.timed(label, getattr(module, attribute),
                                                       counts_subjects=label is _embed_label))
        embed = importlib.import_module("rafmedia.evaluate.embed")  # where the altered embeddings are drawn
        create = embed.create_alteration
        patched.append((embed, "create_alteration", create))
        embed.create_alteration = lambda *args, **kwargs: _TimedAlteration(create(*args, **kwargs), clock)
    began = time.perf_counter()
    try:
        run_evaluation(config, progress=False)
        return time.perf_counter() - began, None
    except UserError as error:
        if config.alterations:
            raise
        return time.perf_counter() - began, str(error)
    finally:
        for module, attribute, original in reversed(patched):
            setattr(module, attribute, original)


def evaluate_config(store_path: Path, encoder_path: Path, *, quick: bool, alterations: list[str]):
    from rafmedia.evaluate.config import EvaluateConfig

    severities = [1, 3] if quick else [1, 2, 3, 4, 5]
    if quick:
        return EvaluateConfig(cohort=str(store_path), encoders=[str(encoder_path)], seeds=[0], min_group_size=4,
                              alterations=alterations, severities=severities, bootstrap_resamples=50, permutations=49)
    return EvaluateConfig(cohort=str(store_path), encoders=[str(encoder_path)], alterations=alterations,
                          severities=severities)


def full_evaluation(store_path: Path, encoder_path: Path, *, quick: bool, with_clean_run: bool) -> dict[str, Any]:
    from rafmedia.shards.alterations import list_alterations

    config = evaluate_config(store_path, encoder_path, quick=quick,
                             alterations=QUICK_ALTERATIONS if quick else list_alterations())
    clock = StageClock()
    total, _ = timed_evaluation(config, clock)
    result = {"config": config, "total_s": total, "stages": dict(clock.seconds), "calls": dict(clock.calls),
              "subjects": dict(clock.subjects), "other_s": total - sum(clock.seconds.values()),
              "by_alteration": dict(clock.by_alteration)}
    if with_clean_run:
        config_clean = evaluate_config(store_path, encoder_path, quick=quick, alterations=[])
        result["without_alterations_s"], result["without_alterations_error"] = timed_evaluation(config_clean)
    return result


def evaluation_table(result: dict[str, Any]) -> str:
    total = result["total_s"]
    lines = ["| stage | calls | subjects | s | subjects / s | share |", "|---|---|---|---|---|---|"]
    for stage, seconds in sorted(result["stages"].items(), key=lambda item: -item[1]):
        subjects = result["subjects"].get(stage)
        rate = f"{subjects / seconds:.1f}" if subjects and seconds > 0 else "-"
        lines.append(f"| {stage} | {result['calls'][stage]} | {subjects or '-'} | {seconds:.1f} | {rate} | "
                     f"{100 * seconds / total:.1f}% |")
    other = result["other_s"]
    lines.append(f"| other (splits, CE, JSON, ...) | - | - | {other:.1f} | - | {100 * other / total:.1f}% |")
    lines.append(f"| **total** | - | - | **{total:.1f}** | - | 100% |")
    if result["by_alteration"]:
        per_subject = result["subjects"]["alter volumes"] / len(result["by_alteration"])  # the same for each
        lines.append("\nalteration ms / subject, mean over severities: " + ", ".join(
            f"{name} {1e3 * seconds / per_subject:.1f}"
            for name, seconds in sorted(result["by_alteration"].items(), key=lambda item: -item[1])))
    if "without_alterations_s" in result:
        clean = result["without_alterations_s"]
        altered = sum(result["stages"].get(stage, 0.0) for stage in (
            "alter volumes", "embed altered", "robustness scoring (probe on altered, stability)"))
        lines.append(f"\nsame run with alterations=[]: {clean:.1f} s; difference {total - clean:.1f} s "
                     f"(the alteration stages above: {altered:.1f} s)")
        if result.get("without_alterations_error"):
            lines.append(f"(that run raised at its end, timed up to the error: {result['without_alterations_error']})")
    return "\n".join(lines)


# ---- main --------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N=24, 3 alterations, severities [1, 3], 1 round")
    parser.add_argument("--subjects", type=int, default=200, help="cohort size N of the full evaluation")
    parser.add_argument("--throughput-subjects", type=int, default=64, help="subjects per pass in part 1")
    parser.add_argument("--batch-size", type=int, default=16, help="subjects per encoder call (evaluator default)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of part 1 (median reported)")
    parser.add_argument("--parts", default="1,2", help="which parts to run: 1 (throughput), 2 (full evaluation)")
    parser.add_argument("--no-clean-run", action="store_true", help="skip part 2's second run with alterations=[]")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--cohort", help="an existing cohort store to use instead of generating one")
    args = parser.parse_args(argv)
    if args.quick:
        args.subjects, args.throughput_subjects, args.rounds = 24, 24, 1
    parts = {part.strip() for part in args.parts.split(",") if part.strip()}
    torch.set_num_threads(args.threads)
    print(f"{datetime.date.today()}; {platform.machine()} CPU, nproc {os.cpu_count()}, {torch.get_num_threads()} "
          f"torch threads, torch {torch.__version__}, Python {platform.python_version()}; {load_average()}")
    print("command: python benchmarks/evaluate.py " + " ".join(sys.argv[1:] if argv is None else argv))
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store_path = Path(args.cohort) if args.cohort else None
        if store_path is None:
            began = time.perf_counter()
            store_path = make_cohort(Path(tmp), num_subjects=args.subjects, workers=1 if args.quick else 2)
            print(f"generated {args.subjects} subjects at 64^3 in {time.perf_counter() - began:.1f} s (not timed)")
        if "1" in parts:
            result["throughput"] = throughput(store_path, num_subjects=args.throughput_subjects,
                                              batch_size=args.batch_size, rounds=args.rounds)
            print_throughput(result["throughput"])
        if "2" in parts:
            result["evaluation"] = full_evaluation(store_path, export(Path(tmp)), quick=args.quick,
                                                   with_clean_run=not args.no_clean_run)
            print_evaluation(result["evaluation"], cohort_size(store_path))
    print(f"\nat the end: {load_average()}")
    return result


def load_average() -> str:
    """The machine's 1-minute load average: on a shared machine, other people's work slows every figure above."""
    return f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"


def print_throughput(part1: dict[str, Any]) -> None:
    print(f"\n## Part 1: throughput, {ENCODER} width 16, {part1['subjects']} subjects at 64^3, batch "
          f"{part1['batch_size']}, {part1['rounds']} alternating rounds (median)")
    print(throughput_table(part1))
    for path, difference in part1["max_abs_embedding_difference"].items():
        print(f"`{path}` + metrics overhead over raw: {100 * (part1['over_raw'][path + ' + metrics'] - 1):.1f}% "
              f"(target at most 10%); its embeddings equal the raw forward's to {difference:.1e}")


def print_evaluation(part2: dict[str, Any], num_subjects: int) -> None:
    config = part2["config"]
    print(f"\n## Part 2: full evaluation, {num_subjects} subjects at 64^3, {len(config.alterations)} alterations x "
          f"severities {config.severities}, seeds {config.seeds}, random baseline {config.random_baseline}, "
          f"{config.bootstrap_resamples} bootstrap resamples, {config.permutations} permutations")
    print(evaluation_table(part2))


def cohort_size(store_path: Path) -> int:
    from rafmedia.shards.store import CohortStore

    return len(CohortStore(store_path).read_manifest())


if __name__ == "__main__":
    main()
