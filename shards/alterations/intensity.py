"""Acquisition alterations that change intensities but not anatomy: noise and bias field."""
from __future__ import annotations

import torch

from rafmedia.shards.alterations.base import Alteration, register


def _normalized_grid(shape, device) -> torch.Tensor:
    axes = [torch.linspace(-1.0, 1.0, size, device=device) for size in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))  # (3, D, H, W)


def smooth_log_field(shape, batch: int, generator: torch.Generator, device, order: int = 3) -> torch.Tensor:
    """Random polynomials of the given order in (z, y, x), one per sample, with zero mean and unit std.

    The same family of smooth fields TorchIO's RandomBiasField draws coefficients for.
    """
    z, y, x = _normalized_grid(shape, device)
    terms = [z**i * y**j * x**k for i in range(order + 1) for j in range(order + 1 - i)
             for k in range(order + 1 - i - j) if i + j + k > 0]
    basis = torch.stack(terms).flatten(1)  # (T, V)
    coefficients = torch.randn((batch, len(terms)), generator=generator, device=generator.device).to(device)
    field = coefficients @ basis
    field = (field - field.mean(dim=1, keepdim=True)) / field.std(dim=1, keepdim=True).clamp(min=1e-6)
    return field.view(batch, 1, *shape)


@register
class GaussianNoise(Alteration):
    """Additive Gaussian noise with std = parameter x each volume's intensity std (ImageNet-C style grading)."""

    name = "gaussian_noise"
    parameter_name = "relative_std"
    severity_parameters = (0.10, 0.20, 0.35, 0.50, 0.75)

    def apply(self, x_BCDHW: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        scale = x_BCDHW.flatten(1).std(dim=1).view(-1, 1, 1, 1, 1) * self.parameter
        noise = torch.randn(x_BCDHW.shape, generator=generator, device=generator.device).to(x_BCDHW.device)
        return x_BCDHW + scale * noise


@register
class BiasField(Alteration):
    """Smooth multiplicative intensity inhomogeneity: x * exp(parameter * field), field a unit-std polynomial."""

    name = "bias_field"
    parameter_name = "log_std"
    severity_parameters = (0.10, 0.20, 0.30, 0.45, 0.60)

    def apply(self, x_BCDHW: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        field = smooth_log_field(x_BCDHW.shape[2:], x_BCDHW.shape[0], generator, x_BCDHW.device)
        return x_BCDHW * torch.exp(self.parameter * field)
