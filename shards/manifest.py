"""One manifest row per subject: metadata, geometry, intensity statistics and quality flags.

Every writer of a cohort store (synthetic generator, file ingest) builds its rows with `summary_row`, so
the datasheet and the cohort builder can rely on these columns:

| column                                     | meaning                                                       |
| ------------------------------------------ | ------------------------------------------------------------- |
| `subject_id`                               | the subject's group name in the store                         |
| metadata columns                           | whatever the source provides (site, sex, age, ...), as given   |
| `shape_0`, `shape_1`, `shape_2`            | array shape in voxels                                         |
| `spacing_0`, `spacing_1`, `spacing_2`      | voxel size in mm, same axis order                             |
| `<channel>_mean/_std/_p01/_p99/_min/_max`  | intensity statistics of each channel (after preprocessing)     |
| `<channel>_noise`                          | robust noise estimate (MAD of neighbour differences)          |
| `label_foreground`                         | fraction of non-zero label voxels (only with a label)         |
| `flags`                                    | quality flags, `;`-separated, empty when none (`QUALITY_FLAGS`) |
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

# Quality flags and the rule that raises each; thresholds are module constants so the datasheet can print them.
ANISOTROPY_LIMIT = 3.0  # largest / smallest spacing
SMALL_FOV_VOXELS = 32  # any axis shorter than this
SATURATION_FRACTION = 0.05  # share of voxels at the channel's maximum (a dark background at the minimum is normal)
NOISY_SNR = 5.0  # (p99 - p01) / noise below this
QUALITY_FLAGS = {
    "anisotropic": f"largest spacing more than {ANISOTROPY_LIMIT:g}x the smallest",
    "small_fov": f"an axis shorter than {SMALL_FOV_VOXELS} voxels",
    "saturated": f"more than {SATURATION_FRACTION:.0%} of voxels at the maximum of a channel",
    "constant": "a channel with zero intensity spread",
    "noisy": f"(p99 - p01) / noise below {NOISY_SNR:g} in a channel",
    "empty_label": "a label map with no foreground voxel",
}


def noise_estimate(volume: np.ndarray) -> float:
    """Noise std from the median absolute difference of neighbours along the last axis.

    For white Gaussian noise of std s on a smooth image, neighbour differences have std s*sqrt(2) and
    MAD/0.6745 estimates that std robustly against edges.
    """
    differences = np.diff(volume.astype(np.float64, copy=False), axis=-1).ravel()
    if differences.size == 0:
        return 0.0
    mad = np.median(np.abs(differences - np.median(differences)))
    return float(mad / 0.6745 / np.sqrt(2.0))


def channel_statistics(name: str, volume: np.ndarray) -> dict[str, float]:
    """Intensity statistics of one channel, prefixed with its name."""
    values = volume.astype(np.float64, copy=False)
    p01, p99 = np.percentile(values, [1, 99])
    stats = {"mean": values.mean(), "std": values.std(), "p01": p01, "p99": p99, "min": values.min(),
             "max": values.max(), "noise": noise_estimate(volume)}
    return {f"{name}_{key}": round(float(value), 6) for key, value in stats.items()}


def quality_flags(channels: Mapping[str, np.ndarray], label: np.ndarray | None, spacing: list[float],
                  stats: Mapping[str, float]) -> list[str]:
    """The names of the `QUALITY_FLAGS` that apply to one subject."""
    flags = []
    if max(spacing) > ANISOTROPY_LIMIT * min(spacing):
        flags.append("anisotropic")
    if min(next(iter(channels.values())).shape) < SMALL_FOV_VOXELS:
        flags.append("small_fov")
    saturated = constant = noisy = False
    for name, volume in channels.items():
        low, high = stats[f"{name}_min"], stats[f"{name}_max"]
        if high == low:
            constant = True
            continue
        saturated |= np.count_nonzero(volume == high) > SATURATION_FRACTION * volume.size
        noise = stats[f"{name}_noise"]
        noisy |= noise > 0 and (stats[f"{name}_p99"] - stats[f"{name}_p01"]) / noise < NOISY_SNR
    flags += [flag for flag, raised in (("saturated", saturated), ("constant", constant), ("noisy", noisy)) if raised]
    if label is not None and not np.any(label):
        flags.append("empty_label")
    return flags


def summary_row(subject_id: str, *, metadata: Mapping[str, Any], channels: Mapping[str, np.ndarray],
                label: np.ndarray | None, spacing: list[float]) -> dict[str, Any]:
    """The manifest row of one subject (see the module docstring for the columns)."""
    shape = next(iter(channels.values())).shape
    row: dict[str, Any] = {"subject_id": subject_id, **metadata}
    row.update({f"shape_{axis}": int(size) for axis, size in enumerate(shape)})
    row.update({f"spacing_{axis}": round(float(size), 6) for axis, size in enumerate(spacing)})
    stats: dict[str, float] = {}
    for name, volume in channels.items():
        stats.update(channel_statistics(name, volume))
    row.update(stats)
    if label is not None:
        row["label_foreground"] = round(float(np.count_nonzero(label)) / label.size, 6)
    row["flags"] = ";".join(quality_flags(channels, label, spacing, stats))
    return row
