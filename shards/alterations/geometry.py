"""Geometry and orientation alterations: rotation, flips/axis permutations, affine and elastic deformation.

All of them move anatomy, so each transforms a label map with the very same random draw (nearest neighbour).
Rotation, affine and elastic build one sampling grid per sample and resample the image trilinearly and the label
with `mode="nearest"` through `torch.nn.functional.grid_sample`; flips and permutations are exact index
operations. Outside the field of view the image is filled with each volume's minimum (air, not zero: CT air is
-1000) and the label with 0 (background).

Grading: every sample draws one random *direction* (axis, sign, unit vector, smooth field) from the generator and
the severity parameter only scales it, so severities 1..5 for the same seed are the same deformation made stronger.

| alteration   | parameter                                                        | s=1  | s=2  | s=3  | s=4  | s=5  |
| ------------ | ---------------------------------------------------------------- | ---- | ---- | ---- | ---- | ---- |
| rotation     | angle in degrees about a random axis (z, y or x), random sign    | 5    | 10   | 20   | 30   | 45   |
| flip_permute | orientation operations: 1-3 axes flipped, 4-5 add axis swaps     | 1    | 2    | 3    | 4    | 5    |
| affine       | strength s: rotation 30*s deg, scale 1 +- 0.2*s, shear +- 0.15*s | 0.2  | 0.4  | 0.6  | 0.8  | 1.0  |
| elastic      | largest displacement, as a fraction of the volume's extent      | 0.02 | 0.04 | 0.06 | 0.09 | 0.12 |
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rafmedia.shards.alterations.base import Alteration, register

# ---- resampling shared by the grid-based alterations -------------------------------------------------------

def resample(x_BCDHW: torch.Tensor, label_BCDHW: torch.Tensor | None,
             grid_BDHW3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Samples image (trilinear) and label (nearest) at `grid` (normalised (x, y, z) coordinates, align_corners=False).

    Points outside the volume take the volume's minimum (image) and 0 (label).
    """
    floor = x_BCDHW.flatten(2).amin(dim=2).view(*x_BCDHW.shape[:2], 1, 1, 1)
    grid = grid_BDHW3.to(x_BCDHW.dtype)
    moved = F.grid_sample(x_BCDHW - floor, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + floor
    if label_BCDHW is None:
        return moved, None
    moved_label = F.grid_sample(label_BCDHW.to(x_BCDHW.dtype), grid, mode="nearest", padding_mode="zeros",
                                align_corners=False)
    return moved, moved_label.round().to(label_BCDHW.dtype)


def affine_grid_3d(theta_N34: torch.Tensor, shape_DHW) -> torch.Tensor:
    """`F.affine_grid(theta, (N, C, D, H, W), align_corners=False)`, built by broadcasting instead of a matmul.

    The grid is affine in (x, y, z), so it is the sum of three outer products and a translation: one pass over the
    (N, D, H, W, 3) output instead of a (D*H*W, 4) @ (4, 3) product per sample (measured on 2 x 128^3 on 2 CPU
    cores: torch's version cost as much as the trilinear sampling that follows it).
    """
    depth, height, width = shape_DHW
    batch = theta_N34.shape[0]

    def centres(size: int) -> torch.Tensor:  # voxel centres in [-1, 1], align_corners=False
        return (torch.arange(size, device=theta_N34.device, dtype=theta_N34.dtype) * 2 + 1) / size - 1

    columns = theta_N34.transpose(1, 2)  # (N, 4, 3): rows are the x, y, z and translation columns of theta
    plane = (columns[:, 3].view(batch, 1, 1, 3) + columns[:, 0].view(batch, 1, 1, 3) * centres(width).view(1, 1, -1, 1)
             + columns[:, 1].view(batch, 1, 1, 3) * centres(height).view(1, -1, 1, 1))  # (N, H, W, 3)
    return plane.unsqueeze(1) + columns[:, 2].view(batch, 1, 1, 1, 3) * centres(depth).view(1, -1, 1, 1, 1)


def voxel_to_normalized(shape_DHW, device) -> torch.Tensor:
    """Diagonal (x, y, z) scale from voxel offsets about the centre to grid_sample's [-1, 1] units.

    With align_corners=False, [-1, 1] spans the outer faces of the edge voxels: N voxels are 2 units.
    """
    depth, height, width = shape_DHW
    return torch.tensor([2.0 / width, 2.0 / height, 2.0 / depth], device=device)


def affine_grid_from_voxel_matrix(matrix_B33: torch.Tensor, shape_DHW) -> torch.Tensor:
    """A grid that maps each output voxel v (about the centre, (x, y, z) order) to input voxel `matrix @ v`.

    Working in voxel units keeps rotations rigid on non-cubic volumes (grid_sample's [-1, 1] units are not).
    """
    scale = voxel_to_normalized(shape_DHW, matrix_B33.device)
    theta = scale.view(1, 3, 1) * matrix_B33 / scale.view(1, 1, 3)
    theta = torch.cat([theta, torch.zeros(theta.shape[0], 3, 1, device=theta.device, dtype=theta.dtype)], dim=2)
    return affine_grid_3d(theta, shape_DHW)


def axis_angle_matrix(axis_B3: torch.Tensor, angle_B: torch.Tensor) -> torch.Tensor:
    """Rotation matrices (Rodrigues) about unit axes, angles in radians."""
    x, y, z = axis_B3.unbind(dim=1)
    zero = torch.zeros_like(x)
    cross = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=1).view(-1, 3, 3)
    eye = torch.eye(3, device=axis_B3.device, dtype=axis_B3.dtype).expand_as(cross)
    sin, cos = torch.sin(angle_B).view(-1, 1, 1), torch.cos(angle_B).view(-1, 1, 1)
    return eye + sin * cross + (1 - cos) * (cross @ cross)


def _random_signs(batch: int, generator: torch.Generator, size: int = 1) -> torch.Tensor:
    return torch.randint(0, 2, (batch, size), generator=generator, device=generator.device).float() * 2 - 1


class _GridAlteration(Alteration):
    """Geometry alterations that resample through one grid per sample; subclasses implement `draw_grid`."""

    moves_anatomy = True

    def draw_grid(self, batch: int, shape_DHW, generator: torch.Generator, device) -> torch.Tensor:
        raise NotImplementedError

    def apply(self, x_BCDHW: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply_with_label(x_BCDHW, None, generator)[0]

    def apply_with_label(self, x_BCDHW, label_BCDHW, generator):
        grid = self.draw_grid(x_BCDHW.shape[0], tuple(x_BCDHW.shape[2:]), generator, x_BCDHW.device)
        return resample(x_BCDHW, label_BCDHW, grid)


# ---- the alterations -----------------------------------------------------------------------------------------

@register
class Rotation(_GridAlteration):
    """Rigid rotation by `parameter` degrees about the centre, about one of the three axes, with a random sign.

    The axis is drawn per sample from (z, y, x) = the (D, H, W) dimensions; rotating about z turns the axial plane.
    """

    name = "rotation"
    category = "geometry"
    parameter_name = "angle_degrees"
    severity_parameters = (5.0, 10.0, 20.0, 30.0, 45.0)

    def draw_axes(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample: the rotation axis as a unit vector in (x, y, z) grid order, and the signed angle (radians)."""
        axis_index = torch.randint(0, 3, (batch,), generator=generator, device=generator.device).cpu()
        signs = _random_signs(batch, generator).view(-1).cpu()
        axes = torch.eye(3)[2 - axis_index]  # dimension D is grid coordinate z = column 2
        return axes, signs * math.radians(self.parameter)

    def draw_grid(self, batch, shape_DHW, generator, device):
        axes, angles = self.draw_axes(batch, generator)
        matrix = axis_angle_matrix(axes.double(), angles.double()).float().to(device)
        return affine_grid_from_voxel_matrix(matrix, shape_DHW)


@register
class Affine(_GridAlteration):
    """Random affine about the centre: rotation, anisotropic scaling and shear, all scaled by one strength s.

    Per sample a unit rotation axis, three scale directions and six shear directions are drawn once; the map is
    R(30 s deg) @ diag(1 + 0.2 s u) @ (I + 0.15 s S) with u, S uniform in [-1, 1].
    """

    name = "affine"
    category = "geometry"
    parameter_name = "strength"
    severity_parameters = (0.2, 0.4, 0.6, 0.8, 1.0)
    max_rotation_degrees, max_scale, max_shear = 30.0, 0.2, 0.15

    def draw_matrix(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """(B, 3, 3) map from output to input voxel offsets about the centre, in (x, y, z) order, on the CPU."""
        draws = torch.rand((batch, 13), generator=generator, device=generator.device).cpu().double() * 2 - 1
        axis = F.normalize(draws[:, :3] + 1e-6, dim=1)
        angle = draws[:, 3].sign() * math.radians(self.max_rotation_degrees) * self.parameter
        scale = torch.diag_embed(1 + self.max_scale * self.parameter * draws[:, 4:7])
        shear = torch.eye(3, dtype=torch.float64).repeat(batch, 1, 1)
        off_diagonal = ~torch.eye(3, dtype=torch.bool)
        shear[:, off_diagonal] += self.max_shear * self.parameter * draws[:, 7:13]
        return axis_angle_matrix(axis, angle) @ scale @ shear

    def draw_grid(self, batch, shape_DHW, generator, device):
        return affine_grid_from_voxel_matrix(self.draw_matrix(batch, generator).float().to(device), shape_DHW)


@register
class Elastic(_GridAlteration):
    """Smooth random displacement: Gaussian vectors on a coarse 5^3 lattice of control points, upsampled
    trilinearly to every voxel and scaled so the largest displacement is `parameter` x the volume's extent.
    """

    name = "elastic"
    category = "geometry"
    parameter_name = "max_displacement_fraction"
    severity_parameters = (0.02, 0.04, 0.06, 0.09, 0.12)
    control_points = 5

    def draw_field(self, batch: int, shape_DHW, generator: torch.Generator, device) -> torch.Tensor:
        """(B, 3, D, H, W) displacement in normalised grid units ((x, y, z) channels), largest norm = 2 x parameter."""
        coarse = torch.randn((batch, 3, *(self.control_points,) * 3), generator=generator,
                             device=generator.device).to(device)
        field = F.interpolate(coarse, size=tuple(shape_DHW), mode="trilinear", align_corners=True)
        # sum of squares, not .norm(dim=1): the strided channel reduction of norm is ~10x slower on CPU
        largest = (field * field).sum(dim=1).flatten(1).amax(dim=1).sqrt().clamp(min=1e-6).view(-1, 1, 1, 1, 1)
        return field / largest * (2.0 * self.parameter)  # [-1, 1] spans the extent: fraction f is 2 f units

    def draw_grid(self, batch, shape_DHW, generator, device):
        identity = torch.eye(3, 4, device=device).expand(batch, 3, 4)
        grid = F.affine_grid(identity, [batch, 1, *shape_DHW], align_corners=False)
        return grid + self.draw_field(batch, shape_DHW, generator, device).permute(0, 2, 3, 4, 1)


# (severity, operations) for flip_permute: flips of (D, H, W) dims, then a swap of two of them.
FLIP_PERMUTE_LEVELS = {1: (1, 0), 2: (2, 0), 3: (3, 0), 4: (1, 1), 5: (3, 1)}


@register
class FlipPermute(Alteration):
    """Orientation errors: flipped axes (a left-right swap, a wrong scan direction) and swapped axes.

    Severity 1-3 flip 1, 2 or 3 of the spatial dimensions; 4 swaps two dimensions and flips one; 5 swaps two and
    flips all three. Which dimensions is drawn per sample. A swap of two dimensions of different sizes is not
    possible without changing the shape, so it is only drawn among dimensions of equal size (none: no swap).
    """

    name = "flip_permute"
    category = "geometry"
    parameter_name = "orientation_operations"
    severity_parameters = (1.0, 2.0, 3.0, 4.0, 5.0)
    moves_anatomy = True
    # The levels are categorical: on a volume without symmetry every flip already moves every voxel, so the
    # error to the clean volume need not grow from one level to the next (tests check the operations instead).
    graded_by_severity = False

    def draw_operations(self, batch: int, shape_DHW, generator: torch.Generator) -> list[tuple[list[int], tuple]]:
        """Per sample: the dims (2, 3, 4) to flip and the pair of dims to swap (empty when none)."""
        num_flips, num_swaps = FLIP_PERMUTE_LEVELS[min(max(round(self.parameter), 1), 5)]
        order = torch.rand((batch, 3), generator=generator, device=generator.device).cpu().argsort(dim=1)
        swappable = [(a, b) for a in range(3) for b in range(a + 1, 3) if shape_DHW[a] == shape_DHW[b]]
        choice = torch.randint(0, 3, (batch,), generator=generator, device=generator.device).cpu()
        operations = []
        for sample in range(batch):  # a loop over the batch (a few samples), never over voxels
            flips = sorted(2 + int(d) for d in order[sample, :num_flips])
            swap = ()
            if num_swaps and swappable:
                a, b = swappable[int(choice[sample]) % len(swappable)]
                swap = (2 + a, 2 + b)
            operations.append((flips, swap))
        return operations

    @staticmethod
    def _orient(volume_CDHW: torch.Tensor, flips: list[int], swap: tuple) -> torch.Tensor:
        volume = volume_CDHW.flip([d - 1 for d in flips]) if flips else volume_CDHW
        return volume.transpose(swap[0] - 1, swap[1] - 1) if swap else volume

    def apply(self, x_BCDHW: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply_with_label(x_BCDHW, None, generator)[0]

    def apply_with_label(self, x_BCDHW, label_BCDHW, generator):
        operations = self.draw_operations(x_BCDHW.shape[0], tuple(x_BCDHW.shape[2:]), generator)
        moved = torch.stack([self._orient(x_BCDHW[i], *ops) for i, ops in enumerate(operations)])
        if label_BCDHW is None:
            return moved.contiguous(), None
        label = torch.stack([self._orient(label_BCDHW[i], *ops) for i, ops in enumerate(operations)])
        return moved.contiguous(), label.contiguous()
