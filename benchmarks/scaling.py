"""Scaling on this machine: strong and weak scaling of `raf pretrain` with 1 and 2 gloo ranks, the stream loader's
patches/s against DataLoader workers, and the step-time model (benchmarks/scaling_model.py) checked against both.

- Strong scaling: a fixed global batch (16; --quick 4) split over 1 and 2 ranks. Weak scaling: a fixed per-rank
  batch (half the global one) on 1 and 2 ranks. Every run is a real `raf pretrain` (DDP on gloo, data.source
  memory, the quickstart's task and encoder; --quick the tiny config) on a small synthetic cohort generated once
  under --data, each rank with train.num_threads = cores / ranks (--quick: 1). The step time is the mean of the step_seconds
  (and data_wait_s / compute_s where the loop logs them) in the run's metrics.jsonl, after --warmup steps.
- Loader: PatchStream batches of --patch^3 patches from the same cohort through `build_stream_loader`, for 0, 1, 2
  and 4 DataLoader workers; patches/s over the batches after the first (worker start-up excluded).
- Model: its parameters measured in this process at the runs' thread counts (views and forward + backward +
  optimizer per sample; a gloo all-reduce of the model's gradients between two processes), then the predicted
  step time of every run beside the measured one.

Ranks are started by torchrun (`python -m torch.distributed.run --standalone`), or with --launcher env by setting
torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR, ...) on N `python -m rafmedia.launch.cli` processes directly,
and a 1-rank run in this process: that skips the launcher's and an interpreter's start-up (used by --quick, i.e.
the test; the step times come from metrics.jsonl either way).

Run:  python benchmarks/scaling.py [--steps 30] [--json scaling.json]
      python benchmarks/scaling.py --quick      # seconds, tiny model and cohort (tests/test_scaling.py)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scaling_model beside this file
import scaling_model

warnings.filterwarnings("ignore")

CORES = os.cpu_count() or 1
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


@dataclass(frozen=True)
class Settings:
    config: str  # --config of raf pretrain/synth ("" = the defaults: the quickstart's pretraining)
    num_subjects: int
    global_batch: int
    steps: int
    warmup: int  # leading steps left out of the means
    patch: int  # loader benchmark's patch side
    loader_batches: int
    workers: tuple[int, ...]
    weak: bool = True  # also the weak-scaling runs (--quick: strong only, to stay within the tests' time)
    threads: int = 0  # torch threads per rank; 0: cores / ranks (--quick: 1, steady on a busy machine)

    def threads_per_rank(self, ranks: int) -> int:
        return self.threads or max(1, CORES // ranks)


FULL = Settings(config="", num_subjects=32, global_batch=16, steps=30, warmup=5, patch=48, loader_batches=24,
                workers=(0, 1, 2, 4))
QUICK = Settings(config="tiny", num_subjects=16, global_batch=4, steps=4, warmup=1, patch=16, loader_batches=4,
                 workers=(0, 1, 2), weak=False, threads=1)


@dataclass
class Run:
    kind: str  # strong | weak
    ranks: int
    batch_per_rank: int
    threads_per_rank: int
    step_s: float  # mean step_seconds after the warm-up
    data_wait_s: float | None
    compute_s: float | None
    wall_s: float  # the whole launch, start-up included
    samples_per_s: float = 0.0  # whole job
    predicted_step_s: float | None = None


# ---- the cohort and the runs ----------------------------------------------------------------------------------------
def make_cohort(folder: Path, settings: Settings) -> Path:
    """A synthetic cohort for the runs, generated once per settings and reused."""
    out = folder / f"cohort-{settings.config or 'default'}-{settings.num_subjects}"
    store = out / "cohort.zarr"
    if not (store / "manifest.csv").exists():
        command = [sys.executable, "-m", "rafmedia.launch.cli", "synth", "--out", str(out), "--quiet",
                   f"cohort.num_subjects={settings.num_subjects}"] + (["--config", settings.config] if settings.config else [])
        subprocess.run(command, check=True, capture_output=True, env=ENV, timeout=900)
    return store


def pretrain_args(cohort: Path, out: Path, settings: Settings, ranks: int, batch: int) -> list[str]:
    return (["pretrain", "--cohort", str(cohort), "--out", str(out), "--quiet"]
            + (["--config", settings.config] if settings.config else [])
            + ["train.wrapper=ddp", f"train.num_threads={settings.threads_per_rank(ranks)}", f"train.batch_size={batch}",
               f"train.steps={settings.steps}", "train.log_every=1", "train.checkpoint_every=0",
               "train.tensorboard=false"])


def launch(ranks: int, args: list[str], launcher: str) -> float:
    """Runs `raf <args>` on `ranks` gloo ranks; returns the wall seconds."""
    from rafmedia.engine.distributed import free_port

    port = str(free_port())
    began = time.perf_counter()
    if launcher == "env" and ranks == 1:  # one process, no rendezvous: this one (its imports are already paid)
        from rafmedia.launch.cli import main as raf

        threads = torch.get_num_threads()
        code = raf(args)
        torch.set_num_threads(threads)
        if code != 0:
            raise RuntimeError(f"raf {' '.join(args)} failed with exit code {code}")
        return time.perf_counter() - began
    if launcher == "torchrun":
        commands = [([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
                      "-m", "rafmedia.launch.cli", *args], ENV)]
    else:  # torchrun's variables set by hand: one process per rank, no launcher process
        commands = [([sys.executable, "-m", "rafmedia.launch.cli", *args],
                     {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(ranks),
                      "LOCAL_WORLD_SIZE": str(ranks), "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
                    for rank in range(ranks)]
    processes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for command, env in commands]
    for process in processes:
        output, _ = process.communicate(timeout=1800)
        if process.returncode != 0:
            raise RuntimeError(f"raf {' '.join(args)} on {ranks} ranks failed:\n{output[-3000:]}")
    return time.perf_counter() - began


def read_metrics(out: Path, warmup: int) -> dict[str, float | None]:
    """Means after the warm-up of the step time and, where the loop logs them, its data-wait and compute parts."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    kept = [r for r in records if r["step"] >= warmup] or records

    def mean(key):
        values = [r[key] for r in kept if r.get(key) is not None]
        return statistics.fmean(values) if values else None

    return {"step_s": mean("step_seconds"), "data_wait_s": mean("data_wait_s"), "compute_s": mean("compute_s")}


def scaling_runs(cohort: Path, folder: Path, settings: Settings, launcher: str, progress: bool) -> list[Run]:
    """Strong (global batch split over 1, 2 ranks) and weak (per-rank batch fixed) runs; a configuration both
    share is run once."""
    half = settings.global_batch // 2
    plan = [("strong", 1, settings.global_batch), ("strong", 2, half)]
    plan += [("weak", 1, half), ("weak", 2, half)] if settings.weak else []
    done: dict[tuple[int, int], Run] = {}
    runs = []
    for kind, ranks, batch in plan:
        if (ranks, batch) not in done:
            out = folder / f"run-{ranks}x{batch}"
            wall = launch(ranks, pretrain_args(cohort, out, settings, ranks, batch), launcher)
            metrics = read_metrics(out, settings.warmup)
            done[ranks, batch] = Run(kind, ranks, batch, settings.threads_per_rank(ranks), metrics["step_s"],
                                     metrics["data_wait_s"], metrics["compute_s"], wall,
                                     samples_per_s=ranks * batch / metrics["step_s"])
            if progress:
                print(f"  {ranks} rank(s) x batch {batch}: {1e3 * metrics['step_s']:.1f} ms/step", flush=True)
        runs.append(Run(**{**asdict(done[ranks, batch]), "kind": kind}))
    return runs


# ---- the loader ----------------------------------------------------------------------------------------------------
def loader_patches_per_s(cohort: Path, settings: Settings, workers: int, batch: int = 4) -> float:
    from rafmedia.shards.streaming import StreamConfig, build_stream_loader

    config = StreamConfig(sampler="uniform", sampler_options={"patch_size": settings.patch}, channels=["image"],
                          patches_per_subject=4, batch_size=batch, seed=0, epochs=None, num_workers=workers)
    batches = iter(build_stream_loader(config, cohort, rank=0, world_size=1))
    next(batches)  # worker start-up and first reads are not timed
    began = time.perf_counter()
    for _ in range(settings.loader_batches):
        next(batches)
    return settings.loader_batches * batch / (time.perf_counter() - began)


# ---- the model's parameters, measured here ------------------------------------------------------------------------
def allreduce_seconds_gloo(numel: int, repeats: int = 5) -> float:
    """Seconds of one gloo all-reduce of `numel` float32 between two ranks on this machine: two gloo process groups
    in two threads of this process, over loopback TCP as two rank processes would be (gloo releases the GIL while
    it communicates and reduces), which spares two interpreter start-ups."""
    import datetime
    import threading

    import torch.distributed as dist

    from rafmedia.engine.distributed import free_port

    port, timeout = free_port(), datetime.timedelta(seconds=120)
    host = dist.TCPStore("127.0.0.1", port, 2, True, timeout=timeout, wait_for_workers=False)
    seconds = {}

    def rank(index: int) -> None:
        store = host if index == 0 else dist.TCPStore("127.0.0.1", port, 2, False, timeout=timeout)
        group = dist.ProcessGroupGloo(store, index, 2, timeout)
        buffer = torch.ones(numel)
        group.allreduce([buffer]).wait()  # connection set-up
        began = time.perf_counter()
        for _ in range(repeats):
            group.allreduce([buffer]).wait()
        seconds[index] = (time.perf_counter() - began) / repeats

    threads = [threading.Thread(target=rank, args=(index,)) for index in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return max(seconds.values())


def build_task(settings: Settings) -> tuple[torch.nn.Module, list[int]]:
    """The runs' pretext task (seeded) and the cohort's volume shape, from the same config `raf pretrain` reads."""
    from rafmedia.engine.encoders import create_encoder
    from rafmedia.engine.tasks import create_task
    from rafmedia.launch.config import load_config

    config = load_config(settings.config or None)
    torch.manual_seed(0)
    encoder = create_encoder(config.encoder.name, **config.encoder.options)
    return create_task(config.task.name, encoder=encoder, **config.task.options), list(config.cohort.shape)


def per_sample_seconds(settings: Settings, threads: int, batch: int, repeats: int = 3) -> tuple[float, float, int]:
    """(views, forward + backward + optimizer) seconds per sample at `threads` torch threads, and the number of
    gradient elements, for the runs' task and encoder on random volumes of the cohort's shape."""
    from rafmedia.engine.batches import view_batches
    from rafmedia.engine.train import TrainConfig, build_optimizer

    torch.set_num_threads(threads)
    task, shape = build_task(settings)
    volumes = torch.randn((2 * batch, 1, *shape), generator=torch.Generator().manual_seed(0))
    batch_of_step = view_batches(volumes, task.views, batch_size=batch, seed=0)
    optimizer = build_optimizer(task, TrainConfig(batch_size=batch))
    views_s, compute_s = [], []
    for step in range(repeats + 1):
        began = time.perf_counter()
        inputs = batch_of_step(step)
        made = time.perf_counter()
        loss = task(inputs)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step > 0:  # the first step allocates
            views_s.append(made - began)
            compute_s.append(time.perf_counter() - made)
    numel = sum(p.numel() for p in task.parameters() if p.requires_grad)
    return statistics.median(views_s) / batch, statistics.median(compute_s) / batch, numel


def predict_runs(runs: list[Run], settings: Settings, allreduce_s: float) -> dict:
    """The model's step time for each run from the parameters measured here: views and compute are serial in the
    training process (data.source memory: no loader workers), gloo shares the cores with compute (overlap 0)."""
    parameters = {}
    for threads in sorted({run.threads_per_rank for run in runs}):
        views, compute, numel = per_sample_seconds(settings, threads, max(run.batch_per_rank for run in runs),
                                                   repeats=1 if settings is QUICK else 5)
        parameters[threads] = {"views_s_per_sample": views, "compute_s_per_sample": compute}
    for run in runs:
        measured = parameters[run.threads_per_rank]
        run.predicted_step_s = scaling_model.step_seconds(
            load_s=run.batch_per_rank * measured["views_s_per_sample"],
            compute_s=scaling_model.compute_seconds(run.batch_per_rank, measured["compute_s_per_sample"]),
            allreduce_s=allreduce_s if run.ranks > 1 else 0.0, overlap=0.0, workers=0)
    return {"per_threads": parameters, "gradient_elements": numel, "allreduce_s": allreduce_s}


# ---- report --------------------------------------------------------------------------------------------------------
def _ms(value: float | None) -> str:
    return f"{1e3 * value:.1f}" if value is not None else "-"


def report(runs: list[Run], loader: dict[int, float], settings: Settings, parameters: dict) -> str:
    lines = [(f"scaling on this machine ({CORES} cores), raf pretrain with DDP on gloo, "
              f"{settings.steps} steps, means after step {settings.warmup}"),
             ("| scaling | ranks | batch/rank | threads/rank | step ms | data wait ms | compute ms | samples/s | "
              "speed-up | efficiency | (wait + compute) / step | model ms | model error |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind in ("strong", "weak"):
        rows = [run for run in runs if run.kind == kind]
        if not rows:
            continue
        base = rows[0].samples_per_s
        for run in rows:
            speedup = run.samples_per_s / base
            error = (f"{100 * (run.predicted_step_s / run.step_s - 1):+.0f}%" if run.predicted_step_s else "-")
            # the serial form (no loader workers): the loop's own wait and compute add up to its step
            parts = (f"{(run.data_wait_s + run.compute_s) / run.step_s:.3f}"
                     if run.data_wait_s is not None and run.compute_s is not None else "-")
            lines.append(f"| {kind} | {run.ranks} | {run.batch_per_rank} | {run.threads_per_rank} | {_ms(run.step_s)} | "
                         f"{_ms(run.data_wait_s)} | {_ms(run.compute_s)} | {run.samples_per_s:.1f} | {speedup:.2f}x | "
                         f"{speedup / run.ranks:.2f} | {parts} | {_ms(run.predicted_step_s)} | {error} |")
    lines += ["", f"stream loader, {settings.patch}^3 patches (build_stream_loader), batches of 4",
              "| DataLoader workers | patches/s | vs 0 workers |", "|---|---|---|"]
    lines += [f"| {workers} | {rate:.1f} | {rate / loader[settings.workers[0]]:.2f}x |" for workers, rate in loader.items()]
    per = ", ".join(f"{threads} thread(s): views {1e3 * p['views_s_per_sample']:.2f} ms + compute "
                    f"{1e3 * p['compute_s_per_sample']:.2f} ms per sample" for threads, p in parameters["per_threads"].items())
    lines += ["", (f"model parameters measured here: {per}; gloo all-reduce of {parameters['gradient_elements']:,} "
                   f"gradients {1e3 * parameters['allreduce_s']:.1f} ms")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny config, 4 steps, workers 0-2: seconds (the test)")
    parser.add_argument("--steps", type=int, help=f"steps per run (default {FULL.steps})")
    parser.add_argument("--threads", type=int, help="torch threads per rank (default: cores / ranks; --quick 1)")
    parser.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "rafmedia-scaling"),
                        help="folder of the generated cohort (kept and reused) and the runs")
    parser.add_argument("--cohort", help="an existing cohort store instead of generating one")
    parser.add_argument("--launcher", choices=("torchrun", "env"), help="default: torchrun; env with --quick")
    parser.add_argument("--json", help="also write every figure here")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    if args.steps or args.threads:
        settings = Settings(**{**asdict(settings), "steps": args.steps or settings.steps,
                               "threads": args.threads or settings.threads})
    launcher = args.launcher or ("env" if args.quick else "torchrun")
    folder = Path(args.data)
    folder.mkdir(parents=True, exist_ok=True)
    cohort = Path(args.cohort) if args.cohort else make_cohort(folder, settings)
    print(f"cohort: {cohort}; launcher: {launcher}", flush=True)

    with tempfile.TemporaryDirectory(dir=folder) as runs_folder:
        runs = scaling_runs(cohort, Path(runs_folder), settings, launcher, progress=not args.quick)
    loader = {workers: loader_patches_per_s(cohort, settings, workers) for workers in settings.workers}
    threads = torch.get_num_threads()
    task, _ = build_task(settings)
    allreduce_s = allreduce_seconds_gloo(sum(p.numel() for p in task.parameters() if p.requires_grad))
    parameters = predict_runs(runs, settings, allreduce_s)
    torch.set_num_threads(threads)
    print(report(runs, loader, settings, parameters))
    result = {"settings": asdict(settings), "cores": CORES, "launcher": launcher, "runs": [asdict(r) for r in runs],
              "loader_patches_per_s": loader, "model_parameters": parameters}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
