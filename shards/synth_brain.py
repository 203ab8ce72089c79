"""A brain-like reference cohort for small, multimodal, weakly and ordinally labelled studies (issue 16).

Each subject has up to three co-registered, skull-stripped channels, `t1`, `flair` and `pet`, one patient-level
ordinal grade on 0..K-1 and no lesion drawn anywhere the methods look. The label map (`BRAIN_LABELS`: CSF, grey
matter, white matter, lesion) is the hidden truth: only `lesion_masks` and `brain_masks` read it, to score
localisation.

- Anatomy: a brain ellipsoid under a smooth random deformation (`smooth_field`), an outer CSF layer, a grey-matter
  cortical shell over white matter, two lateral ventricles and the interhemispheric fissure (CSF). Brain size
  depends on sex; ventricles widen and the cortex thins with age.
- Contrasts (`TISSUE_CONTRAST`): T1-like (white > grey > CSF, lesion dark), FLAIR-like (CSF dark, grey slightly
  above white, lesion bright), PET-like (grey uptake high, white lower, CSF ~0, lesion low; blurrier). Each channel
  is acquired through the subject's site profile (`acquire`) with its own generator.
- Findings: the true grade is assigned first (exact counts from `grade_weights`), then findings are drawn that
  `grade_from_findings` maps back to it. Grade 0: none. Grade >= 1: one lobulated focal lesion centred in the white
  matter of one lobe (`REGION_WEIGHTS`), its size growing with the grade, and a smooth PET hypometabolism of the
  same lobe's cortex, its depth growing with the grade up to `hypometabolism`.
- Weak labels: `grade` is the rated grade (`rate_grades`: each grade moves by one with probability `rater_noise`),
  `grade_true` the planted one, `disease` = int(grade > 0).
- Missing modalities: an exact share of subjects lacks each channel (never all); such a subject simply has no
  array for it in the store, and manifest columns `has_<channel>` say which it has.

Randomness: generators seeded with (seed, purpose[, subject index]): 0 cohort assignment, 1 anatomy and findings,
3-5 acquisition of each channel, 10 the rater, 11 missing channels; so the same seed gives the same cohort for any
number of workers, and changing the rater noise or the missing shares changes nothing else.
"""
from __future__ import annotations

import json
import math
import multiprocessing
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from rafmedia.core.environment import single_threaded_children
from rafmedia.core.errors import UserError
from rafmedia.core.files import write_json
from rafmedia.core.registry import did_you_mean
from rafmedia.shards.description import synthetic_provenance
from rafmedia.shards.manifest import summary_row
from rafmedia.shards.splits import exact_counts
from rafmedia.shards.store import CohortStore, StoreConfig
from rafmedia.shards.synth import SiteProfile, acquire, check_same_recipe, coordinate_grid, smooth_field

CHANNELS = ("t1", "flair", "pet")
BRAIN_LABELS = {"background": 0, "csf": 1, "grey": 2, "white": 3, "lesion": 4}
TISSUE_CONTRAST = {
    "t1": {"csf": 0.15, "grey": 0.50, "white": 0.78, "lesion": 0.32},
    "flair": {"csf": 0.06, "grey": 0.55, "white": 0.45, "lesion": 0.92},
    "pet": {"csf": 0.03, "grey": 0.85, "white": 0.40, "lesion": 0.20},
}
PET_EXTRA_BLUR = 1.2  # voxels of Gaussian blur before the site's own: PET resolves less than MRI
# Lobes and their weights in the grade: a lesion's volume counts `weight` times (location matters, as an eloquent
# region's lesion weighs more on a clinical scale). Made-up values, fixed so the formula can be checked.
REGION_WEIGHTS = {"frontal": 1.0, "parietal": 1.2, "temporal": 1.5, "occipital": 0.8}
BRAIN_SEMI_AXES = (0.66, 0.84, 0.70)  # axis 0 inferior-superior, 1 posterior-anterior, 2 left-right; grid units
LOBULATION = 0.15  # relative amplitude of the lesion's radius modulation over directions
MIDLINE_MARGIN = 0.06  # grid units: lesions and hypometabolism sit in one hemisphere, off the midline
HYPOMETABOLISM_SIGMA = 0.12  # width of the PET bump, as a fraction of the smallest side
VOXEL_SPACING_MM = 4.0
GRADE_FORMULA = (
    "K = num_grades, [r0, r1] = lesion_radius, w = REGION_WEIGHTS[lesion region], V = lesion voxels, d = PET "
    "hypometabolism depth. Lesion grade-equivalent gL = 0 without a lesion, else max(1, 1 + (K - 2) (r_eff - r0) / "
    "(r1 - r0)) with the location-weighted radius r_eff = (3 w V / (4 pi))^(1/3); hypometabolism grade-equivalent "
    "gH = (K - 1) d / hypometabolism. grade = floor((gL + gH) / 2 + 1/2), clipped to [1 if V > 0 else 0, K - 1].")


@dataclass
class BrainCohortConfig:
    """The brain-like weak-label cohort: size, grades and their imbalance, rater noise, missing channels, sites."""

    name: str = "synthetic-brain"
    num_subjects: int = 50
    shape: list[int] = field(default_factory=lambda: [48, 48, 48])
    seed: int = 0
    num_grades: int = 4  # grades 0..num_grades-1
    grade_weights: list[float] = field(default_factory=lambda: [0.4, 0.3, 0.2, 0.1])  # exact counts per true grade
    rater_noise: float = 0.1  # probability that the rater moves a grade by one
    missing: dict[str, float] = field(default_factory=lambda: {"t1": 0.0, "flair": 0.1, "pet": 0.2})  # exact shares
    lesion_radius: list[float] = field(default_factory=lambda: [2.5, 6.5])  # voxels (location-weighted), grade 1..K-1
    hypometabolism: float = 0.25  # relative PET depth at the top grade
    sex_ratio: float = 1.0  # females per male
    age_range: list[float] = field(default_factory=lambda: [30.0, 85.0])
    workers: int = 2
    sites: list[SiteProfile] = field(default_factory=lambda: [
        SiteProfile(name="site-a", scanner="scanner-a", noise_std=0.03, bias_field=0.10, gamma=1.0, blur_sigma=0.5),
        SiteProfile(name="site-b", scanner="scanner-b", noise_std=0.06, bias_field=0.15, gamma=1.1, blur_sigma=0.7)])

    def validate(self) -> None:
        if self.num_subjects < 2:
            raise UserError(f"brain_cohort.num_subjects must be at least 2, got {self.num_subjects}")
        if len(self.shape) != 3 or min(self.shape) < 24:
            raise UserError(f"brain_cohort.shape must be three sizes of at least 24 voxels, got {self.shape}")
        if not 2 <= self.num_grades <= 10:
            raise UserError(f"brain_cohort.num_grades must be in 2..10, got {self.num_grades}")
        if len(self.grade_weights) != self.num_grades or min(self.grade_weights) < 0 or sum(self.grade_weights) <= 0:
            raise UserError(f"brain_cohort.grade_weights must be {self.num_grades} non-negative shares (one per grade, "
                            f"brain_cohort.num_grades), not all zero; got {self.grade_weights}")
        if not 0 <= self.rater_noise <= 1:
            raise UserError(f"brain_cohort.rater_noise must be a probability in [0, 1], got {self.rater_noise}")
        for channel, share in self.missing.items():
            if channel not in CHANNELS:
                raise UserError(f"brain_cohort.missing.{channel}: unknown channel;{did_you_mean(channel, CHANNELS)} "
                                f"(channels: {', '.join(CHANNELS)})")
            if not 0 <= share < 1:
                raise UserError(f"brain_cohort.missing.{channel} must be a share in [0, 1), got {share}")
        if sum(missing_counts(self).values()) > self.num_subjects * (len(CHANNELS) - 1):
            raise UserError(f"brain_cohort.missing {self.missing}: that many missing channels would leave some "
                            "subject with none; lower the shares")
        low, high = self.lesion_radius if len(self.lesion_radius) == 2 else (0, -1)
        if not 0 < low <= high <= min(self.shape) / 6 or (self.num_grades > 2 and low == high):
            raise UserError(f"brain_cohort.lesion_radius must be [smallest, largest] voxels with 0 < smallest < largest"
                            f" <= {min(self.shape) / 6:g} (a sixth of the smallest side), got {self.lesion_radius}")
        if not 0 < self.hypometabolism < 1:
            raise UserError(f"brain_cohort.hypometabolism must be a relative PET depth in (0, 1), got "
                            f"{self.hypometabolism}")
        if self.sex_ratio <= 0 or len(self.age_range) != 2 or self.age_range[0] > self.age_range[1]:
            raise UserError(f"brain_cohort.sex_ratio must be > 0 and brain_cohort.age_range [low, high], got "
                            f"{self.sex_ratio} and {self.age_range}")
        if self.workers < 1:
            raise UserError(f"brain_cohort.workers must be at least 1, got {self.workers}")
        _validate_sites(self.sites)


def _validate_sites(sites: list[SiteProfile]) -> None:
    if not sites:
        raise UserError("brain_cohort.sites is empty: give at least one site")
    names = [site.name for site in sites]
    if len(set(names)) != len(names):
        raise UserError(f"brain_cohort.sites has duplicate names: {names}")
    for index, site in enumerate(sites):
        if site.weight <= 0 or site.noise_std < 0 or site.gamma <= 0:
            raise UserError(f"brain_cohort.sites.{index} ({site.name}): weight and gamma must be > 0, noise_std >= 0")
        if site.disease_prevalence != SiteProfile.disease_prevalence:
            warnings.warn(f"brain_cohort.sites.{index}.disease_prevalence is ignored: grades follow "
                          "brain_cohort.grade_weights", stacklevel=3)


def missing_counts(config: BrainCohortConfig) -> dict[str, int]:
    """Exact number of subjects lacking each channel."""
    return {channel: round(config.missing.get(channel, 0.0) * config.num_subjects) for channel in CHANNELS}


# ---- labels: grades, rater, missing channels --------------------------------------------------------
def rate_grades(true_N: np.ndarray, probability: float, num_grades: int, rng: np.random.Generator) -> np.ndarray:
    """The rater model: each grade independently moves by one with `probability`, up or down with equal chance,
    towards the only neighbour at either end of 0..num_grades-1."""
    true_N = np.asarray(true_N, dtype=np.int64)
    moves = rng.random(true_N.shape) < probability
    step = np.where(rng.random(true_N.shape) < 0.5, -1, 1)
    step = np.where(true_N == 0, 1, np.where(true_N == num_grades - 1, -1, step))
    return true_N + moves * step


def grade_from_findings(lesion_volume_voxels: float, region_weight: float, hypometabolism_depth: float,
                        config: BrainCohortConfig) -> int:
    """The planted grade of a subject's findings (`GRADE_FORMULA`): the rounded mean of a lesion grade-equivalent
    (location-weighted lesion radius, mapped linearly from `lesion_radius` onto grades 1..K-1) and a PET grade-
    equivalent (depth / `hypometabolism` onto 0..K-1). Non-decreasing in volume, weight and depth."""
    num_grades = config.num_grades
    lesion_grade = _lesion_grade_equivalent(lesion_volume_voxels, region_weight, config)
    pet_grade = (num_grades - 1) * hypometabolism_depth / config.hypometabolism
    lowest = 1 if lesion_volume_voxels > 0 else 0
    return int(min(max(math.floor((lesion_grade + pet_grade) / 2 + 0.5), lowest), num_grades - 1))


def _lesion_grade_equivalent(volume: float, weight: float, config: BrainCohortConfig) -> float:
    """gL of `GRADE_FORMULA`: 0 without a lesion, else at least 1."""
    if volume <= 0:
        return 0.0
    smallest, largest = config.lesion_radius
    effective_radius = (3 * weight * volume / (4 * math.pi)) ** (1 / 3)
    slope = (config.num_grades - 2) / (largest - smallest) if largest > smallest else 0.0
    return max(1.0, 1 + slope * (effective_radius - smallest))


def _missing_channels(config: BrainCohortConfig) -> list[set[str]]:
    """Which channels each subject lacks: exact counts per channel, never all of a subject's. Each channel is taken
    from the subjects that still have the most channels (ties at random), which fits whenever `validate` passes."""
    rng = np.random.default_rng([config.seed, 11])
    missing: list[set[str]] = [set() for _ in range(config.num_subjects)]
    for channel, count in sorted(missing_counts(config).items(), key=lambda item: -item[1]):
        remaining = np.array([len(CHANNELS) - len(lacking) for lacking in missing])
        order = np.lexsort((rng.random(config.num_subjects), -remaining))
        for index in order[:count]:
            assert remaining[index] > 1, "the missing-channel shares passed validation but do not fit"
            missing[index].add(channel)
    return missing


def assign_brain_subjects(config: BrainCohortConfig) -> list[dict[str, Any]]:
    """Site, sex, age, true and rated grade, lesion region and missing channels of every subject (exact counts)."""
    rng = np.random.default_rng([config.seed, 0])
    n = config.num_subjects
    site_index = np.repeat(np.arange(len(config.sites)), exact_counts(n, [s.weight for s in config.sites]))
    rng.shuffle(site_index)
    num_female = round(n * config.sex_ratio / (1.0 + config.sex_ratio))
    sex = np.array(["F"] * num_female + ["M"] * (n - num_female))
    rng.shuffle(sex)
    age = rng.uniform(*config.age_range, size=n)
    grade_true = np.repeat(np.arange(config.num_grades), exact_counts(n, list(config.grade_weights)))
    rng.shuffle(grade_true)
    lesioned = np.flatnonzero(grade_true > 0)
    regions = np.repeat(list(REGION_WEIGHTS), exact_counts(len(lesioned), [1.0] * len(REGION_WEIGHTS)))
    rng.shuffle(regions)
    region = np.full(n, "none", dtype=object)
    region[lesioned] = regions
    grade = rate_grades(grade_true, config.rater_noise, config.num_grades, np.random.default_rng([config.seed, 10]))
    missing = _missing_channels(config)
    return [
        {"subject_id": f"sub-{i:04d}", "index": i, "site": config.sites[site_index[i]].name,
         "scanner": config.sites[site_index[i]].scanner, "sex": str(sex[i]), "age": round(float(age[i]), 1),
         "grade": int(grade[i]), "grade_true": int(grade_true[i]), "disease": int(grade[i] > 0),
         "lesion_region": str(region[i]), "channels": [c for c in CHANNELS if c not in missing[i]]}
        for i in range(n)
    ]


# ---- one subject ---------------------------------------------------------------------------------------
def brain_anatomy(subject: dict[str, Any], config: BrainCohortConfig, rng: np.random.Generator):
    """The tissue label map and the subject's normalised coordinates. Returns (label uint8, points (3, D, H, W))."""
    grid = coordinate_grid(tuple(config.shape))
    points = grid + np.stack([smooth_field(rng, grid) for _ in range(3)]) * 0.04
    points /= (1.0 if subject["sex"] == "M" else 0.95) * rng.normal(1, 0.03)
    wobble = smooth_field(rng, grid, max_frequency=3.0)
    radius = np.sqrt(sum((points[axis] / BRAIN_SEMI_AXES[axis]) ** 2 for axis in range(3))) + 0.03 * wobble
    cortex = 0.17 - 0.0006 * (subject["age"] - 55) + 0.02 * smooth_field(rng, grid, max_frequency=3.0)
    label = np.zeros(grid.shape[1:], dtype=np.uint8)
    label[radius < 1.0] = BRAIN_LABELS["csf"]
    label[radius < 0.93] = BRAIN_LABELS["grey"]
    label[radius < 0.93 - cortex] = BRAIN_LABELS["white"]
    ventricle_scale = (1 + 0.008 * (subject["age"] - 55)) * rng.normal(1, 0.05)
    for side in (-1, 1):
        center = (0.08, -0.02, side * 0.13)
        semi_axes = np.array([0.13, 0.32, 0.07]) * ventricle_scale
        inside = sum(((points[axis] - center[axis]) / semi_axes[axis]) ** 2 for axis in range(3)) < 1 + 0.1 * wobble
        label[inside & (label > 0)] = BRAIN_LABELS["csf"]
    fissure = (np.abs(points[2]) < 0.025) & (points[0] > 0.05) & (label > 0)
    label[fissure] = BRAIN_LABELS["csf"]
    return label, points


def lobe_masks(points: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean masks of the four lobes (`REGION_WEIGHTS`) in normalised coordinates, both hemispheres."""
    frontal, occipital = points[1] > 0.25, points[1] < -0.5
    middle = ~frontal & ~occipital
    return {"frontal": frontal, "parietal": middle & (points[0] >= -0.15), "temporal": middle & (points[0] < -0.15),
            "occipital": occipital}


def _lobulated_sphere(rng: np.random.Generator, offsets_3B: list[np.ndarray], radius: float) -> np.ndarray:
    """Voxels of a sphere whose radius varies by +-LOBULATION over directions (three random low-order lobes)."""
    distance = np.sqrt(sum(offset.astype(np.float32) ** 2 for offset in offsets_3B))
    unit = [offset / np.maximum(distance, 1e-6) for offset in offsets_3B]
    lobes = np.zeros_like(distance)
    for _ in range(3):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        lobes += np.cos(3 * sum(d * u for d, u in zip(direction, unit)) + rng.uniform(0, 2 * np.pi)) / 3
    return distance <= radius * (1 + LOBULATION * lobes)


def _place_lesion(rng: np.random.Generator, label: np.ndarray, candidates: np.ndarray, depth: np.ndarray,
                  radius: float) -> dict[str, Any]:
    """Plants one lesion of `radius` centred in a white-matter voxel of `candidates`, as deep in the parenchyma as
    its radius needs (else among the deepest tenth), clipped to the parenchyma. Returns its center and voxels."""
    white = np.argwhere(candidates & (label == BRAIN_LABELS["white"]))
    deep = white[depth[tuple(white.T)] >= radius]
    if len(deep) == 0:
        deepest = depth[tuple(white.T)]
        deep = white[deepest >= np.quantile(deepest, 0.9)]
    center = deep[rng.integers(len(deep))]
    reach = int(np.ceil(radius * (1 + LOBULATION))) + 1
    low, high = np.maximum(center - reach, 0), np.minimum(center + reach + 1, label.shape)
    box = tuple(slice(a, b) for a, b in zip(low, high))
    offsets = list(np.ogrid[tuple(slice(a - c, b - c) for a, b, c in zip(low, high, center))])
    inside = _lobulated_sphere(rng, offsets, radius) & (label[box] >= BRAIN_LABELS["grey"])
    label[box][inside] = BRAIN_LABELS["lesion"]
    return {"center": center.tolist(), "voxels": int(inside.sum())}


def plant_findings(subject: dict[str, Any], config: BrainCohortConfig, label: np.ndarray, points: np.ndarray,
                   rng: np.random.Generator) -> tuple[dict[str, Any], np.ndarray]:
    """Plants the lesion (into `label`) and the PET hypometabolism consistent with the subject's true grade.

    The lesion's grade-equivalent gL is drawn within 0.3 of the grade, its radius follows from the inverse of
    `grade_from_findings` and the region's weight; the depth is then solved from the realised lesion volume so
    that (gL + gH) / 2 lies within 0.25 of the grade. Returns (truth, PET multiplier field)."""
    grade, num_grades = subject["grade_true"], config.num_grades
    if grade == 0:
        return {"lesion": None, "hypometabolism": None}, np.ones(label.shape, dtype=np.float32)
    region, weight = subject["lesion_region"], REGION_WEIGHTS[subject["lesion_region"]]
    side = "left" if rng.uniform() < 0.5 else "right"  # axis 2 runs from left to right, as x in RAS
    hemisphere = points[2] < -MIDLINE_MARGIN if side == "left" else points[2] > MIDLINE_MARGIN
    lobe = lobe_masks(points)[region] & hemisphere
    smallest, largest = config.lesion_radius
    span = (largest - smallest) / (num_grades - 2) if num_grades > 2 else 0.0
    lesion_grade = max(1.0, grade + rng.uniform(-0.3, 0.3))
    radius = (smallest + span * (lesion_grade - 1)) / weight ** (1 / 3)
    depth_map = ndimage.distance_transform_edt(label >= BRAIN_LABELS["grey"])
    lesion = _place_lesion(rng, label, lobe, depth_map, radius)
    target = grade + rng.uniform(-0.25, 0.25)
    lesion_equivalent = _lesion_grade_equivalent(lesion["voxels"], weight, config)
    pet_grade = float(np.clip(2 * target - lesion_equivalent, 0.5, num_grades - 1))
    depth = round(config.hypometabolism * pet_grade / (num_grades - 1), 5)
    if grade_from_findings(lesion["voxels"], weight, depth, config) != grade:  # clipped: aim at the grade itself
        pet_grade = float(np.clip(2 * grade - lesion_equivalent, 0.0, num_grades - 1))
        depth = round(config.hypometabolism * pet_grade / (num_grades - 1), 5)
    assert grade_from_findings(lesion["voxels"], weight, depth, config) == grade, (subject["subject_id"], lesion)
    cortex = np.argwhere(lobe & (label == BRAIN_LABELS["grey"]))
    center = cortex.mean(axis=0)
    sigma = HYPOMETABOLISM_SIGMA * min(config.shape)
    squared = sum((np.arange(size, dtype=np.float32)[tuple(slice(None) if a == axis else None for a in range(3))]
                   - center[axis]) ** 2 for axis, size in enumerate(label.shape))
    multiplier = 1 - depth * np.exp(-squared / (2 * sigma**2)).astype(np.float32)
    truth = {"lesion": {**lesion, "radius": round(radius, 3), "region": region, "region_weight": weight,
                        "hemisphere": side},
             "hypometabolism": {"depth": depth, "center": [round(float(c), 2) for c in center],
                                "sigma_voxels": round(sigma, 3), "region": region},
             "grade_equivalents": {"lesion": round(lesion_equivalent, 4), "pet": round(pet_grade, 4)}}
    return truth, multiplier



def render_brain_subject(subject: dict[str, Any], config: BrainCohortConfig, site: SiteProfile,
                         channels: tuple[str, ...] = CHANNELS):
    """Renders one subject's `channels` (each acquired with its own generator). Returns (channels {name: float32},
    label uint8, truth dict)."""
    rng = np.random.default_rng([config.seed, 1, subject["index"]])
    label, points = brain_anatomy(subject, config, rng)
    truth, pet_multiplier = plant_findings(subject, config, label, points, rng)
    texture = ndimage.gaussian_filter(rng.standard_normal(label.shape).astype(np.float32), sigma=1.5)
    texture *= (label > 0) * (0.02 / max(float(texture.std()), 1e-6))
    grid = coordinate_grid(label.shape)
    volumes = {}
    for index, channel in enumerate(CHANNELS):
        if channel not in channels:
            continue
        clean = np.zeros(label.shape, dtype=np.float32)
        for tissue, intensity in TISSUE_CONTRAST[channel].items():
            clean[label == BRAIN_LABELS[tissue]] = intensity
        clean += texture
        if channel == "pet":
            clean = ndimage.gaussian_filter(clean * pet_multiplier, sigma=PET_EXTRA_BLUR, mode="constant")
        volumes[channel] = acquire(clean, site, np.random.default_rng([config.seed, 3 + index, subject["index"]]), grid)
    truth["brain_voxels"] = int(np.count_nonzero(label))
    return volumes, label, truth


# ---- the whole cohort ------------------------------------------------------------------------------------
METADATA = ("site", "scanner", "sex", "age", "grade", "grade_true", "disease", "lesion_region")


def _write_brain_subject(store_path: str, subject: dict[str, Any], config: BrainCohortConfig):
    store = CohortStore(store_path)
    site = next(s for s in config.sites if s.name == subject["site"])
    channels, label, truth = render_brain_subject(subject, config, site, tuple(subject["channels"]))
    metadata = _metadata(subject, truth)
    store.write_subject(subject["subject_id"], channels=channels, label=label, attrs={
        "metadata": metadata, "spacing": [VOXEL_SPACING_MM] * 3, "origin": [0.0] * 3,
        "direction": np.eye(3).ravel().tolist(), "truth": truth,
        "provenance": {"source": "rafmedia.shards.synth_brain", "seed": config.seed}})
    return _manifest_row(subject["subject_id"], metadata, channels, label), truth


def _metadata(subject: dict[str, Any], truth: dict[str, Any]) -> dict[str, Any]:
    lesion, hypometabolism = truth["lesion"], truth["hypometabolism"]
    return {**{key: subject[key] for key in METADATA}, "lesion_voxels": lesion["voxels"] if lesion else 0,
            "hypometabolism": hypometabolism["depth"] if hypometabolism else 0.0,
            **{f"has_{channel}": int(channel in subject["channels"]) for channel in CHANNELS}}


def _manifest_row(subject_id: str, metadata: dict[str, Any], channels: dict[str, np.ndarray],
                  label: np.ndarray) -> dict[str, Any]:
    """`summary_row`, with blank statistics for the channels a subject lacks, in `CHANNELS` order (so every row
    has the same columns whichever channels the first subject has)."""
    row = summary_row(subject_id, metadata=metadata, channels=channels, label=label, spacing=[VOXEL_SPACING_MM] * 3)
    present = next(iter(channels))
    statistics = [key.removeprefix(f"{present}_") for key in row if key.startswith(f"{present}_")]
    tail = ("label_foreground", "flags")
    ordered = {key: value for key, value in row.items()
               if key not in tail and not any(key.startswith(f"{channel}_") for channel in CHANNELS)}
    ordered.update({f"{channel}_{name}": row.get(f"{channel}_{name}", "") for channel in CHANNELS
                    for name in statistics})
    ordered.update({key: row[key] for key in tail if key in row})
    return ordered


def generate_brain_cohort(config: BrainCohortConfig, *, store_config: StoreConfig, out: str | Path,
                          progress: bool = True, overwrite: bool = False) -> CohortStore:
    """Generates the brain cohort into a new (or resumed) store at `out`; writes manifest.csv and planted.json.

    As `generate_cohort`: finished subjects of a resumed store are kept (the recipe must match), and with
    `config.workers > 1` subjects are rendered in spawned processes (guard a calling script's entry point).
    """
    config.validate()
    store = CohortStore.create(out, config=store_config, name=config.name, overwrite=overwrite)
    recipe = json.loads(json.dumps(asdict(config)))
    recipe.pop("workers")  # the number of processes does not change the cohort
    check_same_recipe(store, {"kind": "brain", **recipe})
    subjects = assign_brain_subjects(config)
    store.update_attrs({"provenance": synthetic_provenance("rafmedia synthetic brain cohort", len(subjects))})
    done: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    todo = [s for s in subjects if not store.has_subject(s["subject_id"])]
    for subject in subjects:
        if store.has_subject(subject["subject_id"]):  # resumed run: keep the finished subject as written
            done[subject["subject_id"]] = _row_from_store(store, subject["subject_id"])
    bar = tqdm(total=len(subjects), initial=len(subjects) - len(todo), desc="synth brain", unit="subject",
               disable=not progress)
    if config.workers > 1 and len(todo) > 1:
        # spawn, not fork, and one native thread per worker: as in `generate_cohort`.
        context = multiprocessing.get_context("spawn")
        with single_threaded_children(), ProcessPoolExecutor(config.workers, mp_context=context) as pool:
            futures = {pool.submit(_write_brain_subject, str(store.path), s, config): s["subject_id"] for s in todo}
            for future in as_completed(futures):
                done[futures[future]] = future.result()
                bar.update()
    else:
        for subject in todo:
            done[subject["subject_id"]] = _write_brain_subject(str(store.path), subject, config)
            bar.update()
    bar.close()
    manifest = [done[s["subject_id"]][0] for s in subjects]
    store.write_manifest(manifest)
    write_json(store.path / "planted.json",
               planted_brain_truth(config, manifest, {s["subject_id"]: done[s["subject_id"]][1] for s in subjects}))
    return store


def _row_from_store(store: CohortStore, subject_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    attrs = store.subject_attrs(subject_id)
    channels = {name: store.read(subject_id, name) for name in attrs["channels"]}
    return _manifest_row(subject_id, attrs["metadata"], channels, store.read_label(subject_id)), attrs["truth"]


def planted_brain_truth(config: BrainCohortConfig, manifest: list[dict[str, Any]],
                        truths: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What was planted and the realised counts: grades (true and rated), the rater's flip rate, the grade formula,
    missing channels, and per subject its lesion and the lesion's share of the brain (a pointing game's chance)."""
    grades = range(config.num_grades)
    subjects = {}
    for row in manifest:
        truth = truths[row["subject_id"]]
        lesion = truth["lesion"]
        subjects[row["subject_id"]] = {
            "grade_true": row["grade_true"], "grade": row["grade"],
            "lesion": None if lesion is None else {**lesion, "brain_fraction": round(
                lesion["voxels"] / truth["brain_voxels"], 6)},
            "hypometabolism": truth["hypometabolism"], "channels": [c for c in CHANNELS if row[f"has_{c}"]]}
    flips = [row["grade"] != row["grade_true"] for row in manifest]
    fractions = [s["lesion"]["brain_fraction"] for s in subjects.values() if s["lesion"]]
    return {
        "cohort": config.name, "kind": "brain", "seed": config.seed, "num_subjects": len(manifest),
        "config": asdict(config), "labels": BRAIN_LABELS, "channels": list(CHANNELS), "contrast": TISSUE_CONTRAST,
        "region_weights": REGION_WEIGHTS, "grade_formula": GRADE_FORMULA,
        "grade_counts_true": {g: sum(row["grade_true"] == g for row in manifest) for g in grades},
        "grade_counts_rated": {g: sum(row["grade"] == g for row in manifest) for g in grades},
        "rater_noise": config.rater_noise, "rater_flip_rate": round(float(np.mean(flips)), 6),
        "missing_counts": {c: sum(not row[f"has_{c}"] for row in manifest) for c in CHANNELS},
        "sites": {site.name: {**asdict(site), "num_subjects": sum(row["site"] == site.name for row in manifest)}
                  for site in config.sites},
        "sex_counts": {sex: sum(row["sex"] == sex for row in manifest) for sex in ("F", "M")},
        "lesion_brain_fraction_mean": round(float(np.mean(fractions)), 6) if fractions else None,
        "subjects": subjects,
    }


# ---- the hidden truth, for scoring only --------------------------------------------------------------------
def lesion_masks(store: CohortStore, subject_ids: list[str]) -> np.ndarray:
    """The planted lesions of `subject_ids` as a bool (N, D, H, W) array (all False for a grade-0 subject). Read
    for scoring localisation only, never as an input of a method."""
    return _label_masks(store, subject_ids, lambda label: label == BRAIN_LABELS["lesion"])


def brain_masks(store: CohortStore, subject_ids: list[str]) -> np.ndarray:
    """The brains (label > 0) of `subject_ids` as a bool (N, D, H, W) array: the denominator of chance rates and
    the voxels a localisation AUROC is computed over."""
    return _label_masks(store, subject_ids, lambda label: label > 0)


def _label_masks(store: CohortStore, subject_ids: list[str], select) -> np.ndarray:
    if not subject_ids:
        return np.zeros((0, 0, 0, 0), dtype=bool)
    return np.stack([select(store.read_label(subject_id)) for subject_id in subject_ids])
