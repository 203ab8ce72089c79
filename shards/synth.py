"""A synthetic reference cohort: simplified 3D body scans with known ground truth and planted biases.

No real multi-subject cohort with demographics installs offline, so the product's default data set is
generated. Each subject has:

- an intensity volume (float32, channel "image") and a label map: 1 body, 2 heart, 3 liver, 4 kidneys,
  5 lesions. Organs are ellipsoids under a smooth random deformation; sizes depend on sex and age.
- metadata `subject_id, site, scanner, sex, age, disease, severity`. The scan-level disease is an
  enlarged heart (as cardiomegaly is on a chest scan): `severity` 1-3 is binned from the enlargement ratio,
  0 for healthy subjects. Small liver lesions are local findings for segmentation, not the scan label.
- a per-site acquisition profile: blur (resolution), gamma (contrast), a smooth multiplicative bias field,
  then additive Gaussian noise of exactly `noise_std` (measurable in the air around the body).

Optionally (`paired_channel`), each subject also gets a second acquisition stored as that channel on the same
grid: a breathing pair. "image" is end-inhale; the paired channel is end-exhale, the same anatomy (label map and
tissue texture) moved by a known, physiologically shaped displacement field (`rafmedia.shards.breathing`: the
diaphragm rises by up to `paired_displacement` voxels, the abdomen with it, the thorax compressed), rendered in
another tissue contrast (`PAIRED_TISSUE_INTENSITY`, so a voxel-wise copy of "image" cannot answer a paired pretext
task) with its own bias field and independent noise of the site's `noise_std`. The exhale label map is stored as
the channel `<paired_channel>_label`, and the subject's `truth` records the field's parameters (`breathing`) and
named landmarks with their inhale and exact exhale voxel positions (`landmarks`). Its draws come from their own
generator, so "image" and the label map are the same with or without it.

Planted biases come from the config (a noisy site, an under-represented sex via `sex_ratio`, a disease
prevalence per site) and are applied with exact counts; what was planted is written to `planted.json`.
Every random choice comes from `numpy.random.default_rng` seeded with (seed, purpose, subject index), so
the same seed gives the same cohort whatever the number of worker processes.
"""
from __future__ import annotations

import json
import multiprocessing
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
from rafmedia.shards.breathing import breathing_field, draw_breathing, exhale_positions, landmarks, warp
from rafmedia.shards.manifest import summary_row
from rafmedia.shards.splits import exact_counts
from rafmedia.shards.store import CohortStore, StoreConfig

LABELS = {"background": 0, "body": 1, "heart": 2, "liver": 3, "kidney": 4, "lesion": 5}
TISSUE_INTENSITY = {"body": 0.30, "heart": 0.62, "liver": 0.48, "kidney": 0.72, "lesion": 0.85}
# The optional second acquisition's contrast: another tissue ordering (as T2 is to T1), so a voxel-wise copy of
# "image" cannot be the answer to a paired pretext task; only the shared anatomy links the two.
PAIRED_TISSUE_INTENSITY = {"body": 0.55, "heart": 0.25, "liver": 0.40, "kidney": 0.15, "lesion": 0.75}
BREATHING_MODEL = "breathing-v1"  # the paired channel's recipe: a store made by an older one is not resumed
LANDMARK_RESIDUAL_LIMIT = 1e-3  # voxels: |q + u(q) - p| of every recorded exhale landmark
SEVERITY_BINS = (1.25, 1.35)  # enlargement ratio thresholds between severities 1|2 and 2|3
VOXEL_SPACING_MM = 3.0


@dataclass
class SiteProfile:
    """One acquisition site: its share of subjects, its scanner and its image-quality profile."""

    name: str = "site-a"
    scanner: str = "scanner-a"
    weight: float = 1.0  # relative share of subjects
    noise_std: float = 0.03  # additive Gaussian noise, in units of the [0, 1] tissue intensity scale
    bias_field: float = 0.1  # std of the log of the smooth multiplicative bias field
    gamma: float = 1.0  # contrast: intensity ** gamma
    blur_sigma: float = 0.5  # Gaussian blur in voxels (resolution)
    disease_prevalence: float = 0.4  # exact fraction of this site's subjects with the disease


@dataclass
class CohortConfig:
    """The synthetic cohort: size, demographics and sites (each with planted acquisition biases).

    `paired_channel`: None (default) for one channel, "image"; a name (e.g. "exhale") adds an end-exhale
    acquisition of each subject under that channel name (see the module docstring), whose diaphragm moves by
    `paired_displacement` * U(0.8, 1) voxels (the field's largest motion; at most a sixth of the smallest side).
    Typed `Any` because the config loader coerces no `str | None`; `validate` checks it.
    """

    name: str = "synthetic"
    num_subjects: int = 200
    shape: list[int] = field(default_factory=lambda: [64, 64, 64])
    seed: int = 0
    sex_ratio: float = 1.0  # females per male; 0.5 plants a 1:2 under-representation of females
    age_range: list[float] = field(default_factory=lambda: [20.0, 85.0])
    enlargement_range: list[float] = field(default_factory=lambda: [1.15, 1.45])  # heart size ratio if diseased
    lesion_probability: float = 0.5
    lesion_radius: list[float] = field(default_factory=lambda: [3.0, 6.0])  # voxels
    max_lesions: int = 3
    workers: int = 2
    sites: list[SiteProfile] = field(default_factory=lambda: [SiteProfile()])
    paired_channel: Any = None  # None, or the channel name of a second acquisition of each subject
    paired_displacement: float = 4.0  # voxels: the diaphragm's largest exhale motion (12 mm at 3 mm voxels)

    def validate(self) -> None:
        if self.num_subjects < 2:
            raise UserError(f"cohort.num_subjects must be at least 2, got {self.num_subjects}")
        if len(self.shape) != 3 or min(self.shape) < 16:
            raise UserError(f"cohort.shape must be three sizes of at least 16 voxels, got {self.shape}")
        if self.sex_ratio <= 0:
            raise UserError(f"cohort.sex_ratio (females per male) must be positive, got {self.sex_ratio}")
        if not self.sites:
            raise UserError("cohort.sites is empty: give at least one site")
        names = [site.name for site in self.sites]
        if len(set(names)) != len(names):
            raise UserError(f"cohort.sites has duplicate names: {names}")
        for index, site in enumerate(self.sites):
            if not 0 <= site.disease_prevalence <= 1:
                raise UserError(f"cohort.sites.{index}.disease_prevalence must be in [0, 1], got {site.disease_prevalence}")
            if site.weight <= 0 or site.noise_std < 0 or site.gamma <= 0:
                raise UserError(f"cohort.sites.{index} ({site.name}): weight and gamma must be > 0, noise_std >= 0")
        if self.paired_channel is not None and (not isinstance(self.paired_channel, str) or not self.paired_channel
                                                or self.paired_channel == "image"):
            raise UserError(f"cohort.paired_channel must be null or a channel name other than 'image', got "
                            f"{self.paired_channel!r}; e.g. cohort.paired_channel=exhale")
        if self.paired_channel is not None and not 0 <= self.paired_displacement <= min(self.shape) / 6:
            raise UserError(f"cohort.paired_displacement must be in [0, {min(self.shape) / 6:g}] voxels (a sixth "
                            f"of the smallest side, {min(self.shape)}), got {self.paired_displacement}; lower it or "
                            "enlarge cohort.shape")


# ---- cohort-level assignment (exact counts) ------------------------------------------------------
def assign_subjects(config: CohortConfig) -> list[dict[str, Any]]:
    """Draws site, sex, age and disease for every subject, with exact planted counts."""
    rng = np.random.default_rng([config.seed, 0])
    n = config.num_subjects
    site_index = np.repeat(np.arange(len(config.sites)), exact_counts(n, [s.weight for s in config.sites]))
    rng.shuffle(site_index)
    num_female = int(round(n * config.sex_ratio / (1.0 + config.sex_ratio)))
    sex = np.array(["F"] * num_female + ["M"] * (n - num_female))
    rng.shuffle(sex)
    age = rng.uniform(*config.age_range, size=n)
    diseased = np.zeros(n, dtype=bool)
    for index, site in enumerate(config.sites):
        members = np.flatnonzero(site_index == index)
        chosen = rng.permutation(members)[: int(round(site.disease_prevalence * len(members)))]
        diseased[chosen] = True
    enlargement = np.where(diseased, rng.uniform(*config.enlargement_range, size=n), rng.uniform(0.94, 1.06, size=n))
    return [
        {"subject_id": f"sub-{i:04d}", "site": config.sites[site_index[i]].name,
         "scanner": config.sites[site_index[i]].scanner, "sex": str(sex[i]), "age": round(float(age[i]), 1),
         "disease": int(diseased[i]), "severity": severity_from_enlargement(enlargement[i], diseased[i]),
         "enlargement": round(float(enlargement[i]), 4), "index": i}
        for i in range(n)
    ]


def severity_from_enlargement(ratio: float, diseased: bool) -> int:
    """Ordinal severity: 0 healthy, then 1-3 by heart enlargement ratio (bins at SEVERITY_BINS)."""
    return 0 if not diseased else 1 + int(np.searchsorted(SEVERITY_BINS, ratio, side="right"))


# ---- one subject ---------------------------------------------------------------------------------
def coordinate_grid(shape: tuple[int, int, int]) -> np.ndarray:
    """Voxel-centre coordinates spanning [-1, 1] along each axis, (3, D, H, W)."""
    axes = [np.linspace(-1.0, 1.0, size, dtype=np.float32) for size in shape]
    return np.stack(np.meshgrid(*axes, indexing="ij"))  # (3, D, H, W)


def smooth_field(rng: np.random.Generator, grid: np.ndarray, num_waves: int = 6, max_frequency: float = 2.0) -> np.ndarray:
    """A smooth random scalar field with zero mean and unit variance (a sum of low-frequency waves)."""
    field_ = np.zeros(grid.shape[1:], dtype=np.float32)
    for _ in range(num_waves):
        frequency = rng.uniform(-max_frequency, max_frequency, size=3).astype(np.float32) * np.pi / 2
        phase = rng.uniform(0, 2 * np.pi)
        field_ += np.cos(np.tensordot(frequency, grid, axes=1) + phase)
    return (field_ - field_.mean()) / max(float(field_.std()), 1e-6)


def _ellipsoid(points: np.ndarray, center, semi_axes, wobble: np.ndarray) -> np.ndarray:
    distance = sum(((points[axis] - center[axis]) / semi_axes[axis]) ** 2 for axis in range(3))
    return distance < 1.0 + wobble


def render_subject(subject: dict[str, Any], config: CohortConfig, site: SiteProfile):
    """Renders one subject. Returns (image float32, label uint8, truth dict)."""
    image, label, truth, _ = _render_subject(subject, config, site)
    return image, label, truth


def _render_subject(subject: dict[str, Any], config: CohortConfig, site: SiteProfile):
    """`render_subject`, plus the tissue texture the paired acquisition shares (same anatomy)."""
    rng = np.random.default_rng([config.seed, 1, subject["index"]])
    shape = tuple(config.shape)
    grid = coordinate_grid(shape)
    deformation = np.stack([smooth_field(rng, grid) for _ in range(3)]) * 0.04
    points = grid + deformation
    wobble = smooth_field(rng, grid, max_frequency=3.0) * 0.08

    body_scale = (1.0 if subject["sex"] == "M" else 0.92) * (1 + 0.002 * (subject["age"] - 50)) * rng.normal(1, 0.03)
    organ_scale = body_scale * rng.normal(1, 0.04)
    heart_scale = organ_scale * subject["enlargement"]
    s = body_scale
    label = np.zeros(shape, dtype=np.uint8)
    label[_ellipsoid(points, (0, 0, 0), (0.78 * s, 0.62 * s, 0.82 * s), wobble)] = LABELS["body"]
    organs = [
        ("liver", (0.15, 0.12, -0.30), (0.24 * organ_scale, 0.20 * organ_scale, 0.26 * organ_scale)),
        ("kidney", (0.25, 0.32, 0.38), (0.10 * organ_scale, 0.09 * organ_scale, 0.07 * organ_scale)),
        ("kidney", (0.25, 0.32, -0.05), (0.10 * organ_scale, 0.09 * organ_scale, 0.07 * organ_scale)),
        ("heart", (-0.12, -0.08, 0.22), (0.24 * heart_scale, 0.22 * heart_scale, 0.25 * heart_scale)),
    ]
    body = label == LABELS["body"]
    for name, center, semi_axes in organs:
        label[_ellipsoid(points, center, semi_axes, wobble * 0.5) & body] = LABELS[name]
    lesions = _add_lesions(rng, label, config)

    image = np.zeros(shape, dtype=np.float32)
    for name, intensity in TISSUE_INTENSITY.items():
        image[label == LABELS[name]] = intensity
    # Tissue texture: stationary correlated noise with the same spectrum for every subject. (A texture built
    # from per-subject random waves made a fingerprint that contrastive pretraining matched instead of anatomy.)
    texture = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=1.5)
    tissue_texture = (label > 0) * texture * (0.02 / max(float(texture.std()), 1e-6))
    image += tissue_texture
    image = acquire(image, site, rng, grid)
    truth = {"heart_scale": float(heart_scale), "body_scale": float(body_scale), "lesions": lesions,
             "heart_voxels": int((label == LABELS["heart"]).sum())}
    return image, label, truth, tissue_texture


def paired_clean(subject: dict[str, Any], config: CohortConfig, label: np.ndarray, tissue_texture: np.ndarray,
                 lesions: list[dict[str, Any]]) -> dict[str, Any]:
    """The noiseless end-exhale rendering of a subject rendered by `_render_subject`, before acquisition.

    Its breathing parameters are the first draws of the pair's own generator (purpose 2, a fixed number whatever
    `paired_displacement`), which is returned for the acquisition's draws. Returns {"clean": the exhale volume in
    the paired contrast (float32), "label": the exhale label map (uint8), "truth": breathing parameters, landmarks
    and the largest displacement, "rng": the generator}.
    """
    rng = np.random.default_rng([config.seed, 2, subject["index"]])
    params = draw_breathing(rng, label, liver=LABELS["liver"], max_voxels=config.paired_displacement)
    field_ = breathing_field(np.indices(label.shape, dtype=np.float64), params).astype(np.float32)
    clean = np.zeros(label.shape, dtype=np.float32)
    for name, intensity in PAIRED_TISSUE_INTENSITY.items():
        clean[label == LABELS[name]] = intensity
    clean += tissue_texture
    points = landmarks(label, LABELS, [lesion["center"] for lesion in lesions])
    inhale = np.array(list(points.values()), dtype=np.float64).reshape(-1, 3)
    exhale, residual = exhale_positions(inhale, params)
    if residual > LANDMARK_RESIDUAL_LIMIT:  # Newton on a smooth, invertible field: this is a bug, not bad input
        raise RuntimeError(f"{subject['subject_id']}: exhale landmarks off by {residual:.2g} voxels")
    truth = {"breathing": params, "paired_displacement": round(float(np.sqrt((field_**2).sum(axis=0)).max()), 4),
             "landmarks": {"names": list(points), "inhale": inhale.round(4).tolist(),
                           "exhale": exhale.round(4).tolist(), "residual": residual}}
    return {"clean": warp(clean, field_, order=1), "label": warp(label, field_, order=0), "truth": truth, "rng": rng}


def render_paired_acquisition(subject: dict[str, Any], config: CohortConfig, site: SiteProfile, label: np.ndarray,
                              tissue_texture: np.ndarray,
                              lesions: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The end-exhale acquisition of a subject: `paired_clean`, then acquired by the same site with fresh draws
    from the pair's own generator, so "image" is unchanged. Returns (image float32, exhale label map uint8, truth)."""
    pair = paired_clean(subject, config, label, tissue_texture, lesions)
    grid = coordinate_grid(label.shape)
    return acquire(pair["clean"], site, pair["rng"], grid), pair["label"], pair["truth"]


def _add_lesions(rng: np.random.Generator, label: np.ndarray, config: CohortConfig) -> list[dict[str, Any]]:
    lesions = []
    if rng.uniform() >= config.lesion_probability:
        return lesions
    liver = np.argwhere(label == LABELS["liver"])
    if len(liver) == 0:
        return lesions
    for _ in range(int(rng.integers(1, config.max_lesions + 1))):
        center = liver[rng.integers(len(liver))]
        radius = float(rng.uniform(*config.lesion_radius))
        low = np.maximum(center - int(np.ceil(radius)), 0)
        high = np.minimum(center + int(np.ceil(radius)) + 1, label.shape)
        box = tuple(slice(a, b) for a, b in zip(low, high))
        offsets = np.ogrid[tuple(slice(a - c, b - c) for a, b, c in zip(low, high, center))]
        sphere = sum(offset.astype(np.float32) ** 2 for offset in offsets) <= radius**2
        label[box][sphere & (label[box] == LABELS["liver"])] = LABELS["lesion"]
        lesions.append({"center": center.tolist(), "radius": round(radius, 2)})
    return lesions


def acquire(image: np.ndarray, site: SiteProfile, rng: np.random.Generator, grid: np.ndarray) -> np.ndarray:
    """Applies a site's acquisition profile: blur, gamma, bias field, then additive noise."""
    if site.blur_sigma > 0:
        image = ndimage.gaussian_filter(image, sigma=site.blur_sigma, mode="constant")
    image = np.clip(image, 0.0, None) ** site.gamma
    image = image * np.exp(site.bias_field * smooth_field(rng, grid, num_waves=3, max_frequency=1.0))
    image = image + rng.normal(0.0, site.noise_std, size=image.shape).astype(np.float32)
    return image.astype(np.float32)


# ---- the whole cohort ----------------------------------------------------------------------------
def _write_one(store_path: str, subject: dict[str, Any], config: CohortConfig) -> dict[str, Any]:
    store = CohortStore(store_path)
    site = next(s for s in config.sites if s.name == subject["site"])
    image, label, truth, tissue_texture = _render_subject(subject, config, site)
    channels = {"image": image}
    if config.paired_channel is not None:
        exhale, exhale_label, pair_truth = render_paired_acquisition(subject, config, site, label, tissue_texture,
                                                                     truth["lesions"])
        channels[config.paired_channel] = exhale
        channels[paired_label_channel(config.paired_channel)] = exhale_label
        truth.update(pair_truth)
    metadata = {key: subject[key] for key in ("site", "scanner", "sex", "age", "disease", "severity")}
    store.write_subject(subject["subject_id"], channels=channels, label=label, attrs={
        "metadata": metadata, "spacing": [VOXEL_SPACING_MM] * 3, "origin": [0.0] * 3,
        "direction": np.eye(3).ravel().tolist(), "provenance": {"source": "rafmedia.shards.synth", "seed": config.seed},
        "truth": {**truth, "enlargement": subject["enlargement"]}})
    return _manifest_row(subject, metadata, channels, label, len(truth["lesions"]))


def generate_cohort(config: CohortConfig, *, store_config: StoreConfig, out: str | Path,
                    progress: bool = True, overwrite: bool = False) -> CohortStore:
    """Generates the cohort into a new (or resumed) store at `out`; writes manifest.csv and planted.json.

    With `config.workers > 1` subjects are rendered in spawned processes, so a script calling this must guard
    its entry point with `if __name__ == "__main__":` (as for any spawned multiprocessing).
    """
    config.validate()
    store = CohortStore.create(out, config=store_config, name=config.name, overwrite=overwrite)
    _check_same_recipe(store, config)
    store.update_attrs({"provenance": {"licence": "CC0-1.0", "sources": [
        {"name": "rafmedia synthetic body cohort", "licence": "CC0-1.0", "subjects": config.num_subjects}]}})
    subjects = assign_subjects(config)
    rows: dict[str, dict[str, Any]] = {}
    todo = [s for s in subjects if not store.has_subject(s["subject_id"])]
    for subject in subjects:
        if store.has_subject(subject["subject_id"]):  # resumed run: keep the finished subject as written
            rows[subject["subject_id"]] = _row_from_store(store, subject)
    bar = tqdm(total=len(subjects), initial=len(subjects) - len(todo), desc="synth", unit="subject", disable=not progress)
    if config.workers > 1 and len(todo) > 1:
        # spawn, not fork: the parent may hold torch/blosc thread pools that a forked child would inherit.
        # One thread per worker: with native thread pools on top, two workers on two cores ran 3x slower.
        context = multiprocessing.get_context("spawn")
        with single_threaded_children(), ProcessPoolExecutor(config.workers, mp_context=context) as pool:
            futures = [pool.submit(_write_one, str(store.path), subject, config) for subject in todo]
            for future in as_completed(futures):
                row = future.result()
                rows[row["subject_id"]] = row
                bar.update()
    else:
        for subject in todo:
            row = _write_one(str(store.path), subject, config)
            rows[row["subject_id"]] = row
            bar.update()
    bar.close()
    manifest = [rows[s["subject_id"]] for s in subjects]
    store.write_manifest(manifest)
    write_json(store.path / "planted.json", planted_truth(config, manifest))
    return store


def _check_same_recipe(store: CohortStore, config: CohortConfig) -> None:
    """Resuming is only safe with the config that started the store; anything else would mix two cohorts."""
    recipe = json.loads(json.dumps(asdict(config)))
    recipe.pop("workers")  # the number of processes does not change the cohort
    if recipe["paired_channel"] is None:  # stores made before the paired channel existed keep resuming
        recipe.pop("paired_channel")
        recipe.pop("paired_displacement")
    else:
        recipe["paired_model"] = BREATHING_MODEL
    check_same_recipe(store, recipe)


def paired_label_channel(paired_channel: str) -> str:
    """The channel holding the paired acquisition's label map (the exhale anatomy)."""
    return f"{paired_channel}_label"


def check_same_recipe(store: CohortStore, recipe: dict[str, Any]) -> None:
    """Records `recipe` (a generator config as plain JSON data) in a new store, or refuses to resume a store that
    another recipe started."""
    existing = store.attrs().get("synth_config")
    if existing is None:
        store.update_attrs({"synth_config": recipe})
    elif existing != recipe:
        changed = sorted(key for key in recipe.keys() | existing.keys() if recipe.get(key) != existing.get(key))
        raise UserError(f"{store.path} was generated with a different cohort config (changed: {', '.join(changed)}); "
                        "pass --overwrite to regenerate it, or choose another --out")


def _row_from_store(store: CohortStore, subject: dict[str, Any]) -> dict[str, Any]:
    subject_id = subject["subject_id"]
    attrs = store.subject_attrs(subject_id)
    channels = {name: store.read(subject_id, name) for name in attrs.get("channels", ["image"])}
    return _manifest_row(subject, attrs["metadata"], channels, store.read_label(subject_id),
                         len(attrs["truth"]["lesions"]))


def _manifest_row(subject: dict[str, Any], metadata: dict[str, Any], channels: dict[str, np.ndarray],
                  label: np.ndarray, num_lesions: int) -> dict[str, Any]:
    truth = {"enlargement": subject["enlargement"], "lesions": num_lesions}
    return summary_row(subject["subject_id"], metadata={**metadata, **truth}, channels=channels, label=label,
                       spacing=[VOXEL_SPACING_MM] * 3)


def planted_truth(config: CohortConfig, manifest: list[dict[str, Any]]) -> dict[str, Any]:
    """What was planted in the cohort, and the realised counts, for checking the evaluator against."""
    noise = {site.name: site.noise_std for site in config.sites}
    median_noise = float(np.median(list(noise.values())))
    sites = {}
    for site in config.sites:
        members = [row for row in manifest if row["site"] == site.name]
        sites[site.name] = {**asdict(site), "num_subjects": len(members),
                            "num_diseased": sum(row["disease"] for row in members)}
    return {
        "cohort": config.name, "seed": config.seed, "num_subjects": len(manifest), "shape": list(config.shape),
        "sex_ratio_planted": config.sex_ratio,
        "sex_counts": {sex: sum(row["sex"] == sex for row in manifest) for sex in ("F", "M")},
        "noisy_sites": [name for name, value in noise.items() if value >= 2 * median_noise and value > 0],
        "sites": sites, "labels": LABELS,
        "disease_definition": f"heart enlargement ratio in {config.enlargement_range}; severity bins at {list(SEVERITY_BINS)}",
    }
