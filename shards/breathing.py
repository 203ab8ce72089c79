"""A breathing pair's known motion: the end-inhale to end-exhale displacement field of the synthetic cohort, its
landmarks, and where each landmark lands.

Convention (the one image registration uses): the exhale volume is the inhale one resampled through the field,
`exhale(x) = inhale(x + u(x))`, with `u` (3, D, H, W) in voxels defined on the exhale grid. A tissue point at `p` in
the inhale volume therefore sits at the `q` with `q + u(q) = p` in the exhale volume (`exhale_positions`).

The shape follows the physiology of quiet breathing, with axis 0 the body axis (cranial = low index, as the
cohort's heart lies above its liver):

- on exhale the diaphragm (the liver dome) rises by the largest amount, `amplitude` voxels;
- the abdomen below moves up with it, the motion fading smoothly to `floor` of it at the caudal end;
- the thorax above is compressed: the motion fades smoothly (a smoothstep, so the field is C1) to 0 at the apex;
- a small antero-posterior component (`anterior` times the cranial motion) and a smaller lateral one;
- per-subject variation: the amplitude, a left-right tilt (`asymmetry`, one hemidiaphragm moving more) and a
  +-10% modulation by three smooth waves.

The field is an analytic function of position (`breathing_field(points, params)`), so it can be evaluated exactly
anywhere: `params` (plain JSON, stored in each subject's `truth.breathing`) rebuild it without the generator.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

FLOOR = 0.4  # the caudal end's share of the diaphragm's motion
MODULATION = 0.1  # relative size of the smooth per-subject variation of the cranial motion
NUM_WAVES = 3


def draw_breathing(rng: np.random.Generator, label: np.ndarray, *, liver: int, max_voxels: float) -> dict[str, Any]:
    """Draws one subject's breathing parameters (a fixed number of draws, whatever `max_voxels`), anchored on its
    inhale label map: the dome is the liver's top, the apex the body's top (both along axis 0)."""
    shape = label.shape
    liver_rows = np.flatnonzero((label == liver).any(axis=(1, 2)))
    body_rows = np.flatnonzero((label > 0).any(axis=(1, 2)))
    apex = float(body_rows[0]) if len(body_rows) else 0.0
    dome = float(liver_rows[0]) if len(liver_rows) else 0.45 * (shape[0] - 1)
    draws = {"amplitude": max_voxels * rng.uniform(0.8, 1.0), "asymmetry": rng.uniform(-0.15, 0.15),
             "anterior": rng.uniform(0.1, 0.2), "lateral": rng.uniform(0.03, 0.06),
             "waves": rng.uniform(-1.5, 1.5, size=(NUM_WAVES, 3)), "phases": rng.uniform(0, 2 * np.pi, NUM_WAVES),
             "lateral_waves": rng.uniform(-1.5, 1.5, size=(NUM_WAVES, 3)),
             "lateral_phases": rng.uniform(0, 2 * np.pi, NUM_WAVES)}
    params = {"shape": [int(s) for s in shape], "dome": dome, "apex": apex, "floor": FLOOR, "scale": 1.0,
              **{k: (v.tolist() if isinstance(v, np.ndarray) else float(v)) for k, v in draws.items()}}
    largest = float(np.sqrt((breathing_field(np.indices(shape, dtype=np.float64), params) ** 2).sum(axis=0)).max())
    params["scale"] = params["amplitude"] / largest if largest > 0 else 0.0  # the largest motion is `amplitude`
    return params


def _smoothstep(s: np.ndarray) -> np.ndarray:
    s = np.clip(s, 0.0, 1.0)
    return s * s * (3.0 - 2.0 * s)


def _waves(frequencies, phases, unit_3N: np.ndarray) -> np.ndarray:
    """Mean of cosines of the unit coordinates: smooth, in [-1, 1]."""
    total = sum(np.cos(np.tensordot(np.asarray(f) * np.pi / 2, unit_3N, axes=1) + p) for f, p in zip(frequencies, phases))
    return total / len(phases)


def breathing_field(points: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    """u at `points` (3, ...) of the exhale grid (voxel coordinates), in voxels, shaped like `points`."""
    points = np.asarray(points, dtype=np.float64)
    shape = np.asarray(params["shape"], dtype=np.float64).reshape(3, *([1] * (points.ndim - 1)))
    unit = 2.0 * points / np.maximum(shape - 1, 1) - 1.0  # [-1, 1] per axis
    t, apex, bottom = points[0], params["apex"], params["shape"][0] - 1.0
    # the dome's exhale position; the thorax keeps at least half its height however large the amplitude
    dome = max(params["dome"] - params["amplitude"], apex + 0.5 * (params["dome"] - apex))
    thorax = _smoothstep((t - apex) / max(dome - apex, 1e-6))
    abdomen = 1.0 - (1.0 - params["floor"]) * _smoothstep((t - dome) / max(bottom - dome, 1e-6))
    profile = np.where(t < dome, thorax, abdomen)
    cranial = profile * (1.0 + params["asymmetry"] * unit[2] + MODULATION * _waves(params["waves"], params["phases"],
                                                                                   unit))
    lateral = params["lateral"] * profile * _waves(params["lateral_waves"], params["lateral_phases"], unit)
    return params["scale"] * np.stack([cranial, params["anterior"] * cranial, lateral])


def exhale_positions(inhale_N3: np.ndarray, params: dict[str, Any], *, iterations: int = 30) -> tuple[np.ndarray, float]:
    """The exhale positions q (N, 3) of inhale points p: the solutions of q + u(q) = p, by Newton's method on the
    exact field (a plain fixed-point iteration diverges where the thorax is compressed by more than half).

    Returns (q, the largest residual |q + u(q) - p| in voxels)."""
    p = np.asarray(inhale_N3, dtype=np.float64)
    q = p - breathing_field(p.T, params).T
    step = 1e-4
    for _ in range(iterations):
        residual = q + breathing_field(q.T, params).T - p  # (N, 3)
        if np.abs(residual).max() < 1e-9:
            break
        jacobian = np.empty((len(q), 3, 3))
        for axis in range(3):
            shift = np.zeros(3)
            shift[axis] = step
            derivative = (breathing_field((q + shift).T, params) - breathing_field((q - shift).T, params)).T / (2 * step)
            jacobian[:, :, axis] = derivative
        jacobian += np.eye(3)
        q = q - np.linalg.solve(jacobian, residual[..., None])[..., 0]
    residual = q + breathing_field(q.T, params).T - p
    return q, float(np.linalg.norm(residual, axis=1).max()) if len(q) else 0.0


def warp(volume: np.ndarray, field_3DHW: np.ndarray, *, order: int) -> np.ndarray:
    """`volume` resampled through `field`: out(x) = volume(x + u(x)); `order` 0 for label maps, 1 for images."""
    coordinates = np.indices(volume.shape, dtype=np.float32) + field_3DHW.astype(np.float32)
    return ndimage.map_coordinates(volume, coordinates, order=order, mode="nearest").astype(volume.dtype)


def landmarks(label: np.ndarray, labels: dict[str, int], lesion_centres: list[list[int]]) -> dict[str, list[float]]:
    """Named inhale landmarks (voxel coordinates) from a label map: organ centroids, the liver dome, each kidney's
    centroid and upper pole, the thoracic apex, the anterior and posterior body wall at the liver's level, and the
    lesion centres. A structure absent from the map gives no landmark."""
    points: dict[str, list[float]] = {}
    for name in ("heart", "liver"):
        voxels = np.argwhere(label == labels[name])
        if len(voxels):
            points[f"{name}_centroid"] = voxels.mean(axis=0).tolist()
    liver = np.argwhere(label == labels["liver"])
    if len(liver):
        top = liver[liver[:, 0] <= liver[:, 0].min() + 1]
        points["liver_dome"] = top.mean(axis=0).tolist()
    kidney = np.argwhere(label == labels["kidney"])
    split = 0.165 * (label.shape[2] - 1) / 2 + (label.shape[2] - 1) / 2  # between the two kidneys' centres
    for side, voxels in (("right", kidney[kidney[:, 2] < split]), ("left", kidney[kidney[:, 2] >= split])):
        if len(voxels):
            points[f"kidney_{side}_centroid"] = voxels.mean(axis=0).tolist()
            points[f"kidney_{side}_upper_pole"] = voxels[voxels[:, 0] <= voxels[:, 0].min() + 1].mean(axis=0).tolist()
    body = label > 0
    _body_landmarks(body, points)
    for index, centre in enumerate(lesion_centres):
        points[f"lesion_{index}"] = [float(c) for c in centre]
    return points


def _body_landmarks(body: np.ndarray, points: dict[str, list[float]]) -> None:
    """The thoracic apex (the body's top at the central column) and the anterior/posterior wall at the liver's
    level, mid-line."""
    centre = [s // 2 for s in body.shape]
    column = np.flatnonzero(body[:, centre[1], centre[2]])
    if len(column):
        points["thorax_apex"] = [float(column[0]), float(centre[1]), float(centre[2])]
    level = round(points.get("liver_centroid", centre)[0])
    row = np.flatnonzero(body[level, :, centre[2]])
    if len(row):
        points["anterior_wall"] = [float(level), float(row[0]), float(centre[2])]
        points["posterior_wall"] = [float(level), float(row[-1]), float(centre[2])]
