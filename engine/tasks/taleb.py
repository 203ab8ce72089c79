"""Three of the five 3D pretext tasks of Taleb et al. (NeurIPS 2020): relative patch location, 3D jigsaw and
rotation prediction.

Each follows the contract of `rafmedia.engine.tasks.base`: a task is an `nn.Module` owning its head and loss, declaring
its view maker in `task.views`, returning `{"loss", "accuracy"}`. The view makers are picklable dataclasses
`(volumes_BCDHW, generator) -> dict`, every random draw taken from the generator, so a batch is a pure
function of (volumes, seed).

- Relative patch location (Doersch et al. 2015, in 3D): a 3x3x3 grid of patches of side `patch_size`
  separated by `gap` voxels; the centre patch and one of its 26 neighbours (moved by a random jitter, so the
  network cannot match borders) are embedded by the encoder; a head on both embeddings classifies which
  neighbour it was.
- Rotation prediction: one crop rotated by one of 10 rotations (`views.ROTATIONS_3D`); the head classifies which.
- 3D jigsaw (Noroozi & Favaro 2016, in 3D): a cube cut into `grid^3` cells, each cell cropped smaller at a
  random offset (again against border matching), the cells shuffled by one permutation from a fixed set chosen
  greedily for large Hamming distance; the encoder embeds each cell, a head on the concatenated embeddings
  classifies the permutation index.

Every patch/cell gets its own intensity jitter and noise: shared statistics would be a shortcut to the label.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rafmedia.engine.tasks.base import TASKS, mlp_head
from rafmedia.engine.views import ROTATIONS_3D, IntensityOptions, RotationViews, crop, random_crop_starts

# The 26 neighbour offsets in units of grid cells, in raster order; the label is the index in this tuple.
NEIGHBOUR_OFFSETS: tuple[tuple[int, int, int], ...] = tuple(
    offset for offset in itertools.product((-1, 0, 1), repeat=3) if offset != (0, 0, 0))


def _classification(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """A classification task's outputs: cross-entropy loss and (detached) accuracy."""
    return {"loss": F.cross_entropy(logits, labels),
            "accuracy": (logits.argmax(dim=1) == labels).float().mean().detach()}


# ---------------------------------------------------------------------------------------------------------------
# Relative patch location


@dataclass
class RelativePatchViews(IntensityOptions):
    """A centre patch and one of its 26 neighbours per volume; label = index in `NEIGHBOUR_OFFSETS`.

    The neighbour's corner is `centre + offset * (patch_size + gap) + jitter`, jitter ~ U{-jitter..jitter}
    per axis. The centre is drawn uniformly where the whole jittered 3x3x3 grid fits in the volume.
    """

    patch_size: int = 8
    gap: int = 2
    jitter: int = 1
    noise_std: float = 0.1  # IntensityOptions' setting, with this view maker's default

    def grid_extent(self) -> int:
        """Side of the region the jittered grid may cover: the smallest volume side this view maker accepts."""
        return 3 * self.patch_size + 2 * (self.gap + self.jitter)

    def __call__(self, volumes_BCDHW: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        batch, shape = volumes_BCDHW.shape[0], volumes_BCDHW.shape[2:]
        if min(shape) < self.grid_extent():
            raise ValueError(f"relative patch location needs volumes of side >= {self.grid_extent()} "
                             f"(3 * patch_size + 2 * (gap + jitter)), got {tuple(shape)}; lower patch_size or gap")
        stride = self.patch_size + self.gap
        margin = stride + self.jitter
        centre_starts = margin + random_crop_starts(generator, shape, self.patch_size + 2 * margin, batch)
        labels = torch.randint(0, len(NEIGHBOUR_OFFSETS), (batch,), generator=generator)
        jitters = torch.randint(-self.jitter, self.jitter + 1, (batch, 3), generator=generator)
        neighbour_starts = centre_starts + torch.tensor(NEIGHBOUR_OFFSETS)[labels] * stride + jitters
        patches = torch.cat([crop(volumes_BCDHW, centre_starts, self.patch_size),
                             crop(volumes_BCDHW, neighbour_starts, self.patch_size)])
        centre, neighbour = self.augment_intensity(patches, generator).chunk(2)
        return {"centre": centre, "neighbour": neighbour, "position": labels,
                "centre_starts": centre_starts, "neighbour_starts": neighbour_starts}


class RelativePatchLocation(nn.Module):
    """Classifies which of the 26 neighbours of the centre patch the second patch is."""

    def __init__(self, encoder: nn.Module, views: RelativePatchViews, hidden_dim: int = 256):
        super().__init__()
        self.encoder = encoder
        self.views = views
        self.head = mlp_head(2 * encoder.embed_dim, hidden_dim, len(NEIGHBOUR_OFFSETS))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # One encoder call on both patches, so BatchNorm sees the two kinds of patch together.
        centre, neighbour = self.encoder(torch.cat([batch["centre"], batch["neighbour"]])).chunk(2)
        return _classification(self.head(torch.cat([centre, neighbour], dim=1)), batch["position"])


@TASKS.register("relative_patch_location", options_from=RelativePatchViews)
def relative_patch_location(encoder: nn.Module, hidden_dim: int = 256, **view_options) -> nn.Module:
    """`view_options` are `RelativePatchViews` settings (patch_size, gap, jitter, noise_std, ...)."""
    return RelativePatchLocation(encoder, RelativePatchViews(**view_options), hidden_dim=hidden_dim)


# ---------------------------------------------------------------------------------------------------------------
# 3D jigsaw


def hamming_permutation_set(num_cells: int, num_permutations: int, *, seed: int = 0, criterion: str = "min",
                            num_candidates: int = 50_000) -> np.ndarray:
    """A set of permutations of `num_cells` chosen greedily for large Hamming distance (Noroozi & Favaro 2016).

    Start from one random candidate; repeatedly add the candidate whose distance to the chosen set is largest.
    `criterion="min"` scores a candidate by its distance to the *nearest* chosen permutation (farthest-point
    greedy: it maximises the set's minimum distance, which is what keeps two classes from being confusable);
    `criterion="sum"` by the summed distance, Noroozi & Favaro's Algorithm 1 literally. Ties go to the
    lowest candidate index. Candidates are all permutations when there are at most `num_candidates` (8 cells:
    8! = 40320), else `num_candidates` drawn at random (27 cells).

    Returns:
        (num_permutations, num_cells) int64; row k is the cell order of class k.
    """
    if criterion not in ("min", "sum"):
        raise ValueError(f"criterion must be 'min' or 'sum', got {criterion!r}")
    rng = np.random.default_rng(seed)
    if math.factorial(num_cells) <= num_candidates:
        candidates = np.array(list(itertools.permutations(range(num_cells))), dtype=np.int64)
    else:
        candidates = np.array([rng.permutation(num_cells) for _ in range(num_candidates)], dtype=np.int64)
    if num_permutations > len(candidates):
        raise ValueError(f"asked for {num_permutations} permutations of {num_cells} cells, only "
                         f"{len(candidates)} candidates; lower num_permutations")
    chosen = [int(rng.integers(len(candidates)))]
    score = (candidates != candidates[chosen[0]]).sum(axis=1)
    for _ in range(num_permutations - 1):
        score[chosen] = -1  # never pick a permutation twice
        chosen.append(int(np.argmax(score)))
        distance = (candidates != candidates[chosen[-1]]).sum(axis=1)
        score = np.minimum(score, distance) if criterion == "min" else score + distance
    return candidates[chosen]


def minimum_hamming_distance(permutations_KN: np.ndarray) -> int:
    """Smallest Hamming distance between two different rows."""
    distances = (permutations_KN[:, None, :] != permutations_KN[None, :, :]).sum(axis=2)
    np.fill_diagonal(distances, permutations_KN.shape[1] + 1)
    return int(distances.min())


@dataclass
class JigsawViews(IntensityOptions):
    """A cube of `grid^3` cells of side `cell_size` per volume; each cell cropped to `cell_size - jitter` at a
    random offset, the cells shuffled by permutation `permutations[label]`: output position j holds the cell
    whose raster index (d, h, w order) is `permutations[label, j]`.

    The `num_permutations` classes are `hamming_permutation_set(grid^3, num_permutations,
    seed=permutation_seed, criterion=permutation_criterion)`, chosen once when the view maker is built.
    Output `cells`: (B, grid^3, C, s, s, s) with s = cell_size - jitter.
    """

    grid: int = 2
    cell_size: int = 12
    jitter: int = 2
    num_permutations: int = 100
    permutation_seed: int = 0
    permutation_criterion: str = "min"
    noise_std: float = 0.1  # IntensityOptions' setting, with this view maker's default
    permutations: np.ndarray = field(init=False, repr=False, compare=False)  # (num_permutations, grid^3)

    def __post_init__(self):
        if self.jitter >= self.cell_size:
            raise ValueError(f"jitter {self.jitter} must be smaller than cell_size {self.cell_size}")
        self.permutations = hamming_permutation_set(self.grid**3, self.num_permutations, seed=self.permutation_seed,
                                                    criterion=self.permutation_criterion)

    def __call__(self, volumes_BCDHW: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        batch, side = volumes_BCDHW.shape[0], self.grid * self.cell_size
        shape = volumes_BCDHW.shape[2:]
        if min(shape) < side:
            raise ValueError(f"jigsaw needs volumes of side >= grid * cell_size = {side}, got {tuple(shape)}; "
                             "lower grid or cell_size")
        starts = random_crop_starts(generator, shape, side, batch)
        labels = torch.randint(0, len(self.permutations), (batch,), generator=generator)
        num_cells, small = self.grid**3, self.cell_size - self.jitter
        cell_corners = torch.tensor(list(itertools.product(range(self.grid), repeat=3))) * self.cell_size
        offsets = torch.randint(0, self.jitter + 1, (batch, num_cells, 3), generator=generator)
        order = torch.as_tensor(self.permutations)[labels]  # (B, N): cell index shown at each position
        corners = starts[:, None, :] + cell_corners[order] + offsets  # (B, N, 3)
        repeated = volumes_BCDHW.repeat_interleave(num_cells, dim=0)
        cells = crop(repeated, corners.reshape(-1, 3), small)
        cells = self.augment_intensity(cells, generator)
        return {"cells": cells.reshape(batch, num_cells, *cells.shape[1:]), "permutation": labels,
                "starts": starts, "cell_corners": corners}


class Jigsaw3d(nn.Module):
    """Embeds each cell with the shared encoder; a head on the concatenation classifies the permutation."""

    def __init__(self, encoder: nn.Module, views: JigsawViews, hidden_dim: int = 256):
        super().__init__()
        self.encoder = encoder
        self.views = views
        num_cells = views.grid**3
        self.head = mlp_head(num_cells * encoder.embed_dim, hidden_dim, len(views.permutations))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        cells = batch["cells"]
        embeddings = self.encoder(cells.flatten(0, 1)).reshape(cells.shape[0], -1)
        return _classification(self.head(embeddings), batch["permutation"])


@TASKS.register("jigsaw_3d", options_from=JigsawViews)
def jigsaw_3d(encoder: nn.Module, hidden_dim: int = 256, **view_options) -> nn.Module:
    """`view_options` are `JigsawViews` settings (grid, cell_size, jitter, num_permutations, noise_std, ...)."""
    return Jigsaw3d(encoder, JigsawViews(**view_options), hidden_dim=hidden_dim)


class RotationPrediction(nn.Module):
    """3D rotation prediction (Taleb et al., NeurIPS 2020): classify which of 10 rotations a crop went through."""

    def __init__(self, encoder: nn.Module, views: RotationViews, hidden_dim: int = 256, head_norm: str = "batch"):
        super().__init__()
        self.encoder = encoder
        self.views = views
        self.head = mlp_head(encoder.embed_dim, hidden_dim, len(ROTATIONS_3D), norm=head_norm)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return _classification(self.head(self.encoder(batch["view"])), batch["rotation"])


@TASKS.register("rotation", options_from=RotationViews)
def rotation(encoder: nn.Module, hidden_dim: int = 256, head_norm: str = "batch", **view_options) -> nn.Module:
    """`view_options` are `RotationViews` settings (crop_size, intensity_scale, intensity_shift, noise_std)."""
    return RotationPrediction(encoder, RotationViews(**view_options), hidden_dim=hidden_dim, head_norm=head_norm)
