"""A shape-prior denoising autoencoder on label maps, to score the anatomical plausibility of predicted masks.

`shape_prior_dae` (registered with `data="label"`) follows Post-DAE (Larrazabal et al., IEEE TMI 2020) and the
shape prior of ACNN (Oktay et al., IEEE TMI 2018): label maps are one-hot encoded, corrupted (blocks erased or
pasted from elsewhere, blobs whose labels are swapped, one structure's border eroded or dilated), and the
registered encoder plus a small decoder learn to give back the clean map. Learning only from plausible
anatomy, the autoencoder reconstructs a plausible mask almost unchanged and pulls an implausible one (holes,
stray blobs) towards the nearest plausible shape, so `reconstruction_error` (1 - Dice between a mask and its
reconstruction) is low for plausible masks and high for implausible ones; the evaluator uses it as a score.

The decoder has no skip connections on purpose: a skip would let the input through unchanged and no prior
would be learned. The encoder must take `num_classes` input channels (`encoder.options.in_channels`).
`export_extra` writes the whole autoencoder as `shape_prior.safetensors` plus a JSON card; `load_shape_prior`
rebuilds it (both through `rafmedia.engine.export`, the encoders' weights-plus-card mechanism).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rafmedia.core.errors import UserError
from rafmedia.core.files import read_json
from rafmedia.engine.encoders import create_encoder
from rafmedia.engine.export import CARD_SUFFIX, ENCODER_FORMAT, load_weights, read_card, save_with_card
from rafmedia.engine.tasks.base import TASKS
from rafmedia.engine.views import crop, random_crop_starts

SHAPE_PRIOR_FILE = "shape_prior.safetensors"
CARD_FORMAT = "rafmedia.shape_prior/1"


# ---------------------------------------------------------------------------------------------- views
def label_indices(label_maps: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, 1, D, H, W) or (B, D, H, W) float class indices -> (B, D, H, W) int64, checked against `num_classes`."""
    indices = label_maps[:, 0] if label_maps.ndim == 5 else label_maps
    indices = (indices.round() if indices.is_floating_point() else indices).long()
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= num_classes):
        raise UserError(f"the label maps hold classes {int(indices.min())}..{int(indices.max())} but num_classes is "
                        f"{num_classes}; set task.options.num_classes={int(indices.max()) + 1} (and "
                        f"encoder.options.in_channels to the same)")
    return indices


def one_hot(indices_BDHW: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, D, H, W) int64 -> (B, K, D, H, W) float32."""
    return F.one_hot(indices_BDHW, num_classes).permute(0, 4, 1, 2, 3).float()


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """One integer in [low, high] (inclusive)."""
    return int(torch.randint(low, high + 1, (1,), generator=generator))


def _random_box(generator: torch.Generator, shape, max_size: int) -> tuple[slice, ...]:
    sides = [_randint(generator, 2, max(2, min(max_size, size))) for size in shape]
    starts = [_randint(generator, 0, size - side) for size, side in zip(shape, sides)]
    return tuple(slice(start, start + side) for start, side in zip(starts, sides))


def corrupt_blocks(indices_DHW: torch.Tensor, generator: torch.Generator, num_blocks: int, max_size: int) -> None:
    """In place: `num_blocks` boxes (sides 2..`max_size`), each erased to background or, with probability 1/2,
    overwritten by a same-size box copied from elsewhere in the map."""
    for _ in range(num_blocks):
        box = _random_box(generator, indices_DHW.shape, max_size)
        if float(torch.rand((), generator=generator)) < 0.5:
            indices_DHW[box] = 0
        else:
            starts = [_randint(generator, 0, size - (s.stop - s.start)) for size, s in zip(indices_DHW.shape, box)]
            source = tuple(slice(start, start + s.stop - s.start) for start, s in zip(starts, box))
            indices_DHW[box] = indices_DHW[source].clone()


def corrupt_blobs(indices_DHW: torch.Tensor, generator: torch.Generator, num_blobs: int, max_radius: float,
                  num_classes: int) -> None:
    """In place: inside `num_blobs` balls (radius U(1, `max_radius`) voxels), labels are permuted at random."""
    grid = torch.stack(torch.meshgrid(*(torch.arange(size, dtype=torch.float32) for size in indices_DHW.shape),
                                      indexing="ij"))
    for _ in range(num_blobs):
        center = torch.rand(3, generator=generator) * torch.tensor(indices_DHW.shape, dtype=torch.float32)
        radius = 1.0 + (max_radius - 1.0) * float(torch.rand((), generator=generator))
        permutation = torch.randperm(num_classes, generator=generator)
        inside = ((grid - center.view(3, 1, 1, 1)) ** 2).sum(dim=0) <= radius**2
        indices_DHW[inside] = permutation[indices_DHW[inside]]


def corrupt_boundary(indices_DHW: torch.Tensor, generator: torch.Generator, probability: float,
                     num_classes: int) -> None:
    """In place, with `probability`: one foreground class present in the map is dilated by one voxel (its
    26-neighbours take its label) or eroded by one voxel (its border becomes background), either with
    probability 1/2."""
    chance, dilate = torch.rand(2, generator=generator).tolist()
    present = [c for c in torch.unique(indices_DHW).tolist() if c > 0]
    choice = _randint(generator, 0, num_classes - 1)
    if chance >= probability or not present:
        return
    target = present[choice % len(present)]
    mask = (indices_DHW == target).float()[None, None]
    if dilate < 0.5:
        indices_DHW[F.max_pool3d(mask, 3, stride=1, padding=1)[0, 0] > 0] = target
    else:
        eroded = 1 - F.max_pool3d(1 - mask, 3, stride=1, padding=1)
        indices_DHW[(mask - eroded)[0, 0] > 0] = 0


@dataclass
class LabelCorruptionViews:
    """Crops label maps (or takes them whole when `crop_size` is None), one-hot encodes them and corrupts a copy.

    Returns `{"corrupted", "clean"}`, each (B, `num_classes`, d, h, w) float32 one-hot. Every draw comes from the
    generator. At most `num_blocks * max_block_size**3` voxels change through blocks, `num_blobs` balls of radius
    `max_blob_radius` through blobs, and the one-voxel rim of one structure through the boundary change.
    """

    num_classes: int = 6
    crop_size: int | None = 32
    num_blocks: int = 2
    max_block_size: int = 8
    num_blobs: int = 2
    max_blob_radius: float = 4.0
    boundary_probability: float = 0.5

    def __call__(self, label_maps_BCDHW: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        if label_maps_BCDHW.ndim != 5 or label_maps_BCDHW.shape[1] != 1:
            raise UserError(f"shape_prior_dae takes label maps (B, 1, D, H, W) as float class indices, got shape "
                            f"{tuple(label_maps_BCDHW.shape)}")
        if self.crop_size is not None:
            starts = random_crop_starts(generator, label_maps_BCDHW.shape[2:], self.crop_size, len(label_maps_BCDHW))
            label_maps_BCDHW = crop(label_maps_BCDHW, starts, self.crop_size)
        clean = label_indices(label_maps_BCDHW, self.num_classes)
        corrupted = clean.clone()
        for sample in corrupted:
            corrupt_blocks(sample, generator, self.num_blocks, self.max_block_size)
            corrupt_blobs(sample, generator, self.num_blobs, self.max_blob_radius, self.num_classes)
            corrupt_boundary(sample, generator, self.boundary_probability, self.num_classes)
        return {"corrupted": one_hot(corrupted, self.num_classes), "clean": one_hot(clean, self.num_classes)}


# ---------------------------------------------------------------------------------------------- model
def check_input_channels(encoder: nn.Module, num_classes: int, probe_size: int) -> torch.Size:
    """Checks that `encoder` takes `num_classes` channels; returns its feature shape for a (1, K, s, s, s) probe.

    The first Conv3d's `in_channels` gives the clearest message; encoders without one (2D slice backbones) are
    checked by the probe forward alone, run in eval mode so BatchNorm statistics are left as they were.
    """
    fix = f"set encoder.options.in_channels={num_classes} (the shape prior sees one channel per class)"
    first = next((module for module in encoder.modules() if isinstance(module, nn.Conv3d)), None)
    if first is not None and first.in_channels != num_classes:
        raise UserError(f"shape_prior_dae feeds the encoder {num_classes} one-hot channels (num_classes) but its "
                        f"first convolution takes {first.in_channels}; {fix}")
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            return encoder.forward_features(torch.zeros(1, num_classes, probe_size, probe_size, probe_size)).shape
    except RuntimeError as error:
        raise UserError(f"the encoder could not run on a (1, {num_classes}, {probe_size}, {probe_size}, {probe_size}) "
                        f"one-hot input ({error}); {fix}, and a crop_size the encoder accepts") from error
    finally:
        encoder.train(was_training)


class ShapeDecoder(nn.Module):
    """Feature map (B, F, d, h, w) -> class logits: `num_upsamplings` stages of (2x transposed conv, conv), the
    width halving down to `width`; the logits are resized to the requested size at the end."""

    def __init__(self, in_channels: int, num_classes: int, num_upsamplings: int, width: int = 16):
        super().__init__()
        widths = [width * 2 ** max(num_upsamplings - 1 - stage, 0) for stage in range(num_upsamplings)]
        layers: list[nn.Module] = []
        channels = in_channels
        for out_channels in widths:
            layers += [nn.ConvTranspose3d(channels, out_channels, kernel_size=2, stride=2, bias=False),
                       nn.BatchNorm3d(out_channels), nn.ReLU(inplace=True),
                       nn.Conv3d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
                       nn.BatchNorm3d(out_channels), nn.ReLU(inplace=True)]
            channels = out_channels
        self.stages = nn.Sequential(*layers)
        self.classify = nn.Conv3d(channels, num_classes, kernel_size=1)

    def forward(self, features_BFDHW: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
        logits = self.classify(self.stages(features_BFDHW))
        if tuple(logits.shape[2:]) != tuple(size):
            logits = F.interpolate(logits, size=size, mode="trilinear", align_corners=False)
        return logits


def soft_dice_loss(probabilities_BKDHW: torch.Tensor, target_BKDHW: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - mean over samples and classes of (2 sum(p t) + s) / (sum(p) + sum(t) + s)."""
    dims = (2, 3, 4)
    overlap = (probabilities_BKDHW * target_BKDHW).sum(dim=dims)
    total = probabilities_BKDHW.sum(dim=dims) + target_BKDHW.sum(dim=dims)
    return 1 - ((2 * overlap + smooth) / (total + smooth)).mean()


def foreground_dice(a_BDHW: torch.Tensor, b_BDHW: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per sample, the mean Dice of classes 1..K-1 present in either map (1 where neither has foreground)."""
    scores = []
    for a, b in zip(a_BDHW, b_BDHW):
        dices = [2 * ((a == c) & (b == c)).sum() / ((a == c).sum() + (b == c).sum())
                 for c in range(1, num_classes) if ((a == c) | (b == c)).any()]
        scores.append(torch.stack(dices).float().mean() if dices else torch.tensor(1.0))
    return torch.stack(scores)


class ShapePriorDAE(nn.Module):
    """Encoder + decoder trained to map corrupted one-hot label maps back to the clean ones (CE + soft Dice)."""

    def __init__(self, encoder: nn.Module, views: LabelCorruptionViews, *, decoder_width: int = 16,
                 dice_weight: float = 1.0, num_upsamplings: int | None = None, probe_size: int | None = None):
        super().__init__()
        self.encoder, self.views, self.dice_weight = encoder, views, dice_weight
        self.num_classes = views.num_classes
        probe_size = probe_size or views.crop_size or _encoder_input_size(encoder)
        features = check_input_channels(encoder, self.num_classes, probe_size)
        if num_upsamplings is None:  # enough 2x stages to get back from the feature grid to the input's
            num_upsamplings = max(0, round(math.log2(probe_size / min(features[2:]))))
        self.decoder_options = {"in_channels": int(features[1]), "num_upsamplings": int(num_upsamplings),
                                "width": decoder_width}
        self.decoder = ShapeDecoder(num_classes=self.num_classes, **self.decoder_options)

    def logits(self, onehot_BKDHW: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder.forward_features(onehot_BKDHW), tuple(onehot_BKDHW.shape[2:]))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self.logits(batch["corrupted"])
        target = batch["clean"]
        cross_entropy = F.cross_entropy(logits, target.argmax(dim=1))
        dice = soft_dice_loss(logits.softmax(dim=1), target)
        with torch.no_grad():
            voxel_accuracy = (logits.argmax(dim=1) == target.argmax(dim=1)).float().mean()
        return {"loss": cross_entropy + self.dice_weight * dice, "cross_entropy": cross_entropy.detach(),
                "soft_dice_loss": dice.detach(), "voxel_accuracy": voxel_accuracy}

    def reconstruct(self, onehot_BKDHW: torch.Tensor) -> torch.Tensor:
        """Class probabilities (B, K, D, H, W) of the reconstruction of one-hot label maps."""
        return self.logits(onehot_BKDHW).softmax(dim=1)

    @torch.no_grad()
    def reconstruction_error(self, label_maps: torch.Tensor) -> torch.Tensor:
        """Per-sample implausibility of label maps ((B, 1, D, H, W) or (B, D, H, W) class indices): 1 - the mean
        foreground Dice between each map and the argmax of its reconstruction, in [0, 1] (0: reproduced exactly).

        Runs in eval mode (BatchNorm running statistics) and restores the previous mode. The maps' size must be
        one the encoder accepts (the training crop size for a ViT).
        """
        was_training = self.training
        self.eval()
        try:
            indices = label_indices(label_maps, self.num_classes)
            device = next(self.parameters()).device
            reconstruction = self.logits(one_hot(indices, self.num_classes).to(device)).argmax(dim=1).cpu()
            return 1 - foreground_dice(indices, reconstruction, self.num_classes)
        finally:
            self.train(was_training)

    # ---- export
    def export_extra(self, out_dir: str | Path, *, architecture: str | None = None,
                     options: dict[str, Any] | None = None) -> list[Path]:
        """Writes the whole autoencoder as `out_dir/shape_prior.safetensors` and its JSON card; returns both paths.

        The card names the encoder's registered `architecture` and `options` so `load_shape_prior` can rebuild
        it; when not given they are read from the encoder card the pretraining exported into `out_dir` first.
        """
        out_dir = Path(out_dir)
        if architecture is None:
            architecture, options = _exported_encoder(out_dir)
        card = {"format": CARD_FORMAT, "architecture": architecture, "options": dict(options or {}),
                "num_classes": self.num_classes, "decoder": self.decoder_options, "dice_weight": self.dice_weight,
                "views": {"crop_size": self.views.crop_size},
                "score": "reconstruction_error = 1 - mean foreground Dice(mask, argmax reconstruction)"}
        return list(save_with_card(self, out_dir / SHAPE_PRIOR_FILE, card, metadata={"format": CARD_FORMAT}))


def _encoder_input_size(encoder: nn.Module) -> int:
    size = getattr(encoder, "img_size", None)  # ViTs take one input size only
    return int(size[0] if isinstance(size, (tuple, list)) else size) if size is not None else 32


def _exported_encoder(out_dir: Path) -> tuple[str, dict[str, Any]]:
    cards = [read_json(path) for path in sorted(out_dir.glob(f"*{CARD_SUFFIX}"))]
    encoders = [card for card in cards if card.get("format") == ENCODER_FORMAT]
    if len(encoders) != 1:
        raise UserError(f"{out_dir} holds {len(encoders)} exported encoder cards, so the shape prior's encoder "
                        "architecture is unknown; call export_extra(out_dir, architecture=..., options=...)")
    return encoders[0]["architecture"], encoders[0].get("options", {})


def load_shape_prior(weights: str | Path) -> tuple[ShapePriorDAE, dict[str, Any]]:
    """Rebuilds an exported shape prior from its card and safetensors weights; returns (model in eval mode, card)."""
    card = read_card(weights, card_format=CARD_FORMAT, what="shape prior",
                     how_to_export="export it with ShapePriorDAE.export_extra")
    encoder = create_encoder(card["architecture"], **card.get("options", {}))
    decoder = card["decoder"]
    views = LabelCorruptionViews(num_classes=card["num_classes"], crop_size=card["views"]["crop_size"])
    model = ShapePriorDAE(encoder, views, decoder_width=decoder["width"], dice_weight=card["dice_weight"],
                          num_upsamplings=decoder["num_upsamplings"])
    return load_weights(model, weights, card), card


@TASKS.register("shape_prior_dae", data="label", options_from=LabelCorruptionViews)
def shape_prior_dae(encoder: nn.Module, num_classes: int = 6, decoder_width: int = 16, dice_weight: float = 1.0,
                    **view_options) -> nn.Module:
    """`view_options` are the other `LabelCorruptionViews` settings (crop_size, num_blocks, num_blobs, ...)."""
    if num_classes < 2:
        raise UserError(f"shape_prior_dae: num_classes counts background too and must be >= 2, got {num_classes}")
    views = LabelCorruptionViews(num_classes=num_classes, **view_options)
    return ShapePriorDAE(encoder, views, decoder_width=decoder_width, dice_weight=dice_weight)
