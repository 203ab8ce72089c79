"""View makers for pretext tasks: batched, channel-first, every random draw from one `torch.Generator`.

A view maker is a picklable callable `(volumes_BCDHW, generator) -> dict[str, Tensor]`; the data
pipeline calls the one its pretext task declares.

Each augmentation setting is declared once, in the dataclass that applies it, and the view makers inherit the
ones they use: `FlipOptions` (flip_probability), `IntensityOptions` (intensity_scale, intensity_shift, noise_std)
and `TwoCropViews` (crops, rotations, contrast, blur; what `PairedViews` and `DaliViews` extend). A view maker
whose default differs (less noise on small patches, for instance) restates only that default. The task factories
pass their view options on unlisted (`TASKS.register(..., options_from=TheViews)` names the accepted ones).

Each random draw is a function of its own (`draw_flips`, `draw_jitter`, `draw_blur`, `draw_rotations`), shared by
the torch operations here and the DALI pipeline (`rafmedia.engine.dali_views`), so both draw the same values.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rafmedia.core.errors import UserError
from rafmedia.shards.alterations.geometry import affine_grid_from_voxel_matrix, axis_angle_matrix
from rafmedia.shards.alterations.intensity import smooth_log_field
from rafmedia.shards.sampling import as_triple


def uniform(generator: torch.Generator, low: float, high: float, size: tuple[int, ...]) -> torch.Tensor:
    """U(low, high) samples of shape `size` (one `torch.rand` draw, scaled)."""
    return low + (high - low) * torch.rand(size, generator=generator)


def random_crop_starts(generator: torch.Generator, volume_shape, crop_size: int | Sequence[int],
                       batch: int) -> torch.Tensor:
    """Uniform random corners (B, 3) int64 of crops of side `crop_size` (one int, or one per axis)."""
    highs = torch.tensor([size - side + 1 for size, side in zip(volume_shape, as_triple(crop_size, "crop size"))])
    if (highs < 1).any():
        raise ValueError(f"crop size {crop_size} is larger than the volume {tuple(volume_shape)}")
    return (torch.rand((batch, 3), generator=generator) * highs).long()


def crop(volumes_BCDHW: torch.Tensor, starts_B3: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """The crops of side `size` (one int, or one per axis) at corners `starts_B3[b]`, stacked."""
    sd, sh, sw = as_triple(size, "crop size")
    return torch.stack([v[:, d:d + sd, h:h + sh, w:w + sw] for v, (d, h, w) in zip(volumes_BCDHW, starts_B3.tolist())])


def draw_flips(generator: torch.Generator, batch: int, probability: float) -> torch.Tensor:
    """(B, 3) bool: flip spatial axis d of sample b when its U(0, 1) draw is below `probability`."""
    return torch.rand((batch, 3), generator=generator) < probability


def random_flip(x_BCDHW: torch.Tensor, generator: torch.Generator, probability: float = 0.5) -> torch.Tensor:
    """Flips each sample independently along each spatial axis with `probability`."""
    return flip_samples(x_BCDHW, draw_flips(generator, x_BCDHW.shape[0], probability))


def flip_samples(x_BCDHW: torch.Tensor, flips_B3: torch.Tensor) -> torch.Tensor:
    """Flips sample b along spatial axis d where `flips_B3[b, d]`."""
    out = x_BCDHW.clone()
    for index, sample_flips in enumerate(flips_B3.tolist()):
        dims = [axis + 1 for axis, flip in enumerate(sample_flips) if flip]
        if dims:
            out[index] = torch.flip(x_BCDHW[index], dims=dims)
    return out


def draw_jitter(generator: torch.Generator, batch: int, scale: float,
                shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample gains ~ U(1 - scale, 1 + scale), then offsets ~ U(-shift, shift): two (B,) tensors."""
    return uniform(generator, 1 - scale, 1 + scale, (batch,)), uniform(generator, -shift, shift, (batch,))


def intensity_jitter(x_BCDHW: torch.Tensor, generator: torch.Generator, scale: float, shift: float) -> torch.Tensor:
    """x * U(1-scale, 1+scale) + U(-shift, shift), drawn per sample."""
    gains, offsets = draw_jitter(generator, x_BCDHW.shape[0], scale, shift)
    return x_BCDHW * gains.view(-1, 1, 1, 1, 1) + offsets.view(-1, 1, 1, 1, 1)


def gaussian_noise(x_BCDHW: torch.Tensor, generator: torch.Generator, max_std: float) -> torch.Tensor:
    """Adds noise with a per-sample std drawn from U(0, max_std); draws nothing when `max_std` is 0."""
    if max_std <= 0:
        return x_BCDHW
    stds = uniform(generator, 0.0, max_std, (x_BCDHW.shape[0], 1, 1, 1, 1))
    return x_BCDHW + stds * torch.randn(x_BCDHW.shape, generator=generator)


def draw_blur(generator: torch.Generator, batch: int, max_sigma: float,
              probability: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample sigmas ~ U(0, max_sigma), then whether each sample is blurred (U(0, 1) < probability): (B,) each."""
    sigmas = uniform(generator, 0.0, max_sigma, (batch,))
    return sigmas, torch.rand((batch,), generator=generator) < probability


def gaussian_blur(x_BCDHW: torch.Tensor, generator: torch.Generator, max_sigma: float,
                  probability: float = 0.5) -> torch.Tensor:
    """Blurs each sample with probability `probability`, sigma ~ U(0, max_sigma) voxels (separable 3D Gaussian,
    zero padding, truncated at 3 sigma). Only the chosen samples are convolved."""
    if max_sigma <= 0:
        return x_BCDHW
    batch, channels = x_BCDHW.shape[:2]
    sigmas, blurred_B = draw_blur(generator, batch, max_sigma, probability)
    chosen = torch.nonzero(blurred_B).flatten()
    if len(chosen) == 0:
        return x_BCDHW
    radius = max(1, int(3 * max_sigma + 0.5))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernels = torch.exp(-0.5 * (offsets[None] / sigmas[chosen].clamp(min=1e-3)[:, None]) ** 2)
    kernels = (kernels / kernels.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0).to(x_BCDHW)
    groups = len(chosen) * channels
    blurred = x_BCDHW[chosen].reshape(1, groups, *x_BCDHW.shape[2:])
    for axis in range(3):
        shape, padding = [groups, 1, 1, 1, 1], [0, 0, 0]
        shape[2 + axis], padding[axis] = len(offsets), radius
        blurred = F.conv3d(blurred, kernels.view(shape), padding=tuple(padding), groups=groups)
    out = x_BCDHW.clone()
    out[chosen] = blurred.view(len(chosen), channels, *x_BCDHW.shape[2:])
    return out


def _match_moments(x_BCDHW: torch.Tensor, reference_BCDHW: torch.Tensor) -> torch.Tensor:
    """Gives each sample of `x` the mean and std of the same sample of `reference`."""
    shape = (-1, 1, 1, 1, 1)
    x_flat, reference = x_BCDHW.flatten(1), reference_BCDHW.flatten(1)
    standardized = (x_BCDHW - x_flat.mean(dim=1).view(shape)) / x_flat.std(dim=1).clamp(min=1e-6).view(shape)
    return standardized * reference.std(dim=1).view(shape) + reference.mean(dim=1).view(shape)


def random_gamma(x_BCDHW: torch.Tensor, generator: torch.Generator, max_log_gamma: float) -> torch.Tensor:
    """Contrast change: rescale each sample to [0, 1], raise to gamma = exp(U(-m, m)), restore its mean and std."""
    if max_log_gamma <= 0:
        return x_BCDHW
    flat = x_BCDHW.flatten(1)
    shape = (-1, 1, 1, 1, 1)
    low, high = flat.min(dim=1).values.view(shape), flat.max(dim=1).values.view(shape)
    unit = (x_BCDHW - low) / (high - low).clamp(min=1e-6)
    gamma = torch.exp(uniform(generator, -max_log_gamma, max_log_gamma, (x_BCDHW.shape[0], 1, 1, 1, 1)))
    return _match_moments(unit**gamma, x_BCDHW)


def random_bias_field(x_BCDHW: torch.Tensor, generator: torch.Generator, max_strength: float) -> torch.Tensor:
    """Smooth multiplicative inhomogeneity: (x - min) * exp(s * field), s ~ U(0, max_strength) per sample, then
    each sample's mean and std are restored (the views are z-scored volumes, not raw intensities)."""
    if max_strength <= 0:
        return x_BCDHW
    batch, shape = x_BCDHW.shape[0], (-1, 1, 1, 1, 1)
    flat = x_BCDHW.flatten(1)
    strength = uniform(generator, 0.0, max_strength, (batch,)).view(shape)
    field = smooth_log_field(x_BCDHW.shape[2:], batch, generator, x_BCDHW.device)
    return _match_moments((x_BCDHW - flat.min(dim=1).values.view(shape)) * torch.exp(strength * field), x_BCDHW)


def resized_crops(volumes_BCDHW: torch.Tensor, starts_B3: torch.Tensor, sides_B: torch.Tensor,
                  size: int | Sequence[int]) -> torch.Tensor:
    """Cubic crops of side `sides_B[b]` at corners `starts_B3[b]`, each resized to `size` (one int, or one per axis;
    trilinear, align_corners=False: what DALI's resize gives with antialiasing off). A crop already of that size
    is returned as cut."""
    size = as_triple(size, "crop size")
    crops = []
    for volume, (d, h, w), side in zip(volumes_BCDHW, starts_B3.tolist(), sides_B.tolist()):
        box = volume[:, d:d + side, h:h + side, w:w + side]
        if tuple(box.shape[1:]) != size:
            box = F.interpolate(box[None], size=size, mode="trilinear", align_corners=False)[0]
        crops.append(box)
    return torch.stack(crops)


def random_rotate90(x_BCDHW: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each (cubic) sample turned by one of the 10 rotations of `ROTATIONS_3D`, drawn uniformly."""
    rotations = torch.randint(0, len(ROTATIONS_3D), (x_BCDHW.shape[0],), generator=generator)
    return torch.stack([rotate(sample, int(r)) for sample, r in zip(x_BCDHW, rotations)])


def draw_rotations(generator: torch.Generator, batch: int, max_degrees: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample angles ~ U(-max_degrees, max_degrees) in degrees (B,), then unit axes uniform on the sphere (B, 3)."""
    degrees = uniform(generator, -max_degrees, max_degrees, (batch,))
    return degrees, F.normalize(torch.randn((batch, 3), generator=generator), dim=1)


def random_rotation(x_BCDHW: torch.Tensor, generator: torch.Generator, max_degrees: float) -> torch.Tensor:
    """A rotation about the centre, about a random axis, by U(-max_degrees, max_degrees); trilinear, zero fill."""
    if max_degrees <= 0:
        return x_BCDHW
    degrees, axes = draw_rotations(generator, x_BCDHW.shape[0], max_degrees)
    angles = torch.deg2rad(degrees)
    grid = affine_grid_from_voxel_matrix(axis_angle_matrix(axes, angles).to(x_BCDHW.device), x_BCDHW.shape[2:])
    return F.grid_sample(x_BCDHW, grid.to(x_BCDHW.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)


@dataclass
class FlipOptions:
    """The flip setting of the view makers that flip (inherited: declared once here)."""

    flip_probability: float = 0.5  # chance of flipping each spatial axis of each view


@dataclass
class IntensityOptions:
    """The intensity settings every view maker but the masked and label ones inherit: a per-sample gain and offset
    (`intensity_jitter`), then Gaussian noise of a per-sample std (`gaussian_noise`)."""

    intensity_scale: float = 0.2  # gain ~ U(1 - intensity_scale, 1 + intensity_scale)
    intensity_shift: float = 0.2  # offset ~ U(-intensity_shift, intensity_shift)
    noise_std: float = 0.2  # noise std ~ U(0, noise_std); 0 draws nothing

    def augment_intensity(self, x_BCDHW: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Intensity jitter, then noise, each drawn per sample."""
        x_BCDHW = intensity_jitter(x_BCDHW, generator, self.intensity_scale, self.intensity_shift)
        return gaussian_noise(x_BCDHW, generator, self.noise_std)


@dataclass
class TwoCropViews(FlipOptions, IntensityOptions):
    """Two augmented crops of each volume whose corners differ by at most `max_shift` voxels per axis.

    Optional (off by default, and then drawing nothing, so existing seeds keep their views): resized crops
    (`resized_crop_scale`), one of the 10 quarter-turn rotations (`rotate90`) and an arbitrary rotation
    (`max_rotation_degrees`). `rafmedia.engine.dali_views.DaliViews` runs the same operations as a DALI pipeline.
    """

    crop_size: int = 40
    max_shift: int = 12
    blur_sigma: float = 0.0  # max blur sigma (voxels), applied to a `blur_probability` share of the views
    blur_probability: float = 0.5
    gamma: float = 0.0  # max |log gamma| of the contrast change
    bias_field: float = 0.0  # max strength of a smooth multiplicative field
    resized_crop_scale: tuple[float, float] = (1.0, 1.0)  # crop side range (fractions of crop_size), resized back
    rotate90: bool = False  # one of the 10 quarter-turn rotations of ROTATIONS_3D per view
    max_rotation_degrees: float = 0.0  # arbitrary rotation about a random axis, U(-m, m) degrees

    def __post_init__(self):
        low, high = self.resized_crop_scale
        if not 0 < low <= high:
            raise UserError("resized_crop_scale must be (low, high) with 0 < low <= high, "
                            f"got {self.resized_crop_scale}")

    def __call__(self, volumes_BCDHW: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        starts_a, starts_b, sides_a, sides_b = self.corners(generator, volumes_BCDHW.shape[2:], volumes_BCDHW.shape[0])
        return {"view_a": self.augment(self.crops(volumes_BCDHW, starts_a, sides_a), generator),
                "view_b": self.augment(self.crops(volumes_BCDHW, starts_b, sides_b), generator)}

    @property
    def resizes(self) -> bool:
        return tuple(self.resized_crop_scale) != (1.0, 1.0)

    def corners(self, generator: torch.Generator, volume_shape,
                batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Both views' crop corners (B, 3) and sides (B,), int64: a's corner uniform, b's within `max_shift` of it
        per axis, both views' sides drawn (when resizing) before either view's augmentations, every crop moved
        back into the volume (which never increases the shift)."""
        spatial = torch.tensor(tuple(volume_shape))
        starts_a = random_crop_starts(generator, volume_shape, self.crop_size, batch)
        shift = torch.randint(-self.max_shift, self.max_shift + 1, (batch, 3), generator=generator)
        sides = [torch.full((batch,), self.crop_size), torch.full((batch,), self.crop_size)]
        if self.resizes:
            low, high = self.resized_crop_scale
            sides = [uniform(generator, low * self.crop_size, high * self.crop_size, (batch,)).round().long()
                     .clamp(1, int(spatial.min())) for _ in range(2)]
        starts_a = torch.minimum(starts_a, spatial - sides[0][:, None])  # a larger crop still fits the volume
        starts_b = torch.minimum(torch.clamp(starts_a + shift, min=0), spatial - sides[1][:, None])
        return starts_a, starts_b, sides[0], sides[1]

    def crops(self, volumes_BCDHW: torch.Tensor, starts_B3: torch.Tensor, sides_B: torch.Tensor) -> torch.Tensor:
        """The crops at `starts_B3` of side `sides_B`, resized to `crop_size` when resizing."""
        if not self.resizes:
            return crop(volumes_BCDHW, starts_B3, self.crop_size)
        return resized_crops(volumes_BCDHW, starts_B3, sides_B, self.crop_size)

    def augment(self, x_BCDHW: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One view's augmentations; each one off draws nothing (flips and the jitter always draw)."""
        # drawn in DaliViews' order (flips, quarter turn, rotation, blur, jitter, noise), applied rotations first
        flips = draw_flips(generator, x_BCDHW.shape[0], self.flip_probability)
        if self.rotate90:
            x_BCDHW = random_rotate90(x_BCDHW, generator)
        x_BCDHW = flip_samples(random_rotation(x_BCDHW, generator, self.max_rotation_degrees), flips)
        x_BCDHW = random_gamma(x_BCDHW, generator, self.gamma)
        x_BCDHW = random_bias_field(x_BCDHW, generator, self.bias_field)
        x_BCDHW = gaussian_blur(x_BCDHW, generator, self.blur_sigma, self.blur_probability)
        return self.augment_intensity(x_BCDHW, generator)


# The 10 rotation classes of Taleb et al. (NeurIPS 2020): identity, then 90/180/270 degrees about each axis.
ROTATIONS_3D: tuple[tuple[int, tuple[int, int]], ...] = ((0, (1, 2)),) + tuple(
    (quarter_turns, plane) for plane in ((2, 3), (1, 3), (1, 2)) for quarter_turns in (1, 2, 3))


def rotate(x_CDHW: torch.Tensor, rotation: int) -> torch.Tensor:
    quarter_turns, plane = ROTATIONS_3D[rotation]
    return torch.rot90(x_CDHW, quarter_turns, dims=plane)


@dataclass
class RotationViews(IntensityOptions):
    """One augmented cubic crop per volume, rotated by one of the 10 rotations; the label is its index."""

    crop_size: int = 40

    def __call__(self, volumes_BCDHW: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        batch = volumes_BCDHW.shape[0]
        starts = random_crop_starts(generator, volumes_BCDHW.shape[2:], self.crop_size, batch)
        crops = crop(volumes_BCDHW, starts, self.crop_size)
        labels = torch.randint(0, len(ROTATIONS_3D), (batch,), generator=generator)
        rotated = torch.stack([rotate(c, int(r)) for c, r in zip(crops, labels)])
        return {"view": self.augment_intensity(rotated, generator), "rotation": labels}
