"""Acquisition alterations that change intensities but not anatomy: noise and bias field."""
from __future__ import annotations

import torch

from rafmedia.shards.alterations.base import Alteration, register


def smooth_log_field(shape, batch: int, generator: torch.Generator, device, order: int = 3) -> torch.Tensor:
    """Random polynomials of the given order in (z, y, x), one per sample, with zero mean and unit std.

    The same family of smooth fields TorchIO's RandomBiasField draws coefficients for. The polynomial is evaluated
    axis by axis (contract x, then y, then z), so only the last step touches every voxel: a basis of one volume per
    term (19 volumes for order 3) cost several times more time and memory.
    """
    depth, height, width = shape
    powers = [(i, j, k) for i in range(order + 1) for j in range(order + 1 - i)
              for k in range(order + 1 - i - j) if i + j + k > 0]
    coefficients = torch.randn((batch, len(powers)), generator=generator, device=generator.device).to(device)
    dense = torch.zeros(batch, order + 1, order + 1, order + 1, device=device)
    index = torch.tensor(powers, device=device)
    dense[:, index[:, 0], index[:, 1], index[:, 2]] = coefficients

    def monomials(size: int) -> torch.Tensor:  # (size, order + 1): t^0 .. t^order on [-1, 1]
        return torch.linspace(-1.0, 1.0, size, device=device).view(-1, 1) ** torch.arange(order + 1, device=device)

    in_x = torch.einsum("bijk,wk->bijw", dense, monomials(width))
    in_xy = torch.einsum("bijw,hj->bihw", in_x, monomials(height))
    field = torch.einsum("bihw,di->bdhw", in_xy, monomials(depth)).reshape(batch, -1)
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
        return noise.mul_(scale).add_(x_BCDHW)  # in place: no second volume-sized temporary


@register
class BiasField(Alteration):
    """Smooth multiplicative intensity inhomogeneity: x * exp(parameter * field), field a unit-std polynomial."""

    name = "bias_field"
    parameter_name = "log_std"
    severity_parameters = (0.10, 0.20, 0.30, 0.45, 0.60)

    def apply(self, x_BCDHW: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        field = smooth_log_field(x_BCDHW.shape[2:], x_BCDHW.shape[0], generator, x_BCDHW.device)
        return x_BCDHW * torch.exp(self.parameter * field)
