"""CT alterations: metal streak artefacts and beam-hardening cupping, both in the axial (H, W) plane.

Intensities are treated as attenuation above air, air being each volume's 1st percentile (HU -1000 on a CT; 0 on
a normalised volume; the percentile ignores noise in the background). The body, which sets the cupping's centre
and radius and where metal goes, is where the volume's mean along D is more than a quarter of the way from that
projection's minimum to its maximum.

Metal streaks follow the physics at low cost: per sample two metal rods (dental fillings, hip or spine
hardware) are inserted along z over a slab of slices; the metal's parallel-beam projections p(theta, s) are
computed over 90 angles (rotate-and-sum), the beam-hardening / photon-starvation error of the measured line
integrals is modelled as -p^2 (it grows faster than linearly with the metal crossed), and that error is
reconstructed by filtered back-projection (ramp filter). Rays crossing both rods get the cross term -2 p1 p2:
a dark band along the line through the two rods and bright/dark streaks radiating from them, as on real scans.
The streak image is computed once per sample (the rods are straight along z) and added to every slice of the slab
(30% of the slices, centred in the middle fifth of the volume).

| alteration     | parameter                                                                | s=1  | s=2  | s=3  | s=4  | s=5  |
| -------------- | ------------------------------------------------------------------------ | ---- | ---- | ---- | ---- | ---- |
| metal_streaks  | streak amplitude (99th pct. of abs streak), fraction of intensity range | 0.05 | 0.10 | 0.20 | 0.35 | 0.50 |
| beam_hardening | cupping: fraction by which the body centre is darkened relative to edge  | 0.05 | 0.10 | 0.15 | 0.22 | 0.30 |
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rafmedia.shards.alterations.base import Alteration, register

BODY_THRESHOLD = 0.25  # fraction of the range of the mean-along-D projection above its minimum that is body
AIR_QUANTILE = 0.01


def _air_and_range(x_BCDHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per volume: air (the 1st percentile, robust to noise in the background) and the range above it."""
    flat = x_BCDHW.flatten(2)
    rank = max(1, round(AIR_QUANTILE * flat.shape[2]))
    air = flat.kthvalue(rank, dim=2).values.view(*x_BCDHW.shape[:2], 1, 1, 1)
    span = (flat.amax(dim=2).view(*x_BCDHW.shape[:2], 1, 1, 1) - air).clamp(min=1e-8)
    return air, span


def _body_geometry(x_BCDHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample: in-plane body centre (row, column) and body radius, in voxels, from channel 0.

    The body is where the mean along D (which averages the background noise away) is more than
    BODY_THRESHOLD of that projection's range above its minimum.
    """
    projection_BHW = x_BCDHW[:, 0].mean(dim=1)
    low = projection_BHW.flatten(1).amin(dim=1).view(-1, 1, 1)
    high = projection_BHW.flatten(1).amax(dim=1).view(-1, 1, 1)
    body_BHW = (projection_BHW - low > BODY_THRESHOLD * (high - low)).float()
    height, width = body_BHW.shape[1:]
    rows = torch.arange(height, device=x_BCDHW.device, dtype=torch.float32).view(1, -1, 1)
    columns = torch.arange(width, device=x_BCDHW.device, dtype=torch.float32).view(1, 1, -1)
    count = body_BHW.flatten(1).sum(dim=1).clamp(min=1)
    centre_row = (body_BHW * rows).flatten(1).sum(dim=1) / count
    centre_column = (body_BHW * columns).flatten(1).sum(dim=1) / count
    distance = ((rows - centre_row.view(-1, 1, 1)) ** 2 + (columns - centre_column.view(-1, 1, 1)) ** 2).sqrt()
    radius = (distance * body_BHW).flatten(1).amax(dim=1)
    empty = count <= 1  # no body found (a constant volume): use the whole plane
    radius = torch.where(empty, torch.tensor(0.5 * math.hypot(height, width), device=radius.device), radius)
    return centre_row, centre_column, radius.clamp(min=1.0)


@register
class BeamHardening(Alteration):
    """Cupping: attenuation above air multiplied by 1 - p * (1 - (r / R)^2), r the in-plane distance from the body
    centre and R the body radius (the field is 1 at and beyond the body edge, 1 - p at the centre).

    A uniform phantom thus reads p lower (relative to air) at its centre than at its edge.
    """

    name = "beam_hardening"
    category = "ct"
    parameter_name = "cupping_fraction"
    severity_parameters = (0.05, 0.10, 0.15, 0.22, 0.30)

    def cupping_field(self, x_BCDHW: torch.Tensor) -> torch.Tensor:
        """(B, 1, 1, H, W) multiplicative field."""
        centre_row, centre_column, radius = _body_geometry(x_BCDHW)
        height, width = x_BCDHW.shape[3:]
        rows = torch.arange(height, device=x_BCDHW.device, dtype=torch.float32).view(1, -1, 1)
        columns = torch.arange(width, device=x_BCDHW.device, dtype=torch.float32).view(1, 1, -1)
        squared = ((rows - centre_row.view(-1, 1, 1)) ** 2 + (columns - centre_column.view(-1, 1, 1)) ** 2)
        relative = (squared / radius.view(-1, 1, 1) ** 2).clamp(max=1.0)
        return (1.0 - self.parameter * (1.0 - relative)).view(-1, 1, 1, height, width)

    def apply(self, x_BCDHW: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        air, _ = _air_and_range(x_BCDHW)
        return air + (x_BCDHW - air) * self.cupping_field(x_BCDHW)


@register
class MetalStreaks(Alteration):
    """Two metal rods with streaks reconstructed from a -p^2 projection error (see the module docstring)."""

    name = "metal_streaks"
    category = "ct"
    parameter_name = "streak_amplitude"
    severity_parameters = (0.05, 0.10, 0.20, 0.35, 0.50)
    num_rods, num_angles = 2, 90  # a pair of rods: their cross term makes the streaks (see the module docstring)
    rod_radius_fraction, slab_fraction, metal_contrast = 0.04, 0.3, 1.5

    def draw_rods(self, x_BCDHW: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Per sample: rod centres (B, 2, 2) as (row, column), rod radius, first slice and thickness of the slab."""
        batch, depth = x_BCDHW.shape[0], x_BCDHW.shape[2]
        draws = torch.rand((batch, 5), generator=generator, device=generator.device).cpu()
        centre_row, centre_column, radius = (v.cpu() for v in _body_geometry(x_BCDHW))
        # a pair of rods (as hip or spine hardware comes) about a midpoint near the body centre: midpoint within
        # 0.2 R of it, rods 0.3-0.6 R apart, so both stay inside the body (within 0.5 R of its centre) and apart
        offset_angle, offset, angle, separation = (draws[:, i] for i in range(4))
        midpoint_row = centre_row + 0.2 * radius * offset * torch.sin(2 * math.pi * offset_angle)
        midpoint_column = centre_column + 0.2 * radius * offset * torch.cos(2 * math.pi * offset_angle)
        half = 0.5 * (0.3 + 0.3 * separation) * radius
        step = torch.stack([half * torch.sin(math.pi * angle), half * torch.cos(math.pi * angle)], dim=1)  # (B, 2)
        midpoint = torch.stack([midpoint_row, midpoint_column], dim=1)
        centres = torch.stack([midpoint - step, midpoint + step], dim=1)  # (B, 2 rods, 2)
        rod_radius = max(1.0, self.rod_radius_fraction * min(x_BCDHW.shape[3:]))
        thickness = max(1, round(self.slab_fraction * depth))
        # the slab is centred in the middle fifth of the slices, so it always holds the middle slice (previews)
        centre = depth * (0.4 + 0.2 * draws[:, -1])
        first = (centre - thickness / 2).round().long().clamp(0, depth - thickness)
        return {"centres": centres, "rod_radius": torch.tensor(rod_radius), "first": first, "thickness": thickness}

    def rod_mask(self, rods: dict, height: int, width: int, device) -> torch.Tensor:
        """(B, 1, H, W) in-plane metal mask, 1 inside any rod."""
        rows = torch.arange(height, dtype=torch.float32).view(1, 1, -1, 1)
        columns = torch.arange(width, dtype=torch.float32).view(1, 1, 1, -1)
        centres = rods["centres"].view(-1, self.num_rods, 2, 1, 1)
        squared = (rows - centres[:, :, 0]) ** 2 + (columns - centres[:, :, 1]) ** 2
        return (squared <= rods["rod_radius"] ** 2).any(dim=1, keepdim=True).float().to(device)

    def apply(self, x_BCDHW: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch, _, depth, height, width = x_BCDHW.shape
        rods = self.draw_rods(x_BCDHW, generator)
        mask_B1HW = self.rod_mask(rods, height, width, x_BCDHW.device)
        streaks_B1HW = normalized_streaks(streak_image(mask_B1HW, self.num_angles), mask_B1HW)
        air, span = _air_and_range(x_BCDHW)
        slices = torch.arange(depth, device=x_BCDHW.device).view(1, -1)
        first = rods["first"].to(x_BCDHW.device).view(-1, 1)
        in_slab = ((slices >= first) & (slices < first + rods["thickness"])).float().view(batch, 1, depth, 1, 1)
        metal = (mask_B1HW.unsqueeze(2) * in_slab)  # (B, 1, D, H, W)
        streaked = x_BCDHW + self.parameter * span * streaks_B1HW.unsqueeze(2) * in_slab
        metal_value = air + (1.0 + self.metal_contrast) * span  # brighter than anything in the volume
        return torch.where(metal > 0, metal_value, streaked)


def normalized_streaks(streaks_B1HW: torch.Tensor, mask_B1HW: torch.Tensor) -> torch.Tensor:
    """Streaks in units of their 99th-percentile magnitude outside the metal, clipped to +-2.

    The reconstruction peaks sharply at the metal's rim; the percentile grades the streaks one sees across the
    slice rather than that rim, and the clip keeps the rim from dominating.
    """
    outside = (streaks_B1HW * (1 - mask_B1HW)).flatten(1).abs()
    scale = torch.quantile(outside, 0.99, dim=1).clamp(min=1e-12).view(-1, 1, 1, 1)
    return (streaks_B1HW / scale).clamp(-2.0, 2.0)


def streak_image(mask_B1HW: torch.Tensor, num_angles: int) -> torch.Tensor:
    """Filtered back-projection of the -p^2 error of the mask's parallel-beam projections p(theta, s)."""
    batch, _, height, width = mask_B1HW.shape
    angles = torch.arange(num_angles, device=mask_B1HW.device, dtype=torch.float32) * (math.pi / num_angles)
    cos, sin = torch.cos(angles), torch.sin(angles)
    rotation = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)  # (A, 2, 2), voxel units
    size = [batch * num_angles, 1, height, width]
    forward = F.affine_grid(_grid_theta(rotation, height, width).repeat(batch, 1, 1), size, align_corners=False)
    rotated = F.grid_sample(mask_B1HW.repeat_interleave(num_angles, dim=0), forward, align_corners=False)
    projections = rotated.sum(dim=2)  # (B*A, 1, W): line integrals along rows of the rotated image
    filtered = _ramp_filter(-projections**2)
    smeared = filtered.unsqueeze(2).expand(-1, -1, height, -1).contiguous()
    inverse_theta = _grid_theta(rotation.transpose(1, 2), height, width).repeat(batch, 1, 1)
    inverse = F.affine_grid(inverse_theta, size, align_corners=False)
    # border padding: a back-projected ray stays constant along itself out to the corners (no FOV circle edge)
    back = F.grid_sample(smeared, inverse, padding_mode="border", align_corners=False)
    return back.view(batch, num_angles, height, width).sum(dim=1, keepdim=True)


def _grid_theta(rotation_A22: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """affine_grid thetas (A, 2, 3) for in-plane rotations given in voxel units, rigid on non-square planes too."""
    scale = torch.tensor([2.0 / width, 2.0 / height], device=rotation_A22.device)
    theta = scale.view(1, 2, 1) * rotation_A22 / scale.view(1, 1, 2)
    return torch.cat([theta, torch.zeros(theta.shape[0], 2, 1, device=theta.device)], dim=2)


def _ramp_filter(rows_N1W: torch.Tensor) -> torch.Tensor:
    """|frequency| filter along the last dim, zero-padded to twice its length against wrap-around."""
    width = rows_N1W.shape[-1]
    padded = F.pad(rows_N1W, (0, width))
    ramp = torch.fft.rfftfreq(2 * width, device=rows_N1W.device).abs()
    return torch.fft.irfft(torch.fft.rfft(padded, dim=-1) * ramp, n=2 * width, dim=-1)[..., :width]
