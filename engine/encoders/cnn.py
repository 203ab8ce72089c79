"""Convolutional 3D encoders: a small CNN for quick CPU runs and MONAI's 3D ResNets as trunks."""
from __future__ import annotations

import torch
from monai.networks import nets
from torch import nn

from rafmedia.core.registry import unknown_name_error
from rafmedia.engine.encoders.base import ENCODERS, PooledEncoder

NORMS = {
    "batch": nn.BatchNorm3d,
    "instance": lambda channels: nn.InstanceNorm3d(channels, affine=True),
    "group": lambda channels: nn.GroupNorm(min(8, channels), channels),
}


def _conv_block(in_channels: int, out_channels: int, stride: int, norm: str) -> nn.Sequential:
    if norm not in NORMS:
        raise unknown_name_error("norm", norm, NORMS)
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
        NORMS[norm](out_channels),
        nn.ReLU(inplace=True),
    )


class SmallCNN3d(PooledEncoder):
    """A small 3D CNN: a stride-2 stem, then `num_stages` stages (stride-2 conv, conv) doubling the width.

    Fast enough on two CPU cores to pretrain in minutes; the quickstart's default encoder.
    """

    def __init__(self, in_channels: int = 1, width: int = 16, num_stages: int = 3, norm: str = "batch"):
        super().__init__()
        layers = [_conv_block(in_channels, width, stride=2, norm=norm)]
        channels = width
        for _ in range(num_stages):
            layers += [_conv_block(channels, channels * 2, stride=2, norm=norm),
                       _conv_block(channels * 2, channels * 2, stride=1, norm=norm)]
            channels *= 2
        self.features = nn.Sequential(*layers)
        self.embed_dim = channels

    def forward_features(self, x_BCDHW: torch.Tensor) -> torch.Tensor:
        return self.features(x_BCDHW)

    def forward_pyramid(self, x_BCDHW: torch.Tensor) -> list[torch.Tensor]:
        """The feature map after the stem and after each stage, finest first (the last is `forward_features`):
        what a dense head on frozen features needs, since the last map alone is 1/16 of the input or coarser."""
        maps, x = [], self.features[0](x_BCDHW)
        maps.append(x)
        for start in range(1, len(self.features), 2):
            x = self.features[start + 1](self.features[start](x))
            maps.append(x)
        return maps


class MonaiResNet3d(PooledEncoder):
    """MONAI's 3D ResNet (`monai.networks.nets.resnet*`) as a trunk, without its classifier."""

    def __init__(self, depth: int = 10, in_channels: int = 1, widen_factor: float = 1.0):
        super().__init__()
        factory = getattr(nets, f"resnet{depth}")
        self.trunk = factory(spatial_dims=3, n_input_channels=in_channels, feed_forward=False,
                             widen_factor=widen_factor, conv1_t_size=3, conv1_t_stride=1, shortcut_type="A")
        self.embed_dim = self.trunk.layer4[-1].conv2.out_channels if depth < 50 else self.trunk.layer4[-1].conv3.out_channels

    def forward_features(self, x_BCDHW: torch.Tensor) -> torch.Tensor:
        return self.forward_pyramid(x_BCDHW)[-1]

    def forward_pyramid(self, x_BCDHW: torch.Tensor) -> list[torch.Tensor]:
        """The outputs of layer1..layer4, finest first (the last is `forward_features`)."""
        t = self.trunk
        x = t.maxpool(t.act(t.bn1(t.conv1(x_BCDHW))))
        maps = []
        for layer in (t.layer1, t.layer2, t.layer3, t.layer4):
            x = layer(x)
            maps.append(x)
        return maps


@ENCODERS.register("cnn3d_small", family="cnn")
def cnn3d_small(in_channels: int = 1, width: int = 16, num_stages: int = 3, norm: str = "batch") -> nn.Module:
    return SmallCNN3d(in_channels=in_channels, width=width, num_stages=num_stages, norm=norm)


@ENCODERS.register("resnet10_3d", family="cnn")
def resnet10_3d(in_channels: int = 1, widen_factor: float = 1.0) -> nn.Module:
    return MonaiResNet3d(depth=10, in_channels=in_channels, widen_factor=widen_factor)


@ENCODERS.register("resnet18_3d", family="cnn")
def resnet18_3d(in_channels: int = 1, widen_factor: float = 1.0) -> nn.Module:
    return MonaiResNet3d(depth=18, in_channels=in_channels, widen_factor=widen_factor)
