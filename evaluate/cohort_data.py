"""The cohort of an evaluation, described once for every encoder: manifest rows, binary labels, the seeded
train/test split of each replicate, the subgroups, and where its volumes and label maps are read from.

Volumes and label maps are not loaded: they are streamed from the store in batches (`StoreVolumes`, read by
`evaluate.num_workers` DataLoader workers) by whichever stage needs them, so the evaluator's memory does not grow
with the cohort (docs/evaluation.md, "Memory and streaming")."""
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
from rafmedia.shards.volumes import StoreVolumes, TensorVolumes, VolumeSource, as_volume_source


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
    """Images (N, C, D, H, W) with label maps (N, D, H, W), or None for the maps of an unlabelled cohort; each in
    memory (a tensor / an array) or streamed from a store (`StoreVolumes`), restricted to the rows `indices`
    (None: all rows)."""

    images: torch.Tensor | VolumeSource
    labels: np.ndarray | torch.Tensor | VolumeSource | None
    indices: np.ndarray | None = None

    def __post_init__(self):
        self.images = as_volume_source(self.images)
        if self.labels is not None and not isinstance(self.labels, (TensorVolumes, StoreVolumes)):
            self.labels = TensorVolumes(torch.as_tensor(np.asarray(self.labels))[:, None])  # (N, 1, D, H, W)
        if self.indices is None:
            self.indices = np.arange(len(self.images))

    def __len__(self) -> int:
        return len(self.indices)

    def subset(self, positions: np.ndarray) -> "LabelledSet":
        """The rows `positions` of this set (positions into `indices`)."""
        return LabelledSet(self.images, self.labels, self.indices[np.asarray(positions, dtype=int)])


@dataclass
class CohortData:
    """A cohort described once for every encoder: manifest rows, labels, the seeded splits, groups, and its
    volumes (and label maps) as sources streamed from the store."""

    store: CohortStore
    rows: list[dict[str, Any]]
    volumes: VolumeSource  # raw image volumes in manifest order, streamed (`StoreVolumes`)
    labels: dict[str, np.ndarray]
    splits: dict[int, tuple[np.ndarray, np.ndarray]]
    groups: dict[str, np.ndarray]  # grouping name (attributes and their pairs) -> group label per subject
    digest: str
    label_maps: VolumeSource | None = None  # when evaluate.segmentation is on and the cohort has them
    reference: LabelledSet | None = None  # evaluate.segmentation.reference_cohort, streamed
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)


def load_cohort(config: EvaluateConfig, *, progress: bool) -> CohortData:
    """The cohort of `config`: manifest rows, binary labels of every target, one seeded split per replicate, group
    labels, and the sources its volumes are streamed from (`config.num_workers` readers); the label maps (and the
    reference cohort) when the segmentation stage is on. Reads no volume."""
    store = CohortStore(config.cohort)
    rows = store.read_manifest()
    targets = list(dict.fromkeys([config.primary_target, *config.targets]))  # ordered: the report is deterministic
    for column in [*targets, *config.group_by, *config.ordinal_targets]:
        if column not in rows[0]:
            raise UserError(f"column '{column}' is not in {store.path / 'manifest.csv'} (columns: {', '.join(rows[0])})")
    subject_ids = [row["subject_id"] for row in rows]
    volumes = StoreVolumes(store.path, subject_ids, num_workers=config.num_workers)
    labels = {target: binary_labels(rows, target) for target in targets}
    splits = {seed: split_indices(labels[config.primary_target], test_fraction=config.test_fraction, seed=seed)
              for seed in config.seeds}
    groups = group_labels(rows, config.group_by, age_bins=config.age_bins, intersections=config.intersections)
    data = CohortData(store, rows, volumes, labels, splits, groups,
                      digest=digest(store.path.name, (store.path / "manifest.csv").read_text(encoding="utf-8")))
    if config.segmentation.enabled:
        data.label_maps = label_map_source(store, rows, config.segmentation.channel, num_workers=config.num_workers,
                                           required=not config.segmentation.reference_cohort)
        data.spacing = tuple(float(rows[0].get(f"spacing_{axis}", 1.0) or 1.0) for axis in range(3))
        if config.segmentation.reference_cohort:
            reference = CohortStore(config.segmentation.reference_cohort)
            reference_rows = reference.read_manifest()
            data.reference = LabelledSet(
                StoreVolumes(reference.path, [row["subject_id"] for row in reference_rows],
                             num_workers=config.num_workers),
                label_map_source(reference, reference_rows, config.segmentation.channel,
                                 num_workers=config.num_workers, required=True))
    return data


def label_map_source(store: CohortStore, rows: list[dict[str, Any]], channel: str, *, num_workers: int,
                     required: bool) -> StoreVolumes | None:
    """The store's label maps of `channel` as a streamed source of (B, 1, D, H, W) int64 batches; None when the
    store has none and they are not required."""
    try:
        store.shape(rows[0]["subject_id"], channel)
    except UserError as missing:
        if required:
            raise UserError(f"evaluate.segmentation needs label maps in {store.path}: {missing}; set "
                            "evaluate.segmentation.channel, or evaluate.segmentation.reference_cohort to a labelled "
                            "store") from None
        return None
    # int64 as before (labels were read as float32 and cast); store label values are small integers, read exactly
    return StoreVolumes(store.path, [row["subject_id"] for row in rows], channel=channel, num_workers=num_workers,
                        dtype=np.int64)


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
