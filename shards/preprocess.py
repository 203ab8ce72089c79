"""Preprocessing of one subject between reading its files and writing it to the cohort store.

The stages, in order, each a small function that appends one entry to the subject's `provenance` (the step,
its parameters, and the shape and spacing before and after):

1. `assemble`: checks the volumes read from disk (finite voxels, one shared grid for all channels, a label
   on the same grid and integer-valued) and records the sources.
2. `reorient`: to canonical axis codes ("RAS" by default, nibabel's convention) with `nibabel.orientations`.
3. `resample`: to a target spacing with MONAI `Spacing` (bilinear for images, nearest for labels), or keep
   native; then checks that the label is still on the image's grid.
4. `crop_foreground`: optional, the bounding box (plus a margin) of voxels above a threshold in the first
   channel, in source units; applied to every channel and the label.
5. `apply_intensity`: one policy per channel from the `INTENSITY_POLICIES` registry (CT window, MR z-score,
   PET passthrough or SUV, none). It runs after the crop, so statistics such as the z-score's mean describe
   the voxels that are stored.
6. `finalize`: images to float32; the label to uint8 (or int16 when its values need it).

Arrays are (i, j, k) in voxel index order with a 4x4 RAS affine (see `shards/formats.py`). Problems with the
input raise `BadInput`, whose message is the reason listed in the ingest error report.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import ScaleIntensityRange, Spacing
from nibabel import orientations

from rafmedia.core.errors import UserError
from rafmedia.core.registry import Registry, unknown_name_error
from rafmedia.shards.formats import BadInput, Volume, affine_spacing

INTENSITY_POLICIES: Registry[IntensityPolicy] = Registry("intensity policy")


@dataclass
class SubjectVolumes:
    """The arrays of one subject while it is preprocessed; every channel and the label share `affine`."""

    channels: dict[str, np.ndarray]
    label: np.ndarray | None
    affine: np.ndarray
    provenance: list[dict[str, Any]] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, ...]:
        return next(iter(self.channels.values())).shape

    def geometry(self) -> dict[str, Any]:
        return {"shape": [int(size) for size in self.shape], "spacing": _rounded(affine_spacing(self.affine))}

    def record(self, step: str, params: dict[str, Any], before: dict[str, Any]) -> None:
        self.provenance.append({"step": step, "params": params, "before": before, "after": self.geometry()})


def _rounded(values, digits: int = 6) -> list[float]:
    return [round(float(value), digits) for value in np.ravel(values)]


def geometry_attrs(affine: np.ndarray) -> dict[str, Any]:
    """The store attributes describing a grid: spacing, RAS affine, origin, direction (row-major) and axis codes."""
    spacing = affine_spacing(affine)
    return {"spacing": _rounded(spacing), "affine": [_rounded(row) for row in affine],
            "origin": _rounded(affine[:3, 3]), "direction": _rounded(affine[:3, :3] / spacing[None, :]),
            "orientation": "".join(orientations.aff2axcodes(affine))}


# ---- 1. assemble -----------------------------------------------------------------------------------
def assemble(volumes: dict[str, Volume], label: Volume | None, *, tolerance_mm: float) -> SubjectVolumes:
    """Checks the volumes of one subject and stacks them into a `SubjectVolumes`; raises `BadInput`."""
    for channel, volume in volumes.items():
        _check_finite(f"channel '{channel}' ({volume.path.name})", volume.array)
    reference_name, reference = next(iter(volumes.items()))
    for channel, volume in list(volumes.items())[1:]:
        difference = grid_difference(reference, volume, tolerance_mm)
        if difference:
            raise BadInput(f"channel '{channel}' ({volume.path.name}) is not on the grid of channel "
                           f"'{reference_name}' ({reference.path.name}): {difference}; resample it onto one grid first")
    label_array = None
    if label is not None:
        _check_finite(f"label ({label.path.name})", label.array)
        difference = grid_difference(reference, label, tolerance_mm)
        if difference:
            raise BadInput(f"label ({label.path.name}) does not match image '{reference_name}' "
                           f"({reference.path.name}): {difference}")
        label_array = integer_label(label.array, label.path.name)
    subject = SubjectVolumes(channels={name: v.array.astype(np.float32) for name, v in volumes.items()},
                             label=label_array, affine=reference.affine.copy())
    sources = {name: {"path": str(v.path), **v.info} for name, v in volumes.items()}
    if label is not None:
        sources["label"] = {"path": str(label.path), **label.info}
    subject.record("read", {"reader": "SimpleITK", "sources": sources,
                            "orientation": geometry_attrs(subject.affine)["orientation"]}, subject.geometry())
    return subject


def _check_finite(what: str, array: np.ndarray) -> None:
    if np.issubdtype(array.dtype, np.floating):
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise BadInput(f"{what} has {bad} NaN or Inf voxels (of {array.size})")


def grid_difference(reference: Volume, other: Volume, tolerance_mm: float) -> str:
    """How `other`'s grid differs from `reference`'s (shape, spacing, origin, direction), or "" if it does not."""
    if reference.array.shape != other.array.shape:
        return f"shape {other.array.shape} vs {reference.array.shape}"
    spacing, reference_spacing = other.spacing, reference.spacing
    if np.abs(spacing - reference_spacing).max() > tolerance_mm:
        return f"spacing {_rounded(spacing, 4)} vs {_rounded(reference_spacing, 4)} mm"
    origin, reference_origin = other.affine[:3, 3], reference.affine[:3, 3]
    if np.abs(origin - reference_origin).max() > tolerance_mm:
        return f"origin {_rounded(origin, 3)} vs {_rounded(reference_origin, 3)} mm (RAS)"
    # Directions are compared through the far corner, so the tolerance stays in mm whatever the field of view.
    corner = np.array([*(np.array(reference.array.shape) - 1), 1.0])
    if np.abs(other.affine @ corner - reference.affine @ corner).max() > tolerance_mm:
        return (f"direction {_rounded(other.affine[:3, :3] / spacing, 4)} vs "
                f"{_rounded(reference.affine[:3, :3] / reference_spacing, 4)}")
    return ""


def integer_label(array: np.ndarray, name: str) -> np.ndarray:
    """The label as int64, refusing non-integer values (a probability map or an interpolated label)."""
    if np.issubdtype(array.dtype, np.floating):
        rounded = np.rint(array)
        if not np.array_equal(rounded, array):
            example = float(array[rounded != array].flat[0])
            raise BadInput(f"label ({name}) has non-integer values (e.g. {example:g}); expected a map of class indices")
        array = rounded
    return array.astype(np.int64)


# ---- 2. reorient -----------------------------------------------------------------------------------
def reorient(subject: SubjectVolumes, axcodes: str) -> SubjectVolumes:
    """Permutes and flips the array axes so they point along `axcodes` (nibabel's as_reoriented)."""
    before = subject.geometry()
    current = orientations.io_orientation(subject.affine)
    transform = orientations.ornt_transform(current, orientations.axcodes2ornt(tuple(axcodes)))
    source_codes = "".join(orientations.aff2axcodes(subject.affine))
    subject.affine = subject.affine @ orientations.inv_ornt_aff(transform, subject.shape)
    subject.channels = {name: orientations.apply_orientation(array, transform) for name, array in subject.channels.items()}
    if subject.label is not None:
        subject.label = orientations.apply_orientation(subject.label, transform)
    subject.record("reorient", {"from": source_codes, "to": axcodes}, before)
    return subject


# ---- 3. resample -----------------------------------------------------------------------------------
def resample(subject: SubjectVolumes, spacing: list[float] | None, *, tolerance_mm: float) -> SubjectVolumes:
    """Resamples to `spacing` (mm per array axis) with MONAI Spacing; None keeps the native grid."""
    before = subject.geometry()
    if spacing is None or np.allclose(affine_spacing(subject.affine), spacing, rtol=0, atol=1e-6):
        subject.record("resample", {"target_spacing": spacing, "done": False,
                                    "why": "native spacing kept" if spacing is None else "already at target spacing"},
                       before)
        return subject
    names = list(subject.channels)
    images, affine = _monai_spacing(np.stack([subject.channels[name] for name in names]), subject.affine, spacing,
                                    "bilinear")
    subject.channels = {name: images[index].astype(np.float32) for index, name in enumerate(names)}
    if subject.label is not None:
        label, label_affine = _monai_spacing(subject.label[None].astype(np.float32), subject.affine, spacing, "nearest")
        if label.shape[1:] != images.shape[1:] or np.abs(label_affine - affine).max() > tolerance_mm:
            raise BadInput(f"label not aligned with image after resampling: label {label.shape[1:]} vs image "
                           f"{images.shape[1:]}, affines differ by {np.abs(label_affine - affine).max():.4g} mm")
        subject.label = integer_label(label[0], "label after resampling")
    subject.affine = affine
    subject.record("resample", {"target_spacing": [float(s) for s in spacing], "done": True,
                                "image_mode": "bilinear", "label_mode": "nearest", "padding_mode": "border",
                                "library": "monai.transforms.Spacing"}, before)
    return subject


def _monai_spacing(array_CIJK: np.ndarray, affine: np.ndarray, spacing: list[float], mode: str):
    tensor = MetaTensor(torch.from_numpy(np.ascontiguousarray(array_CIJK)), affine=torch.as_tensor(affine))
    output = Spacing(pixdim=spacing, mode=mode, padding_mode="border")(tensor)
    return output.detach().cpu().numpy(), np.asarray(output.affine, dtype=np.float64)


# ---- 4. crop foreground ----------------------------------------------------------------------------
def crop_foreground(subject: SubjectVolumes, *, threshold: float, margin: int) -> SubjectVolumes:
    """Crops every array to the box of first-channel voxels above `threshold`, grown by `margin` voxels."""
    before = subject.geometry()
    channel, first = next(iter(subject.channels.items()))
    foreground = np.argwhere(first > threshold)
    if len(foreground) == 0:
        raise BadInput(f"no voxel of channel '{channel}' is above the foreground crop threshold {threshold:g} "
                       f"(its values span {float(first.min()):g} to {float(first.max()):g})")
    start = np.maximum(foreground.min(axis=0) - margin, 0)
    stop = np.minimum(foreground.max(axis=0) + 1 + margin, first.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(start, stop))
    subject.channels = {name: array[box] for name, array in subject.channels.items()}
    if subject.label is not None:
        subject.label = subject.label[box]
    subject.affine = subject.affine.copy()
    subject.affine[:3, 3] = (subject.affine @ np.array([*start, 1.0]))[:3]
    subject.record("crop_foreground", {"channel": channel, "threshold": threshold, "margin": margin,
                                       "box": [[int(a), int(b)] for a, b in zip(start, stop)]}, before)
    return subject


# ---- 5. intensity ----------------------------------------------------------------------------------
class IntensityPolicy:
    """Maps one channel's voxel values; returns the new array and what it measured (for the provenance)."""

    name = "none"

    def __call__(self, array: np.ndarray, *, metadata: Mapping[str, Any], channel: str) -> tuple[np.ndarray, dict]:
        return array, {}

    def params(self) -> dict[str, Any]:
        return {"name": self.name, **{key: value for key, value in vars(self).items()}}


@INTENSITY_POLICIES.register("none")
def _none() -> IntensityPolicy:
    return IntensityPolicy()


class CTWindow(IntensityPolicy):
    """Clips to the Hounsfield window [low, high] and scales it to [0, 1] (MONAI ScaleIntensityRange)."""

    name = "ct_window"

    def __init__(self, low: float = -1000.0, high: float = 1000.0):
        if not high > low:
            raise UserError(f"intensity policy ct_window: high ({high}) must be above low ({low})")
        self.low, self.high = float(low), float(high)

    def __call__(self, array, *, metadata, channel):
        scale = ScaleIntensityRange(a_min=self.low, a_max=self.high, b_min=0.0, b_max=1.0, clip=True)
        return np.asarray(scale(array).detach().cpu().numpy(), dtype=np.float32), {}


class MRZScore(IntensityPolicy):
    """Clips to the [lower, upper] percentiles, then subtracts the mean and divides by the std of the clipped
    voxels. With `nonzero`, statistics come from non-zero voxels only and zero voxels stay zero (skull-stripped MR)."""

    name = "mr_zscore"

    def __init__(self, lower: float = 0.5, upper: float = 99.5, nonzero: bool = False):
        if not 0 <= lower < upper <= 100:
            raise UserError(f"intensity policy mr_zscore: need 0 <= lower < upper <= 100, got {lower}, {upper}")
        self.lower, self.upper, self.nonzero = float(lower), float(upper), bool(nonzero)

    def __call__(self, array, *, metadata, channel):
        mask = array != 0 if self.nonzero else np.ones(array.shape, dtype=bool)
        if not mask.any():
            return array.astype(np.float32), {"note": "no non-zero voxel; left unchanged"}
        values = array[mask].astype(np.float64)
        low, high = np.percentile(values, [self.lower, self.upper])
        clipped = np.clip(values, low, high)
        mean, std = float(clipped.mean()), float(clipped.std())
        output = np.zeros(array.shape, dtype=np.float32)
        output[mask] = (clipped - mean) / std if std > 0 else 0.0
        return output, {"clip": [round(float(low), 6), round(float(high), 6)], "mean": round(mean, 6),
                        "std": round(std, 6)}


class PETPassthrough(IntensityPolicy):
    """Keeps the PET values as stored (activity concentration, or SUV already computed upstream)."""

    name = "pet_passthrough"


class PETSUV(IntensityPolicy):
    """Standardised uptake value: SUV = activity [Bq/mL] * body weight [g] / injected dose [Bq].

    Weight and dose come from the subject's metadata columns `weight_column` and `dose_column`, in
    `weight_unit` (kg or g) and `dose_unit` (Bq, kBq or MBq). A missing or non-positive value makes the
    subject bad. The dose is taken as given (decay correction to scan time is the listing's job).
    """

    name = "pet_suv"
    WEIGHT_TO_G: ClassVar[dict[str, float]] = {"kg": 1000.0, "g": 1.0}
    DOSE_TO_BQ: ClassVar[dict[str, float]] = {"Bq": 1.0, "kBq": 1e3, "MBq": 1e6}

    def __init__(self, weight_column: str = "weight", dose_column: str = "injected_dose", weight_unit: str = "kg",
                 dose_unit: str = "Bq"):
        if weight_unit not in self.WEIGHT_TO_G:
            raise unknown_name_error("pet_suv weight_unit", weight_unit, self.WEIGHT_TO_G)
        if dose_unit not in self.DOSE_TO_BQ:
            raise unknown_name_error("pet_suv dose_unit", dose_unit, self.DOSE_TO_BQ)
        self.weight_column, self.dose_column = weight_column, dose_column
        self.weight_unit, self.dose_unit = weight_unit, dose_unit

    def __call__(self, array, *, metadata, channel):
        weight = self._positive(metadata, self.weight_column, channel) * self.WEIGHT_TO_G[self.weight_unit]
        dose = self._positive(metadata, self.dose_column, channel) * self.DOSE_TO_BQ[self.dose_unit]
        factor = weight / dose
        return (array.astype(np.float64) * factor).astype(np.float32), {"weight_g": weight, "dose_bq": dose,
                                                                        "factor": factor}

    @staticmethod
    def _positive(metadata: Mapping[str, Any], column: str, channel: str) -> float:
        value = metadata.get(column)
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = float("nan")
        if not number > 0:  # also catches NaN
            raise BadInput(f"pet_suv for channel '{channel}' needs a positive number in metadata column "
                           f"'{column}', got {value!r}")
        return number


for _policy in (CTWindow, MRZScore, PETPassthrough, PETSUV):
    INTENSITY_POLICIES.register(_policy.name)(_policy)


def create_intensity_policy(name: str, **options) -> IntensityPolicy:
    """Builds a registered intensity policy; unknown names and options are `UserError`s with "did you mean"."""
    return INTENSITY_POLICIES.create(name, **options)


def list_intensity_policies() -> list[str]:
    return INTENSITY_POLICIES.names()


def policy_entry(channel: str, intensity: Mapping[str, Mapping[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The config entry for `channel`: its exact name, else case-insensitively, else its last `_` part (the
    BIDS suffix of "acq-inhale_ct" is "ct"), else "default". Returns (the key matched, the entry)."""
    lowered = {key.lower(): key for key in intensity}
    for candidate in (channel, channel.lower(), channel.rsplit("_", 1)[-1].lower(), "default"):
        key = candidate if candidate in intensity else lowered.get(candidate)
        if key is not None:
            return key, dict(intensity[key])
    return "default", {"name": "none"}


def apply_intensity(subject: SubjectVolumes, intensity: Mapping[str, Mapping[str, Any]],
                    metadata: Mapping[str, Any]) -> SubjectVolumes:
    """Applies each channel's policy (chosen by `policy_entry`)."""
    before = subject.geometry()
    params = {}
    for channel, array in subject.channels.items():
        key, entry = policy_entry(channel, intensity)
        policy = create_intensity_policy(entry.pop("name", "none"), **entry)
        subject.channels[channel], measured = policy(array, metadata=metadata, channel=channel)
        params[channel] = {"config_key": key, **policy.params(), **measured}
    subject.record("intensity", params, before)
    return subject


# ---- 6. finalize -----------------------------------------------------------------------------------
def finalize(subject: SubjectVolumes) -> SubjectVolumes:
    """float32 images; the smallest of uint8 / int16 that holds the label's values."""
    before = subject.geometry()
    subject.channels = {name: np.ascontiguousarray(array, dtype=np.float32) for name, array in subject.channels.items()}
    label_dtype = None
    if subject.label is not None:
        low, high = int(subject.label.min()), int(subject.label.max())
        label_dtype = next((dtype for dtype in (np.uint8, np.int16)
                            if np.iinfo(dtype).min <= low and high <= np.iinfo(dtype).max), None)
        if label_dtype is None:
            raise BadInput(f"label values span {low} to {high}, outside int16; store class indices instead")
        subject.label = np.ascontiguousarray(subject.label, dtype=label_dtype)
    subject.record("cast", {"image_dtype": "float32",
                            "label_dtype": None if label_dtype is None else np.dtype(label_dtype).name}, before)
    return subject
