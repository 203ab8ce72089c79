"""Loader benchmark: random 96^3 float32 patches from a cohort of 256^3 volumes on disk, four loaders side by side.

- ours: `PatchStream` over the zarr cohort store (default 32^3 chunks) in a `StreamLoader` (torch DataLoader);
- TorchIO: `tio.Queue` with a `UniformSampler` over the same volumes saved as NIfTI;
- MONAI: `LoadImaged` + `RandSpatialCropSamplesd` over the same NIfTI in a `monai.data.DataLoader`;
- raw ceiling: plain reads of exactly the chunk files our patches touch (each once per subject visit), CRC32C
  check and decode with the store's codec (numcodecs), no assembly into patches and nothing sent back from the workers.

Everyone gets the same worker count, batch size, patches per volume visit and number of patches measured. The
volumes are rendered by the synthetic-cohort generator (anatomy, texture, bias field, noise), so they compress like
scans, not like constants. Before each cold run the benchmark's own files are evicted from the page cache
(fsync + posix_fadvise DONTNEED; with --drop-caches also `echo 1 > /proc/sys/vm/drop_caches` when permitted); each
loader is then re-run warm. Data is generated once and cached under --data.

Run:  python benchmarks/loader.py [--data runs/bench_loader] [--formats nii.gz,nii] [--repeats 3] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

warnings.filterwarnings("ignore")


@dataclass
class BenchConfig:
    subjects: int = 20
    size: int = 256
    patch: int = 96
    per_volume: int = 8  # TorchIO samples_per_volume == MONAI num_samples == our patches_per_subject
    batch: int = 8
    workers: int = 2
    patches: int = 0  # patches measured per run; 0: one epoch (every volume visited once)
    seed: int = 0
    render_workers: int = 2  # processes rendering the volumes (once; the data is cached)

    def num_patches(self) -> int:
        return self.patches or self.subjects * self.per_volume


QUICK = BenchConfig(subjects=4, size=48, patch=16, per_volume=4, batch=4, patches=16, render_workers=1)


# ---- data ----------------------------------------------------------------------------------------
def _render(index: int, num_subjects: int, size: int, seed: int) -> np.ndarray:
    from rafmedia.shards.synth import CohortConfig, assign_subjects, render_subject

    config = CohortConfig(num_subjects=max(num_subjects, 2), shape=[size] * 3, seed=seed)
    subject = assign_subjects(config)[index]
    return render_subject(subject, config, config.sites[0])[0]


def _write_subject(folder: str, index: int, num_subjects: int, size: int, seed: int) -> None:
    import nibabel as nib

    from rafmedia.shards.store import CohortStore

    folder = Path(folder)
    store = CohortStore(folder / "cohort.zarr")
    subject_id = f"sub-{index:04d}"
    image = _render(index, num_subjects, size, seed)
    if not store.has_subject(subject_id):
        store.write_subject(subject_id, channels={"image": image}, label=None, attrs={"spacing": [1.0] * 3})
    for suffix in ("nii.gz", "nii"):
        final = folder / "nifti" / f"{subject_id}.{suffix}"
        if not final.exists():  # written under a temporary name and renamed: a killed run leaves no half file
            partial = final.with_name(f".partial.{subject_id}.{suffix}")
            nib.save(nib.Nifti1Image(image, np.eye(4)), str(partial))
            os.replace(partial, final)


def prepare_data(folder: Path, config: BenchConfig) -> Path:
    """Renders the cohort once into `folder` (zarr store + .nii.gz + .nii); later runs reuse it."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from rafmedia.shards.store import CohortStore, StoreConfig
    from rafmedia.core.environment import single_threaded_children

    recipe = {"subjects": config.subjects, "size": config.size, "seed": config.seed, "version": 2}  # 2: Blosc-LZ4 float chunks
    recipe_path = folder / "recipe.json"
    if recipe_path.is_file() and json.loads(recipe_path.read_text()) != recipe:
        shutil.rmtree(folder)  # a cache for another recipe: regenerate rather than mix
    (folder / "nifti").mkdir(parents=True, exist_ok=True)
    if not recipe_path.is_file():
        recipe_path.write_text(json.dumps(recipe))
    CohortStore.create(folder / "cohort.zarr", config=StoreConfig(), name="bench-loader")  # default 32^3 chunks
    todo = [i for i in range(config.subjects)
            if not all((folder / "nifti" / f"sub-{i:04d}.{s}").exists() for s in ("nii.gz", "nii"))
            or not CohortStore(folder / "cohort.zarr").has_subject(f"sub-{i:04d}")]
    if todo:
        print(f"rendering {len(todo)} volumes of {config.size}^3 into {folder} (cached for later runs)...", flush=True)
        began = time.perf_counter()
        arguments = ([str(folder)] * len(todo), todo, [config.subjects] * len(todo), [config.size] * len(todo),
                     [config.seed] * len(todo))
        if config.render_workers > 1:
            with single_threaded_children(), ProcessPoolExecutor(
                    config.render_workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                list(pool.map(_write_subject, *arguments))
        else:
            list(map(_write_subject, *arguments))
        print(f"  done in {time.perf_counter() - began:.0f} s", flush=True)
    return folder


def data_files(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file()]


# ---- page cache ----------------------------------------------------------------------------------
def evict(files: list[Path], drop_caches: bool) -> str:
    """Evicts the benchmark's files from the page cache; returns how (for the report)."""
    os.sync()  # dirty pages cannot be dropped
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    how = "posix_fadvise(DONTNEED) on the data files"
    if drop_caches:
        try:
            with open("/proc/sys/vm/drop_caches", "w") as handle:
                handle.write("1\n")
            how += " + drop_caches"
        except OSError:
            how += " (drop_caches not permitted)"
    return how


def resident_fraction(files: list[Path]) -> float | None:
    """Share of the files' pages in the page cache, from util-linux `fincore` (None when it is not installed)."""
    if shutil.which("fincore") is None:
        return None
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES,SIZE", *map(str, files)],
                         capture_output=True, text=True, check=False).stdout.split()
    resident, size = sum(map(int, out[0::2])), sum(map(int, out[1::2]))
    return resident / max(size, 1)


# ---- loaders: each returns an iterator of batches (a tensor of patches first) ----------------------
def ours(folder: Path, config: BenchConfig) -> Iterator:
    from rafmedia.shards.sampling import create_sampler
    from rafmedia.shards.sources import ZarrSource
    from rafmedia.shards.streaming import PatchStream, StreamLoader

    stream = PatchStream(ZarrSource(folder / "cohort.zarr"), create_sampler("uniform", patch_size=config.patch),
                         patches_per_subject=config.per_volume, batch_size=config.batch, seed=config.seed)
    for batch in StreamLoader(stream, num_workers=config.workers):
        yield batch["image"]


def torchio_queue(folder: Path, config: BenchConfig, suffix: str) -> Iterator:
    import torchio as tio
    from torch.utils.data import DataLoader

    subjects = [tio.Subject(image=tio.ScalarImage(path)) for path in sorted((folder / "nifti").glob(f"*.{suffix}"))
                if path.name.endswith(f".{suffix}") and not path.name.startswith(".")]
    queue = tio.Queue(tio.SubjectsDataset(subjects), max_length=2 * config.workers * config.per_volume,
                      samples_per_volume=config.per_volume, sampler=tio.UniformSampler(config.patch),
                      num_workers=config.workers)
    while True:
        for batch in DataLoader(queue, batch_size=config.batch, num_workers=0):  # the queue's own rule: 0 here
            yield batch["image"][tio.DATA]


def monai_crops(folder: Path, config: BenchConfig, suffix: str) -> Iterator:
    from monai.data import DataLoader, Dataset
    from monai.transforms import Compose, LoadImaged, RandSpatialCropSamplesd

    files = [{"image": str(path)} for path in sorted((folder / "nifti").glob(f"*.{suffix}"))
             if path.name.endswith(f".{suffix}") and not path.name.startswith(".")]
    crops = RandSpatialCropSamplesd("image", roi_size=config.patch, num_samples=config.per_volume, random_size=False)
    transform = Compose([LoadImaged("image", ensure_channel_first=True, image_only=True), crops])
    transform.set_random_state(config.seed)
    # batch_size subjects per batch; MONAI flattens the per-volume samples: batch == per_volume patches
    loader = DataLoader(Dataset(files, transform), batch_size=max(config.batch // config.per_volume, 1), shuffle=True,
                        num_workers=config.workers, generator=torch.Generator().manual_seed(config.seed))
    while True:
        for batch in loader:
            yield batch["image"]


class RawChunkReads(torch.utils.data.IterableDataset):
    """The ceiling: for each of our subject visits, read the chunk files its patches overlap (each file once per
    visit, as our reader's per-visit chunk cache does), check CRC32C and decode with the store's codec; no assembly, nothing sent back
    but a count."""

    def __init__(self, visits: list[list[tuple[Path, list[tuple[int, int, int]]]]], chunk: int, patch: int):
        super().__init__()
        self.visits, self.chunk, self.patch = visits, chunk, patch

    def __iter__(self):
        import google_crc32c

        from rafmedia.shards.chunks import chunk_codec

        info = torch.utils.data.get_worker_info()
        for array, origins in self.visits[info.id if info else 0]:
            codec = chunk_codec(json.loads((array / "zarr.json").read_text()))
            decoded_in_visit = set()
            for origin in origins:
                ranges = [range(o // self.chunk, (o + self.patch - 1) // self.chunk + 1) for o in origin]
                decoded = 0
                for index in ((i, j, k) for i in ranges[0] for j in ranges[1] for k in ranges[2]):
                    if index in decoded_in_visit:
                        continue
                    decoded_in_visit.add(index)
                    with open(array / "c" / str(index[0]) / str(index[1]) / str(index[2]), "rb") as handle:
                        raw = handle.read()
                    payload = np.frombuffer(raw, dtype=np.uint8)[:-4]
                    if google_crc32c.value(payload).to_bytes(4, "little") != raw[-4:]:
                        raise ValueError("checksum")
                    decoded += len(codec.decode(payload))
                yield decoded  # one item per patch, batched like ours


def raw_ceiling(folder: Path, config: BenchConfig) -> Iterator:
    from rafmedia.shards.sampling import create_sampler
    from rafmedia.shards.sources import ZarrSource
    from rafmedia.shards.streaming import PatchStream, StreamContext

    source = ZarrSource(folder / "cohort.zarr")
    stream = PatchStream(source, create_sampler("uniform", patch_size=config.patch),
                         patches_per_subject=config.per_volume, seed=config.seed)
    visits = [[] for _ in range(config.workers)]
    epochs = -(-config.num_patches() // (config.subjects * config.per_volume)) + 1
    for worker in range(config.workers):  # exactly the visits and patches our worker `worker` reads, in its order
        for epoch in range(epochs):
            for key in stream.keys(StreamContext(config.seed, epoch, 0, 1, worker, config.workers)):
                plans = stream.plans(next(source.open(key)), epoch)
                visits[worker].append((source.store.path / "subjects" / key / "image", [p["origin"] for p in plans]))
    loader = torch.utils.data.DataLoader(RawChunkReads(visits, 32, config.patch), batch_size=config.batch,
                                         num_workers=config.workers)
    yield from loader


# ---- measurement ---------------------------------------------------------------------------------
@dataclass
class Row:
    loader: str
    data: str
    cache: str
    repeat: int
    patches_per_s: float
    mb_per_s: float
    first_batch_s: float
    patches: int
    load_average: float  # 1-minute load of the machine when the run ended (other processes compete for the cores)


def measure(name: str, data: str, cache: str, repeat: int, make: Callable[[], Iterator], config: BenchConfig) -> Row:
    """Time to the first batch, and patches/s from the loader's creation to the last of `config.num_patches()` patches
    (start-up, queue fills and worker launches included: every loader pays its own)."""
    target = config.num_patches()
    began = time.perf_counter()
    batches = make()
    count = len(next(batches))
    first = time.perf_counter()
    for batch in batches:
        count += len(batch)
        if count >= target:
            break
    ended = time.perf_counter()
    batches.close()  # shuts the loader's workers down before the next loader starts
    rate = count / (ended - began)
    return Row(name, data, cache, repeat, rate, rate * config.patch ** 3 * 4 / 1e6, first - began, count,
               os.getloadavg()[0])


def loaders(folder: Path, config: BenchConfig, formats: list[str]) -> list[tuple[str, str, Callable[[], Iterator]]]:
    entries = [("ours: PatchStream over zarr", "zarr, 32^3 chunks", lambda: ours(folder, config))]
    for suffix in formats:
        entries.append(("TorchIO Queue + UniformSampler", f".{suffix}", lambda s=suffix: torchio_queue(folder, config, s)))
        entries.append(("MONAI LoadImaged + RandSpatialCropSamplesd", f".{suffix}",
                        lambda s=suffix: monai_crops(folder, config, s)))
    entries.append(("raw ceiling: chunk file reads + decode", "zarr chunk files", lambda: raw_ceiling(folder, config)))
    return entries


def run(folder: Path, config: BenchConfig, formats: list[str], drop_caches: bool, caches: list[str],
        repeats: int) -> list[Row]:
    """Every loader, every cache state, `repeats` rounds; loaders alternate so a noisy minute hits them all."""
    files = data_files(folder)
    rows = []
    for repeat in range(repeats):
        for cache in caches:
            for name, data, make in loaders(folder, config, formats):
                if cache == "cold":
                    how = evict(files, drop_caches)
                    left = resident_fraction(files)
                    print(f"  evicted ({how}); resident after: {'?' if left is None else f'{left:.1%}'}", flush=True)
                else:
                    for _ in islice_batches(make(), config):  # warm: read the same data once first
                        pass
                row = measure(name, data, cache, repeat, make, config)
                rows.append(row)
                print(f"  {cache:4s} #{repeat} {name} [{data}]: {row.patches_per_s:.1f} patches/s, first batch "
                      f"{row.first_batch_s:.2f} s (load {row.load_average:.2f})", flush=True)
    return rows


def islice_batches(batches: Iterator, config: BenchConfig) -> Iterator:
    count = 0
    for batch in batches:
        count += len(batch)
        yield batch
        if count >= config.num_patches():
            batches.close()
            return


def summarise(rows: list[Row]) -> list[dict]:
    """Median patches/s and first-batch time per (cache, loader, data), with the range over repeats."""
    groups: dict[tuple[str, str, str], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.cache, row.loader, row.data), []).append(row)
    return [{"cache": cache, "loader": loader, "data": data,
             "patches_per_s": float(np.median([r.patches_per_s for r in group])),
             "range": (min(r.patches_per_s for r in group), max(r.patches_per_s for r in group)),
             "mb_per_s": float(np.median([r.mb_per_s for r in group])),
             "first_batch_s": float(np.median([r.first_batch_s for r in group])), "runs": len(group)}
            for (cache, loader, data), group in groups.items()]


def report(rows: list[Row], config: BenchConfig, formats: list[str]) -> None:
    summary = summarise(rows)
    mb = config.patch ** 3 * 4 / 1e6
    print(f"\nRandom {config.patch}^3 float32 patches ({mb:.2f} MB) from {config.subjects} volumes of {config.size}^3; "
          f"{config.per_volume} patches per volume visit, batch {config.batch}, {config.workers} workers, "
          f"{config.num_patches()} patches per run; median of {summary[0]['runs']} runs; mean 1-minute load "
          f"{np.mean([r.load_average for r in rows]):.2f} on {os.cpu_count()} CPUs")
    print("| cache | loader | data | patches/s (range) | MB/s | first batch (s) | ours / this |\n|---|---|---|---|---|---|---|")
    for entry in summary:
        ours_rate = next(e["patches_per_s"] for e in summary if e["cache"] == entry["cache"] and e["loader"].startswith("ours"))
        low, high = entry["range"]
        print(f"| {entry['cache']} | {entry['loader']} | {entry['data']} | {entry['patches_per_s']:.1f} ({low:.0f}-{high:.0f}) "
              f"| {entry['mb_per_s']:.0f} | {entry['first_batch_s']:.2f} | {ours_rate / entry['patches_per_s']:.2f} |")
    # Ratios are taken within each round (the loaders of a round ran minutes apart at most, under the same load from
    # other processes), then the median over rounds: steadier than a ratio of medians on a shared machine.
    targets = [(f"TorchIO (.{suffix})", ("TorchIO", f".{suffix}"), 5.0) for suffix in formats]
    targets += [(f"MONAI (.{suffix})", ("MONAI", f".{suffix}"), 3.0) for suffix in formats]
    targets.append(("raw ceiling", ("raw", "zarr chunk files"), 0.5))
    for cache in dict.fromkeys(row.cache for row in rows):
        checks = []
        for name, key, goal in targets:
            ratios = []
            for repeat in sorted({row.repeat for row in rows}):
                by = {(r.loader.split(":")[0].split(" ")[0], r.data): r.patches_per_s
                      for r in rows if r.cache == cache and r.repeat == repeat}
                ratios.append(by[("ours", "zarr, 32^3 chunks")] / by[key])
            value = float(np.median(ratios))
            checks.append(f"ours / {name} = {value:.2f} [{min(ratios):.2f}-{max(ratios):.2f}] "
                          f"(target >= {goal:g}: {'met' if value >= goal else 'MISSED'})")
        print(f"\n{cache}, median of per-round ratios [range]: " + "; ".join(checks))


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="runs/bench_loader", help="cache folder for the generated volumes")
    parser.add_argument("--quick", action="store_true", help="tiny volumes and few patches: a smoke test in seconds")
    parser.add_argument("--formats", default="nii.gz,nii", help="NIfTI variants for the peers (comma-separated)")
    parser.add_argument("--caches", default="cold,warm", help="cold (evicted before the run), warm (read once first)")
    parser.add_argument("--drop-caches", action="store_true", help="also write /proc/sys/vm/drop_caches (needs root)")
    parser.add_argument("--subjects", type=int, help="volumes in the cohort (default 20)")
    parser.add_argument("--patches", type=int, help="patches measured per run (default: one epoch)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds over all loaders; the table shows medians")
    parser.add_argument("--json", help="also write every run's row to this JSON file")
    args = parser.parse_args(argv)
    config = QUICK if args.quick else BenchConfig()
    if args.subjects:
        config.subjects = args.subjects
    if args.patches:
        config.patches = args.patches
    folder = Path(args.data) / ("quick" if args.quick else "full")
    formats = [f.strip().lstrip(".") for f in args.formats.split(",") if f.strip()]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; config {asdict(config)}")
    prepare_data(folder, config)
    rows = run(folder, config, formats, args.drop_caches, [c.strip() for c in args.caches.split(",")], args.repeats)
    report(rows, config, formats)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(row) for row in rows], indent=2))
    return rows


if __name__ == "__main__":
    main()
