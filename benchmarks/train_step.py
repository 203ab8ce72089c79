"""Training-step throughput: our engine against a hand-written raw PyTorch loop, side by side in one process.

Both loops run the same task, model, batches, AdamW parameter groups, warmup-cosine schedule and gradient
clipping; ours adds what the engine does every step (wrapper, NaN check, EMA hook, signal check, JSONL and
TensorBoard logs every 10 steps) and its final checkpoint. Runs alternate (ours, raw, ours, raw, ...) so neither
gets the warmer machine; the figure is the median of the rounds.

Presets:
  cpu   contrastive_two_crop on cnn3d_small (width 16), 16 pairs of 40^3 crops: the quickstart's pretraining.
  vit   rotation on a 3D ViT-B (16^3 patches) with 96^3 inputs in bf16 (a GPU machine); also reports the model
        FLOPs of a step (torch's FlopCounterMode), the achieved TFLOP/s and the model-FLOPs utilisation (MFU)
        against the device's dense bf16 peak, and the step time when the batches are streamed from a real zarr
        store (PatchStream, DataLoader workers) against in-memory batches.

Run:  python benchmarks/train_step.py                       # CPU preset
      python benchmarks/train_step.py --preset vit --stream # GPU machine
      python benchmarks/train_step.py --quick               # seconds; used by the tests
"""
from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch

warnings.filterwarnings("ignore")

@dataclass
class Preset:
    task: str
    task_options: dict
    encoder: str
    encoder_options: dict
    volume: int  # side of the in-memory volumes the views crop from
    batch_size: int
    steps: int
    precision: str = "fp32"


PRESETS = {
    "cpu": Preset("contrastive_two_crop", {"crop_size": 40, "max_shift": 12}, "cnn3d_small", {"width": 16},
                  volume=64, batch_size=16, steps=30),
    "vit": Preset("rotation", {"crop_size": 96}, "vit_base_3d", {"img_size": 96, "patch_size": 16},
                  volume=96, batch_size=8, steps=30, precision="bf16"),
    "quick": Preset("contrastive_two_crop", {"crop_size": 16, "max_shift": 4}, "cnn3d_small", {"width": 4},
                    volume=24, batch_size=4, steps=6),
}


def build_task(preset: Preset, device: torch.device) -> torch.nn.Module:
    from rafmedia.engine.encoders import create_encoder
    from rafmedia.engine.tasks import create_task

    torch.manual_seed(0)
    return create_task(preset.task, encoder=create_encoder(preset.encoder, **preset.encoder_options),
                       **preset.task_options).to(device)


def in_memory_batches(preset: Preset, views, device: torch.device) -> list[dict]:
    """The batches both loops train on, made once and kept on the device."""
    from rafmedia.engine.batches import view_batches

    volumes = torch.randn((4 * preset.batch_size, 1) + (preset.volume,) * 3, generator=torch.Generator().manual_seed(0))
    batch_of_step = view_batches(volumes, views, batch_size=preset.batch_size, seed=0)
    return [{k: v.to(device) for k, v in batch_of_step(step).items()} for step in range(preset.steps)]


def train_config(preset: Preset, **changes):
    from rafmedia.engine.train import TrainConfig

    return TrainConfig(steps=preset.steps, batch_size=preset.batch_size, warmup_steps=max(1, preset.steps // 10),
                       checkpoint_every=0, log_every=10, precision=preset.precision, **changes)


def ours(preset: Preset, batches, device: torch.device) -> float:
    """Seconds per step of `rafmedia.engine.train.train` (plain wrapper) on `batches` (a list or a batch source)."""
    from rafmedia.engine.train import train

    task = build_task(preset, device)
    source = (lambda step: batches[step]) if isinstance(batches, list) else batches(task.views)
    with tempfile.TemporaryDirectory() as out:
        _sync(device)
        began = time.perf_counter()
        train(task, source, config=train_config(preset), out_dir=Path(out), progress=False)
        _sync(device)
        return (time.perf_counter() - began) / preset.steps


def raw(preset: Preset, batches: list[dict], device: torch.device) -> float:
    """Seconds per step of a hand-written loop with the same optimizer, schedule, clipping and precision."""
    from rafmedia.engine.train import build_optimizer, build_scheduler

    task = build_task(preset, device)
    config = train_config(preset)
    optimizer = build_optimizer(task, config)
    scheduler = build_scheduler(optimizer, config)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(preset.precision)
    task.train()
    _sync(device)
    began = time.perf_counter()
    for step in range(preset.steps):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = task(batches[step])["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(task.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        loss.item()  # as any loop that prints or logs its loss
    _sync(device)
    return (time.perf_counter() - began) / preset.steps


def step_flops(preset: Preset, batch: dict, device: torch.device) -> float:
    """Model FLOPs of one forward + backward pass (matmuls and convolutions, counted by torch), as the trainer
    counts them for its TFLOP/s and MFU (`rafmedia.engine.accounting.step_flops`)."""
    from rafmedia.engine.accounting import step_flops as count

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(preset.precision)
    return count(build_task(preset, device), batch, dtype=dtype, micro_steps=1)


def stream_source(preset: Preset, store_path: Path, num_workers: int):
    """A factory of the batch source that streams `preset.volume`^3 patches from the store (as `raf pretrain`
    does with data.source=stream)."""
    from rafmedia.engine.batches import StreamBatches
    from rafmedia.shards.streaming import StreamConfig, build_stream_loader

    def build(views):
        config = StreamConfig(sampler="uniform", sampler_options={"patch_size": preset.volume}, channels=["image"],
                              patches_per_subject=4, batch_size=preset.batch_size, seed=0, epochs=None,
                              num_workers=num_workers)
        return StreamBatches(build_stream_loader(config, store_path, rank=0, world_size=1), views, seed=0)

    return build


def write_store(folder: Path, side: int, subjects: int) -> Path:
    from rafmedia.shards.store import StoreConfig
    from rafmedia.shards.synth import CohortConfig, generate_cohort

    config = CohortConfig(num_subjects=subjects, shape=[side] * 3, workers=2)
    return generate_cohort(config, store_config=StoreConfig(chunk_size=64), out=folder / "cohort.zarr",
                           progress=False).path


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_tflops(device: torch.device, given: float | None, precision: str) -> float | None:
    from rafmedia.engine.accounting import device_peak_tflops

    return given or device_peak_tflops(device, precision)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--quick", action="store_true", help="the tiny preset, one round (for tests)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (median reported)")
    parser.add_argument("--steps", type=int, help="steps per run (default: the preset's)")
    parser.add_argument("--batch-size", type=int, help="per-step batch (default: the preset's)")
    parser.add_argument("--stream", action="store_true", help="also time batches streamed from a zarr store")
    parser.add_argument("--stream-subjects", type=int, default=24)
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers of the stream")
    parser.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: by device name)")
    args = parser.parse_args(argv)
    preset = PRESETS["quick" if args.quick else args.preset]
    preset = replace(preset, steps=args.steps or preset.steps, batch_size=args.batch_size or preset.batch_size)
    rounds = 1 if args.quick else args.rounds
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU"
    print(f"device: {name}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"preset: {preset}")

    batches = in_memory_batches(preset, build_task(preset, device).views, device)
    raw(preset, batches, device)  # warm-up: allocations, kernel selection, autotuning
    ours_s, raw_s = [], []
    for _ in range(rounds):
        ours_s.append(ours(preset, batches, device))
        raw_s.append(raw(preset, batches, device))
    ours_med, raw_med = statistics.median(ours_s), statistics.median(raw_s)
    ratios = [r / o for o, r in zip(ours_s, raw_s)]
    samples = preset.batch_size
    print(f"\n{preset.task} on {preset.encoder}, batch {samples}, {preset.steps} steps per run, {rounds} alternating rounds")
    print("| loop | ms / step | samples / s | ours / raw |\n|---|---|---|---|")
    print(f"| ours: rafmedia.engine.train | {ours_med * 1e3:.1f} | {samples / ours_med:.1f} | {statistics.median(ratios):.3f} |")
    print(f"| raw PyTorch loop | {raw_med * 1e3:.1f} | {samples / raw_med:.1f} | 1.000 |")
    print(f"engine overhead: {100 * (1 - statistics.median(ratios)):.1f}% (target at most 5%)")

    flops = step_flops(preset, batches[0], device)
    peak = peak_tflops(device, args.peak_tflops, preset.precision)
    achieved = flops / ours_med / 1e12
    line = f"model FLOPs per step: {flops / 1e9:.2f} GFLOP; achieved {achieved:.3f} TFLOP/s (ours)"
    print(line + (f"; MFU {100 * achieved / peak:.1f}% of {peak:.0f} TFLOP/s peak" if peak else ""))
    result = {"ours_s": ours_med, "raw_s": raw_med, "ours_over_raw": statistics.median(ratios), "flops": flops,
              "tflops": achieved, "mfu": achieved / peak if peak else None}

    if args.stream:
        with tempfile.TemporaryDirectory() as tmp:
            store = write_store(Path(tmp), preset.volume + 16, 4 if args.quick else args.stream_subjects)
            streamed = statistics.median(ours(preset, stream_source(preset, store, args.workers), device)
                                         for _ in range(rounds))
        print(f"\nbatches streamed from a zarr store ({args.workers} workers) vs in memory, ours")
        print("| batches | ms / step | stream / memory |\n|---|---|---|")
        print(f"| zarr PatchStream | {streamed * 1e3:.1f} | {streamed / ours_med:.3f} |")
        print(f"| in memory | {ours_med * 1e3:.1f} | 1.000 |")
        result["stream_s"] = streamed
    return result


if __name__ == "__main__":
    main()
