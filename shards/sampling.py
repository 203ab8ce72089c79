"""Patch samplers behind one registry, and the grid aggregator that stitches patch predictions back together.

A sampler draws patches from one subject through a *subject reader* (`SubjectReader`: `subject_id`, `shape`,
`channels`, `attrs`, `has_label`, `read(channel, region)`, `read_label(region)`), so the same sampler runs over a
zarr cohort store (reading only the chunks a patch overlaps) and over volumes decoded in memory (webdataset).

Sampling is split in two steps, so a stream can skip patches without reading them:

- `plan(reader, rng)` yields patch plans (origins, the class a centre was drawn from): cheap, it reads at most the
  label map. Random samplers yield forever; the grid sampler yields each window once.
- `extract(reader, plan)` reads only the plan's region(s) and returns the patch dict
  `{"subject_id", "image" (C, d, h, w) float32, "label" (1, d, h, w) when the subject has one, "origin" (3,), ...}`.

| sampler          | what it draws                                                         | like                                   |
| ---------------- | --------------------------------------------------------------------- | -------------------------------------- |
| `uniform`        | origins uniform over every position where the patch fits               | TorchIO UniformSampler, MONAI RandSpatialCrop |
| `label_balanced` | a centre voxel of a class drawn with `foreground_probability` or `class_weights` | MONAI RandCropByPosNegLabel / RandCropByLabelClasses |
| `grid`           | every window of a grid with `overlap`, for inference (see `GridAggregator`) | MONAI sliding_window_inference, TorchIO GridSampler |
| `paired`         | two views of one subject: two crops at most `max_shift` apart, or `channels=[a, b]` at one location | two-crop contrastive views, multi-contrast / longitudinal pairs |

Every random draw comes from the numpy Generator the caller passes (the stream seeds one per subject visit).
"""
from __future__ import annotations

import warnings
from collections import Counter
from typing import Any, Iterator, Protocol, Sequence

import numpy as np
import torch

from rafmedia.core.errors import UserError
from rafmedia.core.registry import Registry, unknown_name_error

SAMPLERS: Registry["PatchSampler"] = Registry("patch sampler")
Region = tuple[slice, slice, slice]
# Above this share of the volume, a class's voxels are found by rejection sampling (a few random probes) instead of
# listing them all: listing the background of a 256^3 volume would be an 80 MB index array per visit.
_DENSE_CLASS_FRACTION = 0.05


class SubjectReader(Protocol):
    """What a sampler needs from one subject. `channels` are the ones stacked into "image"."""

    subject_id: str
    shape: tuple[int, int, int]
    channels: tuple[str, ...]
    attrs: dict[str, Any]
    has_label: bool

    def read(self, channel: str, region: Region | None = None) -> np.ndarray: ...  # may also take out=array

    def read_label(self, region: Region | None = None) -> np.ndarray: ...


class ArraySubject:
    """A subject held in memory (decoded webdataset sample, tests): the `SubjectReader` over numpy arrays."""

    def __init__(self, subject_id: str, channels: dict[str, np.ndarray], label: np.ndarray | None = None,
                 attrs: dict[str, Any] | None = None, image_channels: Sequence[str] | None = None):
        shapes = {array.shape for array in channels.values()} | ({label.shape} if label is not None else set())
        if len(shapes) != 1 or len(next(iter(shapes))) != 3:
            raise UserError(f"subject '{subject_id}': channels and label must be 3D arrays of one shape, got {shapes}")
        self.subject_id, self.attrs, self.has_label = subject_id, dict(attrs or {}), label is not None
        self._arrays, self._label = channels, label
        self.shape = tuple(int(size) for size in next(iter(shapes)))
        self.channels = tuple(image_channels or channels)
        missing = [name for name in self.channels if name not in channels]
        if missing:
            raise UserError(f"subject '{subject_id}' has no channel {missing} (it has: {', '.join(channels)})")

    def read(self, channel: str, region: Region | None = None) -> np.ndarray:
        if channel not in self._arrays:
            raise UserError(f"subject '{self.subject_id}' has no channel '{channel}' (it has: {', '.join(self._arrays)})")
        # a copy: a view would keep (and, sent to another process, share) the whole volume
        return np.array(self._arrays[channel][region if region is not None else ...])

    def read_label(self, region: Region | None = None) -> np.ndarray:
        if self._label is None:
            raise UserError(f"subject '{self.subject_id}' has no label map")
        return np.array(self._label[region if region is not None else ...])


# ---- helpers -------------------------------------------------------------------------------------
def as_triple(size: int | Sequence[int], name: str = "patch_size") -> tuple[int, int, int]:
    """A cubic size or three sizes, as a tuple of three positive ints."""
    sizes = (int(size),) * 3 if np.isscalar(size) else tuple(int(s) for s in size)
    if len(sizes) != 3 or min(sizes) < 1:
        raise UserError(f"{name} must be a positive int or three positive ints, got {size}")
    return sizes


def region_at(origin: Sequence[int], size: Sequence[int]) -> Region:
    return tuple(slice(int(o), int(o) + int(s)) for o, s in zip(origin, size))


def read_image(reader: SubjectReader, region: Region, channels: Sequence[str] | None = None,
               out: np.ndarray | None = None) -> np.ndarray:
    """The (C, d, h, w) float32 stack of `channels` (default: the reader's) over `region`, written into `out` if given."""
    names = channels or reader.channels
    if out is not None:
        direct = getattr(reader, "read_into_supported", False) and out.dtype == np.float32
        for index, name in enumerate(names):
            if direct:  # the reader decodes straight into the slot
                reader.read(name, region, out=out[index])
            else:
                out[index] = reader.read(name, region)
        return out
    arrays = [np.asarray(reader.read(name, region), dtype=np.float32) for name in names]
    return arrays[0][None] if len(arrays) == 1 else np.stack(arrays)  # one channel: a view, no copy


def _read_label(reader: SubjectReader, region: Region) -> np.ndarray:
    return np.asarray(reader.read_label(region))[None]


# ---- samplers ------------------------------------------------------------------------------------
class PatchSampler:
    """Base class: `plan` draws where patches go, `extract` reads them; calling a sampler does both."""

    name = ""
    # Random samplers plan forever (the stream takes `patches_per_subject`); the grid sampler plans each window once.
    finite = False
    has_image = True  # patches carry "image" (C, *patch_size), which a batch can have read into place

    def __init__(self, patch_size: int | Sequence[int]):
        self.patch_size = as_triple(patch_size)

    def plan(self, reader: SubjectReader, rng: np.random.Generator) -> Iterator[dict[str, Any]]:
        raise NotImplementedError

    def extract(self, reader: SubjectReader, plan: dict[str, Any], out: np.ndarray | None = None) -> dict[str, Any]:
        """Reads the plan's patch; `out` (C, *patch_size) float32, when given, receives the image."""
        region = region_at(plan["origin"], self.patch_size)
        patch = {"subject_id": reader.subject_id, "image": read_image(reader, region, out=out),
                 "origin": np.asarray(plan["origin"], dtype=np.int64)}
        if reader.has_label:
            patch["label"] = _read_label(reader, region)
        patch.update({key: np.asarray(value) for key, value in plan.items() if key != "origin"})
        return patch

    def regions(self, plan: dict[str, Any]) -> list[Region]:
        """The regions `extract` will read for `plan` (for read-ahead)."""
        return [region_at(plan["origin"], self.patch_size)]

    def __call__(self, reader: SubjectReader, rng: np.random.Generator) -> Iterator[dict[str, Any]]:
        for plan in self.plan(reader, rng):
            yield self.extract(reader, plan)

    def _highs(self, reader: SubjectReader) -> np.ndarray:
        """The exclusive upper bound of valid origins per axis; a subject smaller than the patch is a user error."""
        highs = np.asarray(reader.shape) - np.asarray(self.patch_size) + 1
        if (highs < 1).any():
            raise UserError(f"subject '{reader.subject_id}' has shape {tuple(reader.shape)}, smaller than the "
                            f"{self.name} sampler's patch_size {self.patch_size}; choose a smaller patch_size")
        return highs

    def __repr__(self) -> str:
        options = ", ".join(f"{key}={value!r}" for key, value in vars(self).items() if not key.startswith("_"))
        return f"{type(self).__name__}({options})"


@SAMPLERS.register("uniform")
class UniformSampler(PatchSampler):
    """Origins uniform over all positions where the patch fits (every voxel-aligned patch equally likely)."""

    name = "uniform"

    def plan(self, reader: SubjectReader, rng: np.random.Generator) -> Iterator[dict[str, Any]]:
        highs = self._highs(reader)
        while True:
            yield {"origin": tuple(int(o) for o in rng.integers(0, highs))}


class ClassLocations:
    """Draws a random voxel among those whose label is in a set of classes, from one label map."""

    def __init__(self, label: np.ndarray):
        self.label = np.ascontiguousarray(label).ravel()
        self.shape = label.shape
        self.counts = np.bincount(self.label.astype(np.int64, copy=False))
        self._indices: dict[tuple[int, ...], np.ndarray] = {}

    def count(self, classes: tuple[int, ...]) -> int:
        return int(sum(self.counts[c] for c in classes if c < len(self.counts)))

    def draw(self, classes: tuple[int, ...], rng: np.random.Generator) -> tuple[int, int, int]:
        """A uniformly random voxel of `classes` (which must be present: `count(classes) > 0`)."""
        if self.count(classes) >= _DENSE_CLASS_FRACTION * self.label.size:
            member = np.isin(np.arange(len(self.counts)), classes)
            while True:  # rejection sampling: each probe hits with probability >= 5%
                probes = rng.integers(0, self.label.size, size=64)
                hits = probes[member[self.label[probes]]]
                if len(hits):
                    return tuple(int(i) for i in np.unravel_index(hits[0], self.shape))
        if classes not in self._indices:
            self._indices[classes] = np.flatnonzero(np.isin(self.label, classes))
        indices = self._indices[classes]
        return tuple(int(i) for i in np.unravel_index(indices[rng.integers(len(indices))], self.shape))


@SAMPLERS.register("label_balanced")
class LabelBalancedSampler(PatchSampler):
    """Patches centred on a voxel of a chosen class, to fight class imbalance.

    With `class_weights` (one weight per label value, or {label: weight}) the centre's class is drawn with those
    weights, as MONAI RandCropByLabelClasses(ratios); otherwise the centre is foreground (label > 0) with
    `foreground_probability` and background otherwise, as MONAI RandCropByPosNegLabel(pos=p, neg=1-p). A class
    absent from a subject is left out and the others renormalised (with a warning), as MONAI does. The patch is
    clamped into the volume, so the centre voxel is always inside it, though not always at its middle.
    """

    name = "label_balanced"

    def __init__(self, patch_size: int | Sequence[int], foreground_probability: float = 0.5,
                 class_weights: Sequence[float] | dict[int, float] | None = None):
        super().__init__(patch_size)
        if not 0.0 <= foreground_probability <= 1.0:
            raise UserError(f"label_balanced: foreground_probability must be in [0, 1], got {foreground_probability}")
        self.foreground_probability = float(foreground_probability)
        if class_weights is not None:
            items = class_weights.items() if isinstance(class_weights, dict) else enumerate(class_weights)
            class_weights = {int(label): float(weight) for label, weight in items}
            if any(w < 0 for w in class_weights.values()) or sum(class_weights.values()) <= 0:
                raise UserError(f"label_balanced: class_weights must be >= 0 with a positive sum, got {class_weights}")
        self.class_weights = class_weights
        self._missing: Counter[str] = Counter()

    @property
    def missing_classes(self) -> Counter[str]:
        """Subject visits (in this process) that lacked some of the weighted classes, per missing class set."""
        return self._missing

    def targets(self) -> list[tuple[tuple[int, ...], float]]:
        """(classes, weight) pairs; foreground is every class above 0 (filled in per subject)."""
        if self.class_weights is not None:
            return [((label,), weight) for label, weight in sorted(self.class_weights.items()) if weight > 0]
        return [(("foreground",), self.foreground_probability), ((0,), 1.0 - self.foreground_probability)]

    def plan(self, reader: SubjectReader, rng: np.random.Generator) -> Iterator[dict[str, Any]]:
        highs = self._highs(reader)
        if not reader.has_label:
            raise UserError(f"label_balanced sampler: subject '{reader.subject_id}' has no label map; "
                            "use the uniform sampler for unlabelled cohorts")
        locations = ClassLocations(reader.read_label())  # one label read per subject visit
        foreground = tuple(range(1, len(locations.counts)))
        targets = [(foreground if classes == ("foreground",) else classes, weight)
                   for classes, weight in self.targets() if weight > 0]
        present = [(classes, weight) for classes, weight in targets if locations.count(classes) > 0]
        if len(present) < len(targets):
            missing = str([list(classes) for classes, _ in targets if locations.count(classes) == 0])
            self._missing[missing] += 1
            if self._missing[missing] == 1:  # warned once per class set; later visits are only counted
                warnings.warn(f"label_balanced sampler: subject '{reader.subject_id}' has no voxel of classes {missing}; "
                              "drawing from the classes present instead (later subjects lacking them are counted in "
                              "sampler.missing_classes, not warned)", stacklevel=2)
        if not present:  # nothing to balance: fall back to uniform centres rather than stopping the stream
            present = [(tuple(range(len(locations.counts))), 1.0)]
        probabilities = np.asarray([weight for _, weight in present]) / sum(weight for _, weight in present)
        half = np.asarray(self.patch_size) // 2
        while True:
            classes = present[int(rng.choice(len(present), p=probabilities))][0]
            centre = locations.draw(classes, rng)
            origin = np.clip(np.asarray(centre) - half, 0, highs - 1)
            yield {"origin": tuple(int(o) for o in origin), "center": centre,
                   "center_class": int(locations.label[np.ravel_multi_index(centre, locations.shape)])}


def grid_origins(shape: Sequence[int], patch_size: Sequence[int], overlap: float) -> list[tuple[int, int, int]]:
    """Window origins of a sliding-window grid, in C order, exactly as MONAI's `dense_patch_slices`.

    The step is `int(patch * (1 - overlap))` (at least 1); the last window on each axis is moved back so it ends at
    the volume's edge, so the windows cover every voxel.
    """
    starts = []
    for size, patch in zip(shape, patch_size):
        step = patch if patch == size else max(int(patch * (1 - overlap)), 1)
        count = next(i for i in range(size + 1) if i * step + patch >= size) + 1
        starts.append([i * step - max(i * step + patch - size, 0) for i in range(count)])
    return [(d, h, w) for d in starts[0] for h in starts[1] for w in starts[2]]


@SAMPLERS.register("grid")
class GridSampler(PatchSampler):
    """Every window of a regular grid with `overlap` (a fraction of the patch, as MONAI), for inference."""

    name = "grid"
    finite = True

    def __init__(self, patch_size: int | Sequence[int], overlap: float = 0.25):
        super().__init__(patch_size)
        if not 0.0 <= overlap < 1.0:
            raise UserError(f"grid sampler: overlap is a fraction of the patch in [0, 1), got {overlap}")
        self.overlap = float(overlap)

    def plan(self, reader: SubjectReader, rng: np.random.Generator) -> Iterator[dict[str, Any]]:
        self._highs(reader)
        origins = grid_origins(reader.shape, self.patch_size, self.overlap)
        for index, origin in enumerate(origins):
            yield {"origin": origin, "grid_index": index, "grid_size": len(origins), "volume_shape": tuple(reader.shape)}


@SAMPLERS.register("paired")
class PairedSampler(PatchSampler):
    """Two views of one subject, for multi-view pretext tasks.

    - two crops: `view_b` is `view_a` moved by up to `max_shift` voxels per axis (clamped into the volume, which
      never increases the shift);
    - `channels=[a, b]`: `view_a` reads channel a and `view_b` channel b at the same location (max_shift 0), e.g.
      T1/T2 or two acquisitions of one subject stored as two channels.
    Returns `{"subject_id", "view_a", "view_b" (C, d, h, w), "origin_a", "origin_b", "label_a", "label_b"}`.
    """

    name = "paired"
    has_image = False  # two views instead

    def __init__(self, patch_size: int | Sequence[int], max_shift: int = 0, channels: Sequence[str] | None = None):
        super().__init__(patch_size)
        if max_shift < 0:
            raise UserError(f"paired sampler: max_shift must be >= 0, got {max_shift}")
        if channels is not None and len(channels) != 2:
            raise UserError(f"paired sampler: channels takes exactly two channel names, got {channels}")
        self.max_shift, self.channels = int(max_shift), (tuple(channels) if channels is not None else None)

    def plan(self, reader: SubjectReader, rng: np.random.Generator) -> Iterator[dict[str, Any]]:
        highs = self._highs(reader)
        while True:
            origin_a = rng.integers(0, highs)
            shift = rng.integers(-self.max_shift, self.max_shift + 1, size=3)
            origin_b = np.clip(origin_a + shift, 0, highs - 1)
            yield {"origin_a": tuple(int(o) for o in origin_a), "origin_b": tuple(int(o) for o in origin_b)}

    def regions(self, plan: dict[str, Any]) -> list[Region]:
        return [region_at(plan[f"origin_{view}"], self.patch_size) for view in ("a", "b")]

    def extract(self, reader: SubjectReader, plan: dict[str, Any], out: np.ndarray | None = None) -> dict[str, Any]:
        patch: dict[str, Any] = {"subject_id": reader.subject_id}
        for index, view in enumerate(("a", "b")):
            region = region_at(plan[f"origin_{view}"], self.patch_size)
            channels = [self.channels[index]] if self.channels else None
            patch[f"view_{view}"] = read_image(reader, region, channels)
            patch[f"origin_{view}"] = np.asarray(plan[f"origin_{view}"], dtype=np.int64)
            if reader.has_label:
                patch[f"label_{view}"] = _read_label(reader, region)
        return patch


def create_sampler(name: str, **options) -> PatchSampler:
    """Builds a registered patch sampler, e.g. `create_sampler("label_balanced", patch_size=96, foreground_probability=0.7)`."""
    return SAMPLERS.create(name, **options)


def list_samplers() -> list[str]:
    return SAMPLERS.names()


# ---- aggregation ---------------------------------------------------------------------------------
def importance_map(patch_size: Sequence[int], mode: str = "constant", sigma_scale: float = 0.125) -> torch.Tensor:
    """Per-voxel weights of one window's prediction, the same as MONAI's `compute_importance_map`."""
    if mode == "constant":
        return torch.ones(tuple(patch_size), dtype=torch.float32)
    if mode != "gaussian":
        raise unknown_name_error("aggregation mode", mode, ("constant", "gaussian"))
    weights = None
    for axis, size in enumerate(patch_size):
        x = torch.arange(-(size - 1) / 2.0, (size - 1) / 2.0 + 1, dtype=torch.float32)
        x = torch.exp(x ** 2 / (-2 * (size * sigma_scale) ** 2))
        weights = x if axis == 0 else weights.unsqueeze(-1) * x[(None,) * axis]
    return weights.clamp(min=max(float(weights.min()), 1e-3))  # no zero weight at the window's corners


class GridAggregator:
    """Accumulates window predictions (weighted) into a full volume, like TorchIO's GridAggregator.

    Sums are kept in float64, so with constant weights overlapping copies of one value average back to exactly
    that value (a grid of identity predictions reconstructs the volume bit for bit).
    """

    def __init__(self, shape: Sequence[int], patch_size: int | Sequence[int], *, mode: str = "constant",
                 sigma_scale: float = 0.125):
        self.shape, self.patch_size = tuple(int(s) for s in shape), as_triple(patch_size)
        self.weights = importance_map(self.patch_size, mode, sigma_scale).double()
        self._sum: torch.Tensor | None = None
        self._weight = torch.zeros(self.shape, dtype=torch.float64)

    def add(self, prediction: torch.Tensor | np.ndarray, origin: torch.Tensor | np.ndarray | Sequence) -> None:
        """Adds one window (C, d, h, w) at `origin` (3,), or a batch (B, C, d, h, w) at origins (B, 3)."""
        prediction = torch.as_tensor(prediction).detach().cpu()
        origins = torch.as_tensor(np.asarray(origin)).reshape(-1, 3).tolist()
        batch = prediction.reshape(len(origins), -1, *prediction.shape[-3:])
        if tuple(batch.shape[-3:]) != self.patch_size:
            raise ValueError(f"prediction windows are {tuple(batch.shape[-3:])}, the aggregator's patch_size is {self.patch_size}")
        if self._sum is None:
            self._sum = torch.zeros((batch.shape[1], *self.shape), dtype=torch.float64)
        for window, corner in zip(batch, origins):
            region = region_at(corner, self.patch_size)
            self._sum[(slice(None), *region)] += window.double() * self.weights
            self._weight[region] += self.weights

    def result(self) -> torch.Tensor:
        """The aggregated (C, D, H, W) float32 volume; every voxel must have been covered by some window."""
        if self._sum is None or (self._weight == 0).any():
            uncovered = int((self._weight == 0).sum())
            raise ValueError(f"{uncovered} voxels were covered by no window: add every patch of the grid first")
        return (self._sum / self._weight).float()
