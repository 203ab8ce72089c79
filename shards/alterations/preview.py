"""`raf alter preview`: a PNG grid of alterations x severities on one volume's middle axial slice.

The volume comes from a NIfTI file, `STORE:subject_id`, or a store (its first subject). Arrays are read in voxel
order (i, j, k), as nibabel and the cohort store hold them, and turned into the torch (D, H, W) = (k, j, i)
layout, so that for RAS-oriented data slices along D are axial and the CT alterations act in the axial plane.
Large volumes are first resampled to at most `max_size` voxels per side: a preview, not a measurement.

Every cell uses the same seed, so a row shows one random draw made stronger from severity 1 to 5, and every
cell shares the clean slice's intensity window, so contrast changes show as such.
"""
from __future__ import annotations

from pathlib import Path

import nibabel
import numpy as np
import torch
import torch.nn.functional as F

from rafmedia.core.errors import UserError
from rafmedia.core.files import atomic_write_bytes
from rafmedia.core.render import png, subplots
from rafmedia.shards.alterations.base import ALTERATIONS, NUM_SEVERITIES, create_alteration, list_alterations
from rafmedia.shards.store import CohortStore, resolve_store

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def load_preview_volume(source: str) -> tuple[np.ndarray, str]:
    """Reads `source` as an (i, j, k) float32 array; returns it and a short description of where it came from."""
    path = Path(source)
    if path.is_file():
        if not path.name.endswith(NIFTI_SUFFIXES):
            raise UserError(f"'{source}' is not a NIfTI file (.nii or .nii.gz); give a NIfTI file, a cohort store, "
                            "or STORE:subject_id")
        return _read_nifti(path), path.name
    if path.is_dir():
        store = _open_store(path)
        subjects = store.subject_ids()
        if not subjects:
            raise UserError(f"cohort store {store.path} has no finished subjects; name a subject as STORE:subject_id")
        return store.read(subjects[0]).astype(np.float32), f"{subjects[0]} (first subject of {store.path})"
    if ":" in source:
        store_path, subject_id = source.rsplit(":", 1)
        if Path(store_path).is_dir():
            return _open_store(Path(store_path)).read(subject_id).astype(np.float32), subject_id
    raise UserError(f"volume '{source}' not found: give a NIfTI file, a cohort store (folder), or STORE:subject_id")


def _read_nifti(path: Path) -> np.ndarray:
    try:
        array = np.asarray(nibabel.load(str(path)).dataobj, dtype=np.float32)
    except Exception as error:  # nibabel raises OSError, EOFError, ImageFileError, ValueError, ...
        raise UserError(f"cannot read NIfTI file {path}: {error}") from error
    array = np.squeeze(array)
    if array.ndim != 3:
        raise UserError(f"NIfTI file {path} holds a {array.ndim}-D image of shape {array.shape}; the preview needs "
                        "one 3-D volume")
    return array


def _open_store(path: Path) -> CohortStore:
    path = resolve_store(path)
    if not (path / "zarr.json").is_file():
        raise UserError(f"{path} is not a cohort store (no zarr.json); create one with `raf synth --out DIR`")
    return CohortStore(path)


def to_preview_tensor(volume_IJK: np.ndarray, max_size: int) -> torch.Tensor:
    """(1, 1, D, H, W) float32 = (k, j, i), resampled so that no side exceeds `max_size`."""
    x = torch.from_numpy(np.ascontiguousarray(volume_IJK.transpose(2, 1, 0))).float()[None, None]
    largest = max(x.shape[2:])
    if largest > max_size:
        size = [max(1, round(side * max_size / largest)) for side in x.shape[2:]]
        x = F.interpolate(x, size=size, mode="trilinear", align_corners=False)
    return x


def preview_slices(x_11DHW: torch.Tensor, names: list[str], seed: int) -> dict[str, list[np.ndarray]]:
    """Per alteration: the middle slice along D of the clean volume, then of severities 1..5 (one seed for all)."""
    middle = x_11DHW.shape[2] // 2
    clean = x_11DHW[0, 0, middle].numpy()
    rows = {}
    for name in names:
        cells = [clean]
        for severity in range(1, NUM_SEVERITIES + 1):
            altered = create_alteration(name, severity=severity)(x_11DHW, torch.Generator().manual_seed(seed))
            cells.append(altered[0, 0, altered.shape[2] // 2].numpy())
        rows[name] = cells
    return rows


def render_grid(rows: dict[str, list[np.ndarray]], title: str) -> bytes:
    """PNG bytes: one row per alteration; columns clean, s=1..5; one intensity window for all cells.

    The window is the clean slice's 0.5-99.5 percentile range widened by 15% each way.
    """
    clean = next(iter(rows.values()))[0]
    low, high = np.percentile(clean, [0.5, 99.5])
    margin = 0.15 * (high - low) if high > low else 1.0  # room for brightened / darkened cells before they clip
    low, high = low - margin, high + margin
    figure, axes = subplots(len(rows), NUM_SEVERITIES + 1, figsize=(2.0 * (NUM_SEVERITIES + 1), 2.1 * len(rows)),
                                squeeze=False)
    for row, (name, cells) in enumerate(rows.items()):
        parameters = ALTERATIONS.get(name).severity_parameters
        for column, cell in enumerate(cells):
            axis = axes[row, column]
            axis.imshow(cell.T, cmap="gray", vmin=low, vmax=high, origin="lower", interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            axis.set_title("clean" if column == 0 else f"s={column}: {parameters[column - 1]:g}", fontsize=8)
        axes[row, 0].set_ylabel(name, fontsize=9)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout(rect=(0, 0, 1, 0.97))  # leave room for the title
    return png(figure, dpi=80, tight=False)


def write_preview(source: str, out: str | Path, *, alterations: list[str] | None = None, seed: int = 0,
                  max_size: int = 128) -> dict:
    """Writes the preview grid PNG to `out` (atomically); returns what was drawn."""
    names = alterations or list_alterations()
    for name in names:
        ALTERATIONS.get(name)  # unknown names fail here with "did you mean", before any work
    volume, description = load_preview_volume(source)
    x = to_preview_tensor(volume, max_size)
    rows = preview_slices(x, names, seed)
    title = f"{description}: middle axial slice {x.shape[2] // 2} of {x.shape[2]}, seed {seed}"
    path = atomic_write_bytes(out, render_grid(rows, title))
    return {"path": path, "alterations": names, "shape": tuple(x.shape[2:]), "source": description}
