"""SSL view generation as an NVIDIA DALI pipeline, with the call contract of the torch view makers.

`DaliViews` is a drop-in for `rafmedia.engine.views.TwoCropViews`: `views(volumes_BCDHW, generator)` returns
`{"view_a", "view_b"}`, two augmented crops of each volume. The work is split in two places:

    torch.Generator --draw_view_parameters--> per-sample parameters (crop corners, flips, rotations, gains, sigmas)
    volumes (B, C, D, H, W) ----------------> fn.external_source --> [crop | resized crop] -> 90-degree rotation
        -> arbitrary rotation -> flip -> gaussian blur -> intensity jitter -> gaussian noise --> two views

Every random choice except the noise field is drawn from the caller's `torch.Generator` by the same draw functions
the torch operations of `views.py` use (`TwoCropViews.corners`, `draw_flips`, `draw_rotations`, `draw_blur`,
`draw_jitter`), in the same order, and fed to DALI as per-sample argument inputs. So the engine can swap one view
maker for the other, the same seed gives the same crops, flips and gains on both paths, and each DALI op can be
checked against its torch reference with identical parameters (tests/engine/test_dali_views.py). The noise field
is DALI's own (`fn.noise.gaussian`, seeded once when the pipeline is built): generating it in torch would defeat
the GPU backend.

Layout: DALI's 3D geometric operators (rotate, resize, blur) take channel-last volumes, so samples travel as DHWC
and are turned back into (B, C, D, H, W) at the end. `device="cpu"` runs DALI's CPU backend (what CI tests);
`device="gpu"` runs the same graph on a CUDA device (`DaliViews.for_available_device()` picks).

Known differences from the torch references (each is tested or documented in docs/augmentation.md):
- blur: DALI mirrors the border (reflect-101, scipy's mode="mirror"); `views.gaussian_blur` pads with zeros. They
  agree on voxels farther than the kernel radius from the border. A sample not chosen for blur gets sigma 1e-3,
  which is the identity (as in the torch path, which clamps sigma to 1e-3).
- resized crop: trilinear with antialiasing off, which equals `F.interpolate(..., align_corners=False)`.
- arbitrary rotation: DALI's `fn.rotate`, linear interpolation, zero fill, about the volume centre.

DALI is an optional dependency (`pip install -c constraints.txt -e ".[dali]"`), imported only when a pipeline
is built, so importing this module is cheap. `DaliViews` is a `TwoCropViews` (same settings, same draws) whose
`__call__` runs the DALI pipeline; it refuses the two settings DALI has no op for here (gamma, bias_field).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from rafmedia.core.errors import UserError
from rafmedia.engine.views import (ROTATIONS_3D, TwoCropViews, draw_blur, draw_flips, draw_jitter, draw_rotations,
                                   uniform)

LAYOUT = "DHWC"
IDENTITY_SIGMA = 1e-3  # a blur of this sigma is the identity; the torch path clamps sigma to the same value
# ROTATIONS_3D[index] = (quarter turns, plane of CDHW dims) as DALI's fn.rotate (axis in x=W, y=H, z=D order,
# angle in degrees); found by matching torch.rot90 exactly, and checked by test_rotation90_matches_torch.
_PLANE_AXIS_SIGN = {(2, 3): ((0.0, 0.0, 1.0), -1.0), (1, 3): ((0.0, 1.0, 0.0), 1.0), (1, 2): ((1.0, 0.0, 0.0), -1.0)}
ROTATION_AXIS_ANGLE: tuple[tuple[tuple[float, float, float], float], ...] = tuple(
    (_PLANE_AXIS_SIGN[plane][0], (_PLANE_AXIS_SIGN[plane][1] * 90.0 * turns) % 360.0) for turns, plane in ROTATIONS_3D)


def import_dali():
    """The `nvidia.dali` modules (fn, types, pipeline_def), or a UserError naming the extra to install."""
    try:
        from nvidia.dali import fn, pipeline_def, types  # an optional extra: imported only to build a pipeline
    except ImportError as error:
        raise UserError("the DALI view pipeline needs NVIDIA DALI: pip install -c constraints.txt -e \".[dali]\" "
                        f"(it installs nvidia-dali-cuda120; import failed: {error})") from error
    return fn, types, pipeline_def


# ---- parameters, drawn in torch from the caller's generator --------------------------------------------------
@dataclass
class ViewParameters:
    """Per-sample parameters of one view (numpy, one row per sample), fed to the DALI graph."""

    starts_B3: np.ndarray  # crop corner (D, H, W), int
    sides_B: np.ndarray  # crop side before resizing to the view size (== view size for plain crops)
    rotations_B: np.ndarray  # index into ROTATIONS_3D (0: identity)
    angles_B: np.ndarray  # arbitrary rotation angle, degrees
    axes_B3: np.ndarray  # arbitrary rotation axis (x, y, z), unit
    flips_B3: np.ndarray  # flip along (D, H, W), 0/1
    sigmas_B: np.ndarray  # blur sigma in voxels (IDENTITY_SIGMA: not blurred)
    gains_B: np.ndarray
    offsets_B: np.ndarray
    noise_stds_B: np.ndarray

    @classmethod
    def identity(cls, starts_B3, side: int) -> "ViewParameters":
        """Plain crops of side `side` at `starts_B3`, every augmentation off: the base for explicit parameters
        (`dataclasses.replace(ViewParameters.identity(...), flips_B3=...)`)."""
        starts = np.asarray(starts_B3, np.int64).reshape(-1, 3)
        batch = len(starts)
        return cls(starts, np.full(batch, side), np.zeros(batch, np.int64), np.zeros(batch, np.float32),
                   np.tile(np.float32([0, 0, 1]), (batch, 1)), np.zeros((batch, 3), np.int32),
                   np.full(batch, IDENTITY_SIGMA, np.float32), np.ones(batch, np.float32), np.zeros(batch, np.float32),
                   np.zeros(batch, np.float32))

    def feeds(self, prefix: str) -> dict[str, list[np.ndarray]]:
        """The external-source inputs of this view, one array per sample."""
        rotation_axes = [np.asarray(ROTATION_AXIS_ANGLE[r][0], np.float32) for r in self.rotations_B]
        rotation_angles = [np.asarray(ROTATION_AXIS_ANGLE[r][1], np.float32) for r in self.rotations_B]
        columns = {"start": self.starts_B3.astype(np.float32),
                   "shape": np.repeat(self.sides_B[:, None], 3, 1).astype(np.float32),
                   "angle": self.angles_B.astype(np.float32), "axis": self.axes_B3.astype(np.float32),
                   "flip": self.flips_B3.astype(np.int32), "sigma": self.sigmas_B.astype(np.float32),
                   "gain": self.gains_B.astype(np.float32), "offset": self.offsets_B.astype(np.float32),
                   "noise_std": self.noise_stds_B.astype(np.float32)}
        # np.array(row), not ascontiguousarray: a scalar parameter must stay 0-d per sample
        feeds = {f"{prefix}_{name}": [np.array(row) for row in values] for name, values in columns.items()}
        feeds[f"{prefix}_rotation_axis"], feeds[f"{prefix}_rotation_angle"] = rotation_axes, rotation_angles
        return feeds


def draw_blur_sigmas(generator: torch.Generator, batch: int, max_sigma: float, probability: float) -> np.ndarray:
    """The draws of `views.gaussian_blur` (`views.draw_blur`) as one sigma per sample: a sample not chosen for
    blur gets the identity sigma."""
    if max_sigma <= 0:
        return np.full(batch, IDENTITY_SIGMA, np.float32)
    sigmas, chosen = draw_blur(generator, batch, max_sigma, probability)
    sigmas = sigmas.clamp(min=IDENTITY_SIGMA)
    return torch.where(chosen, sigmas, torch.full_like(sigmas, IDENTITY_SIGMA)).numpy()


def blur_window(max_sigma: float) -> int:
    """The kernel width of `views.gaussian_blur` (radius round(3 * max_sigma), at least 1), fixed per pipeline."""
    return 2 * max(1, int(3 * max_sigma + 0.5)) + 1


# ---- the DALI graph ----------------------------------------------------------------------------------------------
class _Inputs:
    """The per-sample parameter inputs of one view, created on first use: DALI drops an external source that no
    op reads, and feeding a dropped one is an error, so the pipeline records which ones exist."""

    DTYPES = {"flip": "INT32"}  # every other parameter is FLOAT

    def __init__(self, fn, types, prefix: str, used: set[str]):
        self.fn, self.types, self.prefix, self.used = fn, types, prefix, used
        self._nodes: dict[str, Any] = {}

    def __getitem__(self, name: str):
        if name not in self._nodes:
            dtype = getattr(self.types, self.DTYPES.get(name, "FLOAT"))
            self._nodes[name] = self.fn.external_source(name=f"{self.prefix}_{name}", dtype=dtype)
            self.used.add(f"{self.prefix}_{name}")
        return self._nodes[name]


def view_graph(fn, types, volume, args: _Inputs, views: "DaliViews", seed: int):
    """One view from a DHWC volume node: the ops in order, each skipped when its setting turns it off."""
    size = views.crop_size
    x = fn.slice(volume, args["start"], args["shape"], axis_names="DHW", normalized_anchor=False,
                 normalized_shape=False)
    if views.resizes:
        x = fn.resize(x, size=[size] * 3, interp_type=types.INTERP_LINEAR, antialias=False)
    if views.rotate90:
        x = fn.rotate(x, angle=args["rotation_angle"], axis=args["rotation_axis"], keep_size=True,
                      interp_type=types.INTERP_LINEAR, fill_value=0.0)
    if views.max_rotation_degrees > 0:
        x = fn.rotate(x, angle=args["angle"], axis=args["axis"], keep_size=True, interp_type=types.INTERP_LINEAR,
                      fill_value=0.0)
    flips = args["flip"]
    x = fn.flip(x, depthwise=flips[0], vertical=flips[1], horizontal=flips[2])
    if views.blur_sigma > 0:
        x = fn.gaussian_blur(x, sigma=args["sigma"], window_size=blur_window(views.blur_sigma))
    gain, offset = args["gain"], args["offset"]
    if x.device == "gpu":  # arithmetic needs its tensor operands on one device (argument inputs stay on the CPU)
        gain, offset = gain.gpu(), offset.gpu()
    x = x * gain + offset
    if views.noise_std > 0:
        x = fn.noise.gaussian(x, stddev=args["noise_std"], seed=seed)
    return x


def build_pipeline(views: "DaliViews", batch_size: int):
    """The DALI pipeline of `views` (external sources in: volumes + per-view parameters; two views out), and the
    names of the parameter inputs its graph reads."""
    fn, types, pipeline_def = import_dali()
    gpu, used = views.device == "gpu", set()

    @pipeline_def(batch_size=batch_size, num_threads=views.num_threads, device_id=0 if gpu else None,
                  prefetch_queue_depth=1, exec_dynamic=True, seed=views.seed)
    def two_views():
        volume = fn.external_source(name="volume", layout=LAYOUT, dtype=types.FLOAT)
        volume = volume.gpu() if gpu else volume  # parameters stay on the CPU: DALI argument inputs must
        return tuple(view_graph(fn, types, volume, _Inputs(fn, types, prefix, used), views, views.seed + index)
                     for index, prefix in enumerate(("a", "b")))

    pipeline = two_views()
    pipeline.build()
    return pipeline, used


def to_torch(tensor_list, device: str) -> torch.Tensor:
    """A DALI output batch (DHWC samples of equal shape) as a (B, C, D, H, W) float32 torch tensor."""
    if device == "gpu":
        from nvidia.dali.plugin.pytorch import feed_ndarray  # the optional DALI extra, as in import_dali

        dense = tensor_list.as_tensor()
        out = torch.empty(dense.shape(), dtype=torch.float32, device="cuda")
        feed_ndarray(dense, out)
    else:
        out = torch.from_numpy(np.array(tensor_list.as_array()))
    return out.permute(0, 4, 1, 2, 3).contiguous()


# ---- the view maker ---------------------------------------------------------------------------------------------
@dataclass
class DaliViews(TwoCropViews):
    """Two augmented crops per volume, made by a DALI pipeline: a `views.TwoCropViews` run by DALI.

    The settings of TwoCropViews mean the same and draw the same way (gamma and bias_field must stay 0: DALI has
    no op for them here). Extra settings:
        device: "cpu" (DALI's CPU backend) or "gpu"; num_threads: DALI worker threads; seed: the noise seed.

    Example:
        views = DaliViews(crop_size=32, blur_sigma=1.0, device="cpu")
        out = views(volumes_BCDHW, torch.Generator().manual_seed(0))  # {"view_a": ..., "view_b": ...}
    """

    device: str = "cpu"
    num_threads: int = 2
    seed: int = 0
    _pipelines: dict[int, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        super().__post_init__()
        if self.device not in ("cpu", "gpu"):
            raise UserError(f"DaliViews device must be 'cpu' or 'gpu', got {self.device!r}")
        if self.device == "gpu" and not torch.cuda.is_available():
            raise UserError("DaliViews(device='gpu') needs a CUDA device and none is visible; use device='cpu' or "
                            "DaliViews.for_available_device()")
        unsupported = {name: getattr(self, name) for name in ("gamma", "bias_field") if getattr(self, name)}
        if unsupported:
            raise UserError(f"DaliViews has no gamma or bias-field op, got {unsupported}: set them to 0 or keep the "
                            "torch view maker (TwoCropViews)")

    @classmethod
    def for_available_device(cls, **settings) -> "DaliViews":
        """DaliViews on the GPU backend when CUDA is available, else on the CPU backend."""
        return cls(device="gpu" if torch.cuda.is_available() else "cpu", **settings)

    @classmethod
    def like(cls, torch_views: TwoCropViews, **settings) -> "DaliViews":
        """The DALI twin of a `TwoCropViews` (all its settings), e.g.
        `task.views = DaliViews.like(task.views, device="gpu")`. Refuses settings DALI has no op for here."""
        shared = {item.name: getattr(torch_views, item.name) for item in fields(TwoCropViews) if item.init}
        return cls(**{**shared, **settings})

    def __getstate__(self):  # picklable into DataLoader workers: each process builds its own pipeline
        return {**self.__dict__, "_pipelines": {}}

    # -- parameters ------------------------------------------------------------------------------------------------
    def draw(self, generator: torch.Generator, spatial: tuple[int, int, int],
             batch: int) -> tuple[ViewParameters, ViewParameters]:
        """Both views' parameters, drawn in TwoCropViews' order (crops first, then each view's augmentations)."""
        starts_a, starts_b, sides_a, sides_b = self.corners(generator, spatial, batch)
        return (self._augmentations(generator, batch, starts_a.numpy(), sides_a.numpy()),
                self._augmentations(generator, batch, starts_b.numpy(), sides_b.numpy()))

    def _augmentations(self, generator: torch.Generator, batch: int, starts, sides) -> ViewParameters:
        flips = draw_flips(generator, batch, self.flip_probability).numpy().astype(np.int32)
        rotations = (torch.randint(0, len(ROTATIONS_3D), (batch,), generator=generator).numpy() if self.rotate90
                     else np.zeros(batch, np.int64))
        angles, axes = np.zeros(batch, np.float32), np.tile(np.float32([0, 0, 1]), (batch, 1))
        if self.max_rotation_degrees > 0:
            degrees, unit_axes = draw_rotations(generator, batch, self.max_rotation_degrees)
            angles, axes = degrees.numpy(), unit_axes.numpy()
        sigmas = draw_blur_sigmas(generator, batch, self.blur_sigma, self.blur_probability)
        gains, offsets = draw_jitter(generator, batch, self.intensity_scale, self.intensity_shift)
        noise_stds = (uniform(generator, 0.0, self.noise_std, (batch,)).numpy() if self.noise_std > 0
                      else np.zeros(batch, np.float32))  # as views.gaussian_noise: no draw when off
        return ViewParameters(np.asarray(starts), np.asarray(sides), rotations, angles, axes, flips, sigmas,
                              gains.numpy(), offsets.numpy(), noise_stds)

    # -- running ---------------------------------------------------------------------------------------------------
    def run(self, volumes_BCDHW: torch.Tensor, view_a: ViewParameters,
            view_b: ViewParameters) -> dict[str, torch.Tensor]:
        """The two views for explicit parameters (what `__call__` does after drawing them)."""
        if volumes_BCDHW.ndim != 5:
            raise ValueError(f"DaliViews takes (B, C, D, H, W) volumes, got shape {tuple(volumes_BCDHW.shape)}")
        batch = volumes_BCDHW.shape[0]
        pipeline, used = self._pipeline(batch)
        # Volumes enter on the CPU (the patch stream yields CPU tensors); the GPU graph moves them with .gpu(),
        # the one transfer DALI supports on every version. A CUDA input pays one copy back.
        samples = volumes_BCDHW.detach().float().permute(0, 2, 3, 4, 1).contiguous().cpu().numpy()
        pipeline.feed_input("volume", list(samples), layout=LAYOUT)
        for name, values in {**view_a.feeds("a"), **view_b.feeds("b")}.items():
            if name in used:
                pipeline.feed_input(name, values)
        out_a, out_b = pipeline.run()
        return {"view_a": to_torch(out_a, self.device), "view_b": to_torch(out_b, self.device)}

    def __call__(self, volumes_BCDHW: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        view_a, view_b = self.draw(generator, tuple(volumes_BCDHW.shape[2:]), volumes_BCDHW.shape[0])
        return self.run(volumes_BCDHW, view_a, view_b)

    def _pipeline(self, batch: int):
        # DALI fixes the batch size of a built pipeline; one pipeline per size seen (the last batch of an epoch)
        if batch not in self._pipelines:
            self._pipelines[batch] = build_pipeline(self, batch)
        return self._pipelines[batch]


# ---- feeding from the patch stream -------------------------------------------------------------------------------
def stream_views(batches: Iterable[dict[str, Any]], views: Callable, generator: torch.Generator,
                 key: str = "image") -> Iterator[dict[str, Any]]:
    """A data stage: each batch of a `PatchStream` (batch_size set) with its views added.

    Args:
        batches: dicts with `key` a (B, C, D, H, W) tensor, as `PatchStream(..., batch_size=B)` yields.
        views: a view maker, `DaliViews` or any torch one (`TwoCropViews`): the stage does not care which.
        generator: the one generator every view parameter is drawn from.
    """
    for batch in batches:
        if key not in batch:
            raise UserError(f"the stream's batches have no '{key}' (keys: {sorted(batch)}); stream with a sampler "
                            "that reads images and set batch_size")
        yield {**batch, **views(batch[key], generator)}
