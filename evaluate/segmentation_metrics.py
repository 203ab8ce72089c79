"""Pixel-level segmentation metrics per structure (Dice, HD95, NSD) as defined by Metrics Reloaded.

Definitions (Maier-Hein et al., "Metrics Reloaded", Nature Methods 2024), computed by MONAI's functions:
- Dice = 2 |P & R| / (|P| + |R|) (`monai.metrics.compute_dice`);
- HD95 = max(q95 of the distances from the border voxels of P to the border of R, q95 of those from R to P),
  in mm (`monai.metrics.compute_hausdorff_distance(percentile=95)`: borders are the voxels removed by one
  binary erosion, distances are Euclidean with the voxel spacing, quantiles interpolate linearly);
- NSD at tolerance tau = (|{p in dP : d(p, dR) <= tau}| + |{r in dR : d(r, dP) <= tau}|) / (|dP| + |dR|)
  (`monai.metrics.compute_surface_dice`, border voxels counted as in HD95).

MONAI answers NaN, inf or a warning when a mask is empty; Metrics Reloaded asks for the worst value instead,
never a value silently dropped, so the empty cases are decided here before MONAI is called (see
`segmentation_metrics`).
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

from rafmedia.core.errors import UserError

METRICS = ("dice", "hd95", "nsd")


def image_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Length of the image's diagonal, sqrt(sum_i (n_i s_i)^2) in mm: more than any distance between two voxels,
    so it is the worst HD95 a mask can get."""
    return float(np.sqrt(np.sum((np.asarray(shape, dtype=np.float64) * np.asarray(spacing, dtype=np.float64)) ** 2)))


def _check_inputs(pred_DHW: np.ndarray, ref_DHW: np.ndarray, labels: dict[str, int], spacing,
                  nsd_tolerance_mm: float) -> tuple[float, float, float]:
    """Checks the inputs; returns the spacing as three floats."""
    if pred_DHW.shape != ref_DHW.shape or pred_DHW.ndim != 3:
        raise UserError(f"segmentation_metrics takes two label maps (D, H, W) of one shape, got {pred_DHW.shape} "
                        f"(prediction) and {ref_DHW.shape} (reference); resample the prediction to the reference grid")
    if not labels:
        raise UserError("segmentation_metrics: `labels` is empty; pass {structure name: label value}, "
                        "e.g. {'liver': 3}")
    values = np.asarray(spacing, dtype=np.float64).ravel()
    if values.size not in (1, 3) or not (np.isfinite(values).all() and (values > 0).all()):
        raise UserError(f"voxel spacing must be three positive sizes in mm along (D, H, W), or one for isotropic "
                        f"voxels, got {spacing}")
    spacing = tuple(float(value) for value in np.broadcast_to(values, (3,)))
    if not (np.isfinite(nsd_tolerance_mm) and nsd_tolerance_mm >= 0):  # MONAI's own check, with our error
        raise UserError(f"nsd_tolerance_mm must be a finite distance >= 0 in mm, got {nsd_tolerance_mm}")
    return spacing


def _monai_metrics(pred_KDHW: np.ndarray, ref_KDHW: np.ndarray, spacing: tuple[float, float, float],
                   nsd_tolerance_mm: float) -> dict[str, np.ndarray]:
    """Dice, HD95, NSD for K binary channels, every one non-empty in both maps."""
    pred = torch.from_numpy(pred_KDHW[None].astype(np.float32))
    ref = torch.from_numpy(ref_KDHW[None].astype(np.float32))
    with warnings.catch_warnings():
        # MONAI 1.5-1.6 passes its own deprecated argument to get_mask_edges; the warning is not for our users.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        dice = compute_dice(pred, ref, include_background=True, ignore_empty=False)
        hd95 = compute_hausdorff_distance(pred, ref, include_background=True, percentile=95, spacing=list(spacing))
        nsd = compute_surface_dice(pred, ref, [nsd_tolerance_mm] * len(pred_KDHW), include_background=True,
                                   spacing=list(spacing))
    return {name: value[0].double().numpy() for name, value in zip(METRICS, (dice, hd95, nsd))}


def _empty_case(pred_empty: bool, ref_empty: bool, diagonal_mm: float) -> dict[str, float]:
    if pred_empty and ref_empty:  # nothing to find and nothing found: a perfect answer
        return {"dice": 1.0, "hd95": 0.0, "nsd": 1.0}
    return {"dice": 0.0, "hd95": diagonal_mm, "nsd": 0.0}  # one side empty: the worst case


def segmentation_metrics(pred_DHW: np.ndarray, ref_DHW: np.ndarray, *, labels: dict[str, int],
                         spacing: float | Sequence[float] = (1.0, 1.0, 1.0),
                         nsd_tolerance_mm: float = 1.0) -> dict[str, dict[str, float | bool]]:
    """Dice, HD95 (mm) and NSD per structure of two integer label maps, as in Metrics Reloaded (module docstring).

    Structure `name` is the binary mask `label_map == labels[name]`. Empty masks, where MONAI gives NaN or inf,
    get the values Metrics Reloaded prescribes, so no case can fall silently out of an average:
    - reference present, prediction empty: the worst case, Dice 0, NSD 0, HD95 = the image diagonal in mm
      (`image_diagonal_mm`, larger than any distance two voxels can have);
    - prediction present, reference empty: Dice 0, NSD 0, HD95 = the image diagonal;
    - both empty: Dice 1, NSD 1, HD95 0.
    The flags `pred_empty` and `ref_empty` say which case applied, so an aggregation can keep or leave out the
    structures absent from the reference explicitly (`aggregate_structures(include_ref_empty=...)`).

    Args:
        pred_DHW: predicted label map (D, H, W), integers.
        ref_DHW: reference label map of the same shape.
        labels: structure name -> label value.
        spacing: voxel size in mm along (D, H, W), or one number for isotropic voxels.
        nsd_tolerance_mm: the NSD tolerance tau in mm.

    Returns:
        {structure: {"dice", "hd95", "nsd": float, "pred_empty", "ref_empty": bool}}.
    """
    pred_DHW, ref_DHW = np.asarray(pred_DHW), np.asarray(ref_DHW)
    spacing = _check_inputs(pred_DHW, ref_DHW, labels, spacing, nsd_tolerance_mm)
    diagonal_mm = image_diagonal_mm(ref_DHW.shape, spacing)
    results, both_present = {}, []
    for name, value in labels.items():
        pred_empty, ref_empty = not (pred_DHW == value).any(), not (ref_DHW == value).any()
        results[name] = {"pred_empty": pred_empty, "ref_empty": ref_empty}
        if pred_empty or ref_empty:
            results[name].update(_empty_case(pred_empty, ref_empty, diagonal_mm))
        else:
            both_present.append(name)
    if both_present:
        values = [labels[name] for name in both_present]
        pred_KDHW = np.stack([pred_DHW == value for value in values])
        ref_KDHW = np.stack([ref_DHW == value for value in values])
        computed = _monai_metrics(pred_KDHW, ref_KDHW, spacing, float(nsd_tolerance_mm))
        for index, name in enumerate(both_present):
            results[name].update({metric: float(computed[metric][index]) for metric in METRICS})
    return {name: {metric: results[name][metric] for metric in (*METRICS, "pred_empty", "ref_empty")}
            for name in labels}


def _summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": float("nan"), "median": float("nan")}
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "median": float(np.median(array))}


def aggregate_structures(per_case: list[dict[str, dict[str, float | bool]]], *,
                         include_ref_empty: bool = True) -> dict[str, dict]:
    """Mean and median of each metric per structure over cases, and over all (case, structure) pairs.

    Args:
        per_case: one `segmentation_metrics` result per case.
        include_ref_empty: whether structures absent from a case's reference count (both empty: Dice 1; only
            the prediction present: Dice 0). Either way the counts below say how many there were.

    Returns:
        {"per_structure": {structure: {metric: {"mean", "median"}, "num_cases", "num_pred_empty",
        "num_ref_empty", "num_both_empty", "num_excluded"}}, "over_structures": {metric: {"mean", "median"},
        "num_pairs", "num_pred_empty", "num_excluded"}}. `num_pred_empty` counts prediction-empty cases whose
        reference is present (the worst cases); a structure left with no case has NaN summaries and
        num_cases 0.
    """
    if not per_case:
        raise UserError("aggregate_structures got no cases; pass a list of segmentation_metrics results")
    structures = list(per_case[0])
    for index, case in enumerate(per_case):
        if list(case) != structures:
            raise UserError(f"aggregate_structures: case {index} has structures {list(case)} but case 0 has "
                            f"{structures}; score every case with the same `labels`")
    per_structure, pooled = {}, {metric: [] for metric in METRICS}
    for name in structures:
        rows = [case[name] for case in per_case]
        kept = [row for row in rows if include_ref_empty or not row["ref_empty"]]
        entry = {metric: _summary([row[metric] for row in kept]) for metric in METRICS}
        entry.update(num_cases=len(kept),
                     num_pred_empty=sum(row["pred_empty"] and not row["ref_empty"] for row in rows),
                     num_ref_empty=sum(bool(row["ref_empty"]) for row in rows),
                     num_both_empty=sum(row["pred_empty"] and row["ref_empty"] for row in rows),
                     num_excluded=len(rows) - len(kept))
        per_structure[name] = entry
        for metric in METRICS:
            pooled[metric] += [row[metric] for row in kept]
    over = {metric: _summary(pooled[metric]) for metric in METRICS}
    over.update(num_pairs=sum(entry["num_cases"] for entry in per_structure.values()),
                num_pred_empty=sum(entry["num_pred_empty"] for entry in per_structure.values()),
                num_excluded=sum(entry["num_excluded"] for entry in per_structure.values()))
    return {"per_structure": per_structure, "over_structures": over}
