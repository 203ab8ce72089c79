"""Foundation benchmarks, ours and the peers side by side in one process on the same data.

1. Random 32^3 patch reads from 160x192x128 float32 volumes: our zarr cohort store (reads only the chunks a
   patch overlaps) vs MONAI (LoadImage + RandSpatialCrop) and TorchIO (ScalarImage + UniformSampler) on the
   same volumes saved as NIfTI (.nii.gz, and uncompressed .nii).
(Pretraining step throughput against a raw PyTorch loop moved to benchmarks/train_step.py.)

Run:  python benchmarks/foundation.py [--patches 60]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=6)
    parser.add_argument("--patches", type=int, default=60)
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


if __name__ == "__main__":
    main()
