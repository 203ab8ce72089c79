"""Appearance alterations: contrast (gamma), intensity shift and scale, scanner-like histogram shift.

They change how tissue looks, not where it is, so labels are left as they are. Each works per (sample, channel)
volume and uses that volume's own statistics (min/max, mean/std, quantiles), so a CT in HU and an MR in arbitrary
units are altered alike. Each sample draws its random direction (sign, perturbation) once and the severity
parameter scales it: the same seed at severities 1..5 gives the same change made stronger.

| alteration            | parameter                                                          | s=1  | s=2  | s=3  | s=4  | s=5  |
| --------------------- | ------------------------------------------------------------------ | ---- | ---- | ---- | ---- | ---- |
| gamma                 | abs(log gamma); sign random per sample (expansion or compression)  | 0.05 | 0.10 | 0.20 | 0.30 | 0.45 |
| intensity_shift_scale | p: contrast scaled by exp(+-p) about the mean, shifted by +-p std  | 0.05 | 0.10 | 0.20 | 0.30 | 0.50 |
| histogram_shift       | std of the log of the quantile-spacing perturbation                | 0.10 | 0.20 | 0.35 | 0.50 | 0.75 |
"""
from __future__ import annotations

import torch

from rafmedia.shards.alterations.base import Alteration, register

MAX_QUANTILE_SAMPLE = 1 << 18  # voxels sorted per volume to place the histogram landmarks (a 64^3 volume in full)


def _random_signs(shape, generator: torch.Generator, device) -> torch.Tensor:
    return (torch.randint(0, 2, shape, generator=generator, device=generator.device) * 2 - 1).float().to(device)


def _volume_range(x_BCDHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x_BCDHW.flatten(2)
    low = flat.amin(dim=2).view(*x_BCDHW.shape[:2], 1, 1, 1)
    high = flat.amax(dim=2).view(*x_BCDHW.shape[:2], 1, 1, 1)
    return low, (high - low).clamp(min=1e-8)


@register
class Gamma(Alteration):
    """y = low + span * ((x - low) / span) ** gamma per volume, gamma = exp(+-parameter), the sign drawn per sample.

    gamma > 1 darkens mid-tones (contrast expansion among bright tissue, compression among dark), gamma < 1 the
    opposite; the volume's minimum and maximum stay where they are.
    """

    name = "gamma"
    category = "appearance"
    parameter_name = "abs_log_gamma"
    severity_parameters = (0.05, 0.10, 0.20, 0.30, 0.45)  # TorchIO's RandomGamma default draws log gamma in +-0.3

    def draw_gamma(self, batch: int, generator: torch.Generator, device) -> torch.Tensor:
        """(B,) gamma per sample."""
        return torch.exp(self.parameter * _random_signs((batch,), generator, device))

    def apply(self, x_BCDHW: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        gamma = self.draw_gamma(x_BCDHW.shape[0], generator, x_BCDHW.device).view(-1, 1, 1, 1, 1)
        low, span = _volume_range(x_BCDHW)
        # in place after the first op: one temporary instead of five, which is what this memory-bound op costs
        unit = (x_BCDHW - low).div_(span).clamp_(0.0, 1.0)
        return unit.pow_(gamma).mul_(span).add_(low)


@register
class IntensityShiftScale(Alteration):
    """y = mean + (x - mean) * exp(+-p) +- p * std per volume: a contrast change and an offset, signs per sample.

    Scaling about the mean keeps the two effects orthogonal, so the squared error grows with p for either sign.
    """

    name = "intensity_shift_scale"
    category = "appearance"
    parameter_name = "log_scale_and_shift_in_std"
    severity_parameters = (0.05, 0.10, 0.20, 0.30, 0.50)

    def apply(self, x_BCDHW: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        signs = _random_signs((x_BCDHW.shape[0], 2), generator, x_BCDHW.device)
        scale = torch.exp(self.parameter * signs[:, 0]).view(-1, 1, 1, 1, 1)
        shift = (self.parameter * signs[:, 1]).view(-1, 1, 1, 1, 1)
        flat = x_BCDHW.flatten(2)
        mean = flat.mean(dim=2).view(*x_BCDHW.shape[:2], 1, 1, 1)
        std = flat.std(dim=2).view(*x_BCDHW.shape[:2], 1, 1, 1)
        return mean + (x_BCDHW - mean) * scale + shift * std


@register
class HistogramShift(Alteration):
    """A scanner-like histogram change: a smooth, monotonic piecewise-linear remapping of the intensity CDF.

    Per volume, landmarks L_k are the intensities at quantiles q_k = k / K (K = 10, as in Nyul-Udupa histogram
    standardisation). Per sample, the spacings between quantiles are multiplied by exp(parameter * z_k), z_k
    standard normal, and renormalised: new quantile levels q'_k. Intensity L_k is mapped to the intensity the
    volume has at q'_k, linearly in between: tissue classes move along the intensity axis and their spreads
    change, as between two scanners, while the order of voxels (their ranks) is kept.
    """

    name = "histogram_shift"
    category = "appearance"
    parameter_name = "log_spacing_std"
    severity_parameters = (0.10, 0.20, 0.35, 0.50, 0.75)
    num_segments = 10

    def draw_levels(self, batch: int, generator: torch.Generator, device) -> torch.Tensor:
        """(B, K + 1) perturbed quantile levels, from 0 to 1, strictly increasing."""
        z = torch.randn((batch, self.num_segments), generator=generator, device=generator.device).to(device)
        spacing = torch.exp(self.parameter * z)
        levels = torch.cumsum(spacing / spacing.sum(dim=1, keepdim=True), dim=1)
        return torch.cat([torch.zeros(batch, 1, device=device), levels.clamp(max=1.0)], dim=1)

    def apply(self, x_BCDHW: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch, channels = x_BCDHW.shape[:2]
        flat_NV = x_BCDHW.reshape(batch * channels, -1)
        sorted_NV = _sorted_sample(flat_NV)
        base = torch.linspace(0, 1, self.num_segments + 1, device=x_BCDHW.device).expand(batch * channels, -1)
        levels = self.draw_levels(batch, generator, x_BCDHW.device).repeat_interleave(channels, dim=0)
        source_NK = _quantiles(sorted_NV, base)
        target_NK = _quantiles(sorted_NV, levels)
        return _piecewise_linear(flat_NV, source_NK, target_NK).view_as(x_BCDHW)


def _sorted_sample(flat_NV: torch.Tensor) -> torch.Tensor:
    """Each row's values, sorted, from a regular stride of at most MAX_QUANTILE_SAMPLE voxels plus the exact
    minimum and maximum: landmarks need not be exact, but the end points must, so the map covers the whole range."""
    step = -(-flat_NV.shape[1] // MAX_QUANTILE_SAMPLE)
    sample = flat_NV[:, ::step]
    ends = torch.stack([flat_NV.amin(dim=1), flat_NV.amax(dim=1)], dim=1)
    return torch.cat([sample, ends], dim=1).sort(dim=1).values


def _quantiles(sorted_NV: torch.Tensor, levels_NK: torch.Tensor) -> torch.Tensor:
    """Linear-interpolated quantiles of each row of an already sorted (N, V) tensor at per-row levels (N, K)."""
    position = levels_NK * (sorted_NV.shape[1] - 1)
    below = position.floor().long().clamp(0, sorted_NV.shape[1] - 1)
    above = (below + 1).clamp(max=sorted_NV.shape[1] - 1)
    weight = position - below
    return torch.gather(sorted_NV, 1, below) * (1 - weight) + torch.gather(sorted_NV, 1, above) * weight


def _piecewise_linear(x_NV: torch.Tensor, source_NK: torch.Tensor, target_NK: torch.Tensor) -> torch.Tensor:
    """Maps each row through the monotone polyline source_k -> target_k (non-decreasing in both)."""
    segment = (torch.searchsorted(source_NK.contiguous(), x_NV.contiguous(), right=True) - 1)
    segment = segment.clamp(0, source_NK.shape[1] - 2)
    left, right = torch.gather(source_NK, 1, segment), torch.gather(source_NK, 1, segment + 1)
    low, high = torch.gather(target_NK, 1, segment), torch.gather(target_NK, 1, segment + 1)
    fraction = ((x_NV - left) / (right - left).clamp(min=1e-12)).clamp(0.0, 1.0)
    return low + fraction * (high - low)
