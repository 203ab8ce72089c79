"""The cohort of an evaluation, loaded once for every encoder: manifest rows, raw volumes, binary labels, the seeded
train/test split of each replicate, the subgroups, and the label maps of the pixel-level stage."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from rafmedia.core.errors import UserError
from rafmedia.core.files import read_json
from rafmedia.evaluate.config import EvaluateConfig
from rafmedia.evaluate.groups import group_labels
from rafmedia.evaluate.results import digest
from rafmedia.shards.datasheet import DatasheetConfig, compute_datasheet
from rafmedia.shards.store import CohortStore
from rafmedia.shards.volumes import load_volumes


def binary_labels(rows: list[dict[str, Any]], target: str) -> np.ndarray:
    """0/1 labels for a target column: numbers > 0 are positive; two-valued strings map in sorted order."""
    values = [row[target] for row in rows]
    if all(isinstance(value, (int, float)) for value in values):
        return (np.asarray(values, dtype=float) > 0).astype(int)
    levels = sorted(set(map(str, values)))
    if len(levels) != 2:
        raise UserError(f"target '{target}' must be binary for the linear probe; it has values {levels}")
    return np.array([levels.index(str(value)) for value in values])


def split_indices(labels: np.ndarray, *, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of the subjects into train and test indices, stratified by `labels` (scikit-learn's
    `train_test_split`)."""
    indices = np.arange(len(labels))
    return train_test_split(indices, test_size=test_fraction, stratify=labels, random_state=seed)


@dataclass
class LabelledSet:
    """Images (N, C, D, H, W) with label maps (N, D, H, W), or None for the maps of an unlabelled cohort."""

    images: torch.Tensor
    labels: np.ndarray | None


@dataclass
class CohortData:
    """A cohort loaded once for every encoder: manifest rows, raw volumes, labels, the seeded splits, groups."""

    store: CohortStore
    rows: list[dict[str, Any]]
    volumes: torch.Tensor
    labels: dict[str, np.ndarray]
    splits: dict[int, tuple[np.ndarray, np.ndarray]]
    groups: dict[str, np.ndarray]  # grouping name (attributes and their pairs) -> group label per subject
    digest: str
    label_maps: np.ndarray | None = None  # (N, D, H, W) when evaluate.segmentation is on and the cohort has them
    reference: LabelledSet | None = None  # evaluate.segmentation.reference_cohort, loaded
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)


def load_cohort(config: EvaluateConfig, *, progress: bool) -> CohortData:
    """The cohort of `config`: manifest rows, volumes, binary labels of every target, one seeded split per
    replicate, group labels; the label maps (and the reference cohort) when the segmentation stage is on."""
    store = CohortStore(config.cohort)
    rows = store.read_manifest()
    targets = list(dict.fromkeys([config.primary_target, *config.targets]))  # ordered: the report is deterministic
    for column in [*targets, *config.group_by, *config.ordinal_targets]:
        if column not in rows[0]:
            raise UserError(f"column '{column}' is not in {store.path / 'manifest.csv'} (columns: {', '.join(rows[0])})")
    volumes = load_volumes(store, [row["subject_id"] for row in rows], normalize=False, progress=progress)
    labels = {target: binary_labels(rows, target) for target in targets}
    splits = {seed: split_indices(labels[config.primary_target], test_fraction=config.test_fraction, seed=seed)
              for seed in config.seeds}
    groups = group_labels(rows, config.group_by, age_bins=config.age_bins, intersections=config.intersections)
    data = CohortData(store, rows, volumes, labels, splits, groups,
                      digest=digest(store.path.name, (store.path / "manifest.csv").read_text(encoding="utf-8")))
    if config.segmentation.enabled:
        data.label_maps = load_label_maps(store, rows, config.segmentation.channel, progress=progress,
                                          required=not config.segmentation.reference_cohort)
        data.spacing = tuple(float(rows[0].get(f"spacing_{axis}", 1.0) or 1.0) for axis in range(3))
        if config.segmentation.reference_cohort:
            reference = CohortStore(config.segmentation.reference_cohort)
            reference_rows = reference.read_manifest()
            data.reference = LabelledSet(
                load_volumes(reference, [row["subject_id"] for row in reference_rows], normalize=False,
                             progress=progress),
                load_label_maps(reference, reference_rows, config.segmentation.channel, progress=progress, required=True))
    return data


def load_label_maps(store: CohortStore, rows: list[dict[str, Any]], channel: str, *, progress: bool,
                    required: bool) -> np.ndarray | None:
    """(N, D, H, W) integer label maps of the store's channel; None when it has none and they are not required."""
    try:
        store.shape(rows[0]["subject_id"], channel)
    except UserError as missing:
        if required:
            raise UserError(f"evaluate.segmentation needs label maps in {store.path}: {missing}; set "
                            "evaluate.segmentation.channel, or evaluate.segmentation.reference_cohort to a labelled "
                            "store") from None
        return None
    return load_volumes(store, [row["subject_id"] for row in rows], channel=channel, normalize=False,
                        progress=progress)[:, 0].numpy().astype(np.int64)


def cohort_summary(store: CohortStore, rows, config: EvaluateConfig) -> dict[str, Any]:
    """The report's "cohort" section: subjects, group counts, each subject's groups, the datasheet and the planted
    biases of a synthetic cohort."""
    planted = store.path / "planted.json"
    counts = {column: {str(v): sum(str(r[column]) == str(v) for r in rows) for v in sorted({str(r[column]) for r in rows})}
              for column in config.group_by}
    subjects = {column: [str(row[column]) for row in rows] for column in ["subject_id", *config.group_by]}
    return {"path": str(store.path), "num_subjects": len(rows), "counts": counts, "subjects": subjects,
            "datasheet": cohort_datasheet(rows, config.group_by),
            "planted": read_json(planted) if planted.is_file() else None}


def cohort_datasheet(rows: list[dict[str, Any]], attributes: list[str]) -> dict[str, Any]:
    """The cohort's datasheet numbers (subgroups, intersections, rare categories, missing metadata, geometry),
    without the voxel intensity histograms (those are in `raf shards datasheet`)."""
    categorical = [column for column in attributes if not str(rows[0].get(column, "")).replace(".", "").isdigit()]
    return compute_datasheet(rows, config=DatasheetConfig(attributes=categorical or None), title="evaluated cohort",
                             read_sample=None, progress=False)
