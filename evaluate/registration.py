"""The paired-acquisition downstream study of one encoder: registration of the breathing pair on its frozen features
(target registration error on landmarks, Dice of warped label maps) and segmentation through the existing head,
each with a 95% bootstrap interval over the held-out test subjects, beside two baselines: the identity (no
registration) and the same registration head on raw intensities (`IntensityGrid`).

The cohort is a store with two acquisitions and their label maps on one grid (the synthetic breathing pair:
`raf synth` with `cohort.paired_channel=exhale`): the moving channel (inhale, "image") with the store's label map,
the fixed channel (exhale) with its own label channel, and per subject `truth.landmarks` (inhale and exhale voxel
positions) and `truth.breathing` (the field's parameters, from which the training target is rebuilt exactly:
`rafmedia.shards.breathing.breathing_field`). The head is trained on the training subjects only (docs/paired.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from rafmedia.core.errors import UserError
from rafmedia.evaluate.encoder_entries import EncoderEntry
from rafmedia.evaluate.metrics import bootstrap_cis
from rafmedia.evaluate.mil import one_thread
from rafmedia.evaluate.registration_head import (IntensityGrid, dice_per_structure, fit_registration_head,
                                                 predict_fields, target_registration_error)
from rafmedia.evaluate.segmentation_head import encoder_features, fit_segmentation_head, predict_masks
from rafmedia.shards.breathing import breathing_field, warp
from rafmedia.shards.store import CohortStore


@dataclass
class RegistrationConfig:
    """`evaluate.registration`: off unless `enabled`; needs a paired cohort with landmarks (module docstring)."""

    enabled: bool = False
    moving_channel: str = "image"  # inhale
    fixed_channel: str = "exhale"
    fixed_label_channel: str = ""  # "": "<fixed_channel>_label", as `raf synth` writes it
    structures: dict[str, int] = field(default_factory=lambda: {"body": 1, "heart": 2, "liver": 3, "kidney": 4})
    head_steps: int = 300
    head_lr: float = 3e-3
    hidden_channels: int = 32
    batch_size: int = 4
    raw_factor: int = 4  # the raw-intensity baseline's cell side (the stride of a cnn3d_small's dense features)
    segmentation_steps: int = 150  # the segmentation head's steps (0: no segmentation)
    segmentation_lr: float = 1e-2

    def validate(self) -> None:
        if not self.structures:
            raise UserError("evaluate.registration.structures is empty: name the label values to score, "
                            "e.g. {liver: 3}")
        if self.moving_channel == self.fixed_channel:
            raise UserError(f"evaluate.registration.moving_channel and fixed_channel are both "
                            f"'{self.moving_channel}'; set fixed_channel to the second acquisition, e.g. exhale")
        for name in ("head_steps", "batch_size", "raw_factor", "hidden_channels"):
            if getattr(self, name) < 1:
                raise UserError(f"evaluate.registration.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def label_channel(self) -> str:
        return self.fixed_label_channel or f"{self.fixed_channel}_label"


@dataclass
class PairedCohort:
    """What the study reads of each subject, in memory: raw volumes (N, 1, D, H, W), label maps (N, D, H, W) uint8,
    true fields (N, 3, D, H, W) float32, landmarks (per subject (K, 3) inhale and exhale voxel positions)."""

    subject_ids: list[str]
    moving: torch.Tensor
    fixed: torch.Tensor
    moving_labels: np.ndarray
    fixed_labels: np.ndarray
    fields: torch.Tensor
    moving_landmarks: list[np.ndarray]
    fixed_landmarks: list[np.ndarray]
    spacing: tuple[float, float, float]


def load_paired_cohort(store: CohortStore, subject_ids: list[str], config: RegistrationConfig) -> PairedCohort:
    """Reads the subjects' pairs, label maps, landmarks and true fields; refuses a store that lacks any of them."""
    moving, fixed, moving_labels, fixed_labels, fields, inhale, exhale = [], [], [], [], [], [], []
    for subject in subject_ids:
        attrs = store.subject_attrs(subject)
        missing = [c for c in (config.moving_channel, config.fixed_channel, config.label_channel)
                   if c not in attrs.get("channels", [])]
        truth = attrs.get("truth", {})
        if missing or "landmarks" not in truth or "breathing" not in truth:
            raise UserError(f"{store.path}: subject {subject} has no {', '.join(missing) or 'landmarks/breathing truth'}"
                            f"; registration needs a breathing pair: regenerate with raf synth "
                            f"cohort.paired_channel={config.fixed_channel}, or set evaluate.registration channels")
        moving.append(np.asarray(store.read(subject, config.moving_channel), dtype=np.float32))
        fixed.append(np.asarray(store.read(subject, config.fixed_channel), dtype=np.float32))
        moving_labels.append(np.asarray(store.read_label(subject), dtype=np.uint8))
        fixed_labels.append(np.asarray(store.read(subject, config.label_channel), dtype=np.uint8))
        fields.append(breathing_field(np.indices(moving[-1].shape, dtype=np.float64), truth["breathing"]))
        inhale.append(np.asarray(truth["landmarks"]["inhale"], dtype=np.float64).reshape(-1, 3))
        exhale.append(np.asarray(truth["landmarks"]["exhale"], dtype=np.float64).reshape(-1, 3))
    spacing = tuple(float(s) for s in store.subject_attrs(subject_ids[0]).get("spacing", [1.0, 1.0, 1.0]))
    return PairedCohort(list(subject_ids), torch.from_numpy(np.stack(moving))[:, None],
                        torch.from_numpy(np.stack(fixed))[:, None], np.stack(moving_labels), np.stack(fixed_labels),
                        torch.from_numpy(np.stack(fields).astype(np.float32)), inhale, exhale, spacing)


def split_subjects(num_subjects: int, *, seed: int, test_fraction: float = 1 / 3) -> tuple[np.ndarray, np.ndarray]:
    """(training, test) subject indices, sorted: a seeded permutation, its first round(test_fraction * N) held out."""
    if not 0 < test_fraction < 1 or num_subjects < 4:
        raise UserError(f"registration needs at least 4 subjects and a test fraction in (0, 1), got {num_subjects} "
                        f"subjects and {test_fraction}")
    order = np.random.default_rng(seed).permutation(num_subjects)
    num_test = max(2, round(test_fraction * num_subjects))
    return np.sort(order[num_test:]), np.sort(order[:num_test])


# ---- scores of predicted fields ------------------------------------------------------------------------------------
def registration_scores(fields_N3DHW: np.ndarray, cohort: PairedCohort, indices: np.ndarray,
                        structures: dict[str, int], *, seed: int, bootstrap_resamples: int) -> dict[str, Any]:
    """TRE (mm, mean over each subject's landmarks) and Dice of the moving label map warped by each field against
    the fixed label map, per structure and mean, with their subject-bootstrap 95% intervals."""
    tre, dice = [], []
    for field_, index in zip(fields_N3DHW, indices):
        tre.append(float(target_registration_error(field_, cohort.moving_landmarks[index],
                                                   cohort.fixed_landmarks[index], cohort.spacing).mean()))
        warped = warp(cohort.moving_labels[index], field_, order=0)
        dice.append(dice_per_structure(warped, cohort.fixed_labels[index], structures))
    per_structure = {name: [case[name] for case in dice] for name in structures}
    mean_dice = [float(np.mean([case[name] for name in structures])) for case in dice]
    return summarise({"tre_mm": tre, "dice": mean_dice, **{f"dice_{k}": v for k, v in per_structure.items()}},
                     seed=seed, bootstrap_resamples=bootstrap_resamples)


def summarise(per_subject: dict[str, list[float]], *, seed: int, bootstrap_resamples: int) -> dict[str, Any]:
    """Means over subjects and their bootstrap 95% intervals (one set of resamples for every metric), plus the
    per-subject values (so a comparison can pair subjects)."""
    arrays = {name: np.asarray(values, dtype=float) for name, values in per_subject.items()}
    intervals = bootstrap_cis(lambda idx: {name: float(v[idx].mean()) for name, v in arrays.items()},
                              len(next(iter(arrays.values()))), seed=seed, num_resamples=bootstrap_resamples)
    return {"mean": {name: float(v.mean()) for name, v in arrays.items()},
            "ci95": {name: list(interval) for name, interval in intervals.items()},
            "per_subject": {name: v.tolist() for name, v in arrays.items()}}


def paired_difference(a_N: np.ndarray, b_N: np.ndarray, *, seed: int, bootstrap_resamples: int) -> dict[str, Any]:
    """Mean of a - b over the same subjects, with its subject-bootstrap 95% interval."""
    difference = np.asarray(a_N, dtype=float) - np.asarray(b_N, dtype=float)
    low, high = bootstrap_cis(lambda idx: {"d": float(difference[idx].mean())}, len(difference), seed=seed,
                              num_resamples=bootstrap_resamples)["d"]
    return {"mean": float(difference.mean()), "ci95": [low, high]}


# ---- the study ------------------------------------------------------------------------------------------------------
def registration_of(encoder: torch.nn.Module, cohort: PairedCohort, train_idx: np.ndarray, test_idx: np.ndarray,
                    config: RegistrationConfig, *, seed: int, bootstrap_resamples: int) -> dict[str, Any]:
    """Fits the registration head on `encoder`'s features of the training pairs; scores it on the test pairs."""
    train_idx, test_idx = np.asarray(train_idx), np.asarray(test_idx)
    with one_thread():
        moving = encoder_features(encoder, cohort.moving[train_idx], batch_size=config.batch_size)
        fixed = encoder_features(encoder, cohort.fixed[train_idx], batch_size=config.batch_size)
        body = torch.from_numpy(cohort.fixed_labels[train_idx] > 0)
        head, fit = fit_registration_head(moving, fixed, cohort.fields[train_idx], body, steps=config.head_steps,
                                          lr=config.head_lr, seed=seed, batch_size=config.batch_size,
                                          hidden_channels=config.hidden_channels)
        del moving, fixed
        predicted = predict_fields(encoder, head, cohort.moving[test_idx], cohort.fixed[test_idx],
                                   batch_size=config.batch_size)
    scores = registration_scores(predicted, cohort, test_idx, config.structures, seed=seed,
                                 bootstrap_resamples=bootstrap_resamples)
    return {**scores, "head_fit": fit}


def segmentation_of(encoder: torch.nn.Module, cohort: PairedCohort, train_idx: np.ndarray, test_idx: np.ndarray,
                    config: RegistrationConfig, *, seed: int, bootstrap_resamples: int) -> dict[str, Any]:
    """Dice of the existing segmentation head (`fit_segmentation_head`) on the moving acquisition, per structure
    and mean, with intervals."""
    num_classes = int(max(cohort.moving_labels.max(), max(config.structures.values()))) + 1
    with one_thread():
        head = fit_segmentation_head(encoder, cohort.moving[train_idx], cohort.moving_labels[train_idx],
                                     num_classes=num_classes, steps=config.segmentation_steps,
                                     lr=config.segmentation_lr, seed=seed, batch_size=config.batch_size)
        masks = predict_masks(encoder, head, cohort.moving[test_idx], batch_size=config.batch_size)
    dice = [dice_per_structure(mask, cohort.moving_labels[index], config.structures)
            for mask, index in zip(masks, test_idx)]
    per_structure = {f"dice_{name}": [case[name] for case in dice] for name in config.structures}
    mean_dice = [float(np.mean([case[name] for name in config.structures])) for case in dice]
    return summarise({"dice": mean_dice, **per_structure}, seed=seed, bootstrap_resamples=bootstrap_resamples)


def registration_baselines(cohort: PairedCohort, train_idx: np.ndarray, test_idx: np.ndarray,
                           config: RegistrationConfig, *, seed: int, bootstrap_resamples: int) -> dict[str, Any]:
    """The identity (no registration: a zero field) and the head on raw intensities (`IntensityGrid`)."""
    test_idx = np.asarray(test_idx)
    zero = np.zeros((len(test_idx), 3, *cohort.moving.shape[2:]), dtype=np.float32)
    return {"identity": registration_scores(zero, cohort, test_idx, config.structures, seed=seed,
                                            bootstrap_resamples=bootstrap_resamples),
            "raw_intensity": registration_of(IntensityGrid(config.raw_factor), cohort, train_idx, test_idx, config,
                                             seed=seed, bootstrap_resamples=bootstrap_resamples)}


def registration_study(entry: EncoderEntry, cohort: PairedCohort, config: RegistrationConfig, *,
                       train_idx: np.ndarray, test_idx: np.ndarray, seed: int, bootstrap_resamples: int = 1000,
                       baselines: bool = False) -> dict[str, Any]:
    """The study of one encoder entry (its first replicate): registration and segmentation scores (JSON data, every
    number: means, 95% intervals, per-subject values), plus the baselines when asked (they do not depend on the
    encoder: compute them once per cohort and split)."""
    config.validate()
    if len(set(np.asarray(train_idx).tolist()) & set(np.asarray(test_idx).tolist())):
        raise UserError("registration_study: the training and test subjects overlap; pass disjoint indices")
    encoder = entry.replicates[0].model.eval()
    options = {"seed": seed, "bootstrap_resamples": bootstrap_resamples}
    out: dict[str, Any] = {"encoder": entry.name, "source": entry.source, "seed": seed, "num_train": len(train_idx),
                           "num_test": len(test_idx), "spacing_mm": list(cohort.spacing),
                           "test_subjects": [cohort.subject_ids[i] for i in test_idx],
                           "registration": registration_of(encoder, cohort, train_idx, test_idx, config, **options)}
    if config.segmentation_steps > 0:
        out["segmentation"] = segmentation_of(encoder, cohort, train_idx, test_idx, config, **options)
    if baselines:
        out["baselines"] = registration_baselines(cohort, train_idx, test_idx, config, **options)
    return out
