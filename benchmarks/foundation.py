"""Foundation benchmarks, ours and the peers side by side in one process on the same data.

1. Random 32^3 patch reads from 160x192x128 float32 volumes: our zarr cohort store (reads only the chunks a
   patch overlaps) vs MONAI (LoadImage + RandSpatialCrop) and TorchIO (ScalarImage + UniformSampler) on the
   same volumes saved as NIfTI (.nii.gz, and uncompressed .nii).
2. Pretraining step throughput: our `train()` loop (logging, schedule, clipping, checkpoint) vs a raw
   PyTorch loop running the same task on the same batches.

Run:  python benchmarks/foundation.py [--patches 60] [--steps 30]
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore")
SHAPE = (160, 192, 128)
PATCH = 32


def make_volumes(folder: Path, num_subjects: int):
    import nibabel as nib

    from rafmedia.shards.store import CohortStore, StoreConfig

    rng = np.random.default_rng(0)
    store = CohortStore.create(folder / "bench.zarr", config=StoreConfig(chunk_size=32), name="bench", overwrite=True)
    for index in range(num_subjects):
        volume = rng.normal(size=SHAPE).astype(np.float32)
        store.write_subject(f"sub-{index}", channels={"image": volume}, label=None, attrs={})
        for suffix in (".nii.gz", ".nii"):
            nib.save(nib.Nifti1Image(volume, np.eye(4)), str(folder / f"sub-{index}{suffix}"))
    return store


def time_per_item(function, count: int) -> float:
    function(0)  # warm-up (imports, caches)
    began = time.perf_counter()
    for index in range(count):
        function(index)
    return (time.perf_counter() - began) / count


def patch_benchmarks(folder: Path, store, num_subjects: int, num_patches: int) -> list[tuple[str, float]]:
    import torchio as tio
    from monai.transforms import LoadImage, RandSpatialCrop

    rng = np.random.default_rng(1)
    corners = [tuple(int(rng.integers(0, s - PATCH + 1)) for s in SHAPE) for _ in range(num_patches + 1)]
    subjects = [f"sub-{i % num_subjects}" for i in range(num_patches + 1)]

    def ours(i):
        d, h, w = corners[i]
        return store.read(subjects[i], region=(slice(d, d + PATCH), slice(h, h + PATCH), slice(w, w + PATCH)))

    loader, cropper = LoadImage(image_only=True), RandSpatialCrop((PATCH,) * 3, random_size=False)
    cropper.set_random_state(0)

    def monai(suffix):
        return lambda i: cropper(loader(str(folder / f"{subjects[i]}{suffix}"))[None])

    sampler = tio.UniformSampler(PATCH)

    def torchio(suffix):
        def read(i):
            subject = tio.Subject(image=tio.ScalarImage(folder / f"{subjects[i]}{suffix}"))
            return next(iter(sampler(subject, num_patches=1)))["image"].data
        return read

    results = [("ours: zarr store, chunk-local read", time_per_item(ours, num_patches))]
    for suffix in (".nii.gz", ".nii"):
        results.append((f"MONAI LoadImage+RandSpatialCrop ({suffix})", time_per_item(monai(suffix), num_patches // 3)))
        results.append((f"TorchIO ScalarImage+UniformSampler ({suffix})", time_per_item(torchio(suffix), num_patches // 3)))
    return results


def training_benchmark(steps: int, repeats: int = 3) -> tuple[float, float]:
    """Median steps/s of our loop and of a raw loop, alternating runs so neither gets the warm machine."""
    from rafmedia.engine.encoders import create_encoder
    from rafmedia.engine.tasks import create_task
    from rafmedia.engine.train import TrainConfig, train
    from rafmedia.shards.stream import view_batches

    volumes = torch.randn((64, 1, 64, 64, 64), generator=torch.Generator().manual_seed(0))

    def build():
        torch.manual_seed(0)
        return create_task("contrastive_two_crop", encoder=create_encoder("cnn3d_small", width=16))

    task = build()
    batches = view_batches(volumes, task.views, batch_size=16, seed=0)
    cached = [batches(step) for step in range(steps)]  # both loops get the same precomputed batches
    config = TrainConfig(steps=steps, batch_size=16, checkpoint_every=0, log_every=10)

    def ours() -> float:
        with tempfile.TemporaryDirectory() as out:
            began = time.perf_counter()
            train(build(), lambda step: cached[step], config=config, out_dir=Path(out), progress=False)
            return steps / (time.perf_counter() - began)

    def raw() -> float:
        task = build()
        optimizer = torch.optim.AdamW(task.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        task.train()
        began = time.perf_counter()
        for step in range(steps):
            loss = task(cached[step])["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return steps / (time.perf_counter() - began)

    raw()  # warm-up: first-call allocations and kernel selection
    runs = [(ours(), raw()) for _ in range(repeats)]
    return float(np.median([r[0] for r in runs])), float(np.median([r[1] for r in runs]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=6)
    parser.add_argument("--patches", type=int, default=60)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        store = make_volumes(folder, args.subjects)
        rows = patch_benchmarks(folder, store, args.subjects, args.patches)
    ours = rows[0][1]
    print(f"\nRandom {PATCH}^3 patch from a {SHAPE} float32 volume ({args.patches} patches)")
    print("| reader | ms / patch | patches / s | ours speed-up |\n|---|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds * 1e3:.1f} | {1 / seconds:.0f} | {seconds / ours:.1f}x |")
    ours_steps, raw_steps = training_benchmark(args.steps)
    print(f"\nPretraining steps (contrastive_two_crop, cnn3d_small width 16, 16 pairs of 40^3 crops, {args.steps} steps, "
          "median of 3 alternating runs; ours includes the LR schedule, gradient clipping, JSONL log and final checkpoint)")
    print("| loop | steps / s | ours / raw |\n|---|---|---|")
    print(f"| ours: rafmedia.engine.train | {ours_steps:.2f} | {ours_steps / raw_steps:.2f} |")
    print(f"| raw PyTorch loop | {raw_steps:.2f} | 1.00 |")


if __name__ == "__main__":
    main()
