"""View makers for pretext tasks: batched, channel-first, every random draw from one `torch.Generator`.

A view maker is a picklable callable `(volumes_BCDHW, generator) -> dict[str, Tensor]`; the data
pipeline calls the one its pretext task declares.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def _uniform(generator: torch.Generator, low: float, high: float, size: tuple[int, ...]) -> torch.Tensor:
    return low + (high - low) * torch.rand(size, generator=generator)


def random_crop_starts(generator: torch.Generator, volume_shape, crop_size: int, batch: int) -> torch.Tensor:
    """Uniform random crop corners, (B, 3) int64."""
    highs = torch.tensor([size - crop_size + 1 for size in volume_shape])
    if (highs < 1).any():
        raise ValueError(f"crop size {crop_size} is larger than the volume {tuple(volume_shape)}")
    return (torch.rand((batch, 3), generator=generator) * highs).long()


def crop(volumes_BCDHW: torch.Tensor, starts_B3: torch.Tensor, size: int) -> torch.Tensor:
    return torch.stack([v[:, d:d + size, h:h + size, w:w + size] for v, (d, h, w) in zip(volumes_BCDHW, starts_B3.tolist())])


def random_flip(x_BCDHW: torch.Tensor, generator: torch.Generator, probability: float = 0.5) -> torch.Tensor:
    """Flips each sample independently along each spatial axis with `probability`."""
    return flip_samples(x_BCDHW, torch.rand((x_BCDHW.shape[0], 3), generator=generator) < probability)


def flip_samples(x_BCDHW: torch.Tensor, flips_B3: torch.Tensor) -> torch.Tensor:
    """Flips sample b along spatial axis d where `flips_B3[b, d]`."""
    out = x_BCDHW.clone()
    for index, sample_flips in enumerate(flips_B3.tolist()):
        dims = [axis + 1 for axis, flip in enumerate(sample_flips) if flip]
        if dims:
            out[index] = torch.flip(x_BCDHW[index], dims=dims)
    return out


def intensity_jitter(x_BCDHW: torch.Tensor, generator: torch.Generator, scale: float, shift: float) -> torch.Tensor:
    """x * U(1-scale, 1+scale) + U(-shift, shift), drawn per sample."""
    batch = x_BCDHW.shape[0]
    gains = _uniform(generator, 1 - scale, 1 + scale, (batch, 1, 1, 1, 1))
    offsets = _uniform(generator, -shift, shift, (batch, 1, 1, 1, 1))
    return x_BCDHW * gains + offsets


def gaussian_noise(x_BCDHW: torch.Tensor, generator: torch.Generator, max_std: float) -> torch.Tensor:
    """Adds noise with a per-sample std drawn from U(0, max_std); draws nothing when `max_std` is 0."""
    if max_std <= 0:
        return x_BCDHW
    stds = _uniform(generator, 0.0, max_std, (x_BCDHW.shape[0], 1, 1, 1, 1))
    return x_BCDHW + stds * torch.randn(x_BCDHW.shape, generator=generator)


def gaussian_blur(x_BCDHW: torch.Tensor, generator: torch.Generator, max_sigma: float, probability: float = 0.5) -> torch.Tensor:
    """Blurs each sample with probability `probability`, sigma ~ U(0, max_sigma) voxels (separable 3D Gaussian,
    zero padding, truncated at 3 sigma). Only the chosen samples are convolved."""
    if max_sigma <= 0:
        return x_BCDHW
    batch, channels = x_BCDHW.shape[:2]
    sigmas = _uniform(generator, 0.0, max_sigma, (batch,))
    chosen = torch.nonzero(torch.rand((batch,), generator=generator) < probability).flatten()
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
        blurred = torch.nn.functional.conv3d(blurred, kernels.view(shape), padding=tuple(padding), groups=groups)
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
    gamma = torch.exp(_uniform(generator, -max_log_gamma, max_log_gamma, (x_BCDHW.shape[0], 1, 1, 1, 1)))
    return _match_moments(unit**gamma, x_BCDHW)


def random_bias_field(x_BCDHW: torch.Tensor, generator: torch.Generator, max_strength: float) -> torch.Tensor:
    """Smooth multiplicative inhomogeneity: (x - min) * exp(s * field), s ~ U(0, max_strength) per sample, then
    each sample's mean and std are restored (the views are z-scored volumes, not raw intensities)."""
    if max_strength <= 0:
        return x_BCDHW
    from rafmedia.shards.alterations.intensity import smooth_log_field

    batch, shape = x_BCDHW.shape[0], (-1, 1, 1, 1, 1)
    flat = x_BCDHW.flatten(1)
    strength = _uniform(generator, 0.0, max_strength, (batch,)).view(shape)
    field = smooth_log_field(x_BCDHW.shape[2:], batch, generator, x_BCDHW.device)
    return _match_moments((x_BCDHW - flat.min(dim=1).values.view(shape)) * torch.exp(strength * field), x_BCDHW)


def resized_crops(volumes_BCDHW: torch.Tensor, starts_B3: torch.Tensor, sides_B: torch.Tensor, size: int) -> torch.Tensor:
    """Crops of side `sides_B[b]` at corners `starts_B3[b]`, each resized to `size` (trilinear, align_corners=False:
    what DALI's resize gives with antialiasing off)."""
    import torch.nn.functional as F

    crops = []
    for volume, (d, h, w), side in zip(volumes_BCDHW, starts_B3.tolist(), sides_B.tolist()):
        box = volume[:, d:d + side, h:h + side, w:w + side]
        crops.append(F.interpolate(box[None], size=(size,) * 3, mode="trilinear", align_corners=False)[0])
    return torch.stack(crops)


def random_rotate90(x_BCDHW: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each (cubic) sample turned by one of the 10 rotations of `ROTATIONS_3D`, drawn uniformly."""
    rotations = torch.randint(0, len(ROTATIONS_3D), (x_BCDHW.shape[0],), generator=generator)
    return torch.stack([rotate(sample, int(r)) for sample, r in zip(x_BCDHW, rotations)])


def random_rotation(x_BCDHW: torch.Tensor, generator: torch.Generator, max_degrees: float) -> torch.Tensor:
    """A rotation about the centre, about a random axis, by U(-max_degrees, max_degrees); trilinear, zero fill."""
    if max_degrees <= 0:
        return x_BCDHW
    import torch.nn.functional as F

    from rafmedia.shards.alterations.geometry import affine_grid_from_voxel_matrix, axis_angle_matrix

    batch = x_BCDHW.shape[0]
    angles = torch.deg2rad(_uniform(generator, -max_degrees, max_degrees, (batch,)))
    axes = F.normalize(torch.randn((batch, 3), generator=generator), dim=1)
    grid = affine_grid_from_voxel_matrix(axis_angle_matrix(axes, angles).to(x_BCDHW.device), x_BCDHW.shape[2:])
    return F.grid_sample(x_BCDHW, grid.to(x_BCDHW.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)


@dataclass
class TwoCropViews:
    """Two augmented crops of each volume whose corners differ by at most `max_shift` voxels per axis.

    Optional (off by default, and then drawing nothing, so existing seeds keep their views): resized crops
    (`resized_crop_scale`), one of the 10 quarter-turn rotations (`rotate90`) and an arbitrary rotation
    (`max_rotation_degrees`). `rafmedia.engine.dali_views.DaliViews` runs the same operations as a DALI pipeline.
    """

    crop_size: int = 40
    max_shift: int = 12
    flip_probability: float = 0.5
    intensity_scale: float = 0.2
    intensity_shift: float = 0.2
    noise_std: float = 0.2
    blur_sigma: float = 0.0  # max blur sigma (voxels), applied to half the views
    gamma: float = 0.0  # max |log gamma| of the contrast change
    bias_field: float = 0.0  # max strength of a smooth multiplicative field
    resized_crop_scale: tuple[float, float] = (1.0, 1.0)  # crop side range (fractions of crop_size), resized back
    rotate90: bool = False  # one of the 10 quarter-turn rotations of ROTATIONS_3D per view
    max_rotation_degrees: float = 0.0  # arbitrary rotation about a random axis, U(-m, m) degrees

    def __call__(self, volumes_BCDHW: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        batch, spatial = volumes_BCDHW.shape[0], torch.tensor(volumes_BCDHW.shape[2:])
        starts_a = random_crop_starts(generator, volumes_BCDHW.shape[2:], self.crop_size, batch)
        shift = torch.randint(-self.max_shift, self.max_shift + 1, (batch, 3), generator=generator)
        sides = [torch.full((batch,), self.crop_size), torch.full((batch,), self.crop_size)]
        if self.resizes:  # both views' sides, drawn before either view's augmentations (DaliViews.draw's order)
            low, high = self.resized_crop_scale
            sides = [_uniform(generator, low * self.crop_size, high * self.crop_size, (batch,)).round().long()
                     .clamp(1, int(spatial.min())) for _ in range(2)]
        starts_a = torch.minimum(starts_a, spatial - sides[0][:, None])  # a larger crop still fits the volume
        starts_b = torch.minimum(torch.clamp(starts_a + shift, min=0), spatial - sides[1][:, None])
        return {"view_a": self._augment(self._crop(volumes_BCDHW, starts_a, sides[0]), generator),
                "view_b": self._augment(self._crop(volumes_BCDHW, starts_b, sides[1]), generator)}

    @property
    def resizes(self) -> bool:
        return tuple(self.resized_crop_scale) != (1.0, 1.0)

    def _crop(self, volumes_BCDHW: torch.Tensor, starts_B3: torch.Tensor, sides_B: torch.Tensor) -> torch.Tensor:
        if not self.resizes:
            return crop(volumes_BCDHW, starts_B3, self.crop_size)
        return resized_crops(volumes_BCDHW, starts_B3, sides_B, self.crop_size)

    def _augment(self, x_BCDHW: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        # drawn in DaliViews' order (flips, quarter turn, rotation, blur, jitter, noise), applied rotations first
        flips = torch.rand((x_BCDHW.shape[0], 3), generator=generator) < self.flip_probability
        if self.rotate90:
            x_BCDHW = random_rotate90(x_BCDHW, generator)
        x_BCDHW = flip_samples(random_rotation(x_BCDHW, generator, self.max_rotation_degrees), flips)
        x_BCDHW = random_gamma(x_BCDHW, generator, self.gamma)
        x_BCDHW = random_bias_field(x_BCDHW, generator, self.bias_field)
        x_BCDHW = gaussian_blur(x_BCDHW, generator, self.blur_sigma)
        x_BCDHW = intensity_jitter(x_BCDHW, generator, self.intensity_scale, self.intensity_shift)
        return gaussian_noise(x_BCDHW, generator, self.noise_std)


# The 10 rotation classes of Taleb et al. (NeurIPS 2020): identity, then 90/180/270 degrees about each axis.
ROTATIONS_3D: tuple[tuple[int, tuple[int, int]], ...] = ((0, (1, 2)),) + tuple(
    (quarter_turns, plane) for plane in ((2, 3), (1, 3), (1, 2)) for quarter_turns in (1, 2, 3))


def rotate(x_CDHW: torch.Tensor, rotation: int) -> torch.Tensor:
    quarter_turns, plane = ROTATIONS_3D[rotation]
    return torch.rot90(x_CDHW, quarter_turns, dims=plane)


@dataclass
class RotationViews:
    """One augmented cubic crop per volume, rotated by one of the 10 rotations; the label is its index."""

    crop_size: int = 40
    intensity_scale: float = 0.2
    intensity_shift: float = 0.2
    noise_std: float = 0.2

    def __call__(self, volumes_BCDHW: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        batch = volumes_BCDHW.shape[0]
        crops = crop(volumes_BCDHW, random_crop_starts(generator, volumes_BCDHW.shape[2:], self.crop_size, batch), self.crop_size)
        labels = torch.randint(0, len(ROTATIONS_3D), (batch,), generator=generator)
        rotated = torch.stack([rotate(c, int(r)) for c, r in zip(crops, labels)])
        rotated = intensity_jitter(rotated, generator, self.intensity_scale, self.intensity_shift)
        return {"view": gaussian_noise(rotated, generator, self.noise_std), "rotation": labels}
