"""MR k-space artifacts: Gibbs ringing, a k-space spike, rigid motion and ghosting.

Each is defined on the 3D discrete Fourier transform of every (B, C) volume and maps back with the real part,
as an MR reconstruction of a real object would (`torch.fft`, so CPU and CUDA share the code). Where the k-space
change is symmetric under f -> -f (Gibbs, ghosting) the real half-spectrum is used, and where it depends on the
W frequency alone (motion, ghosting) a 1D transform along W is used: the same result at a fraction of the cost.

- `gibbs_ringing`: keeps only a ball of k-space around the centre (truncated acquisition). The parameter is
  MONAI's `GibbsNoise` alpha: the ball radius is `(1 - alpha) * max(shape) * sqrt(2) / 2` voxels of k-space.
  MONAI centres its ball at `(shape - 1) / 2` of the shifted spectrum; we centre it on the zero frequency
  (`shape // 2`) so that the mask is conjugate-symmetric and no energy leaks into the imaginary part. The two
  agree exactly on odd shapes.
- `kspace_spike`: one corrupted k-space sample (a "herringbone" artifact): a spike of magnitude
  `parameter * max|K|` (TorchIO `RandomSpike`'s intensity) with a random phase at a random non-central
  frequency, i.e. a plane wave of amplitude `parameter * |mean(x)|` over the image (for a positive image,
  max|K| is the DC term). One-sided, as a real spike is; the real part splits it over +f and -f.
- `motion`: rigid motion during the acquisition, composed in k-space as TorchIO's `RandomMotion` does: the
  k-space lines along the phase-encoding axis (last axis, W, acquired in shifted order) are split into three
  segments; the first and last are taken from the spectra of two rigidly moved copies (rotations up to
  `parameter` degrees about each axis, shifts up to `parameter / 2` voxels), and the middle one, holding the
  centre of k-space, from the unmoved volume (so anatomy stays in place and labels need no change). A larger
  motion also lasts longer: `min(0.6, parameter / 12)` of the lines are acquired moved. Without that, grading
  would saturate: on fine texture even a one-voxel shift already decorrelates the moved lines completely.
- `ghosting`: every N-th phase-encoding line (N in {2, 3, 4}, drawn per volume) is scaled by `1 - parameter`,
  as TorchIO's `RandomGhosting` does, with the zero-frequency line kept so the mean stays. Scaling a comb of
  period N in k-space subtracts N replicas shifted by FOV/N, so the change is periodic with period W/N.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rafmedia.shards.alterations.base import Alteration, register
from rafmedia.shards.alterations.geometry import affine_grid_3d

SPATIAL_DIMS = (-3, -2, -1)
PHASE_DIM = -1  # the phase-encoding axis of motion and ghosting (W), as TorchIO's motion segments its last axis
GHOST_COUNTS = (2, 3, 4)
MOTION_SEGMENTS = 3
TRANSLATION_VOXELS_PER_DEGREE = 0.5
DEGREES_PER_MOVED_FRACTION = 12.0
MAX_MOVED_FRACTION = 0.6


def _rand(shape, generator: torch.Generator, device) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def centered_frequencies(size: int, device) -> torch.Tensor:
    """Integer frequencies of an unshifted FFT axis: 0, 1, ..., -2, -1."""
    return torch.fft.fftfreq(size, d=1.0 / size, device=device)


def gibbs_mask(shape, alpha: float, device, half: bool = False) -> torch.Tensor:
    """Boolean `(D, H, W)` mask, in unshifted FFT order, of the k-space ball kept at MONAI's `alpha`.

    With `half`, only the `W // 2 + 1` non-negative W frequencies that `torch.fft.rfftn` keeps.
    """
    radius = (1.0 - alpha) * max(shape) * math.sqrt(2.0) / 2.0
    freq_d, freq_h, freq_w = (centered_frequencies(size, device) for size in shape)
    if half:
        freq_w = torch.fft.rfftfreq(shape[2], d=1.0 / shape[2], device=device)
    distance_sq = freq_d.view(-1, 1, 1) ** 2 + freq_h.view(1, -1, 1) ** 2 + freq_w.view(1, 1, -1) ** 2
    return distance_sq <= radius**2


@register
class GibbsRinging(Alteration):
    """k-space truncation to a centred ball (MONAI GibbsNoise's alpha): ringing next to every edge."""

    name = "gibbs_ringing"
    parameter_name = "alpha"
    severity_parameters = (0.35, 0.45, 0.55, 0.65, 0.75)

    def apply(self, x_BCDHW: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        # the ball is symmetric under f -> -f, so the real half-spectrum carries the whole result (2x cheaper)
        shape = x_BCDHW.shape[2:]
        mask = gibbs_mask(shape, self.parameter, x_BCDHW.device, half=True)
        kspace = torch.fft.rfftn(x_BCDHW, dim=SPATIAL_DIMS) * mask
        return torch.fft.irfftn(kspace, s=shape, dim=SPATIAL_DIMS)


def draw_spikes(shape, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random spike frequencies `(B, 3)` (integers, |f| <= size // 3, |f_W| >= 1) and phases `(B,)` on the CPU.

    The W frequency is never 0 so the spike is never the DC term (which would only rescale the image).
    """
    device = generator.device
    limits = torch.tensor([max(size // 3, 1) for size in shape], device=device)
    uniform = torch.rand((batch, 3), generator=generator, device=device)
    frequencies = torch.round((2 * uniform - 1) * limits).long()
    sign = torch.where(frequencies[:, 2] < 0, -1, 1)
    frequencies[:, 2] = sign * frequencies[:, 2].abs().clamp(min=1)
    phases = 2 * math.pi * torch.rand((batch,), generator=generator, device=device)
    return frequencies.cpu(), phases.cpu()


@register
class KSpaceSpike(Alteration):
    """One corrupted k-space sample: a spike of `parameter * max|K|` at a random frequency and phase."""

    name = "kspace_spike"
    parameter_name = "spike_over_max"
    severity_parameters = (0.25, 0.5, 1.0, 1.5, 2.5)  # TorchIO RandomSpike's default intensity range is 1-3

    def apply(self, x_BCDHW: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch, _, *shape = x_BCDHW.shape
        frequencies, phases = draw_spikes(shape, batch, generator)
        # max|K| over the half spectrum equals the max over the whole one (Hermitian symmetry of a real image)
        peak = torch.fft.rfftn(x_BCDHW, dim=SPATIAL_DIMS).abs().flatten(2).amax(dim=2)  # (B, C)
        # the inverse DFT of one sample s at frequency f is s * exp(2 pi i f.r / N) / (D H W): add its real part
        # in the image domain instead of transforming the whole spectrum back
        phase_BDHW = phases.to(x_BCDHW.device).view(-1, 1, 1, 1)
        for axis, size in enumerate(shape):
            position = torch.arange(size, device=x_BCDHW.device, dtype=x_BCDHW.dtype)
            view = [1, 1, 1, 1]
            view[1 + axis] = size
            cycles = frequencies[:, axis].to(x_BCDHW.device, x_BCDHW.dtype).view(-1, 1, 1, 1) / size
            phase_BDHW = phase_BDHW + 2 * math.pi * cycles * position.view(view)
        wave = torch.cos(phase_BDHW).unsqueeze(1) * (self.parameter * peak / math.prod(shape)).view(batch, -1, 1, 1, 1)
        return x_BCDHW + wave


def rigid_theta(angles_N3: torch.Tensor, shifts_N3: torch.Tensor, shape) -> torch.Tensor:
    """`affine_grid` matrices `(N, 3, 4)` for rotations (radians about D, H, W) and shifts (voxels, D H W order).

    The rotation is built in voxel units and conjugated into normalised grid coordinates, so it stays a rigid
    motion on non-cubic volumes.
    """
    cos, sin = torch.cos(angles_N3), torch.sin(angles_N3)
    one, zero = torch.ones_like(cos[:, 0]), torch.zeros_like(cos[:, 0])

    def rotation(c, s, i, j):  # rotation in the (i, j) plane of grid coordinates (x=W, y=H, z=D)
        rows = [[one, zero, zero], [zero, one, zero], [zero, zero, one]]
        rows[i][i], rows[i][j], rows[j][i], rows[j][j] = c, -s, s, c
        return torch.stack([torch.stack(row, dim=-1) for row in rows], dim=-2)

    matrix = (rotation(cos[:, 0], sin[:, 0], 0, 1) @ rotation(cos[:, 1], sin[:, 1], 0, 2)
              @ rotation(cos[:, 2], sin[:, 2], 1, 2))
    half_size = torch.tensor([shape[2], shape[1], shape[0]], dtype=matrix.dtype, device=matrix.device) / 2
    linear = matrix * half_size.view(1, 1, 3) / half_size.view(1, 3, 1)
    translation = shifts_N3.flip(-1) / half_size
    return torch.cat([linear, translation.unsqueeze(-1)], dim=-1)


def moved_fraction(max_degrees: float) -> float:
    """The fraction of k-space lines acquired in moved positions: a larger motion lasts longer (at most 0.6)."""
    return min(MAX_MOVED_FRACTION, max_degrees / DEGREES_PER_MOVED_FRACTION)


def draw_motion(batch: int, max_degrees: float, line_count: int, generator: torch.Generator, device):
    """Per volume: the segment of each phase-encoding line `(B, W)`, and rigid angles/shifts `(B, S, 3)`.

    Segment 1, which holds the centre of k-space, is acquired unmoved; segments 0 and 2 (the first and last
    lines, in shifted order) are acquired in two moved positions, `moved_fraction(max_degrees)` of the lines
    in all. Directions and the split are drawn independently of `max_degrees`, so a higher severity with the
    same seed is the same motion, larger and longer.
    """
    fraction = moved_fraction(max_degrees)
    # the unmoved window [start, start + 1 - fraction) must hold the centre line, at time (n // 2 + 0.5) / n
    low, high = max(0.0, fraction - 0.5 + 1.0 / line_count), min(fraction, 0.5)
    start = low + (high - low) * _rand((batch, 1), generator, device)
    directions = 2 * _rand((batch, MOTION_SEGMENTS, 6), generator, device) - 1
    line_time = (torch.arange(line_count, device=device).view(1, -1) + 0.5) / line_count
    segment_BW = (line_time >= start).long() + (line_time >= start + 1 - fraction).long()
    moved = torch.tensor([1.0, 0.0, 1.0], device=device).view(1, -1, 1)
    angles = directions[..., :3] * math.radians(max_degrees) * moved
    shifts = directions[..., 3:] * max_degrees * TRANSLATION_VOXELS_PER_DEGREE * moved
    return segment_BW, angles, shifts


@register
class Motion(Alteration):
    """Rigid motion: k-space line segments from two rotated/translated copies (up to `parameter` degrees)."""

    name = "motion"
    parameter_name = "max_degrees"
    severity_parameters = (1.0, 2.0, 3.5, 5.0, 8.0)

    def apply(self, x_BCDHW: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch, _, *shape = x_BCDHW.shape
        segment_BW, angles, shifts = draw_motion(batch, self.parameter, shape[2], generator, x_BCDHW.device)
        theta = rigid_theta(angles.flatten(0, 1), shifts.flatten(0, 1), shape)
        moved = self._moved_copies(x_BCDHW, theta.view(batch, MOTION_SEGMENTS, 3, 4))  # (B, 2, C, D, H, W)
        # Composing line segments of the copies' spectra along W (the D and H transforms commute with selecting W
        # frequencies) equals x plus, per moved copy, its difference to x filtered by that copy's line mask. Only
        # the real part is kept (as TorchIO does), and Re(ifft(fft(d) * mask)) of a real d is irfft(rfft(d) *
        # (mask(k) + mask(-k)) / 2): half-spectrum transforms of two differences instead of full complex
        # transforms of three copies.
        select = F.one_hot(segment_BW, MOTION_SEGMENTS).permute(0, 2, 1)[:, [0, 2]].to(x_BCDHW.dtype)  # (B, 2, W)
        select = torch.fft.ifftshift(select, dim=-1)  # line index in centred order -> FFT frequency index
        symmetric = 0.5 * (select + torch.roll(select.flip(-1), 1, dims=-1))  # (mask(k) + mask(-k mod W)) / 2
        half = symmetric[..., :shape[2] // 2 + 1].view(batch, 2, 1, 1, 1, -1)
        spectra = torch.fft.rfft(moved - x_BCDHW.unsqueeze(1), dim=PHASE_DIM)
        change = torch.fft.irfft((spectra * half).sum(dim=1), n=shape[2], dim=PHASE_DIM)
        return x_BCDHW + change

    @staticmethod
    def _moved_copies(x_BCDHW: torch.Tensor, theta_BS34: torch.Tensor) -> torch.Tensor:
        """The volume at the two moved segments' positions (segments 0 and 2; segment 1 is the input itself)."""
        batch = x_BCDHW.shape[0]
        moved_theta = theta_BS34[:, [0, 2]].flatten(0, 1)
        copies = x_BCDHW.repeat_interleave(2, dim=0)  # (B*2, C, D, H, W)
        grid = affine_grid_3d(moved_theta.to(x_BCDHW.dtype), copies.shape[2:])
        # border padding: tissue moving out of view is replaced by the edge value, not by a dark frame
        moved = F.grid_sample(copies, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return moved.view(batch, 2, *x_BCDHW.shape[1:])


def draw_ghost_counts(batch: int, generator: torch.Generator) -> torch.Tensor:
    """The number of ghosts N per volume, `(B,)` on the CPU, drawn from `GHOST_COUNTS`."""
    choice = torch.randint(len(GHOST_COUNTS), (batch,), generator=generator, device=generator.device)
    return torch.tensor(GHOST_COUNTS)[choice.cpu()]


@register
class Ghosting(Alteration):
    """Every N-th phase-encoding line scaled by 1 - parameter: N ghosts shifted by FOV/N along W."""

    name = "ghosting"
    parameter_name = "line_attenuation"
    severity_parameters = (0.15, 0.30, 0.45, 0.60, 0.80)

    def apply(self, x_BCDHW: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch, line_count = x_BCDHW.shape[0], x_BCDHW.shape[-1]
        counts = draw_ghost_counts(batch, generator).to(x_BCDHW.device).view(-1, 1)
        frequency = torch.arange(line_count // 2 + 1, device=x_BCDHW.device).view(1, -1)  # rfft's frequencies
        comb = (frequency % counts == 0) & (frequency != 0)  # (B, W); the zero line is kept: mean unchanged
        scale = 1.0 - self.parameter * comb.to(x_BCDHW.dtype)
        # the comb depends on the W frequency alone and is symmetric in it: a real 1D transform along W suffices
        kspace = torch.fft.rfft(x_BCDHW, dim=PHASE_DIM) * scale.view(batch, 1, 1, 1, -1)
        return torch.fft.irfft(kspace, n=line_count, dim=PHASE_DIM)
