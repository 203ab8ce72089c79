"""Reading medical image files into (i, j, k) arrays with a RAS+ affine, the convention of nibabel/MONAI/TorchIO.

Every format goes through SimpleITK: NIfTI (.nii, .nii.gz), NRRD (.nrrd), MetaImage (.mha, .mhd + its data
file) and DICOM series folders (`ImageSeriesReader`, slices sorted by GDCM, rescale slope/intercept applied).
SimpleITK's `GetArrayFromImage` returns (k, j, i) arrays and LPS geometry; `read_volume` transposes to voxel
index order (i, j, k) and converts the geometry to a 4x4 RAS affine::

    affine_LPS[:3, :3] = direction @ diag(spacing)      affine_LPS[:3, 3] = origin
    affine_RAS = diag(-1, -1, 1, 1) @ affine_LPS

so `affine_RAS @ [i, j, k, 1]` is the world position (mm, RAS+) of voxel (i, j, k), as `nibabel.load(...).affine`.

A folder holding several DICOM series is read as its largest series (most files; ties broken by the smaller
series UID, so the choice is reproducible) and the choice, with the UIDs left out, is recorded in `Volume.info`.
Anything that cannot be read as one 3D scalar volume raises `BadInput`, whose message is the reason shown in
the ingest error report. NIfTI files are decoded a second time with nibabel, because ITK's NIfTI reader
silently zero-fills a truncated file and turns NaN/Inf voxels into 0 (measured with SimpleITK 2.5); the NRRD,
MetaImage and DICOM readers report truncation themselves.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel
import numpy as np
import SimpleITK as sitk

from rafmedia.core.errors import UserError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
DATA_SUFFIXES = (".raw", ".zraw", ".img")  # payloads of .mhd headers: not images on their own
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class BadInput(UserError):
    """One subject's input cannot be ingested; the message is the reason listed in the error report."""


@dataclass
class Volume:
    """One image read from disk: voxels in index order (i, j, k) and a 4x4 RAS affine."""

    array: np.ndarray
    affine: np.ndarray
    path: Path
    files: list[Path]  # every file the volume was read from (checksummed)
    info: dict[str, Any] = field(default_factory=dict)  # format, and the DICOM series chosen

    @property
    def spacing(self) -> np.ndarray:
        return affine_spacing(self.affine)


def image_suffix(path: str | Path) -> str | None:
    """The image suffix of a file name (".nii.gz", ".nrrd", ...), or None when it is not an image file."""
    name = Path(path).name.lower()
    return next((suffix for suffix in IMAGE_SUFFIXES if name.endswith(suffix)), None)


def strip_suffix(path: str | Path) -> str:
    """The file name without its image suffix ("a.nii.gz" -> "a")."""
    name = Path(path).name
    suffix = image_suffix(name)
    return name[: -len(suffix)] if suffix else name


def affine_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size along each array axis: the lengths of the affine's first three columns."""
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


def itk_affine_ras(image) -> np.ndarray:
    """The 4x4 RAS affine of a 3D SimpleITK image (voxel index (i, j, k) -> world mm)."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine_lps = np.eye(4)
    affine_lps[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=np.float64)[None, :]
    affine_lps[:3, 3] = image.GetOrigin()
    return LPS_TO_RAS @ affine_lps


def read_volume(path: str | Path) -> Volume:
    """Reads a 3D image file or DICOM series folder. Raises `BadInput` with the reason when it cannot."""
    path = Path(path)
    sitk.ProcessObject_SetGlobalWarningDisplay(False)  # ITK prints warnings to stderr, over the progress bar
    if path.is_dir():
        image, files, info = _read_dicom_series(path)
    elif path.is_file():
        if image_suffix(path) is None:
            raise BadInput(f"{path.name}: not a supported image file (supported: {', '.join(IMAGE_SUFFIXES)} "
                           "or a folder holding a DICOM series)")
        image = _itk_call(sitk.ReadImage, str(path), what=path.name)
        files, info = [path, *_metaimage_data_files(path)], {"format": image_suffix(path).lstrip(".")}
        if image_suffix(path) in (".nii", ".nii.gz"):
            _check_nifti_data(path)
    else:
        raise BadInput(f"file not found: {path}")
    image = _as_3d_scalar(image, path.name, info)
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # (k, j, i) -> (i, j, k)
    return Volume(array=array, affine=itk_affine_ras(image), path=path, files=files, info=info)


def _itk_call(function, *args, what: str):
    try:
        return function(*args)
    except RuntimeError as error:
        raise BadInput(f"{what}: unreadable or corrupt ({itk_error_summary(str(error))})") from None


def itk_error_summary(message: str) -> str:
    """The informative part of an ITK exception text (which spans several lines and names source files)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    errors = [line.split("ERROR:", 1)[1].strip() for line in lines if "ERROR:" in line]
    summary = errors[-1] if errors else (lines[-1] if lines else "unknown error")
    if lines and errors and "ERROR:" not in lines[-1] and lines[-1] not in summary:
        summary += f"; {lines[-1]}"
    summary = re.sub(r"\w+ImageIO\(0x[0-9a-f]+\): ", "", summary)
    return summary[:300]


def _as_3d_scalar(image, name: str, info: dict[str, Any]):
    """Accepts 3D scalar images, and 4D images holding a single volume (read as 3D)."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise BadInput(f"{name}: a vector image ({image.GetNumberOfComponentsPerPixel()} components per voxel, "
                       "e.g. RGB); expected one scalar per voxel")
    size = tuple(image.GetSize())
    if image.GetDimension() == 4 and size[3] == 1:
        info["squeezed"] = "4D image with a single volume read as 3D"
        return image[:, :, :, 0]
    if image.GetDimension() != 3:
        raise BadInput(f"{name}: expected a 3D volume, got a {image.GetDimension()}D image of size {size}")
    return image


def _check_nifti_data(path: Path) -> None:
    """Reads the voxels again with nibabel: ITK's NIfTI reader (nifticlib) silently zero-fills a truncated file
    and replaces NaN and Inf voxels with 0, so both are caught here (at the cost of a second decode)."""
    try:
        image = nibabel.load(path)
        data = np.asanyarray(image.dataobj)
    except Exception as error:  # nibabel raises OSError, EOFError, zlib.error, ImageFileError, ValueError, ...
        raise BadInput(f"{path.name}: truncated or corrupt ({str(error).splitlines()[0]})") from None
    if data.dtype.kind == "f":
        bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        if bad:
            raise BadInput(f"{path.name} has {bad} NaN or Inf voxels (of {data.size})")


def _metaimage_data_files(path: Path) -> list[Path]:
    """The data file named by a .mhd header (so the checksum covers the voxels, not only the header)."""
    if image_suffix(path) != ".mhd":
        return []
    for line in path.read_text(encoding="latin-1", errors="replace").splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "ElementDataFile" and value.strip() not in ("LOCAL", "LIST") and "%" not in value:
            return [path.parent / value.strip()]
    return []


def _read_dicom_series(folder: Path):
    reader = sitk.ImageSeriesReader()
    series = _itk_call(reader.GetGDCMSeriesIDs, str(folder), what=folder.name)
    if not series:
        raise BadInput(f"{folder.name}/: no DICOM series found in this folder (and it is not an image file)")
    files = {uid: list(reader.GetGDCMSeriesFileNames(str(folder), uid)) for uid in series}
    chosen = min(series, key=lambda uid: (-len(files[uid]), uid))  # most files; ties by UID, reproducibly
    reader.SetFileNames(files[chosen])
    image = _itk_call(reader.Execute, what=f"{folder.name}/ (DICOM series {chosen})")
    info: dict[str, Any] = {"format": "dicom", "series_uid": chosen, "num_files": len(files[chosen])}
    if len(series) > 1:
        info["other_series"] = {uid: len(files[uid]) for uid in series if uid != chosen}
    return image, sorted(Path(name) for name in files[chosen]), info


def source_checksum(files: list[Path], root: Path | None = None) -> str:
    """sha256 of one file's bytes, or of the sorted (name, sha256) lines of several files (a DICOM series)."""
    if len(files) == 1:
        return _file_sha256(files[0])
    digest = hashlib.sha256()
    for path in sorted(files):
        name = path.relative_to(root) if root is not None and path.is_relative_to(root) else path.name
        digest.update(f"{name}\0{_file_sha256(path)}\n".encode())
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as error:
        raise BadInput(f"cannot read {path}: {error.strerror}") from None
    return digest.hexdigest()
