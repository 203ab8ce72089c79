"""Alteration benchmark: voxels/s of every registered alteration on CPU, next to TorchIO's and MONAI's equivalents.

For each alteration in the registry (`list_alterations()`, so alterations added later are picked up by themselves)
and each input, one `(1, 1, S, S, S)` volume and a batch of 8 (default S = 128), the benchmark times:

- ours: `create_alteration(name, severity=...)` called once on the whole batch with a seeded generator;
- TorchIO and MONAI: the peer transform listed in `PEERS` for that name, at the same parameter as far as the two
  parameterisations allow (see each builder), applied to each (C, D, H, W) sample in turn, since those libraries
  transform one subject at a time. An alteration without a peer gets "-".

Everyone runs in this process with the same torch thread count (`--threads`; SimpleITK, behind TorchIO's motion
and elastic transforms, gets the same). The volume is a rendered synthetic body scan (anatomy, texture, noise); the
batch repeats it, which does not change the work. Each measurement is the median of `--repeats` timed calls after
one warm-up call. The table prints Mvoxels/s, the ratios ours / peer and, at the end, the geometric mean of the
ratios against TorchIO (the issue's target: >= 3x on CPU).

With `--device cuda` ours runs on the GPU (the batch moved there once, a CUDA generator, the device synchronised
around each timed call) while the peers stay on the CPU, as users run them: the ratio is then GPU-ours over
CPU-TorchIO (the GPU check's target: >= 50x).

Run:  python benchmarks/alterations.py [--size 128] [--batch 8] [--severity 3] [--threads 2] [--repeats 3]
      [--only gaussian_noise,motion] [--device cpu|cuda] [--quick]
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

warnings.filterwarnings("ignore")

PeerBuilder = Callable[[float, torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]


# ---- peers: name -> (library -> builder(parameter, sample_CDHW) -> transform of one sample) ------------------------
def _tio(name: str, **kwargs):
    import torchio as tio

    transform = getattr(tio, name)(**kwargs)
    return lambda x_CDHW: transform(x_CDHW)


def _monai(name: str, **kwargs):
    import monai.transforms as mt

    transform = getattr(mt, name)(prob=1.0, **kwargs)
    transform.set_random_state(seed=0)
    return lambda x_CDHW: transform(x_CDHW)


def _spectrum_max(x_CDHW: torch.Tensor) -> float:
    return float(torch.fft.fftn(x_CDHW.float(), dim=(1, 2, 3)).abs().max())


PEERS: dict[str, dict[str, PeerBuilder]] = {
    # our std is `p` x each volume's std
    "gaussian_noise": {
        "TorchIO": lambda p, x: _tio("RandomNoise", mean=0.0, std=(p * float(x.std()),) * 2),
        "MONAI": lambda p, x: _monai("RandGaussianNoise", mean=0.0, std=p * float(x.std()), sample_std=False)},
    # ours: a unit-std log field of a degree-3 polynomial times p; the peers draw degree-3 coefficients up to p
    "bias_field": {
        "TorchIO": lambda p, x: _tio("RandomBiasField", coefficients=p, order=3),
        "MONAI": lambda p, x: _monai("RandBiasField", degree=3, coeff_range=(0.0, p))},
    "gibbs_ringing": {"MONAI": lambda p, x: _monai("RandGibbsNoise", alpha=(p, p))},  # the same alpha
    # one spike of p x the spectrum maximum (TorchIO's intensity is that ratio; MONAI takes the log of the value)
    "kspace_spike": {
        "TorchIO": lambda p, x: _tio("RandomSpike", num_spikes=1, intensity=(p, p)),
        "MONAI": lambda p, x: _monai("RandKSpaceSpikeNoise", intensity_range=(math.log(p * _spectrum_max(x)),) * 2)},
    # our sigma is p x the mean |intensity|
    "rician_noise": {"MONAI": lambda p, x: _monai("RandRicianNoise", mean=0.0, std=p * float(x.abs().mean()),
                                                  relative=False, sample_std=False)},
    # rigid motion of up to p degrees and p voxels, two moved positions
    "motion": {"TorchIO": lambda p, x: _tio("RandomMotion", degrees=p, translation=p, num_transforms=2)},
    # ghosts along the last axis, intensity p
    "ghosting": {"TorchIO": lambda p, x: _tio("RandomGhosting", num_ghosts=(2, 4), axes=(2,), intensity=(p, p))},
    # our per-axis sigma is p x U(0.25, 1) voxels (1 mm voxels)
    "anisotropic_blur": {"TorchIO": lambda p, x: _tio("RandomBlur", std=(0.25 * p, p))},
    # slabs of p slices along D
    "thick_slices": {"TorchIO": lambda p, x: _tio("RandomAnisotropy", axes=(0,), downsampling=(p, p))},
    # |log gamma| = p
    "gamma": {"TorchIO": lambda p, x: _tio("RandomGamma", log_gamma=(p, p))},
    # our largest displacement is p x the volume side; TorchIO's max_displacement is in voxels (1 mm)
    "elastic": {"TorchIO": lambda p, x: _tio("RandomElasticDeformation", num_control_points=7,
                                             max_displacement=min(p * x.shape[-1], x.shape[-1] / 8 - 1))},
}
LIBRARIES = ("TorchIO", "MONAI")


# ---- measuring ---------------------------------------------------------------------------------------------------
@dataclass
class Row:
    alteration: str
    batch: int
    ours: float  # voxels/s
    peers: dict[str, float]  # library -> voxels/s (absent: no peer)


def median_seconds(call: Callable[[], object], repeats: int, device: str = "cpu") -> float:
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    call()  # warm-up: first-call allocations and lazy imports are not measured
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        call()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def volume(size: int, seed: int = 0) -> torch.Tensor:
    """A rendered synthetic body scan, (1, 1, S, S, S) float32."""
    from rafmedia.shards.synth import CohortConfig, assign_subjects, render_subject

    config = CohortConfig(num_subjects=2, shape=[size] * 3, seed=seed)
    image = render_subject(assign_subjects(config)[0], config, config.sites[0])[0]
    return torch.from_numpy(np.asarray(image, np.float32)).reshape(1, 1, size, size, size)


def measure(name: str, x_BCDHW: torch.Tensor, severity: int, repeats: int, device: str = "cpu") -> Row:
    from rafmedia.shards.alterations import create_alteration

    alteration = create_alteration(name, severity=severity)
    generator = torch.Generator(device=device).manual_seed(0)
    voxels = x_BCDHW.numel() / x_BCDHW.shape[1]
    x_on_device = x_BCDHW.to(device)
    ours = voxels / median_seconds(lambda: alteration(x_on_device, generator), repeats, device)
    peers = {}
    for library, build in PEERS.get(name, {}).items():
        transform = build(alteration.parameter, x_BCDHW[0])
        peers[library] = voxels / median_seconds(lambda transform=transform: [transform(sample) for sample in x_BCDHW],
                                                  repeats)
    return Row(name, x_BCDHW.shape[0], ours, peers)


# ---- reporting ---------------------------------------------------------------------------------------------------
def table(rows: list[Row]) -> str:
    header = f"{'alteration':24s} {'batch':>5s} {'ours Mvox/s':>12s}" + "".join(
        f" {library + ' Mvox/s':>15s} {'ratio':>7s}" for library in LIBRARIES)
    lines = [header, "-" * len(header)]
    for row in rows:
        line = f"{row.alteration:24s} {row.batch:5d} {row.ours / 1e6:12.1f}"
        for library in LIBRARIES:
            speed = row.peers.get(library)
            line += f" {speed / 1e6:15.1f} {row.ours / speed:6.2f}x" if speed else f" {'-':>15s} {'-':>7s}"
        lines.append(line)
    return "\n".join(lines)


def geometric_mean_ratio(rows: list[Row], library: str) -> float | None:
    ratios = [row.ours / row.peers[library] for row in rows if library in row.peers]
    return math.exp(sum(math.log(r) for r in ratios) / len(ratios)) if ratios else None


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128, help="volume side (default 128)")
    parser.add_argument("--batch", type=int, default=8, help="the batched input's size (default 8; 1 is always run)")
    parser.add_argument("--severity", type=int, default=3, help="severity 1-5 of every alteration (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch and SimpleITK threads for everyone (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement; the median is kept")
    parser.add_argument("--only", default="", help="comma-separated alteration names (default: all registered)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where ours runs (the peers always run on the CPU); default cpu")
    parser.add_argument("--quick", action="store_true", help="32^3, batch 2, 1 repeat: checks that everything runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.batch, args.repeats = 32, 2, 1
    from rafmedia.shards.alterations import list_alterations

    torch.set_num_threads(args.threads)
    try:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    except ImportError:
        pass
    names = [n for n in args.only.split(",") if n] or list_alterations()
    unknown_peers = sorted(set(PEERS) - set(list_alterations()))
    if unknown_peers:
        print(f"note: peers listed for alterations not registered (yet): {', '.join(unknown_peers)}")
    single = volume(args.size)
    inputs = [single] + ([single.repeat(args.batch, 1, 1, 1, 1)] if args.batch > 1 else [])
    rows = [measure(name, x, args.severity, args.repeats, args.device) for name in names for x in inputs]
    where = f"ours on {torch.cuda.get_device_name()}, peers on the CPU" if args.device == "cuda" else "CPU"
    print(f"{where}, {args.threads} threads, volume {args.size}^3, severity {args.severity}, median of {args.repeats}")
    print(table(rows))
    for library in LIBRARIES:
        mean = geometric_mean_ratio(rows, library)
        if mean is not None:
            print(f"geometric mean ratio vs {library}: {mean:.2f}x over "
                  f"{sum(library in row.peers for row in rows)} measurements")
    return rows


if __name__ == "__main__":
    main()
