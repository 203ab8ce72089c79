"""3D encoders behind one registry and one small contract.

Every encoder is an `nn.Module` with:
- `embed_dim`: the size of the pooled embedding;
- `forward_features(x_BCDHW)`: the last feature map, (B, F, d, h, w);
- `forward(x_BCDHW)`: the pooled embedding, (B, embed_dim).

Build one with `create_encoder(name, **options)`; list them with `list_encoders()`. The trainer and the
evaluator only use the contract, never the name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rafmedia.core.registry import Registry

ENCODERS: Registry[nn.Module] = Registry("encoder")


def create_encoder(name: str, **options) -> nn.Module:
    """Builds a registered encoder, e.g. `create_encoder("cnn3d_small", width=16)`."""
    return ENCODERS.create(name, **options)


def list_encoders() -> list[str]:
    return ENCODERS.names()


class PooledEncoder(nn.Module):
    """Adds global average pooling on top of `forward_features` (the contract's `forward`)."""

    embed_dim: int

    def forward_features(self, x_BCDHW: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x_BCDHW: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x_BCDHW).mean(dim=(2, 3, 4))


@dataclass
class EncoderConfig:
    """Which registered encoder to build, its options (passed to its factory), and the licence its exported weights
    are shared under (written into the card; an SPDX id such as "apache-2.0", or "unspecified")."""

    name: str = "cnn3d_small"
    options: dict[str, Any] = field(default_factory=lambda: {"width": 16})
    licence: str = "unspecified"
