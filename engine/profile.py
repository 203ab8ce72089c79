"""`raf profile` for pretraining: every stage of the pipeline measured alone, the real loop end to end, the bound.

Stages measured alone, at the run's settings (encoder, task, batch size, data.source, patch size, chunking):

    store read (cold / warm page cache) -> chunk decode -> patch sampling (one loader worker)      [the loader]
    -> views (torch CPU; DALI CPU; torch CUDA and DALI GPU on a GPU) -> host-to-device (CUDA)
    -> forward+backward -> optimizer step -> gradient all-reduce (under torchrun)                 [the main process]

then the real pipeline (`pretrain.build_batches` + `train.train`) for a fixed number of steps, whose step rate is
the end-to-end figure, with torch.profiler tracing a few steps at its end (`train.profile_steps`).

The analysis (`analyse`) is a pure function of the measured rows: the bounding stage is the slowest stage on the
step path (the loader counted at its per-worker rate times the workers; the main process's stages each alone),
workers needed = ceil(main-process rate / per-worker loader rate), and each advice line cites the numbers its rule
used. docs/profiling.md defines every stage and states every rule.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from rafmedia.core.errors import UserError
from rafmedia.core.files import read_json
from rafmedia.core.profiling import StageClock, stage_row
from rafmedia.engine.batches import DataConfig, as_batch_source, view_batches, view_generator
from rafmedia.engine.dali_views import DaliViews, import_dali
from rafmedia.engine.distributed import Place, barrier, device_for, init_distributed, place_from_environment
from rafmedia.engine.encoders import EncoderConfig, create_encoder
from rafmedia.engine.pretrain import build_batches, load_task_inputs, validate_pretraining
from rafmedia.engine.tasks import TaskConfig, create_task, task_data_kind
from rafmedia.engine.train import TrainConfig, build_optimizer, build_scheduler, to_device, train
from rafmedia.engine.views import TwoCropViews
from rafmedia.engine.wrappers import TorchWrapper
from rafmedia.shards.chunks import ChunkedArray, chunk_codec
from rafmedia.shards.sampling import as_triple
from rafmedia.shards.store import LABEL, SUBJECTS, CohortStore

RUN_FOLDER = "run"
LOADER = "patch sampling (1 worker)"
LOADER_2X = "patch sampling (1 worker, 2x patches per visit)"
VIEWS = "views (torch CPU)"
FORWARD_BACKWARD = "forward+backward"
FORWARD_BACKWARD_2X = "forward+backward (2x batch)"
OPTIMIZER = "optimizer step"
HOST_TO_DEVICE = "host-to-device"
ALL_REDUCE = "gradient all-reduce"
END_TO_END = "end-to-end step"
MAIN_PROCESS = (VIEWS, HOST_TO_DEVICE, FORWARD_BACKWARD, OPTIMIZER, ALL_REDUCE)  # run one after another per step
GAIN = 1.1  # a measured alternative must be this much faster before the advice recommends it


@dataclass
class ProfileSettings:
    """How long each part of `raf profile` runs."""

    steps: int = 20  # end-to-end steps timed (after warmup_steps)
    warmup_steps: int = 3  # end-to-end steps run before the timing starts (worker start-up, allocator warm-up)
    trace_steps: int = 3  # steps traced by torch.profiler after the timed ones (0: no trace)
    isolated_steps: int = 5  # batches each isolated stage processes (after one untimed warm-up batch)
    read_subjects: int = 8  # subjects whose chunk files the store-read and decode stages read

    def validate(self) -> None:
        for name in ("steps", "isolated_steps", "read_subjects"):
            if getattr(self, name) < 1:
                raise UserError(f"profile {name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.trace_steps < 0:
            raise UserError(f"profile warmup_steps and trace_steps must be >= 0, got {self.warmup_steps} and "
                            f"{self.trace_steps}")


# ---- the store: chunk files read cold and warm, then decoded ---------------------------------------------------
def chunk_files(store: CohortStore, subject_ids: list[str], arrays: list[str]) -> list[tuple[Path, Path]]:
    """(array folder, chunk file) of every stored chunk of the subjects' arrays."""
    files = []
    for subject in subject_ids:
        for name in arrays:
            folder = store.path / SUBJECTS / subject / name
            files += [(folder, Path(root) / file) for root, _, names in os.walk(folder / "c") for file in sorted(names)]
    return files


def read_file(path: Path, *, cold: bool) -> bytes:
    """The file's bytes; `cold` first drops its pages from the page cache (POSIX_FADV_DONTNEED: no root needed)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        if cold:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        parts = []
        while part := os.read(descriptor, 1 << 22):
            parts.append(part)
        return b"".join(parts)
    finally:
        os.close(descriptor)


def measure_store(clock: StageClock, store: CohortStore, subject_ids: list[str], arrays: list[str],
                  notes: dict[str, str]) -> None:
    """Stages "store read (cold)", "store read (warm)" and "chunk decode" over the subjects' chunk files."""
    files = chunk_files(store, subject_ids, arrays)
    voxels = sum(int(np.prod(store.shape(subject, name))) for subject in subject_ids for name in arrays)
    raws = []
    for stage, cold in (("store read (cold)", True), ("store read (warm)", False)):
        with clock.stage(stage, volumes=len(subject_ids), voxels=voxels):
            raws = [read_file(path, cold=cold) for _, path in files]
        clock.count(stage, bytes=sum(len(raw) for raw in raws))
    codecs: dict[Path, Any] = {}
    for folder, _ in files:
        if folder not in codecs:
            codecs[folder] = chunk_codec(read_json(folder / "zarr.json")) if ChunkedArray.open(folder) else None
    if any(codec is None for codec in codecs.values()):
        notes["chunk decode"] = "not measured: the store's layout is not the one rafmedia writes (read through zarr)"
        return
    decoded = 0
    with clock.stage("chunk decode", volumes=len(subject_ids), bytes=sum(len(raw) for raw in raws)):
        for (folder, _), raw in zip(files, raws):
            decoded += len(codecs[folder].decode(np.frombuffer(raw, dtype=np.uint8)[:-4]))  # [:-4]: the CRC32C
    itemsize = np.dtype(read_json(files[0][0] / "zarr.json")["data_type"]).itemsize if files else 1
    clock.count("chunk decode", voxels=decoded / itemsize)


def read_amplification(volume_shape, patch_size, chunk_shape) -> float:
    """Voxels decoded per patch voxel for a uniformly placed patch, without the per-visit chunk cache: per axis the
    mean over every valid origin of (chunks the patch overlaps x chunk side) / patch side, multiplied over axes."""
    factor = 1.0
    for size, side, chunk in zip(volume_shape, patch_size, chunk_shape):
        side = min(side, size)
        touched = [(origin + side - 1) // chunk - origin // chunk + 1 for origin in range(size - side + 1)]
        factor *= float(np.mean(touched)) * chunk / side
    return factor


# ---- the loader, the views and the model, each alone -------------------------------------------------------------
def capture_inputs(volumes_BCDHW: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A view maker that makes no views: what the task's view maker would have received."""
    return {"input": volumes_BCDHW}


def stream_inputs(data: DataConfig, kind: str, train_config: TrainConfig, place: Place, count: int,
                  clock: StageClock | None, stage: str) -> list[torch.Tensor]:
    """`count` batches of the stream in this process (one worker's work), timed as `stage` after one warm-up batch."""
    in_process = dataclasses.replace(data, source="stream", num_workers=0)
    batches = build_batches(in_process, kind, capture_inputs, train_config, place, False)
    inputs = [batches.next()["input"]]
    patch_voxels = int(np.prod(as_triple(data.patch_size)))
    samples = train_config.batch_size
    for _ in range(count):
        if clock is None:
            inputs.append(batches.next()["input"])
            continue
        with clock.stage(stage, patches=samples, volumes=samples / data.patches_per_subject,
                         voxels=samples * patch_voxels):
            inputs.append(batches.next()["input"])
    return inputs[1:]


def memory_inputs(volumes_NCDHW: torch.Tensor, train_config: TrainConfig, place: Place,
                  count: int) -> list[torch.Tensor]:
    batch = view_batches(volumes_NCDHW, capture_inputs, batch_size=train_config.batch_size, seed=train_config.seed,
                         rank=place.rank, world_size=place.world_size)
    return [batch(step)["input"] for step in range(count)]


def run_views(clock: StageClock, stage: str, views: Callable, inputs: list[torch.Tensor], seed: int,
              rank: int) -> list[dict[str, torch.Tensor]]:
    """The views of each input batch, timed as `stage` after one untimed call (pipeline build, allocations)."""
    views(inputs[0], view_generator(seed, 0, rank))
    outputs = []
    for position, volumes in enumerate(inputs):
        samples = volumes.shape[0]
        with clock.stage(stage, patches=samples, volumes=samples, voxels=samples * int(np.prod(volumes.shape[2:]))):
            outputs.append(views(volumes, view_generator(seed, position, rank)))
    return outputs


def measure_other_views(clock: StageClock, views: Callable, inputs: list[torch.Tensor], seed: int, rank: int,
                        notes: dict[str, str]) -> None:
    """DALI CPU; torch CUDA and DALI GPU where a GPU exists: a stage each, or a note saying why not measured."""
    cuda = torch.cuda.is_available()
    devices = {"views (DALI CPU)": "cpu", **({"views (DALI GPU)": "gpu"} if cuda else {})}
    if not cuda:
        notes["views (torch CUDA)"] = notes["views (DALI GPU)"] = "not measured: no CUDA device"
    for stage, device in devices.items():
        if not isinstance(views, TwoCropViews):
            notes[stage] = f"not measured: the task's view maker {type(views).__name__} has no DALI twin"
            continue
        try:  # the settings are checked first: a refused setting needs no (slow) DALI import to say so
            dali_views = DaliViews.like(views, device=device)
            import_dali()
            run_views(clock, stage, dali_views, inputs, seed, rank)
        except UserError as error:
            notes[stage] = f"not measured: {error}"
    if cuda:
        try:
            run_views(clock, "views (torch CUDA)", views, [volumes.cuda() for volumes in inputs], seed, rank)
        except (RuntimeError, TypeError) as error:  # a view maker that draws on the CPU generator into CPU tensors
            notes["views (torch CUDA)"] = f"not measured: {type(error).__name__}: {str(error).splitlines()[0]}"


def double_batch(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """Two batches as one of twice the size (tensors concatenated along the batch dimension)."""
    return {key: torch.cat([value, second[key]]) if torch.is_tensor(value) and value.ndim > 0 else value
            for key, value in first.items()}


def measure_model(clock: StageClock, *, encoder: EncoderConfig, task: TaskConfig, train_config: TrainConfig,
                  place: Place, device: torch.device, batches: list[dict[str, Any]], samples: int,
                  notes: dict[str, str]) -> int:
    """Host-to-device (CUDA), forward+backward, optimizer step, and forward+backward at twice the batch, on a fresh
    copy of the task (the end-to-end run builds its own); returns the number of gradient elements."""
    torch.manual_seed(train_config.seed)
    pretext = create_task(task.name, encoder=create_encoder(encoder.name, **encoder.options), **task.options).to(device)
    optimizer = build_optimizer(pretext, train_config)
    wrapper = TorchWrapper(pretext, optimizer, build_scheduler(optimizer, train_config), train_config, place, device,
                           distributed=False)  # the gradient all-reduce is measured on its own
    pretext.train()
    wrapper.micro_step(to_device(batches[0], device), boundary=True)  # warm-up: allocator, kernel selection
    wrapper.optimizer_step()
    for batch in batches:
        if device.type == "cuda":
            size = sum(value.nbytes for value in batch.values() if torch.is_tensor(value))
            with clock.stage(HOST_TO_DEVICE, patches=samples, volumes=samples, bytes=size):
                on_device = to_device(batch, device)
        else:
            on_device = batch
        with clock.stage(FORWARD_BACKWARD, patches=samples, volumes=samples):
            wrapper.micro_step(on_device, boundary=True)
        with clock.stage(OPTIMIZER, patches=samples, volumes=samples):
            wrapper.optimizer_step()
    if device.type != "cuda":
        notes[HOST_TO_DEVICE] = "not measured: no CUDA device (the batch already is where the model is)"
    try:
        for first, second in zip(batches[0::2], batches[1::2]):
            with clock.stage(FORWARD_BACKWARD_2X, patches=2 * samples, volumes=2 * samples):
                wrapper.micro_step(to_device(double_batch(first, second), device), boundary=True)
            wrapper.optimizer_step()
    except torch.OutOfMemoryError as error:
        notes[FORWARD_BACKWARD_2X] = f"not measured: out of memory at batch {2 * samples} ({error})"
    return sum(parameter.numel() for parameter in pretext.parameters() if parameter.requires_grad)


def measure_all_reduce(clock: StageClock, num_elements: int, device: torch.device, count: int, samples: int,
                       notes: dict[str, str]) -> None:
    """An all_reduce of a gradient-sized fp32 buffer, as DDP's reduction moves (under torchrun only)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        notes[ALL_REDUCE] = "not measured: one process (run `torchrun --nproc_per_node N -m rafmedia.launch.cli " \
                            "profile ...` to measure it)"
        return
    buffer = torch.zeros(num_elements, dtype=torch.float32, device=device)
    dist.all_reduce(buffer)
    for _ in range(count):
        with clock.stage(ALL_REDUCE, patches=samples, volumes=samples, bytes=buffer.nbytes):
            dist.all_reduce(buffer)


# ---- the real pipeline, end to end ---------------------------------------------------------------------------
class TimedSource:
    """A batch source that notes when each optimizer step asks for its first micro-batch (one step's start)."""

    def __init__(self, source, micro_steps: int):
        self.source, self.micro_steps, self.calls, self.starts = source, micro_steps, 0, []

    def next(self):
        if self.calls % self.micro_steps == 0:
            self.starts.append(time.perf_counter())
        self.calls += 1
        return self.source.next()

    def state_dict(self) -> dict[str, Any]:
        return self.source.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state)


def run_end_to_end(*, data: DataConfig, encoder: EncoderConfig, task: TaskConfig, train_config: TrainConfig,
                   settings: ProfileSettings, run_dir: Path, place: Place, kind: str, progress: bool) -> dict[str, Any]:
    """`build_batches` + `train` for warmup + timed + 1 + traced steps into `run_dir` (emptied first: never a
    resume); returns the seconds of the timed steps and the trace files."""
    if place.is_main and run_dir.exists():
        shutil.rmtree(run_dir)
    barrier()  # no rank starts writing into the folder before it is emptied
    first_traced = settings.warmup_steps + settings.steps + 1  # the step before it is the profiler's warm-up step
    config = dataclasses.replace(train_config, steps=first_traced + settings.trace_steps, checkpoint_every=0,
                                 tensorboard=False, profile_steps=settings.trace_steps, profile_start=first_traced,
                                 warmup_steps=min(train_config.warmup_steps, first_traced))
    torch.manual_seed(config.seed)
    pretext = create_task(task.name, encoder=create_encoder(encoder.name, **encoder.options), **task.options)
    source = TimedSource(as_batch_source(build_batches(data, kind, pretext.views, config, place, progress)),
                         config.grad_accum_steps)
    # emit_nvtx turns every op and record_function range into an NVTX range; it cannot run beside torch.profiler
    # (one profiler per thread), so with a trace the run gets one NVTX range of its own instead
    nvtx = (torch.autograd.profiler.emit_nvtx() if torch.cuda.is_available() and not settings.trace_steps
            else _nvtx("end-to-end"))
    with nvtx:
        train(pretext, source, config=config, out_dir=run_dir, progress=progress, place=place)
    starts = source.starts
    seconds = starts[settings.warmup_steps + settings.steps] - starts[settings.warmup_steps]
    traces = sorted(str(path) for path in (run_dir / "profile").glob(f"rank{place.rank}*.json*"))
    return {"seconds": seconds, "steps": settings.steps, "traces": traces, "accounting": loop_accounting(run_dir)}


def loop_accounting(run_dir: Path) -> dict[str, float]:
    """Means of the loop's own per-step accounting in metrics.jsonl (data_wait_s, compute_s, ...) where it logs it."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    keys = ("data_wait_s", "compute_s", "step_seconds", "samples_per_s", "voxels_per_s", "peak_rss_mb",
            "cuda_max_allocated_mb", "tflops", "mfu")
    return {key: float(np.mean([r[key] for r in records if r.get(key) is not None]))
            for key in keys if any(r.get(key) is not None for r in records)}


# ---- the analysis: bound, workers, advice -------------------------------------------------------------------------
@dataclass
class RunShape:
    """The settings the analysis weighs the measurements against."""

    source: str  # data.source
    batch_size: int
    num_workers: int
    patches_per_subject: int
    chunk_size: int
    volume_shape: tuple[int, ...]
    patch_size: tuple[int, int, int]
    cpu_count: int


def _rate(rows: dict[str, dict], name: str) -> float | None:
    return rows[name]["patches_per_s"] if name in rows else None


def _per_call(rows: dict[str, dict], name: str) -> float:
    return rows[name]["seconds"] / rows[name]["calls"] if rows.get(name, {}).get("calls") else 0.0


def step_path(rows: dict[str, dict], shape: RunShape) -> dict[str, float]:
    """The isolated samples/s of each stage a training step goes through: the loader (stream only) at its
    per-worker rate times its workers (they run side by side), then each main-process stage alone."""
    path = {}
    if shape.source == "stream" and _rate(rows, LOADER):
        path[f"loader ({shape.num_workers} workers)"] = _rate(rows, LOADER) * max(shape.num_workers, 1)
    path.update({name: _rate(rows, name) for name in MAIN_PROCESS if _rate(rows, name)})
    return path


def analyse(stages: list[dict], shape: RunShape, end_to_end_rate: float | None) -> dict[str, Any]:
    """Bound, end-to-end fraction, workers needed and advice, from the measured stage rows (a pure function)."""
    rows = {row["name"]: row for row in stages}
    path = step_path(rows, shape)
    bound = min(path, key=path.get) if path else None
    main_seconds = sum(_per_call(rows, name) for name in MAIN_PROCESS)  # the main process runs these in turn
    main_rate = shape.batch_size / main_seconds if main_seconds > 0 else None
    worker_rate = _rate(rows, LOADER)
    workers_needed = math.ceil(main_rate / worker_rate) if main_rate and worker_rate else None
    result = {"bound": bound, "step_path": path, "main_process_rate": main_rate, "loader_worker_rate": worker_rate,
              "workers_needed": workers_needed, "workers_formula": "ceil(main_process_rate / loader_worker_rate)",
              "end_to_end_rate": end_to_end_rate,
              "end_to_end_fraction_of_bound": end_to_end_rate / path[bound] if bound and end_to_end_rate else None,
              "read_amplification": read_amplification(shape.volume_shape, shape.patch_size, (shape.chunk_size,) * 3)}
    result["advice"] = advise(rows, shape, result)
    return result


def advise(rows: dict[str, dict], shape: RunShape, result: dict[str, Any]) -> list[str]:
    """Advice lines, each from one rule of docs/profiling.md and citing the measurements it used."""
    advice = []
    bound, path = result["bound"], result["step_path"]
    loader_bound = bound is not None and bound.startswith("loader")
    if shape.source == "stream" and result["workers_needed"] is not None:
        advice += _advise_workers(shape, result)
    if shape.source == "stream" and loader_bound and _rate(rows, LOADER_2X) and _rate(rows, LOADER):
        gain = _rate(rows, LOADER_2X) / _rate(rows, LOADER)
        if gain >= GAIN:
            advice.append(f"set data.patches_per_subject={2 * shape.patches_per_subject} (now "
                          f"{shape.patches_per_subject}): the loader bounds the step, and one worker made "
                          f"{_rate(rows, LOADER):.1f} patches/s at {shape.patches_per_subject} patches per subject "
                          f"visit and {_rate(rows, LOADER_2X):.1f} at {2 * shape.patches_per_subject} (x{gain:.2f}); "
                          "patches of a visit share its opened arrays and decoded chunks")
    if shape.source == "stream" and loader_bound:
        advice += _advise_chunks(shape, result["read_amplification"], rows)
    advice += _advise_views(rows, bound, path)
    fb, fb2 = _rate(rows, FORWARD_BACKWARD), _rate(rows, FORWARD_BACKWARD_2X)
    if fb and fb2 and fb2 / fb >= GAIN and not loader_bound:
        advice.append(f"set train.batch_size={2 * shape.batch_size} (now {shape.batch_size}): forward+backward made "
                      f"{fb:.1f} samples/s at batch {shape.batch_size} and {fb2:.1f} at {2 * shape.batch_size} "
                      f"(x{fb2 / fb:.2f}); scale train.lr with it")
    if shape.source == "memory" and bound in (FORWARD_BACKWARD, OPTIMIZER) and VIEWS in path:
        headroom = path[VIEWS] / path[bound]
        advice.append(f"the model bounds the step ({bound}: {path[bound]:.1f} samples/s) and the views run "
                      f"{headroom:.1f}x faster ({path[VIEWS]:.1f} samples/s): data settings will not raise the rate; "
                      "a smaller encoder or crop, or a faster device, will")
    return advice


def _advise_workers(shape: RunShape, result: dict[str, Any]) -> list[str]:
    needed, worker, main = result["workers_needed"], result["loader_worker_rate"], result["main_process_rate"]
    usable = max(1, shape.cpu_count - 1)  # one core stays with the main process (views, model)
    recommended = min(needed, usable)
    if recommended == shape.num_workers:
        return []
    why = (f"one loader worker makes {worker:.1f} patches/s and the main process consumes {main:.1f} "
           f"(views + model), ceil({main:.1f} / {worker:.1f}) = {needed}")
    if recommended < needed:
        why += f"; this machine has {shape.cpu_count} cores, so at most {usable} workers run beside the main process"
    return [f"set data.num_workers={recommended} (now {shape.num_workers}): {why}"]


def _advise_chunks(shape: RunShape, amplification: float, rows: dict[str, dict]) -> list[str]:
    options = {}
    for chunk in (shape.chunk_size // 2, shape.chunk_size * 2):
        if 8 <= chunk <= max(shape.volume_shape):
            options[chunk] = read_amplification(shape.volume_shape, shape.patch_size, (chunk,) * 3)
    if not options:
        return []
    best = min(options, key=options.get)
    if options[best] > amplification / GAIN:
        return []
    decode = rows.get("chunk decode", {}).get("voxels_per_s")
    return [f"rewrite the store with store.chunk_size={best} (now {shape.chunk_size}): a random {shape.patch_size[0]}^3 "
            f"patch decodes {amplification:.2f} voxels per patch voxel with {shape.chunk_size}^3 chunks and "
            f"{options[best]:.2f} with {best}^3" + (f"; decode runs at {decode / 1e6:.1f} Mvoxel/s" if decode else "")]


def _advise_views(rows: dict[str, dict], bound: str | None, path: dict[str, float]) -> list[str]:
    notes = {name: row["note"] for name, row in rows.items() if not row.get("calls") and row.get("note")}
    torch_rate = _rate(rows, VIEWS)
    if not torch_rate:
        return []
    faster = {name: _rate(rows, name) for name in ("views (DALI CPU)", "views (torch CUDA)", "views (DALI GPU)")
              if _rate(rows, name)}
    best = max(faster, key=faster.get) if faster else None
    if bound == VIEWS and best and faster[best] >= GAIN * torch_rate:
        return [(f"the views bound the step ({torch_rate:.1f} samples/s with torch on CPU); {best} made "
                 f"{faster[best]:.1f} (x{faster[best] / torch_rate:.2f}): use DaliViews.like(task.views, "
                 f"device='{'gpu' if 'GPU' in best else 'cpu'}') (engine/dali_views.py)")]
    if bound == VIEWS and "views (DALI CPU)" not in faster and "views (DALI CPU)" in notes:
        return [(f"the views bound the step ({torch_rate:.1f} samples/s with torch on CPU) and DALI could not be "
                f"compared: {notes['views (DALI CPU)']}")]
    if "views (DALI CPU)" in faster and faster["views (DALI CPU)"] < torch_rate / GAIN:
        return [(f"keep the torch views (DALI off): DALI CPU made {faster['views (DALI CPU)']:.1f} samples/s, "
                 f"torch {torch_rate:.1f}")]
    return []


# ---- the entry ------------------------------------------------------------------------------------------------
def profile_pretraining(*, data: DataConfig, encoder: EncoderConfig, task: TaskConfig, train_config: TrainConfig,
                        out_dir: str | Path, settings: ProfileSettings | None = None,
                        progress: bool = True) -> dict[str, Any]:
    """Measures every stage alone, runs the real pipeline end to end into OUT/run, and returns the profile
    (`core.profiling.write_profile` writes it): stages, bound, advice, workers needed, end-to-end rate, trace."""
    settings = settings or ProfileSettings()
    settings.validate()
    validate_pretraining(data, encoder, task, train_config)
    out_dir = Path(out_dir)
    place = place_from_environment()
    init_distributed(place)
    device = device_for(place)
    kind = task_data_kind(task.name)
    store = CohortStore(data.cohort)
    subject_ids = store.subject_ids()
    clock = StageClock(synchronize=torch.cuda.synchronize if device.type == "cuda" else None)
    notes: dict[str, str] = {}
    arrays = [LABEL] if kind == "label" else (data.channels if kind == "paired" else [data.channel])
    count, samples = settings.isolated_steps, train_config.batch_size
    with _nvtx("store"):
        measure_store(clock, store, subject_ids[:settings.read_subjects], arrays, notes)
    volume_shape = tuple(store.shape(subject_ids[0], arrays[0]))
    with _nvtx("loader"):  # under data.source=memory: what streaming would cost, at patches no larger than a volume
        streamed = data if data.source == "stream" else dataclasses.replace(
            data, patch_size=min(data.patch_size, *volume_shape))
        inputs = stream_inputs(streamed, kind, train_config, place, count, clock, LOADER)
        if data.source == "stream":
            doubled = dataclasses.replace(data, patches_per_subject=2 * data.patches_per_subject)
            stream_inputs(doubled, kind, train_config, place, count, clock, LOADER_2X)
        else:
            with clock.stage("load volumes (once, memory source)", volumes=len(subject_ids)):
                volumes = load_task_inputs(store, subject_ids, data, kind, False)
            inputs = memory_inputs(volumes, train_config, place, count)
    task_views = create_task(task.name, encoder=create_encoder(encoder.name, **encoder.options), **task.options).views
    with _nvtx("views"):
        batches = run_views(clock, VIEWS, task_views, inputs, train_config.seed, place.rank)
        measure_other_views(clock, task_views, inputs, train_config.seed, place.rank, notes)
    with _nvtx("model"):
        num_gradients = measure_model(clock, encoder=encoder, task=task, train_config=train_config, place=place,
                                      device=device, batches=batches, samples=samples, notes=notes)
        measure_all_reduce(clock, num_gradients, device, count, samples, notes)
    end_to_end = run_end_to_end(data=data, encoder=encoder, task=task, train_config=train_config, settings=settings,
                                run_dir=out_dir / RUN_FOLDER, place=place, kind=kind, progress=progress)
    step_samples = samples * train_config.grad_accum_steps
    end_row = stage_row(END_TO_END, end_to_end["seconds"], end_to_end["steps"], patches=step_samples * settings.steps,
                        volumes=step_samples * settings.steps, note="the real loop (build_batches + train), timed steps")
    stages = [*clock.stages(), end_row]
    for row in stages:
        if row["name"] == LOADER and data.source != "stream":
            row["note"] = "off the step path (data.source=memory): shown for data.source=stream"
    stages += [stage_row(name, 0.0, 0, note=note) for name, note in notes.items()]
    shape = RunShape(source=data.source, batch_size=samples, num_workers=data.num_workers,
                     patches_per_subject=data.patches_per_subject, chunk_size=int(store.attrs().get("chunk_size", 32)),
                     volume_shape=volume_shape, patch_size=as_triple(data.patch_size), cpu_count=os.cpu_count() or 1)
    analysis = analyse(stages, shape, end_row["patches_per_s"])
    return {"kind": "pretraining", "stages": stages, "bound": analysis.pop("bound"), "advice": analysis.pop("advice"),
            **analysis, "settings": dataclasses.asdict(settings), "run_shape": dataclasses.asdict(shape),
            "device": str(device), "world_size": place.world_size, "trace": end_to_end["traces"],
            "run": str(out_dir / RUN_FOLDER), "loop_accounting": end_to_end["accounting"],
            "encoder": encoder.name, "task": task.name, "cohort": str(store.path)}


@contextmanager
def _nvtx(name: str) -> Iterator[None]:
    """An NVTX range around a group of stages on CUDA (Nsight Systems shows it); nothing elsewhere."""
    if not torch.cuda.is_available():
        yield
        return
    torch.cuda.nvtx.range_push(f"raf profile: {name}")
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()
