"""The pixel-level downstream task of one encoder: a segmentation head on its frozen features, scored per structure
(Metrics Reloaded), by subgroup (Dice gap, skewed error rate), for anatomical plausibility (topology against the
training masks' norms; the shape prior's reconstruction error when one is given) and by reverse classification
accuracy (RCA: Dice estimated without the test ground truth, compared here with the true Dice).

Runs on the first replicate's split: the head trains on the training subjects' label maps, everything is scored on
the test subjects.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from rafmedia.engine.errors import UserError


@dataclass
class SegmentationConfig:
    """`evaluate.segmentation`: off unless `enabled`; needs a label channel in the cohort."""

    enabled: bool = False
    channel: str = "label"
    structures: dict[str, int] = field(default_factory=lambda: {"body": 1, "heart": 2, "liver": 3, "kidney": 4})
    head_steps: int = 150
    head_lr: float = 1e-2
    nsd_tolerance_mm: float = 2.0
    shape_prior: str = ""  # shape_prior.safetensors of a shape_prior_dae run: adds the reconstruction-error score
    rca_references: int = 8  # training subjects used as RCA's reference set (0: no RCA)
    rca_method: str = "voxel_classifier"

    def validate(self) -> None:
        if self.enabled and not self.structures:
            raise UserError("evaluate.segmentation.structures is empty: name the label values to score, "
                            "e.g. {heart: 2, liver: 3}")


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    finite = np.isfinite(x) & np.isfinite(y)
    if finite.sum() < 3 or np.std(x[finite]) == 0 or np.std(y[finite]) == 0:
        return float("nan")
    return float(np.corrcoef(x[finite], y[finite])[0, 1])


def _group_means(values_N: np.ndarray, groups_N: np.ndarray) -> dict[str, float]:
    return {str(g): float(np.nanmean(values_N[groups_N == g])) for g in np.unique(groups_N)}


def segmentation_results(encoder: torch.nn.Module, images_NCDHW: torch.Tensor, labels_NDHW: np.ndarray,
                         train_idx: np.ndarray, test_idx: np.ndarray, groups: dict[str, np.ndarray], *,
                         config: SegmentationConfig, spacing: tuple[float, float, float], seed: int,
                         bootstrap_resamples: int, permutations: int, min_group_size: int) -> dict[str, Any]:
    """Everything the report's segmentation section shows, for one encoder (module docstring)."""
    from rafmedia.evaluate.fairness import segmentation_fairness
    from rafmedia.evaluate.metrics import bootstrap_ci
    from rafmedia.evaluate.plausibility import plausibility_by_group, topology_norms, topology_plausible
    from rafmedia.evaluate.seg_head import fit_segmentation_head, predict_masks
    from rafmedia.evaluate.segmentation import segmentation_metrics

    num_classes = int(labels_NDHW.max()) + 1
    head = fit_segmentation_head(encoder, images_NCDHW[train_idx], labels_NDHW[train_idx], num_classes=num_classes,
                                 steps=config.head_steps, lr=config.head_lr, seed=seed)
    predictions = predict_masks(encoder, head, images_NCDHW[test_idx])
    per_case = [segmentation_metrics(pred, labels_NDHW[i], labels=config.structures, spacing=spacing,
                                     nsd_tolerance_mm=config.nsd_tolerance_mm) for pred, i in zip(predictions, test_idx)]
    names = list(config.structures)
    dice_NS = np.array([[case[s]["dice"] for s in names] for case in per_case])
    per_structure = {}
    for k, s in enumerate(names):
        per_structure[s] = {metric: float(np.mean([case[s][metric] for case in per_case]))
                            for metric in ("dice", "hd95", "nsd")}
        per_structure[s]["dice_ci95"] = list(bootstrap_ci(lambda idx, k=k: float(dice_NS[idx, k].mean()), len(dice_NS),
                                                          seed=seed, num_resamples=bootstrap_resamples))
    dice_N = dice_NS.mean(axis=1)  # each subject's mean Dice over the structures
    test_groups = {name: labels[test_idx] for name, labels in groups.items()}
    fairness = {name: segmentation_fairness(dice_N, labels, seed=seed, num_resamples=bootstrap_resamples,
                                            num_permutations=permutations, min_group_size=min_group_size)
                for name, labels in test_groups.items()}
    norms = topology_norms([labels_NDHW[i] for i in train_idx], config.structures)
    plausible = topology_plausible(list(predictions), norms)
    plausibility = {"topology_share": float(plausible.mean()), "shape_prior_share": None,
                    "by_group": {name: plausibility_by_group(plausible, labels) for name, labels in test_groups.items()}}
    if config.shape_prior:
        plausibility.update(_shape_prior_plausibility(config.shape_prior, predictions, labels_NDHW[train_idx],
                                                      plausible, test_groups))
    out = {"structures": names, "per_structure": per_structure, "dice_per_subject": dice_N.tolist(),
           "fairness": fairness, "plausibility": plausibility}
    if config.rca_references > 0:
        out["rca"] = _rca(images_NCDHW, predictions, labels_NDHW, train_idx, test_idx, dice_N, test_groups,
                          config=config, seed=seed)
    return out


def _shape_prior_plausibility(path: str, predictions, train_labels, topology_ok, groups) -> dict[str, Any]:
    """Plausible = within the topology norms and a reconstruction error at most the training masks' 95th centile."""
    from rafmedia.engine.tasks_shape import load_shape_prior
    from rafmedia.evaluate.plausibility import error_threshold, plausibility_by_group, shape_prior_error

    prior, _ = load_shape_prior(path)
    threshold = error_threshold(shape_prior_error(prior, train_labels))
    errors = shape_prior_error(prior, predictions)
    plausible = topology_ok & (errors <= threshold)
    return {"shape_prior_share": float((errors <= threshold).mean()), "shape_prior_threshold": threshold,
            "shape_prior_error_mean": float(errors.mean()), "combined_share": float(plausible.mean()),
            "combined_by_group": {name: plausibility_by_group(plausible, labels) for name, labels in groups.items()}}


def _rca(images, predictions, labels_NDHW, train_idx, test_idx, true_dice_N, groups, *, config, seed) -> dict[str, Any]:
    """RCA's Dice estimate of every test prediction from `rca_references` training subjects, against the truth."""
    from rafmedia.evaluate.rca import estimate_dice, estimated_gap

    references = np.random.default_rng(seed).permutation(train_idx)[:config.rca_references]
    image_array = images.numpy()
    estimated = estimate_dice(image_array[test_idx], predictions, image_array[references], labels_NDHW[references],
                              structures=config.structures, method=config.rca_method, seed=seed)
    estimated = np.nanmean(estimated, axis=1)  # a structure absent from both maps is undefined, not 0
    out = {"pearson": _pearson(estimated, true_dice_N), "true_dice": true_dice_N.tolist(),
           "estimated_dice": estimated.tolist(), "num_references": int(len(references)),
           "true_gap": {}, "estimated_gap": {}, "sign_right": {}, "worst_group": {}}
    for name, labels in groups.items():
        true, guess = _group_means(true_dice_N, labels), estimated_gap(estimated, labels)
        true_gap = max(true.values()) - min(true.values()) if len(true) > 1 else float("nan")
        out["true_gap"][name], out["estimated_gap"][name] = true_gap, guess["gap"]
        out["worst_group"][name] = {"true": min(true, key=true.get), "estimated": guess["worst_group"]}
        # the worst group found without labels is the true one (undefined when the groups do not differ)
        out["sign_right"][name] = (out["worst_group"][name]["true"] == out["worst_group"][name]["estimated"]
                                   if np.isfinite(true_gap) and true_gap > 0 else None)
    return out
