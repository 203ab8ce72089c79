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
from rafmedia.evaluate.rca import estimate_dice, estimated_gap
from rafmedia.evaluate.scan_level import ProbeFit
from rafmedia.evaluate.segmentation_head import fit_segmentation_head, predict_masks
from rafmedia.evaluate.segmentation_metrics import segmentation_metrics


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    finite = np.isfinite(x) & np.isfinite(y)
    if finite.sum() < 3 or np.std(x[finite]) == 0 or np.std(y[finite]) == 0:
        return float("nan")
    return float(np.corrcoef(x[finite], y[finite])[0, 1])


def _group_means(values_N: np.ndarray, groups_N: np.ndarray) -> dict[str, float]:
    return {str(g): float(np.nanmean(values_N[groups_N == g])) for g in np.unique(groups_N)}


def segmentation_results(encoder: torch.nn.Module, train: LabelledSet, test: LabelledSet,
                         groups: dict[str, np.ndarray], *, config: SegmentationConfig,
                         spacing: tuple[float, float, float], seed: int, bootstrap_resamples: int, permutations: int,
                         min_group_size: int) -> dict[str, Any]:
    """Everything the report's segmentation section shows, for one encoder (module docstring). `groups` label the
    test subjects."""

    num_classes = int(train.labels.max()) + 1
    head = fit_segmentation_head(encoder, train.images, train.labels, num_classes=num_classes,
                                 steps=config.head_steps, lr=config.head_lr, seed=seed)
    predictions = predict_masks(encoder, head, test.images)
    fairness_options = dict(seed=seed, num_resamples=bootstrap_resamples, num_permutations=permutations,
                            min_group_size=min_group_size)
    out: dict[str, Any] = {"structures": list(config.structures), "labelled": test.labels is not None}
    true_dice_N = None
    if test.labels is not None:
        out.update(_true_scores(predictions, test.labels, config, spacing, seed, bootstrap_resamples))
        true_dice_N = np.array(out["dice_per_subject"])
        out["fairness"] = {name: segmentation_fairness(true_dice_N, labels, **fairness_options)
                           for name, labels in groups.items()}
    norms = topology_norms(list(train.labels), config.structures)
    plausible = topology_plausible(list(predictions), norms)
    out["plausibility"] = {"topology_share": float(plausible.mean()), "shape_prior_share": None,
                           "by_group": {name: plausibility_by_group(plausible, labels) for name, labels in groups.items()}}
    if config.shape_prior:
        out["plausibility"].update(_shape_prior_plausibility(config.shape_prior, predictions, train.labels,
                                                             plausible, groups))
    if config.rca_references > 0:
        out["rca"] = _rca(train, test.images, predictions, true_dice_N, groups, config=config, seed=seed)
        if test.labels is None:  # the estimate is all there is: its fairness by group
            estimated = np.nan_to_num(np.array(out["rca"]["estimated_dice"]), nan=0.0)
            out["estimated_fairness"] = {name: segmentation_fairness(estimated, labels, **fairness_options)
                                         for name, labels in groups.items()}
            out["fairness"], out["fairness_source"] = out["estimated_fairness"], "rca_estimate"
    return out


def _true_scores(predictions, labels_NDHW, config, spacing, seed, bootstrap_resamples) -> dict[str, Any]:
    """Metrics Reloaded scores per structure (means, Dice with a subject-bootstrap CI) and each subject's mean Dice."""

    per_case = [segmentation_metrics(pred, ref, labels=config.structures, spacing=spacing,
                                     nsd_tolerance_mm=config.nsd_tolerance_mm) for pred, ref in zip(predictions, labels_NDHW)]
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


def _rca(train: LabelledSet, test_images, predictions, true_dice_N, groups, *, config, seed) -> dict[str, Any]:
    """RCA's Dice estimate of every test prediction from `rca_references` labelled subjects; against the truth when
    the test subjects have labels."""

    references = np.random.default_rng(seed).permutation(len(train.labels))[:config.rca_references]
    estimated = estimate_dice(test_images.numpy(), predictions, train.images.numpy()[references],
                              train.labels[references], structures=config.structures, method=config.rca_method,
                              seed=seed)
    estimated = np.nanmean(estimated, axis=1)  # a structure absent from both maps is undefined, not 0
    out: dict[str, Any] = {"estimated_dice": estimated.tolist(), "num_references": int(len(references)),
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
    trained and scored on the primary probe's split of the evaluated cohort."""
    if data.reference is not None:
        train, test_idx = data.reference, np.arange(len(data.rows))
        test = LabelledSet(data.volumes, data.label_maps)
    else:
        train = LabelledSet(data.volumes[primary.train_idx], data.label_maps[primary.train_idx])
        test_idx = primary.test_idx
        test = LabelledSet(data.volumes[test_idx], data.label_maps[test_idx])
    return segmentation_results(model, train, test, {name: labels[test_idx] for name, labels in data.groups.items()},
                                config=config.segmentation, spacing=data.spacing, seed=seed,
                                bootstrap_resamples=config.bootstrap_resamples, permutations=config.permutations,
                                min_group_size=config.min_group_size)
