"""Anatomical plausibility of predicted masks, with no ground truth: topology and a learnt shape prior.

Two label-free checks, each calibrated on a reference cohort's ground-truth label maps:
- topology: per structure, the number of connected components and of holes (enclosed cavities), compared
  with the ranges the reference cohort shows (a liver in three pieces, or a heart with a cavity that no
  reference heart has, is implausible). Foreground uses 26-connectivity and background its digital-topology
  complement, 6-connectivity (Kong & Rosenfeld, "Digital topology", 1989), so a cavity that opens to the
  outside only through a corner or an edge is still closed;
- shape prior: the reconstruction error of a denoising autoencoder trained on plausible label maps
  (Post-DAE, Larrazabal et al., IEEE TMI 2020; `rafmedia.engine.tasks.shape`), 1 - foreground Dice between a
  mask and its reconstruction, thresholded at a quantile of the reference masks' errors.
`plausibility_by_group` reports the share of plausible masks per subgroup, for the fairness report.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from scipy import ndimage

from rafmedia.core.errors import UserError

FOREGROUND_CONNECTIVITY = ndimage.generate_binary_structure(3, 3)  # 26 neighbours
BACKGROUND_CONNECTIVITY = ndimage.generate_binary_structure(3, 1)  # 6 neighbours, the complement of 26
COUNTS = ("components", "holes")


# ---------------------------------------------------------------------------------------------- topology
def count_components(mask_DHW: np.ndarray) -> int:
    """Connected components of a binary mask, 26-connectivity."""
    return int(ndimage.label(mask_DHW, structure=FOREGROUND_CONNECTIVITY)[1])


def count_holes(mask_DHW: np.ndarray) -> int:
    """Cavities of a binary mask: 6-connected components of its complement that do not touch the image border."""
    background, num_background = ndimage.label(~mask_DHW, structure=BACKGROUND_CONNECTIVITY)
    if num_background == 0:
        return 0
    border = np.ones(mask_DHW.shape, dtype=bool)
    border[tuple(slice(1, -1) for _ in mask_DHW.shape)] = False
    touching = np.unique(background[border & (background > 0)])
    return int(num_background - len(touching))


def _check_mask(mask_DHW: np.ndarray, name: str = "mask") -> np.ndarray:
    mask_DHW = np.asarray(mask_DHW)
    if mask_DHW.ndim != 3:
        raise UserError(f"{name} must be a label map (D, H, W), got shape {mask_DHW.shape}")
    return mask_DHW


def topology(mask_DHW: np.ndarray, labels: dict[str, int]) -> dict[str, dict[str, int]]:
    """Components (26-connected) and holes (enclosed 6-connected background) of each structure of a label map.

    Args:
        mask_DHW: integer label map (D, H, W).
        labels: structure name -> label value; structure `name` is `mask_DHW == labels[name]` (an absent one
            has 0 components and 0 holes).

    Returns:
        {structure: {"components": int, "holes": int}}.
    """
    mask_DHW = _check_mask(mask_DHW)
    result = {}
    for name, value in labels.items():
        structure = mask_DHW == value
        result[name] = {"components": count_components(structure), "holes": count_holes(structure)}
    return result


def topology_norms(reference_masks_NDHW: Sequence[np.ndarray], labels: dict[str, int], *,
                   quantiles: tuple[float, float] = (0.0, 1.0)) -> dict[str, dict[str, Any]]:
    """Allowed component and hole counts per structure, learnt from a reference cohort's ground-truth maps.

    The band of a count is [floor(q_low), ceil(q_high)] of its values over the reference maps (linear
    quantiles); the default (0, 1) is the reference cohort's min..max.

    Args:
        reference_masks_NDHW: ground-truth label maps, one (D, H, W) map per subject.
        labels: structure name -> label value.
        quantiles: (q_low, q_high) in [0, 1], q_low <= q_high.

    Returns:
        {structure: {"label": value, "components": [low, high], "holes": [low, high]}}.
    """
    low_q, high_q = quantiles
    if not 0.0 <= low_q <= high_q <= 1.0:
        raise UserError(f"quantiles must be (low, high) with 0 <= low <= high <= 1, got {quantiles}")
    if len(reference_masks_NDHW) == 0:
        raise UserError("topology_norms needs at least one reference label map")
    counts = [topology(mask, labels) for mask in reference_masks_NDHW]
    norms = {}
    for name, value in labels.items():
        norms[name] = {"label": int(value)}
        for count in COUNTS:
            values = np.array([case[name][count] for case in counts], dtype=np.float64)
            norms[name][count] = [int(np.floor(np.quantile(values, low_q))), int(np.ceil(np.quantile(values, high_q)))]
    return norms


def topology_violations(mask_DHW: np.ndarray, norms: dict[str, dict[str, Any]]) -> list[str]:
    """The structures of a label map whose component or hole count falls outside `topology_norms`' band,
    one readable line each (empty when the map is topologically plausible)."""
    found = topology(mask_DHW, {name: norm["label"] for name, norm in norms.items()})
    lines = []
    for name, norm in norms.items():
        for count in COUNTS:
            low, high = norm[count]
            if not low <= found[name][count] <= high:
                lines.append(f"{name}: {found[name][count]} {count}, reference range {low}..{high}")
    return lines


def topology_plausible(masks_NDHW: Sequence[np.ndarray], norms: dict[str, dict[str, Any]]) -> np.ndarray:
    """(N,) bool: True where no structure of the map breaks its topology norm."""
    return np.array([not topology_violations(mask, norms) for mask in masks_NDHW], dtype=bool)


# ---------------------------------------------------------------------------------------------- shape prior
def shape_prior_error(shape_prior, masks_NDHW, *, batch_size: int = 8) -> np.ndarray:
    """Reconstruction error per mask, 1 - foreground Dice between the mask and its reconstruction (in [0, 1]).

    Uses `ShapePriorDAE.reconstruction_error` (from `rafmedia.engine.tasks.shape.load_shape_prior`): the mean
    Dice over the foreground classes present in the mask or its reconstruction, in eval mode.

    Args:
        shape_prior: a `ShapePriorDAE`.
        masks_NDHW: integer label maps with the prior's classes 0..num_classes-1, at a size its encoder takes.
        batch_size: masks per forward pass.

    Returns:
        (N,) float64 errors.
    """
    masks = torch.as_tensor(np.asarray(masks_NDHW)).long()
    if masks.ndim != 4:
        raise UserError(f"masks must be label maps (N, D, H, W), got shape {tuple(masks.shape)}")
    num_classes = shape_prior.num_classes
    if masks.numel() and (int(masks.min()) < 0 or int(masks.max()) >= num_classes):
        raise UserError(f"the masks hold classes {int(masks.min())}..{int(masks.max())} but the shape prior knows "
                        f"{num_classes} (0..{num_classes - 1}); map the masks to its classes first (e.g. "
                        "masks > 0 for a body prior) or use a prior trained with num_classes covering them")
    errors = [shape_prior.reconstruction_error(masks[start:start + batch_size])
              for start in range(0, len(masks), batch_size)]
    return torch.cat(errors).double().numpy() if errors else np.zeros(0)


def error_threshold(reference_errors_N: np.ndarray, *, quantile: float = 0.95) -> float:
    """The error above which a mask is called implausible: the `quantile` (linear) of the reference masks'
    errors, so about 1 - `quantile` of plausible masks are flagged by construction."""
    errors = np.asarray(reference_errors_N, dtype=np.float64)
    if errors.size == 0 or not np.isfinite(errors).all():
        raise UserError(f"error_threshold needs finite reference errors, got {errors.size} values "
                        f"({int((~np.isfinite(errors)).sum())} not finite)")
    if not 0.0 <= quantile <= 1.0:
        raise UserError(f"quantile must be in [0, 1], got {quantile}")
    return float(np.quantile(errors, quantile))


# ---------------------------------------------------------------------------------------------- groups
def plausibility_by_group(plausible_N: np.ndarray, groups_N: Sequence[Any]) -> dict[str, dict[str, float | int]]:
    """Share of plausible masks in each subgroup.

    Args:
        plausible_N: (N,) bool, one verdict per mask.
        groups_N: (N,) group label of each mask (e.g. from `rafmedia.evaluate.fairness.group_labels`).

    Returns:
        {group (as str): {"share": plausible / n, "n": number of masks}}, groups sorted by name.
    """
    plausible = np.asarray(plausible_N)
    groups = np.asarray(groups_N).astype(str)
    if plausible.ndim != 1 or plausible.shape != groups.shape:
        raise UserError(f"plausible_N and groups_N must be two 1-D arrays of one length, got shapes "
                        f"{plausible.shape} and {groups.shape}")
    if plausible.dtype != bool:
        raise UserError(f"plausible_N must be booleans (True: plausible), got dtype {plausible.dtype}")
    result = {}
    for group in sorted(set(groups.tolist())):
        members = plausible[groups == group]
        result[group] = {"share": float(members.mean()), "n": int(len(members))}
    return result
