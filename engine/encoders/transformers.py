"""Transformer and 2D-backbone encoders: MONAI's 3D ViT, the Swin encoder of SwinUNETR, timm 2D per slice.

All three follow the `PooledEncoder` contract of `rafmedia.engine.encoders.base` (`embed_dim`, `forward_features` giving
(B, F, d, h, w), `forward` giving (B, embed_dim)), so the trainer and the evaluator never see which one runs.

- `vit_3d` wraps `monai.networks.nets.ViT` in a submodule named `vit`, so its weights keep MONAI's own keys
  (`vit.patch_embedding...`, `vit.blocks.0...`): plain MONAI code loads them after stripping the `vit.` prefix.
  The patch tokens are laid out (d, h, w) by MONAI's conv patch embedding, so the feature map is the token
  sequence reshaped to the patch grid, img_size / patch_size per axis. Pooling is the mean of the patch tokens
  (the contract's default) or the CLS token (`pool="cls"`, which adds MONAI's CLS token).
  `vit_tiny_3d` / `vit_small_3d` / `vit_base_3d` name timm's sizes (192/12/3, 384/12/6, 768/12/12).
- `swin_3d` builds the `SwinTransformer` that `monai.networks.nets.SwinUNETR` builds, in a submodule named
  `swinViT` as there, so exported weights load into a SwinUNETR's `swinViT` unchanged. The last stage
  (16 x feature_size channels, input / 32 per axis) is the feature map; pooled = its global average.
- Dense heads (the evaluator's segmentation head) read Swin's `forward_pyramid`, its five normalised maps (input / 2
  to / 32). The ViT has one resolution, the patch grid; adding earlier blocks' grids (UNETR's skip depths) did not
  help a frozen-feature head (benchmarks/RESULTS.md), so it has no pyramid.
- `timm2d_slices` applies a timm 2D backbone (timm imported only through `torchvision_compat`) to every slice
  along one axis; with `neighbours=k` each slice is stacked with its k neighbours on each side as channels
  (2.5D; edges repeat the border slice). Slice feature maps are stacked back along the slice axis, so the
  pooled embedding is the mean over slices of each slice's global-average embedding.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import ViT
from monai.networks.nets.swin_unetr import SwinTransformer
from torch import nn

from rafmedia.core.errors import UserError
from rafmedia.core.registry import did_you_mean, unknown_name_error
from rafmedia.engine.encoders.base import ENCODERS, PooledEncoder
from rafmedia.engine.torchvision_compat import import_timm
from rafmedia.shards.sampling import as_triple

VIT_SIZES = {  # name: (hidden_size, num_layers, num_heads), as timm's ViT-Ti/S/B
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
}
VIT_POOLS = ("mean", "cls")
SLICE_AXES = {"D": 2, "H": 3, "W": 4}


class MonaiViT3d(PooledEncoder):
    """MONAI's 3D ViT; features = patch tokens on their (d, h, w) grid; pooled = token mean or CLS token."""

    def __init__(self, in_channels: int = 1, img_size: int | Sequence[int] = 32, patch_size: int | Sequence[int] = 8,
                 hidden_size: int = 96, num_layers: int = 4, num_heads: int = 3, mlp_ratio: float = 4.0,
                 pool: str = "mean", dropout_rate: float = 0.0):
        super().__init__()
        img, patch = as_triple(img_size, "img_size"), as_triple(patch_size, "patch_size")
        if any(i % p for i, p in zip(img, patch)):
            raise UserError(f"img_size {img} must be divisible by patch_size {patch} on every axis "
                            f"(e.g. img_size=96 with patch_size=16)")
        if hidden_size % num_heads:
            raise UserError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
        if pool not in VIT_POOLS:
            raise unknown_name_error("ViT pool", pool, VIT_POOLS)
        self.img_size, self.patch_size, self.pool = img, patch, pool
        self.grid = tuple(i // p for i, p in zip(img, patch))
        self.vit = ViT(in_channels=in_channels, img_size=img, patch_size=patch, hidden_size=hidden_size,
                       mlp_dim=int(hidden_size * mlp_ratio), num_layers=num_layers, num_heads=num_heads,
                       classification=pool == "cls", dropout_rate=dropout_rate, spatial_dims=3, qkv_bias=True)
        if pool == "cls":
            del self.vit.classification_head  # we only want MONAI's CLS token, not its classifier
        for block in self.vit.blocks:  # MONAI builds this norm even without cross-attention; it is never used
            if hasattr(block, "norm_cross_attn"):
                block.norm_cross_attn.requires_grad_(False)
        self.embed_dim = hidden_size

    def tokens(self, x_BCDHW: torch.Tensor) -> torch.Tensor:
        """All tokens after the final norm, (B, [CLS] + d*h*w, hidden)."""
        if tuple(x_BCDHW.shape[2:]) != self.img_size:
            raise UserError(f"this ViT was built for img_size {self.img_size}, got a volume of "
                            f"{tuple(x_BCDHW.shape[2:])}; crop/resize the views or set the encoder's img_size")
        vit = self.vit
        x = vit.patch_embedding(x_BCDHW)
        if self.pool == "cls":
            x = torch.cat((vit.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        for block in vit.blocks:
            x = block(x)
        return vit.norm(x)

    def _grid(self, patch_tokens_BND: torch.Tensor) -> torch.Tensor:
        batch = patch_tokens_BND.shape[0]
        return patch_tokens_BND.transpose(1, 2).reshape(batch, self.embed_dim, *self.grid)

    def forward_features(self, x_BCDHW: torch.Tensor) -> torch.Tensor:
        tokens = self.tokens(x_BCDHW)
        return self._grid(tokens[:, 1:] if self.pool == "cls" else tokens)

    def forward(self, x_BCDHW: torch.Tensor) -> torch.Tensor:
        tokens = self.tokens(x_BCDHW)
        return tokens[:, 0] if self.pool == "cls" else tokens.mean(dim=1)


class SwinEncoder3d(PooledEncoder):
    """The Swin transformer encoder of MONAI's SwinUNETR (`swinViT`); features = its last, normalised stage."""

    def __init__(self, in_channels: int = 1, feature_size: int = 24, depths: Sequence[int] = (2, 2, 2, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7, drop_path_rate: float = 0.0,
                 use_v2: bool = False):
        super().__init__()
        if feature_size % 12:
            raise UserError(f"swin feature_size must be divisible by 12 (as in SwinUNETR), got {feature_size}")
        self.swinViT = SwinTransformer(  # same arguments as SwinUNETR builds it, so its keys load there
            in_chans=in_channels, embed_dim=feature_size, window_size=(window_size,) * 3, patch_size=(2, 2, 2),
            depths=tuple(depths), num_heads=tuple(num_heads), mlp_ratio=4.0, qkv_bias=True, drop_rate=0.0,
            attn_drop_rate=0.0, drop_path_rate=drop_path_rate, norm_layer=nn.LayerNorm, spatial_dims=3,
            downsample="merging", use_v2=use_v2)
        self.embed_dim = feature_size * 2 ** len(depths)
        self.downsampling = 2 ** (len(depths) + 1)  # the stride-2 patch embedding, then one merge per stage

    def forward_features(self, x_BCDHW: torch.Tensor) -> torch.Tensor:
        return self.forward_pyramid(x_BCDHW)[-1]

    def forward_pyramid(self, x_BCDHW: torch.Tensor) -> list[torch.Tensor]:
        """The normalised maps SwinUNETR's decoder reads: the patch embedding (input / 2) and each stage's output
        (input / 4 ... / 32), finest first; the last is `forward_features`."""
        factor = self.downsampling
        if any(size % factor for size in x_BCDHW.shape[2:]):
            raise UserError(f"swin_3d needs every spatial size divisible by {factor}, got {tuple(x_BCDHW.shape[2:])}")
        return list(self.swinViT(x_BCDHW.contiguous(), normalize=True))


class Timm2dSlices(PooledEncoder):
    """A timm 2D backbone run on every slice along one axis (2D), or on slices with neighbours as channels (2.5D)."""

    def __init__(self, backbone: str = "resnet18", in_channels: int = 1, axis: str = "D", neighbours: int = 0,
                 pretrained: bool = False, **backbone_options):
        super().__init__()
        timm = import_timm()  # here, not at import: torchvision's CPU fallback must be set up before its first import
        if axis not in SLICE_AXES:
            raise unknown_name_error("slice axis", axis, SLICE_AXES)
        if neighbours < 0:
            raise UserError(f"neighbours must be >= 0 (slices taken on each side for 2.5D), got {neighbours}")
        if not timm.is_model(backbone):  # a name, or a name with a pretrained tag (resnet18.a1_in1k)
            raise UserError(f"unknown timm backbone '{backbone}';{did_you_mean(backbone, timm.list_models())} "
                            f"(see `timm.list_models()`)")
        self.axis, self.neighbours = axis, neighbours
        self.backbone = timm.create_model(backbone, pretrained=pretrained, num_classes=0,
                                          in_chans=in_channels * (2 * neighbours + 1), **backbone_options)
        self.embed_dim = int(self.backbone.num_features)

    def slices(self, x_BCDHW: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) -> (B * S, C * (2k + 1), a, b): every slice with its k neighbours per side as channels."""
        x = x_BCDHW.movedim(SLICE_AXES[self.axis], 2)  # (B, C, S, a, b)
        batch, channels, count = x.shape[:3]
        k = self.neighbours
        if k:
            x = torch.cat([x[:, :, :1]] * k + [x] + [x[:, :, -1:]] * k, dim=2)  # edges repeat the border slice
            x = torch.stack([x[:, :, i:i + count] for i in range(2 * k + 1)], dim=2)  # (B, C, 2k+1, S, a, b)
        else:
            x = x.unsqueeze(2)
        x = x.movedim(3, 1)  # (B, S, C, 2k+1, a, b)
        return x.reshape(batch * count, channels * (2 * k + 1), *x.shape[-2:])

    def forward_features(self, x_BCDHW: torch.Tensor) -> torch.Tensor:
        batch, count = x_BCDHW.shape[0], x_BCDHW.shape[SLICE_AXES[self.axis]]
        maps = self.backbone.forward_features(self.slices(x_BCDHW))  # (B * S, F, h, w)
        return maps.reshape(batch, count, *maps.shape[1:]).movedim(1, 2)  # (B, F, S, h, w)


@ENCODERS.register("vit_3d", family="vit")
def vit_3d(in_channels: int = 1, img_size: int | Sequence[int] = 32, patch_size: int | Sequence[int] = 8,
           hidden_size: int = 96, num_layers: int = 4, num_heads: int = 3, mlp_ratio: float = 4.0,
           pool: str = "mean", dropout_rate: float = 0.0) -> nn.Module:
    return MonaiViT3d(in_channels=in_channels, img_size=img_size, patch_size=patch_size, hidden_size=hidden_size,
                      num_layers=num_layers, num_heads=num_heads, mlp_ratio=mlp_ratio, pool=pool,
                      dropout_rate=dropout_rate)


def _register_vit_size(size: str) -> None:
    hidden_size, num_layers, num_heads = VIT_SIZES[size]

    def factory(in_channels: int = 1, img_size: int | Sequence[int] = 32, patch_size: int | Sequence[int] = 16,
                pool: str = "mean", dropout_rate: float = 0.0) -> nn.Module:
        return MonaiViT3d(in_channels=in_channels, img_size=img_size, patch_size=patch_size,
                          hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads, pool=pool,
                          dropout_rate=dropout_rate)

    factory.__doc__ = f"3D ViT-{size} ({hidden_size} wide, {num_layers} layers, {num_heads} heads)."
    ENCODERS.register(f"vit_{size}_3d", family="vit")(factory)


for _size in VIT_SIZES:
    _register_vit_size(_size)


@ENCODERS.register("swin_3d", family="swin")
def swin_3d(in_channels: int = 1, feature_size: int = 24, depths: Sequence[int] = (2, 2, 2, 2),
            num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7, drop_path_rate: float = 0.0,
            use_v2: bool = False) -> nn.Module:
    return SwinEncoder3d(in_channels=in_channels, feature_size=feature_size, depths=depths, num_heads=num_heads,
                         window_size=window_size, drop_path_rate=drop_path_rate, use_v2=use_v2)


@ENCODERS.register("timm2d_slices", family="slices2d")
def timm2d_slices(backbone: str = "resnet18", in_channels: int = 1, axis: str = "D", neighbours: int = 0,
                  pretrained: bool = False) -> nn.Module:
    return Timm2dSlices(backbone=backbone, in_channels=in_channels, axis=axis, neighbours=neighbours,
                        pretrained=pretrained)
