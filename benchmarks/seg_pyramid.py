"""The evaluator's segmentation head on frozen encoders: the last feature map alone vs the feature pyramid.

`evaluate.seg_head.dense_features` feeds the head every `forward_pyramid` level from the second finest down,
upsampled and concatenated; an encoder without a pyramid gives only `forward_features` (its last, coarsest map).
This script trains the same head (`fit_segmentation_head`, same seed and steps) on both inputs for each registered
3D encoder family, random init (the head measures what the architecture's features hold at each resolution), on a
synthetic cohort, and prints the test Dice per structure (MONAI's `compute_dice`, empty-vs-empty excluded).

There is no peer library for a frozen-feature head; the two inputs are each other's comparison.

Run:  python benchmarks/seg_pyramid.py [--subjects 40] [--train 30] [--size 32] [--steps 200]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import compute_dice

from rafmedia.engine.encoders import create_encoder
from rafmedia.evaluate.segmentation_head import fit_segmentation_head, predict_masks
from rafmedia.shards.store import StoreConfig
from rafmedia.shards.synth import LABELS, CohortConfig, generate_cohort
from rafmedia.shards.volumes import load_volumes

ENCODERS = {"cnn3d_small": {}, "resnet10_3d": {}, "vit_3d": {}, "swin_3d": {}}
STRUCTURES = [name for name in LABELS if name != "background"]


class LastMapOnly(torch.nn.Module):
    """The encoder without its pyramid: `dense_features` then gives the head `forward_features` alone."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward_features(self, x_BCDHW: torch.Tensor) -> torch.Tensor:
        return self.encoder.forward_features(x_BCDHW)


def dice_by_structure(pred_NDHW: np.ndarray, label_NDHW: np.ndarray) -> list[float]:
    classes = len(LABELS)
    one_hot = [F.one_hot(torch.as_tensor(a).long(), classes).permute(0, 4, 1, 2, 3).float()
               for a in (pred_NDHW, label_NDHW)]
    dice = compute_dice(*one_hot, include_background=False, ignore_empty=True)  # (N, classes - 1), NaN if both empty
    return [float(np.nanmean(column)) for column in dice.numpy().T]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=40)
    parser.add_argument("--train", type=int, default=30, help="subjects the head trains on; the rest are scored")
    parser.add_argument("--size", type=int, default=32, help="volume edge (voxels)")
    parser.add_argument("--steps", type=int, default=200, help="head training steps")
    args = parser.parse_args()
    torch.set_num_threads(2)

    with tempfile.TemporaryDirectory() as folder:
        config = CohortConfig(num_subjects=args.subjects, shape=[args.size] * 3, seed=0, workers=1)
        store = generate_cohort(config, store_config=StoreConfig(chunk_size=16), out=Path(folder) / "cohort.zarr",
                                progress=False)
        ids = store.subject_ids()
        volumes = load_volumes(store, ids, normalize=True, progress=False)
        labels = np.stack([store.read_label(subject) for subject in ids]).astype(np.int64)
    train, test = slice(0, args.train), slice(args.train, None)

    print(f"{args.subjects} subjects at {args.size}^3 (train {args.train}), head steps {args.steps}, random-init "
          f"encoders; Dice per structure on the test subjects\n")
    print(f"| encoder | head input | {' | '.join(STRUCTURES)} | fit + predict |")
    print(f"|---|---|{'---|' * len(STRUCTURES)}---|")
    for name, options in ENCODERS.items():
        for label, as_given in (("last map", LastMapOnly), ("pyramid", lambda encoder: encoder)):
            torch.manual_seed(0)
            encoder = as_given(create_encoder(name, **options).eval())
            start = time.perf_counter()
            head = fit_segmentation_head(encoder, volumes[train], labels[train], num_classes=len(LABELS),
                                         steps=args.steps)
            predicted = predict_masks(encoder, head, volumes[test])
            seconds = time.perf_counter() - start
            dice = dice_by_structure(predicted, labels[test])
            print(f"| {name} | {label} | {' | '.join(f'{d:.3f}' for d in dice)} | {seconds:.0f} s |", flush=True)


if __name__ == "__main__":
    main()
