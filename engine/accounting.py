"""Where a training run's time, memory and FLOPs go, measured without holding up the device.

- `StepClock`: wall time per step split into the wait for data (`data_wait_s`: the batch source's `next()` and the
  copy to the device, as the host sees it) and compute (`compute_s`: forward, backward, optimizer step, EMA). On the
  CPU both are host clocks; on CUDA compute is timed by CUDA events read back only when a record is written (a
  logging or checkpoint boundary), so no step waits for the device.
- `step_flops`: model FLOPs of one optimizer step (forward + backward of each micro-batch), counted once per
  architecture and input shape with `torch.utils.flop_counter.FlopCounterMode` on a copy of the task.
- `device_peak_tflops`: the dense peak of the device for the run's precision, from `PEAK_TFLOPS` (NVIDIA's
  datasheets), for the model-FLOPs utilisation (MFU = achieved / peak).
- `Footprint`: device-hours, core-hours, bytes read and the store's size against its source files', accumulated over
  the resumes of one run folder in `footprint.json`.
"""
from __future__ import annotations

import contextlib
import copy
import json
import resource
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import torch
from torch.utils.flop_counter import FlopCounterMode

from rafmedia.core.files import atomic_write_text, read_json

FOOTPRINT_FILE = "footprint.json"

# Dense (no sparsity) peak TFLOP/s per GPU from NVIDIA's datasheets: "NVIDIA H100 Tensor Core GPU" (SXM and PCIe
# columns), "NVIDIA H200 Tensor Core GPU", "NVIDIA A100 Tensor Core GPU" (SXM), "NVIDIA L40S", "NVIDIA V100" (SXM2).
# The datasheets print the sparse figure for tensor cores; the dense one is half of it. Keys are matched in order
# against torch.cuda.get_device_name(), so the more specific names come first. Columns: bf16 (or fp16) tensor cores,
# TF32 tensor cores, plain FP32.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 PCIe": {"bf16": 756.0, "tf32": 378.0, "fp32": 51.0},
    "H100 NVL": {"bf16": 835.0, "tf32": 418.0, "fp32": 60.0},
    "H100": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},  # SXM5
    "H200": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},  # SXM
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.05, "tf32": 183.0, "fp32": 91.6},
    "V100": {"bf16": 125.0, "tf32": 15.7, "fp32": 15.7},  # fp16 tensor cores; no bf16 or TF32
}


def device_peak_tflops(device: torch.device, precision: str, name: str | None = None) -> float | None:
    """The device's dense peak TFLOP/s for `precision` (fp32 uses TF32 when torch lets matmuls use it); None for
    the CPU or a GPU missing from `PEAK_TFLOPS`."""
    if device.type != "cuda" and name is None:
        return None
    name = name or torch.cuda.get_device_name(device)
    column = "bf16" if precision in ("bf16", "fp16") else (
        "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32")
    return next((peaks[column] for key, peaks in PEAK_TFLOPS.items() if key in name), None)


_FLOPS_CACHE: dict[tuple, float] = {}


def step_flops(task: torch.nn.Module, batch: dict[str, Any], *, dtype: torch.dtype | None, micro_steps: int) -> float:
    """Model FLOPs of one optimizer step: forward + backward of `micro_steps` micro-batches shaped like `batch`.

    Counted on a deep copy of the task moved to the meta device (shapes only; a real copy for tasks that read
    values), so the run's weights, gradients and random streams are left alone; once per architecture and input
    shape in a process. Counts matmuls and convolutions, as torch's counter does; autocast does not change the count.
    """
    shapes = tuple(sorted((key, tuple(value.shape), str(value.dtype)) for key, value in batch.items()
                          if torch.is_tensor(value)))
    key = (type(task).__name__, type(getattr(task, "encoder", task)).__name__,
           sum(p.numel() for p in task.parameters()), shapes, str(dtype))
    if key not in _FLOPS_CACHE:
        parameter = next(task.parameters())
        if parameter.dtype != torch.float32:  # weights cast by DeepSpeed: the inputs follow, as its wrapper does
            batch = {name: value.to(parameter.dtype) if torch.is_tensor(value) and value.is_floating_point() else value
                     for name, value in batch.items()}
        try:  # on the meta device: shapes only, no arithmetic
            _FLOPS_CACHE[key] = _counted(task, batch, torch.device("meta"), dtype)
        except (NotImplementedError, RuntimeError):  # a task that reads values (.item(), nonzero): a real copy
            _FLOPS_CACHE[key] = _counted(task, batch, parameter.device, dtype)
    return _FLOPS_CACHE[key] * micro_steps


def _counted(task: torch.nn.Module, batch: dict[str, Any], device: torch.device, dtype: torch.dtype | None) -> float:
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        twin = copy.deepcopy(task).to(device).train()
        inputs = {name: value.to(device) if torch.is_tensor(value) else value for name, value in batch.items()}
        counter = FlopCounterMode(display=False)
        autocast_device = "cpu" if device.type == "meta" else device.type
        with counter, torch.autocast(autocast_device, dtype=dtype, enabled=dtype is not None and device.type != "meta"):
            twin(inputs)["loss"].backward()
    return float(counter.get_total_flops())


def batch_voxels(batch: dict[str, Any]) -> int:
    """Input voxels of one micro-batch: every floating-point tensor's elements (all views, all channels)."""
    return sum(value.numel() for value in batch.values() if torch.is_tensor(value) and value.is_floating_point())


def peak_rss_mb() -> float:
    """The process's peak resident memory so far, in MB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StepClock:
    """Data wait and compute time of the steps since the last record, without a device synchronisation per step."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self._reset()

    def _reset(self) -> None:
        self.began, self.steps, self.data_s, self.compute_s, self.voxels = time.perf_counter(), 0, 0.0, 0.0, 0
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def data(self) -> Iterator[None]:
        began = time.perf_counter()
        yield
        self.data_s += time.perf_counter() - began

    @contextlib.contextmanager
    def compute(self) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events.append((start, end))
        else:
            began = time.perf_counter()
            yield
            self.compute_s += time.perf_counter() - began

    @contextlib.contextmanager
    def outside(self) -> Iterator[None]:
        """Time that belongs to no step (the collapse monitors): left out of the next record's wall time."""
        began = time.perf_counter()
        yield
        self.began += time.perf_counter() - began

    def step_done(self, voxels: int) -> None:
        self.steps += 1
        self.voxels += voxels

    def record(self, *, samples_per_step: int, flops_per_step: float | None, peak_tflops: float | None
               ) -> dict[str, float]:
        """The record of the steps since the last one (means per step, rates per second), then starts afresh.

        Rates are of this rank (samples_per_step is the rank's); on CUDA this waits for the device once."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.compute_s = sum(start.elapsed_time(end) for start, end in self.events) / 1e3
        wall = max(time.perf_counter() - self.began, 1e-12)
        steps = max(self.steps, 1)
        record = {"step_seconds": round(wall / steps, 5), "data_wait_s": round(self.data_s / steps, 5),
                  "compute_s": round(self.compute_s / steps, 5),
                  "samples_per_s": round(samples_per_step * self.steps / wall, 3),
                  "voxels_per_s": round(self.voxels / wall, 1), "peak_rss_mb": round(peak_rss_mb(), 1)}
        if self.cuda:
            record["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        if flops_per_step:
            tflops = flops_per_step * self.steps / wall / 1e12
            record["tflops"] = float(f"{tflops:.4g}")
            if peak_tflops:
                record["mfu"] = round(tflops / peak_tflops, 4)
        self._reset()
        return record


def process_io_bytes() -> int:
    """Bytes this process and its live child processes (DataLoader workers) have read (Linux `rchar`: read calls,
    from disk or the page cache); 0 where /proc is missing."""
    total = 0
    try:
        me = psutil.Process()
        for process in [me, *me.children(recursive=True)]:
            with contextlib.suppress(psutil.Error, AttributeError):
                total += process.io_counters().read_chars
    except psutil.Error:
        return 0
    return total


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its children that have ended."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def live_children_cpu_seconds() -> float:
    """CPU seconds of the child processes still running (DataLoader workers are reaped after the run)."""
    total = 0.0
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                times = child.cpu_times()
                total += times.user + times.system
    return total


class Footprint:
    """What one call of the trainer used on this rank since it was made (make it before the data is loaded): wall
    and CPU time, bytes read."""

    def __init__(self):
        self.began, self.cpu, self.io = time.perf_counter(), cpu_seconds(), process_io_bytes()
        self.call = f"{time.time():.6f}"  # one trainer call: its checkpoints rewrite its entry in footprint.json

    def measure(self) -> dict[str, float]:
        return {"call": self.call, "wall_s": time.perf_counter() - self.began,
                "cpu_s": cpu_seconds() - self.cpu + live_children_cpu_seconds(),
                "bytes_read": process_io_bytes() - self.io}


def write_footprint(out_dir: Path, ranks: list[dict[str, float]], *, device: torch.device, steps: int,
                    store: dict[str, Any] | None) -> Path:
    """Puts this call's footprint (every rank's) into out_dir/footprint.json, next to the earlier calls' (a resumed
    run sums them all); each checkpoint of a call updates that call's entry.

    device-hours: wall hours x GPUs (0 on the CPU); core-hours: CPU seconds of every rank and its loader workers."""
    path = out_dir / FOOTPRINT_FILE
    before = read_json(path) if path.is_file() else {}
    wall_h = max(rank["wall_s"] for rank in ranks) / 3600
    gpus = len(ranks) if device.type == "cuda" else 0
    calls = [call for call in before.get("calls", []) if call.get("call") != ranks[0]["call"]]
    calls += [{"call": ranks[0]["call"], "steps_run": steps, "ranks": len(ranks), "wall_hours": round(wall_h, 6),
                                        "device_hours": round(wall_h * gpus, 6),
                                        "core_hours": round(sum(rank["cpu_s"] for rank in ranks) / 3600, 6),
                                        "bytes_read": int(sum(rank["bytes_read"] for rank in ranks))}]
    footprint = {
        "device": "cpu" if device.type != "cuda" else torch.cuda.get_device_name(device),
        "wall_hours": round(sum(call["wall_hours"] for call in calls), 6),
        "device_hours": round(sum(call["device_hours"] for call in calls), 6),
        "core_hours": round(sum(call["core_hours"] for call in calls), 6),
        "bytes_read": sum(call["bytes_read"] for call in calls),
        "store": store if store is not None else before.get("store"),
        "calls": calls,
        "notes": "device_hours = wall hours x GPUs; core_hours = CPU seconds of every rank and its DataLoader "
                 "workers / 3600; bytes_read = bytes returned by read calls of those processes (Linux rchar: disk "
                 "or page cache), including the one-off load of in-memory volumes",
    }
    atomic_write_text(path, json.dumps(footprint, indent=2) + "\n")
    return path


