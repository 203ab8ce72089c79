"""The pixel-level downstream task of one encoder: a segmentation head on its frozen features, scored per structure
(Metrics Reloaded), by subgroup (Dice gap, skewed error rate), for anatomical plausibility (topology against the
training masks' norms; the shape prior's reconstruction error when one is given) and by reverse classification
accuracy (RCA: Dice estimated without the test ground truth, compared here with the true Dice).

Two set-ups. Without `reference_cohort`, the evaluated cohort's own label maps are used: the head trains on the
first replicate's training subjects and everything is scored on its test subjects, where RCA's estimate can be
checked against the true Dice. With `reference_cohort` (a labelled store), the head trains on it and RCA takes its
references from it, and the evaluated cohort needs no labels: its subjects are scored by RCA's estimated Dice
(by group: an estimated gap and worst group) and by plausibility; if it does have labels, the true scores are
reported beside the estimates.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from rafmedia.engine.tasks.shape import load_shape_prior
from rafmedia.evaluate.cohort_data import CohortData, LabelledSet
from rafmedia.evaluate.config import EvaluateConfig, SegmentationConfig
from rafmedia.evaluate.fairness import segmentation_fairness
from rafmedia.evaluate.metrics import bootstrap_ci
from rafmedia.evaluate.plausibility import (error_threshold, plausibility_by_group, shape_prior_error, topology_norms,
                                            topology_plausible)
from rafmedia.evaluate.rca import estimate_dice, estimated_gap, prepare_references
from rafmedia.evaluate.scan_level import ProbeFit
from rafmedia.evaluate.segmentation_head import encoder_features, fit_head_on_features, predict_masks
from rafmedia.evaluate.segmentation_metrics import segmentation_metrics


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    finite = np.isfinite(x) & np.isfinite(y)
    if finite.sum() < 3 or np.std(x[finite]) == 0 or np.std(y[finite]) == 0:
        return float("nan")
    return float(np.corrcoef(x[finite], y[finite])[0, 1])


def _group_means(values_N: np.ndarray, groups_N: np.ndarray) -> dict[str, float]:
    return {str(g): float(np.nanmean(values_N[groups_N == g])) for g in np.unique(groups_N)}


HEAD_BATCH_SIZE = 4  # volumes per encoder forward and per head step (`fit_segmentation_head`'s default)


def segmentation_results(encoder: torch.nn.Module, train: LabelledSet, test: LabelledSet,
                         groups: dict[str, np.ndarray], *, config: SegmentationConfig,
                         spacing: tuple[float, float, float], seed: int, bootstrap_resamples: int, permutations: int,
                         min_group_size: int) -> dict[str, Any]:
    """Everything the report's segmentation section shows, for one encoder (module docstring). `groups` label the
    test subjects.

    Both sets are read in batches (streamed when their sources are `StoreVolumes`). Kept in memory: the training
    set's encoder features and label maps (the head trains on them for many steps), the RCA references' images and
    labels, and the test set's predicted masks (uint8); the test images and label maps are scored batch by batch.
    """
    features, train_labels, references = _training_set(encoder, train, config=config, seed=seed)
    num_classes = int(train_labels.max()) + 1
    head = fit_head_on_features(features, train_labels, size=tuple(train_labels.shape[1:]), num_classes=num_classes,
                                steps=config.head_steps, lr=config.head_lr, seed=seed, batch_size=HEAD_BATCH_SIZE)
    del features
    train_labels = train_labels.numpy()
    predictions, per_case, estimated = _scored_test_set(encoder, head, test, references, config=config,
                                                        spacing=spacing, seed=seed)
    fairness_options = {"seed": seed, "num_resamples": bootstrap_resamples, "num_permutations": permutations,
                        "min_group_size": min_group_size}
    out: dict[str, Any] = {"structures": list(config.structures), "labelled": test.labels is not None}
    true_dice_N = None
    if test.labels is not None:
        out.update(_true_scores(per_case, config, seed, bootstrap_resamples))
        true_dice_N = np.array(out["dice_per_subject"])
        out["fairness"] = {name: segmentation_fairness(true_dice_N, labels, **fairness_options)
                           for name, labels in groups.items()}
    norms = topology_norms(list(train_labels), config.structures)
    plausible = topology_plausible(list(predictions), norms)
    out["plausibility"] = {"topology_share": float(plausible.mean()), "shape_prior_share": None,
                           "by_group": {name: plausibility_by_group(plausible, labels) for name, labels in groups.items()}}
    if config.shape_prior:
        out["plausibility"].update(_shape_prior_plausibility(config.shape_prior, predictions, train_labels,
                                                             plausible, groups))
    if references is not None:
        out["rca"] = _rca(estimated, len(references[0]), true_dice_N, groups)
        if test.labels is None:  # the estimate is all there is: its fairness by group
            estimated = np.nan_to_num(np.array(out["rca"]["estimated_dice"]), nan=0.0)
            out["estimated_fairness"] = {name: segmentation_fairness(estimated, labels, **fairness_options)
                                         for name, labels in groups.items()}
            out["fairness"], out["fairness_source"] = out["estimated_fairness"], "rca_estimate"
    return out


def _labelled_batches(labelled: LabelledSet, batch_size: int):
    """(images (B, 1, D, H, W), label maps (B, D, H, W) or None) of the set's rows, in batches."""
    images = labelled.images.batches(labelled.indices, batch_size)
    if labelled.labels is None:
        for _, x_BCDHW in images:
            yield x_BCDHW, None
        return
    for (_, x_BCDHW), (_, y_B1DHW) in zip(images, labelled.labels.batches(labelled.indices, batch_size)):
        yield x_BCDHW, y_B1DHW[:, 0]


def _training_set(encoder, train: LabelledSet, *, config: SegmentationConfig, seed: int):
    """The training set's encoder features (N, F, d, h, w) and label maps (N, D, H, W) (uint8 when the values fit),
    and the RCA references (raw images, label maps) drawn from it (None when RCA is off), in one streamed pass."""
    chosen = np.random.default_rng(seed).permutation(len(train))[:config.rca_references]
    wanted = {int(position): slot for slot, position in enumerate(chosen)}
    features, labels, reference_images, reference_labels = [], [], [None] * len(chosen), [None] * len(chosen)
    position = 0
    for x_BCDHW, y_BDHW in _labelled_batches(train, HEAD_BATCH_SIZE):
        features.append(encoder_features(encoder, x_BCDHW, batch_size=HEAD_BATCH_SIZE))
        narrow = y_BDHW.min() >= 0 and y_BDHW.max() <= 255
        labels.append(y_BDHW.to(torch.uint8) if narrow else y_BDHW)
        for j in range(len(x_BCDHW)):
            if position + j in wanted:
                reference_images[wanted[position + j]] = x_BCDHW[j, 0].numpy().copy()
                reference_labels[wanted[position + j]] = y_BDHW[j].numpy().copy()
        position += len(x_BCDHW)
    references = (np.stack(reference_images), np.stack(reference_labels)) if len(chosen) else None
    return torch.cat(features), torch.cat(labels), references


def _scored_test_set(encoder, head, test: LabelledSet, references, *, config: SegmentationConfig, spacing, seed):
    """The test set in one streamed pass: predicted masks (N, D, H, W) uint8, Metrics Reloaded scores of each case
    (when labelled) and RCA's Dice estimate of each case per structure (when `references`)."""
    prepared = None if references is None else prepare_references(references[0], method=config.rca_method)
    predictions, per_case, estimated, first_case = [], [], [], 0
    for x_BCDHW, y_BDHW in _labelled_batches(test, HEAD_BATCH_SIZE):
        masks = predict_masks(encoder, head, x_BCDHW, batch_size=HEAD_BATCH_SIZE)
        if y_BDHW is not None:
            per_case += [segmentation_metrics(pred, ref, labels=config.structures, spacing=spacing,
                                              nsd_tolerance_mm=config.nsd_tolerance_mm)
                         for pred, ref in zip(masks, y_BDHW.numpy())]
        if references is not None:
            estimated.append(estimate_dice(x_BCDHW.numpy(), masks, *references, structures=config.structures,
                                           method=config.rca_method, seed=seed, first_case=first_case,
                                           prepared_references=prepared))
        predictions.append(masks)
        first_case += len(masks)
    return np.concatenate(predictions), per_case, (np.concatenate(estimated) if estimated else None)


def _true_scores(per_case, config, seed, bootstrap_resamples) -> dict[str, Any]:
    """Metrics Reloaded scores per structure (means, Dice with a subject-bootstrap CI) and each subject's mean Dice."""

    names = list(config.structures)
    dice_NS = np.array([[case[s]["dice"] for s in names] for case in per_case])
    per_structure = {}
    for k, s in enumerate(names):
        per_structure[s] = {metric: float(np.mean([case[s][metric] for case in per_case]))
                            for metric in ("dice", "hd95", "nsd")}
        per_structure[s]["dice_ci95"] = list(bootstrap_ci(lambda idx, k=k: float(dice_NS[idx, k].mean()), len(dice_NS),
                                                          seed=seed, num_resamples=bootstrap_resamples))
    return {"per_structure": per_structure, "dice_per_subject": dice_NS.mean(axis=1).tolist()}


def _shape_prior_plausibility(path: str, predictions, train_labels, topology_ok, groups) -> dict[str, Any]:
    """Plausible = within the topology norms and a reconstruction error at most the training masks' 95th centile."""

    prior, _ = load_shape_prior(path)
    threshold = error_threshold(shape_prior_error(prior, train_labels))
    errors = shape_prior_error(prior, predictions)
    plausible = topology_ok & (errors <= threshold)
    return {"shape_prior_share": float((errors <= threshold).mean()), "shape_prior_threshold": threshold,
            "shape_prior_error_mean": float(errors.mean()), "combined_share": float(plausible.mean()),
            "combined_by_group": {name: plausibility_by_group(plausible, labels) for name, labels in groups.items()}}


def _rca(estimated_NS, num_references: int, true_dice_N, groups) -> dict[str, Any]:
    """RCA's Dice estimates of the test predictions from `num_references` labelled subjects, by group; against the
    truth when the test subjects have labels."""

    estimated = np.nanmean(estimated_NS, axis=1)  # a structure absent from both maps is undefined, not 0
    out: dict[str, Any] = {"estimated_dice": estimated.tolist(), "num_references": int(num_references),
                           "estimated_gap": {}, "worst_group": {}}
    if true_dice_N is not None:
        out.update({"pearson": _pearson(estimated, true_dice_N), "true_dice": true_dice_N.tolist(), "true_gap": {},
                    "sign_right": {}})
    for name, labels in groups.items():
        guess = estimated_gap(estimated, labels)
        out["estimated_gap"][name] = guess["gap"]
        out["worst_group"][name] = {"estimated": guess["worst_group"]}
        if true_dice_N is None:
            continue
        true = _group_means(true_dice_N, labels)
        true_gap = max(true.values()) - min(true.values()) if len(true) > 1 else float("nan")
        out["true_gap"][name] = true_gap
        out["worst_group"][name]["true"] = min(true, key=true.get)
        # the worst group found without labels is the true one (undefined when the groups do not differ)
        out["sign_right"][name] = (out["worst_group"][name]["true"] == guess["worst_group"]
                                   if np.isfinite(true_gap) and true_gap > 0 else None)
    return out


def pixel_level_results(model: torch.nn.Module, primary: ProbeFit, data: CohortData, config: EvaluateConfig, *,
                        seed: int) -> dict[str, Any]:
    """The segmentation stage: trained on the reference cohort and scored on every subject when there is one, else
    trained and scored on the primary probe's split of the evaluated cohort (volumes streamed from the stores)."""
    if data.reference is not None:
        train, test_idx = data.reference, np.arange(len(data.rows))
    else:
        train, test_idx = LabelledSet(data.volumes, data.label_maps, primary.train_idx), primary.test_idx
    test = LabelledSet(data.volumes, data.label_maps, test_idx)
    return segmentation_results(model, train, test, {name: labels[test_idx] for name, labels in data.groups.items()},
                                config=config.segmentation, spacing=data.spacing, seed=seed,
                                bootstrap_resamples=config.bootstrap_resamples, permutations=config.permutations,
                                min_group_size=config.min_group_size)
