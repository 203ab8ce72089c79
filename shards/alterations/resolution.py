"""Resolution and coverage alterations: anisotropic blur, thick slices, dropped slices, field-of-view truncation.

- `anisotropic_blur`: a Gaussian point-spread function with a different std along each axis, drawn per volume
  as `parameter * u`, u uniform in [0.25, 1] (`draw_blur_sigmas`). Applied as three separable 1D convolutions
  with per-volume kernels (one grouped `conv3d` per axis, so the batch is one call) and edge replication.
- `thick_slices`: low through-plane resolution. The slice axis (D) is averaged over slabs of `parameter`
  voxels (a thick-slice acquisition), then linearly resampled back from the slab centres to the voxel grid,
  as a viewer or a pipeline resampling to isotropic voxels would. Deterministic.
- `dropped_slices`: a fraction `parameter` of the slices along D (at least one) is zeroed, as missing or
  corrupted slices are. The slices are chosen by random scores per volume; a higher severity with the same seed
  drops a superset of the slices.
- `fov_truncation`: the field of view is too small. A total fraction `parameter` of one in-plane axis (H or W,
  drawn per volume) is cut, split at random between its two ends, and set to zero. The label map is zeroed
  where the image is cut: anatomy outside the field of view is not in the scan.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rafmedia.shards.alterations.base import Alteration, register

SLICE_DIM = 2  # D: the through-plane axis of a (B, C, D, H, W) volume
MIN_RELATIVE_SIGMA = 0.25


def _rand(shape, generator: torch.Generator, device) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def draw_blur_sigmas(max_sigma: float, batch: int, generator: torch.Generator, device) -> torch.Tensor:
    """Gaussian stds `(B, 3)` in voxels along (D, H, W): `max_sigma * u`, u uniform in [0.25, 1]."""
    uniform = _rand((batch, 3), generator, device)
    return max_sigma * (MIN_RELATIVE_SIGMA + (1 - MIN_RELATIVE_SIGMA) * uniform)


def gaussian_kernels(sigmas_N: torch.Tensor, radius: int) -> torch.Tensor:
    """Normalised sampled Gaussians `(N, 2 * radius + 1)`; a zero std gives the identity kernel."""
    offsets = torch.arange(-radius, radius + 1, device=sigmas_N.device, dtype=sigmas_N.dtype)
    weights = torch.exp(-0.5 * (offsets.view(1, -1) / sigmas_N.clamp(min=1e-3).view(-1, 1)) ** 2)
    return weights / weights.sum(dim=1, keepdim=True)


def _fft_size(minimum: int) -> int:
    """The smallest integer >= `minimum` with no prime factor above 5."""
    size = minimum
    while True:
        rest = size
        for prime in (2, 3, 5):
            while rest % prime == 0:
                rest //= prime
        if rest == 1:
            return size
        size += 1


def separable_blur(x_BCDHW: torch.Tensor, sigmas_B3: torch.Tensor) -> torch.Tensor:
    """Blurs each volume with its own Gaussian stds along (D, H, W); edges replicated.

    The same truncated, normalised kernels as a direct separable convolution, applied as a product of their
    spectra: the volume is padded by the kernel radius (replicate), so the circular convolution of the FFT equals
    the linear one on the kept region. On CPU this ran several times faster than three grouped conv3d passes,
    whose cost also grows with the radius.
    """
    batch, channels, *shape = x_BCDHW.shape
    radius = max(1, math.ceil(3 * float(sigmas_B3.max())))
    # pad each axis to a 5-smooth length: an FFT of, say, 146 = 2 x 73 points is several times slower than of 150
    extra = [_fft_size(size + 2 * radius) - size - radius for size in shape]
    padded = F.pad(x_BCDHW, [radius, extra[2], radius, extra[1], radius, extra[0]], mode="replicate")
    sizes = padded.shape[2:]
    spectrum = torch.fft.rfftn(padded, dim=(2, 3, 4))
    for axis, size in enumerate(sizes):
        taps = gaussian_kernels(sigmas_B3[:, axis], radius)  # (B, 2r + 1), centred on tap r
        circular = torch.zeros(batch, size, dtype=taps.dtype, device=taps.device)
        circular[:, :radius + 1] = taps[:, radius:]  # tap 0 at index 0, negative taps wrapped to the end
        circular[:, size - radius:] = taps[:, :radius]
        transfer = torch.fft.rfft(circular, dim=1) if axis == 2 else torch.fft.fft(circular, dim=1)
        view = [batch, 1, 1, 1, 1]
        view[2 + axis] = transfer.shape[1]
        spectrum = spectrum * transfer.view(view)
    blurred = torch.fft.irfftn(spectrum, s=sizes, dim=(2, 3, 4))
    return blurred[:, :, radius:radius + shape[0], radius:radius + shape[1], radius:radius + shape[2]].contiguous()


@register
class AnisotropicBlur(Alteration):
    """Gaussian blur with a different std per axis, each `parameter * U(0.25, 1)` voxels."""

    name = "anisotropic_blur"
    parameter_name = "max_sigma_voxels"
    severity_parameters = (0.5, 1.0, 1.5, 2.0, 3.0)

    def apply(self, x_BCDHW: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        sigmas = draw_blur_sigmas(self.parameter, x_BCDHW.shape[0], generator, x_BCDHW.device)
        return separable_blur(x_BCDHW, sigmas.to(x_BCDHW.dtype))


def thick_slice_resample(x_BCDHW: torch.Tensor, thickness: int) -> torch.Tensor:
    """Averages slabs of `thickness` slices along D, then resamples linearly from slab centres to the slices."""
    depth = x_BCDHW.shape[SLICE_DIM]
    num_slabs = math.ceil(depth / thickness)
    # the last, partial slab is completed by repeating its last slice, as a scanner's last slab still has a width
    padded = F.pad(x_BCDHW, [0, 0, 0, 0, 0, num_slabs * thickness - depth], mode="replicate")
    slabs = F.avg_pool3d(padded, kernel_size=(thickness, 1, 1), stride=(thickness, 1, 1))
    # align_corners=False puts slab j's centre at voxel j * thickness + (thickness - 1) / 2 and clamps at the ends
    resampled = F.interpolate(slabs, size=padded.shape[2:], mode="trilinear", align_corners=False)
    return resampled[:, :, :depth].contiguous()


@register
class ThickSlices(Alteration):
    """Low through-plane resolution: slabs of `parameter` slices averaged, then resampled back along D."""

    name = "thick_slices"
    parameter_name = "slab_thickness_voxels"
    severity_parameters = (2.0, 3.0, 4.0, 5.0, 6.0)

    def apply(self, x_BCDHW: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return thick_slice_resample(x_BCDHW, max(1, round(self.parameter)))


def dropped_slice_mask(depth: int, fraction: float, batch: int, generator: torch.Generator, device) -> torch.Tensor:
    """Boolean `(B, D)`: True for the `max(1, round(fraction * D))` slices with the lowest random scores."""
    scores = _rand((batch, depth), generator, device)
    ranks = scores.argsort(dim=1).argsort(dim=1)
    return ranks < max(1, round(fraction * depth))


@register
class DroppedSlices(Alteration):
    """A fraction `parameter` of the slices along D (at least one) set to zero."""

    name = "dropped_slices"
    parameter_name = "dropped_fraction"
    severity_parameters = (0.03, 0.06, 0.10, 0.15, 0.25)

    def apply(self, x_BCDHW: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch, depth = x_BCDHW.shape[0], x_BCDHW.shape[SLICE_DIM]
        dropped = dropped_slice_mask(depth, self.parameter, batch, generator, x_BCDHW.device)
        return x_BCDHW * (~dropped).to(x_BCDHW.dtype).view(batch, 1, depth, 1, 1)


def fov_keep_mask(shape, fraction: float, batch: int, generator: torch.Generator, device) -> torch.Tensor:
    """Boolean `(B, 1, D, H, W)`: False in the cut border of one in-plane axis (H or W, drawn per volume)."""
    axis_is_w = _rand((batch,), generator, device) < 0.5
    low_share = _rand((batch,), generator, device)
    masks = []
    for dim, size in ((3, shape[1]), (4, shape[2])):
        low = torch.round(fraction * size * low_share)
        high = torch.round(fraction * size * (1 - low_share))
        position = torch.arange(size, device=device).view(1, -1)
        keep = (position >= low.view(-1, 1)) & (position < size - high.view(-1, 1))  # (B, size)
        view = [batch, 1, 1, 1, 1]
        view[dim] = size
        masks.append(keep.view(view))
    keep_h, keep_w = masks
    selected_w = axis_is_w.view(-1, 1, 1, 1, 1)
    return torch.where(selected_w, keep_w.expand(batch, 1, 1, shape[1], shape[2]),
                       keep_h.expand(batch, 1, 1, shape[1], shape[2])).expand(batch, 1, *shape)


@register
class FovTruncation(Alteration):
    """A fraction `parameter` of H or W cut off (zeroed), split at random between both ends; labels too."""

    name = "fov_truncation"
    parameter_name = "cut_fraction"
    severity_parameters = (0.10, 0.20, 0.30, 0.40, 0.50)
    moves_anatomy = True

    def apply(self, x_BCDHW: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply_with_label(x_BCDHW, None, generator)[0]

    def apply_with_label(self, x_BCDHW: torch.Tensor, label_BCDHW: torch.Tensor | None,
                         generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        keep = fov_keep_mask(x_BCDHW.shape[2:], self.parameter, x_BCDHW.shape[0], generator, x_BCDHW.device)
        image = x_BCDHW * keep.to(x_BCDHW.dtype)
        if label_BCDHW is None:
            return image, None
        return image, label_BCDHW * keep.to(label_BCDHW.dtype)
