"""Patch-level evidence mapped back to voxels and scored against planted lesions (weakly supervised localisation).

A patch map gives one value per grid patch (MIL attention, occlusion drop, kNN anomaly). In voxels:

- `mean_map`: each voxel gets the mean value of the patches covering it (resolution: the patch stride);
- `mass_map`: each patch's weight spread evenly over its voxels inside the volume, then summed, so the map sums to the
  weights' sum: the share of the attention mass a region receives.

Scores, per patient with a planted lesion, then over patients with a patient-bootstrap 95% interval:

- pointing game (Zhang et al. 2016): the voxel of the map's maximum inside the brain (ties: the tied voxel nearest
  their centroid) is a hit when it lies within `tolerance` voxels of the lesion. The chance rate is what a point
  drawn uniformly in the brain scores: the share of brain voxels within `tolerance` of the lesion;
- attention mass in the lesion (attention maps): `mass_map`'s share inside the lesion; chance is the share that
  uniform attention over the patches gives;
- voxel AUROC: the map's values over the brain's voxels against the lesion mask (scikit-learn `roc_auc_score`);
  chance is 0.5.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from rafmedia.evaluate.metrics import bootstrap_ci

MASS_MAPS = ("attention",)  # maps that are a distribution over patches (their mass in the lesion is scored)


def _coverage(locations_P3: np.ndarray, patch_size: int, shape: tuple[int, ...]):
    for location in np.asarray(locations_P3, dtype=int):
        yield tuple(slice(int(start), min(int(start) + patch_size, size)) for start, size in zip(location, shape))


def mean_map(values_P: np.ndarray, locations_P3: np.ndarray, patch_size: int, shape: tuple[int, ...]) -> np.ndarray:
    """Each voxel: the mean value of the patches covering it (0 where none does)."""
    total, count = np.zeros(shape), np.zeros(shape)
    for value, region in zip(values_P, _coverage(locations_P3, patch_size, shape)):
        total[region] += value
        count[region] += 1
    return np.divide(total, count, out=np.zeros(shape), where=count > 0)


def mass_map(weights_P: np.ndarray, locations_P3: np.ndarray, patch_size: int, shape: tuple[int, ...]) -> np.ndarray:
    """Each patch's weight spread evenly over its voxels inside the volume, summed over patches."""
    out = np.zeros(shape)
    for weight, region in zip(weights_P, _coverage(locations_P3, patch_size, shape)):
        out[region] += weight / np.prod([s.stop - s.start for s in region])
    return out


def pointing_point(map_DHW: np.ndarray, brain_DHW: np.ndarray) -> np.ndarray:
    """The voxel of the map's maximum inside the brain; among ties, the one nearest the tied voxels' centroid."""
    values = np.where(brain_DHW, map_DHW, -np.inf)
    top = values.max()
    tied = np.argwhere(values >= top - 1e-12 * max(1.0, abs(top)))
    centroid = tied.mean(axis=0)
    return tied[np.argmin(((tied - centroid) ** 2).sum(axis=1))]


def near_lesion(lesion_DHW: np.ndarray, tolerance: float) -> np.ndarray:
    """The voxels within `tolerance` voxels of the lesion (Euclidean): where a pointing game counts a hit."""
    return ndimage.distance_transform_edt(~lesion_DHW) <= tolerance


def pointing_hit(map_DHW: np.ndarray, lesion_DHW: np.ndarray, brain_DHW: np.ndarray, tolerance: float) -> bool:
    return bool(near_lesion(lesion_DHW, tolerance)[tuple(pointing_point(map_DHW, brain_DHW))])


def pointing_chance(lesion_DHW: np.ndarray, brain_DHW: np.ndarray, tolerance: float) -> float:
    """The hit rate of a point drawn uniformly in the brain."""
    return _share_in_brain(near_lesion(lesion_DHW, tolerance), brain_DHW)


def _share_in_brain(near_DHW: np.ndarray, brain_DHW: np.ndarray) -> float:
    return float((near_DHW & brain_DHW).sum() / max(int(brain_DHW.sum()), 1))


def voxel_auroc(map_DHW: np.ndarray, lesion_DHW: np.ndarray, brain_DHW: np.ndarray) -> float:
    inside = brain_DHW | lesion_DHW
    truth = lesion_DHW[inside]
    return float(roc_auc_score(truth, map_DHW[inside])) if 0 < truth.sum() < truth.size else float("nan")


def _interval(values: np.ndarray, *, resamples: int, seed: int) -> dict[str, float]:
    low, high = bootstrap_ci(lambda idx: float(np.nanmean(values[idx])), len(values), seed=seed,
                             num_resamples=resamples)
    return {"rate" if values.dtype == bool else "mean": float(np.nanmean(values)), "low": low, "high": high}


def localisation_scores(maps: dict[str, np.ndarray], lesions: np.ndarray, brains: np.ndarray, locations_P3: np.ndarray,
                        patch_size: int, *, tolerance: float, resamples: int, seed: int,
                        grades: np.ndarray | None = None) -> dict[str, Any]:
    """Pointing game, voxel AUROC and (attention) mass in the lesion of every (N, P) patch map, over the patients
    whose lesion mask is not empty; each with its interval and chance level (module docstring). With `grades`, the
    pointing rate is also given per grade (small lesions are harder to point at)."""
    with_lesion = np.flatnonzero(lesions.reshape(len(lesions), -1).any(axis=1))
    shape = lesions.shape[1:]
    near = {i: near_lesion(lesions[i], tolerance) for i in with_lesion}  # one distance transform per patient
    chance = np.array([_share_in_brain(near[i], brains[i]) for i in with_lesion])
    uniform = mass_map(np.full(len(locations_P3), 1.0 / len(locations_P3)), locations_P3, patch_size, shape)
    uniform_mass = np.array([uniform[lesions[i]].sum() for i in with_lesion])
    out: dict[str, Any] = {"num_patients": len(with_lesion), "tolerance_voxels": tolerance}
    if not len(with_lesion):
        return out
    for name, values_NP in maps.items():
        voxel_maps = [mean_map(values_NP[i], locations_P3, patch_size, shape) for i in with_lesion]
        hits = np.array([near[i][tuple(pointing_point(m, brains[i]))] for m, i in zip(voxel_maps, with_lesion)])
        aurocs = np.array([voxel_auroc(m, lesions[i], brains[i]) for m, i in zip(voxel_maps, with_lesion)])
        scores = {"pointing": {**_interval(hits, resamples=resamples, seed=seed), "chance": float(chance.mean())},
                  "auroc": {**_interval(aurocs, resamples=resamples, seed=seed), "chance": 0.5}}
        if grades is not None:
            graded = np.asarray(grades)[with_lesion]
            scores["pointing"]["by_grade"] = {str(g): {"rate": float(hits[graded == g].mean()),
                                                       "chance": float(chance[graded == g].mean()),
                                                       "n": int((graded == g).sum())} for g in np.unique(graded)}
        if name in MASS_MAPS:
            mass = np.array([mass_map(values_NP[i], locations_P3, patch_size, shape)[lesions[i]].sum()
                             / max(float(values_NP[i].sum()), 1e-12) for i in with_lesion])
            scores["mass_in_lesion"] = {**_interval(mass, resamples=resamples, seed=seed),
                                        "chance": float(uniform_mass.mean())}
        out[name] = scores
    return out


def _unit(volume: np.ndarray) -> np.ndarray:
    low, high = float(volume.min()), float(volume.max())
    return (volume - low) / (high - low) if high > low else np.zeros_like(volume)


def overlay_slices(volumes: dict[str, np.ndarray | None], maps: dict[str, np.ndarray], lesion_DHW: np.ndarray,
                   locations_P3: np.ndarray, patch_size: int, *, subject: str, grade: int, truth: int,
                   digits: int = 3) -> dict[str, Any]:
    """The report's overlay of one patient: the axial slice (axis 0) through the lesion's centre (the middle slice
    without a lesion) of every channel (None when missing), every voxel map scaled to [0, 1] over the whole volume,
    and the lesion mask, rounded to `digits` decimals."""
    shape = lesion_DHW.shape
    z = round(float(np.argwhere(lesion_DHW)[:, 0].mean())) if lesion_DHW.any() else shape[0] // 2

    def plane(array):
        return np.round(np.asarray(array, dtype=float)[z], digits).tolist()

    return {"subject_id": subject, "grade": grade, "grade_true": truth, "slice": z,
            "channels": {c: None if v is None else plane(v) for c, v in volumes.items()},
            "maps": {name: plane(_unit(mean_map(values, locations_P3, patch_size, shape))) for name, values in
                     maps.items()},
            "lesion": lesion_DHW[z].astype(int).tolist()}
