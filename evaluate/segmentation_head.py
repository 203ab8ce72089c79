"""The pixel-level downstream task: a light segmentation head trained on a frozen encoder's feature maps.

As linear probing does for scan-level tasks (and as dinov2 evaluates segmentation with a linear head on frozen
patch features), only the head learns, so the score measures what the encoder's features already hold. The
head is 1x1x1 convolutions on the feature map (B, F, d, h, w) of the encoder contract (`forward_features`),
its logits upsampled trilinearly to the input size. Features are computed once, under `no_grad` and in eval
mode, and cached; each feature channel is standardised with the training set's mean and standard deviation (as
the scan-level probes standardise embeddings), so encoders with very different feature scales train with the
same learning rate. The loss is cross-entropy + soft Dice (MONAI's `DiceCELoss`, softmax over classes).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import nn

from rafmedia.core.errors import UserError
from rafmedia.shards.volumes import normalize_intensity


class SegmentationHead(nn.Module):
    """Standardise features, 1x1x1 conv (-> ReLU -> 1x1x1 conv when `hidden_channels` > 0), upsample trilinearly.

    Args:
        in_channels: the encoder's feature channels F (`encoder.embed_dim` for the registered encoders).
        num_classes: K, background included.
        hidden_channels: width of the hidden 1x1x1 layer; 0 makes the head linear.
    """

    def __init__(self, in_channels: int, num_classes: int, *, hidden_channels: int = 32):
        super().__init__()
        if hidden_channels > 0:
            self.classify = nn.Sequential(nn.Conv3d(in_channels, hidden_channels, kernel_size=1), nn.ReLU(),
                                          nn.Conv3d(hidden_channels, num_classes, kernel_size=1))
        else:
            self.classify = nn.Conv3d(in_channels, num_classes, kernel_size=1)
        self.register_buffer("feature_mean", torch.zeros(1, in_channels, 1, 1, 1))
        self.register_buffer("feature_std", torch.ones(1, in_channels, 1, 1, 1))
        self.num_classes = num_classes

    def set_feature_statistics(self, features_NFDHW: torch.Tensor) -> None:
        """Per-channel mean and standard deviation over samples and positions (a channel's std floored at 1e-6)."""
        self.feature_mean.copy_(features_NFDHW.mean(dim=(0, 2, 3, 4), keepdim=True))
        self.feature_std.copy_(features_NFDHW.std(dim=(0, 2, 3, 4), keepdim=True).clamp(min=1e-6))

    def forward(self, features_BFDHW: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
        """Class logits (B, K, *size) for encoder features (B, F, d, h, w)."""
        logits = self.classify((features_BFDHW - self.feature_mean) / self.feature_std)
        return F.interpolate(logits, size=tuple(size), mode="trilinear", align_corners=False)


def _device(module: nn.Module) -> torch.device:
    return next(iter(module.parameters()), torch.empty(0)).device


@torch.no_grad()
def encoder_features(encoder: nn.Module, volumes_NCDHW: torch.Tensor | np.ndarray, *,
                     batch_size: int) -> torch.Tensor:
    """The frozen encoder's dense feature maps (N, F, d, h, w) of z-scored volumes (`dense_features`), in eval mode
    (restored after).

    Volumes are z-scored per volume (`rafmedia.shards.volumes.normalize_intensity`); z-scoring is idempotent, so
    volumes from `load_volumes(normalize=True)` come out the same.
    """
    volumes = torch.as_tensor(volumes_NCDHW)
    if volumes.ndim != 5:
        raise UserError(f"volumes must be (N, C, D, H, W), got shape {tuple(volumes.shape)}; add the channel axis "
                        "with volumes[:, None]")
    was_training, device = encoder.training, _device(encoder)
    encoder.eval()
    try:
        chunks = [dense_features(encoder, normalize_intensity(volumes[start:start + batch_size]).to(device))
                  for start in range(0, len(volumes), batch_size)]
    finally:
        encoder.train(was_training)
    return torch.cat(chunks)


def dense_features(encoder: nn.Module, x_BCDHW: torch.Tensor) -> torch.Tensor:
    """`forward_features`, or, for encoders with `forward_pyramid` (the CNNs and Swin), every level from the second
    finest down, upsampled to the second-finest level's size and concatenated: the last map alone is too coarse to
    segment small structures, and the finest (stem) level would cost eight times the memory."""
    if not hasattr(encoder, "forward_pyramid"):
        return encoder.forward_features(x_BCDHW)
    levels = encoder.forward_pyramid(x_BCDHW)
    levels = levels[1:] if len(levels) > 2 else levels
    size = levels[0].shape[2:]
    return torch.cat([levels[0], *[F.interpolate(level, size=size, mode="trilinear", align_corners=False)
                                   for level in levels[1:]]], dim=1)


def _check_labels(labels_NDHW, volumes_NCDHW, num_classes: int) -> torch.Tensor:
    labels = torch.as_tensor(np.asarray(labels_NDHW)).long()
    expected = (volumes_NCDHW.shape[0], *volumes_NCDHW.shape[2:])
    if tuple(labels.shape) != tuple(expected):
        raise UserError(f"labels must be (N, D, H, W) = {tuple(expected)} to match the volumes, got "
                        f"{tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise UserError(f"labels hold classes {int(labels.min())}..{int(labels.max())} but num_classes is "
                        f"{num_classes}; pass num_classes={int(labels.max()) + 1}")
    return labels


def fit_segmentation_head(encoder: nn.Module, volumes_NCDHW: torch.Tensor | np.ndarray,
                          labels_NDHW: torch.Tensor | np.ndarray, *, num_classes: int, steps: int = 200,
                          lr: float = 1e-2, seed: int = 0, batch_size: int = 4,
                          hidden_channels: int = 32) -> SegmentationHead:
    """Trains a `SegmentationHead` on the frozen encoder's cached features (Adam, CE + soft Dice).

    Args:
        encoder: any module with `forward_features(x_BCDHW) -> (B, F, d, h, w)`; left unchanged.
        volumes_NCDHW: training volumes, z-scored here per volume.
        labels_NDHW: their integer label maps, classes 0..num_classes-1.
        num_classes: K, background included.
        steps: optimiser steps, each on `batch_size` volumes drawn without replacement.
        lr: Adam learning rate.
        seed: fixes the head's initial weights and the batches, so a fit is repeatable.
        batch_size: volumes per step (and per encoder forward when caching the features).
        hidden_channels: see `SegmentationHead`.

    Returns:
        The trained head in eval mode, on the encoder's device.
    """
    volumes = torch.as_tensor(volumes_NCDHW)
    features = encoder_features(encoder, volumes, batch_size=batch_size)
    labels = _check_labels(labels_NDHW, volumes, num_classes)
    return fit_head_on_features(features, labels, size=tuple(volumes.shape[2:]), num_classes=num_classes,
                                steps=steps, lr=lr, seed=seed, batch_size=batch_size, hidden_channels=hidden_channels)


def fit_head_on_features(features_NFDHW: torch.Tensor, labels_NDHW: torch.Tensor, *, size: tuple[int, int, int],
                         num_classes: int, steps: int = 200, lr: float = 1e-2, seed: int = 0, batch_size: int = 4,
                         hidden_channels: int = 32) -> SegmentationHead:
    """`fit_segmentation_head` from the encoder's features (`encoder_features`, computed in batches of
    `batch_size` volumes) and the label maps (any integer dtype: uint8 keeps a streamed training set small; each
    step's batch is widened to int64), for volumes of spatial `size`."""
    features = features_NFDHW
    labels = torch.as_tensor(labels_NDHW).to(features.device)
    with torch.random.fork_rng(devices=[]):  # the head's initial weights come from `seed`, not the global stream
        torch.manual_seed(seed)
        head = SegmentationHead(features.shape[1], num_classes, hidden_channels=hidden_channels)
    head = head.to(features.device)
    head.set_feature_statistics(features)
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    head.train()
    for _ in range(steps):
        batch = torch.randperm(len(features), generator=generator)[:batch_size].to(features.device)
        loss = loss_function(head(features[batch], tuple(size)), labels[batch][:, None].long())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head.eval()


@torch.no_grad()
def predict_masks(encoder: nn.Module, head: SegmentationHead, volumes_NCDHW: torch.Tensor | np.ndarray, *,
                  batch_size: int = 4) -> np.ndarray:
    """Label maps (N, D, H, W) uint8: the argmax of the head's logits on the frozen encoder's features."""
    volumes = torch.as_tensor(volumes_NCDHW)
    was_training = head.training
    head.eval()
    try:
        masks = [head(encoder_features(encoder, volumes[start:start + batch_size], batch_size=batch_size),
                      tuple(volumes.shape[2:])).argmax(dim=1).to(torch.uint8).cpu()
                 for start in range(0, len(volumes), batch_size)]
    finally:
        head.train(was_training)
    return torch.cat(masks).numpy()
