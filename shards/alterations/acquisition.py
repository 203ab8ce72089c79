"""Acquisition noise with the statistics of the physics behind it: Rician (MR magnitude) and Poisson (CT/PET dose).

Additive Gaussian noise (`gaussian_noise` in `intensity.py`) is the right model only for complex-valued or
high-SNR data. Two other noise models matter in practice:

- **Rician** (`rician_noise`): an MR magnitude image is `|s + n_re + i n_im|` with Gaussian noise of the same
  std sigma on both quadrature channels. In dark regions the noise is not zero-mean (it rectifies to a Rayleigh
  floor), which Gaussian noise misses. The grading follows the MR convention SNR = signal / sigma, with the
  signal taken as each volume's mean intensity: `sigma = parameter * mean(x - offset)` (parameter = 1/SNR).
- **Poisson** (`poisson_noise`): photon-counting (CT/PET) noise. Intensities are turned into expected counts
  `lambda = k * (x - offset)`, counts are drawn from Poisson(lambda) and mapped back, so the variance equals the
  mean *in counts*, and the noise grows as sqrt(signal). The dose `k` is set so that at each volume's mean
  intensity the relative noise std is `parameter` (counts at the mean = 1 / parameter**2): lower dose, more noise.
  This is an image-domain approximation of dose reduction, not a projection-domain simulation.

Both models need a non-negative signal (a magnitude, a count). Volumes with negative values (CT in HU, a
z-scored MR volume, or signed noise around zero in the air) are shifted by their minimum first (`offset`, 0 for
a non-negative volume) and shifted back after: otherwise the magnitude would fold every negative voxel over,
a large change that does not shrink with the noise level.

Both draw their randomness from the given generator on its own device, then move it to the data's device, so
the same seed gives the same noise on CPU and CUDA.
"""
from __future__ import annotations

import torch

from rafmedia.shards.alterations.base import Alteration, register


def _per_volume(values_B: torch.Tensor) -> torch.Tensor:
    return values_B.view(-1, 1, 1, 1, 1)


def _randn_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=generator.device).to(x.device)


def signal_offset_and_mean(x_BCDHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per volume, each `(B, 1, 1, 1, 1)`: the offset (the minimum where negative, else 0) and the mean signal
    above it."""
    flat = x_BCDHW.flatten(1)
    offset = flat.min(dim=1).values.clamp(max=0.0)
    mean_signal = (flat.mean(dim=1) - offset).clamp(min=1e-12)
    return _per_volume(offset), _per_volume(mean_signal)


def poisson_counts_per_unit(mean_signal: torch.Tensor, relative_noise: float) -> torch.Tensor:
    """The dose `k` (counts per unit intensity) that puts `1 / relative_noise**2` counts at the mean signal."""
    return (1.0 / relative_noise**2) / mean_signal


@register
class RicianNoise(Alteration):
    """MR magnitude noise: `|x + sigma n_re + i sigma n_im|`, sigma = parameter x each volume's mean signal."""

    name = "rician_noise"
    parameter_name = "sigma_over_mean"
    severity_parameters = (0.03, 0.06, 0.10, 0.15, 0.22)

    def apply(self, x_BCDHW: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        offset, mean_signal = signal_offset_and_mean(x_BCDHW)
        sigma = self.parameter * mean_signal
        real = x_BCDHW - offset + sigma * _randn_like(x_BCDHW, generator)
        imaginary = sigma * _randn_like(x_BCDHW, generator)
        return torch.sqrt(real * real + imaginary * imaginary) + offset


@register
class PoissonNoise(Alteration):
    """Photon-counting noise: counts ~ Poisson(k (x - offset)), mapped back; relative std at the mean = parameter."""

    name = "poisson_noise"
    parameter_name = "relative_std_at_mean"
    severity_parameters = (0.03, 0.06, 0.10, 0.15, 0.22)

    def apply(self, x_BCDHW: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        offset, mean_signal = signal_offset_and_mean(x_BCDHW)
        counts_per_unit = poisson_counts_per_unit(mean_signal, self.parameter)
        # clamp: rounding can leave a shifted minimum at -1e-9, and Poisson rates must be >= 0
        rates = ((x_BCDHW - offset) * counts_per_unit).clamp(min=0.0)
        counts = torch.poisson(rates.to(generator.device), generator=generator).to(x_BCDHW.device)
        return counts / counts_per_unit + offset
