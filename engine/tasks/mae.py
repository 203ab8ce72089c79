"""Masked autoencoder (He et al., CVPR 2022) in 3D for ViT encoders: `mae_3d`.

Each view is a crop of the ViT's `img_size`, cut into its patch tokens; a random `mask_ratio` of the tokens is
masked (drawn by the view maker from the pipeline's generator, so a batch is a pure function of the seed).
The encoder (`MonaiViT3d`) embeds all patches but runs its transformer blocks and final norm on the visible
tokens only; a small decoder of MONAI `TransformerBlock`s gets the encoded visible tokens back on the full
grid, a shared learned mask token everywhere else, its own position embeddings, and predicts every patch's
voxels. The loss is the mean squared error on the masked patches only, against per-patch normalised voxels
when `norm_pix_loss` (MAE's default).

Tokens are in MONAI's patch-embedding order: raster (d, h, w) over the patch grid. `patchify` lays out each
patch's voxels as (pd, ph, pw, C). After pretraining, the encoder's ordinary `forward` (all tokens, pooled)
is what gets exported; the decoder is thrown away.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from monai.networks.blocks import TransformerBlock
from torch import nn

from rafmedia.core.errors import UserError
from rafmedia.engine.encoders.transformers import MonaiViT3d
from rafmedia.engine.tasks.base import TASKS
from rafmedia.engine.views import FlipOptions, crop, draw_flips, flip_samples, random_crop_starts
from rafmedia.shards.sampling import as_triple

Size3 = tuple[int, int, int]


# ---------------------------------------------------------------------------------------------- patches
def patchify(x_BCDHW: torch.Tensor, patch_size: Size3) -> torch.Tensor:
    """(B, C, D, H, W) -> (B, N, pd * ph * pw * C): patch n in raster (d, h, w) order over the patch grid."""
    batch, channels, *spatial = x_BCDHW.shape
    (pd, ph, pw), (gd, gh, gw) = patch_size, [s // p for s, p in zip(spatial, patch_size)]
    x = x_BCDHW.reshape(batch, channels, gd, pd, gh, ph, gw, pw)
    return x.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(batch, gd * gh * gw, pd * ph * pw * channels)


def unpatchify(patches_BNP: torch.Tensor, patch_size: Size3, grid: Size3, channels: int = 1) -> torch.Tensor:
    """The inverse of `patchify`: (B, N, pd * ph * pw * C) -> (B, C, gd * pd, gh * ph, gw * pw)."""
    (pd, ph, pw), (gd, gh, gw) = patch_size, grid
    x = patches_BNP.reshape(patches_BNP.shape[0], gd, gh, gw, pd, ph, pw, channels)
    return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(patches_BNP.shape[0], channels, gd * pd, gh * ph, gw * pw)


def masked_patch_loss(pred_BNP: torch.Tensor, target_BNP: torch.Tensor, mask_BN: torch.Tensor,
                      norm_pix_loss: bool) -> torch.Tensor:
    """Mean over masked patches (mask True) of the per-patch mean squared error; visible patches count for nothing.

    With `norm_pix_loss` each target patch is standardised by its own mean and variance (eps 1e-6) first.
    """
    if norm_pix_loss:
        mean, var = target_BNP.mean(dim=-1, keepdim=True), target_BNP.var(dim=-1, keepdim=True)
        target_BNP = (target_BNP - mean) / (var + 1e-6).sqrt()
    per_patch = (pred_BNP - target_BNP).square().mean(dim=-1)
    weights = mask_BN.to(per_patch.dtype)
    return (per_patch * weights).sum() / weights.sum()


# ---------------------------------------------------------------------------------------------- views
@dataclass
class MaskedCropViews(FlipOptions):
    """A random `crop_size` crop of each volume (flipped per axis with `flip_probability`) and a random mask of
    exactly round(mask_ratio * N) of its N patch tokens per sample (True = masked).

    Returns `view` (B, C, *crop_size) and `mask` (B, N) bool, tokens in raster (d, h, w) order.
    """

    crop_size: Size3 = (32, 32, 32)
    patch_size: Size3 = (8, 8, 8)
    mask_ratio: float = 0.75

    def __post_init__(self):
        if any(c % p for c, p in zip(self.crop_size, self.patch_size)):
            raise UserError(f"crop_size {self.crop_size} must be divisible by patch_size {self.patch_size}")
        if not 1 <= self.num_masked <= self.num_tokens - 1:
            raise UserError(f"mask_ratio={self.mask_ratio} masks {self.num_masked} of {self.num_tokens} tokens; "
                            f"at least one must be masked and one visible: choose a ratio in (0, 1)")

    @property
    def num_tokens(self) -> int:
        return math.prod(c // p for c, p in zip(self.crop_size, self.patch_size))

    @property
    def num_masked(self) -> int:
        return round(self.mask_ratio * self.num_tokens)

    def __call__(self, volumes_BCDHW: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        batch, spatial = volumes_BCDHW.shape[0], tuple(volumes_BCDHW.shape[2:])
        if any(s < c for s, c in zip(spatial, self.crop_size)):
            raise UserError(f"mae_3d crops {self.crop_size} (the ViT's img_size) but the volumes are {spatial}; "
                            f"build the encoder with a smaller img_size (encoder.options.img_size)")
        crops = crop(volumes_BCDHW, random_crop_starts(generator, spatial, self.crop_size, batch), self.crop_size)
        crops = flip_samples(crops, draw_flips(generator, batch, self.flip_probability))
        # The num_masked tokens with the lowest random scores are masked (MAE's shuffle-and-split).
        order = torch.rand((batch, self.num_tokens), generator=generator).argsort(dim=1)
        mask = torch.zeros((batch, self.num_tokens), dtype=torch.bool)
        mask.scatter_(1, order[:, :self.num_masked], True)
        return {"view": crops, "mask": mask}


# ---------------------------------------------------------------------------------------------- task
def encode_visible(encoder: nn.Module, x_BCDHW: torch.Tensor, visible_BV: torch.Tensor) -> torch.Tensor:
    """A `MonaiViT3d`'s tokens computed from the visible patches only: (B, V, hidden) (CLS token dropped).

    Patch and position embeddings are those of the encoder's MONAI patch embedding; only the `V` visible
    tokens (indices `visible_BV`) enter the transformer blocks and the final norm.
    """
    vit = encoder.vit
    embedding = vit.patch_embedding
    tokens = embedding.patch_embeddings(x_BCDHW).flatten(2).transpose(1, 2) + embedding.position_embeddings
    tokens = embedding.dropout(tokens)
    x = torch.gather(tokens, 1, visible_BV[..., None].expand(-1, -1, tokens.shape[-1]))
    if encoder.pool == "cls":
        x = torch.cat((vit.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    for block in vit.blocks:
        x = block(x)
    x = vit.norm(x)
    return x[:, 1:] if encoder.pool == "cls" else x


class MaeDecoder(nn.Module):
    """Visible tokens back on the full grid, mask tokens elsewhere, + position embeddings, transformer blocks,
    then a linear map to each patch's voxels."""

    def __init__(self, encoder_dim: int, num_tokens: int, patch_voxels: int, dim: int = 64, depth: int = 2,
                 num_heads: int = 4, mlp_ratio: float = 4.0):
        super().__init__()
        if dim % num_heads:
            raise UserError(f"decoder_dim {dim} must be divisible by decoder_heads {num_heads}")
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.position_embeddings = nn.Parameter(torch.zeros(1, num_tokens, dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.position_embeddings, std=0.02)
        self.blocks = nn.ModuleList(TransformerBlock(dim, int(dim * mlp_ratio), num_heads, qkv_bias=True)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.predict = nn.Linear(dim, patch_voxels)

    def forward(self, visible_BVE: torch.Tensor, visible_BV: torch.Tensor) -> torch.Tensor:
        visible = self.embed(visible_BVE)
        batch, num_tokens = visible.shape[0], self.position_embeddings.shape[1]
        x = self.mask_token.expand(batch, num_tokens, -1).clone()
        x = x.scatter(1, visible_BV[..., None].expand(-1, -1, x.shape[-1]), visible) + self.position_embeddings
        for block in self.blocks:
            x = block(x)
        return self.predict(self.norm(x))


class MaskedAutoencoder3d(nn.Module):
    """MAE: encode the visible patches, decode every patch, MSE on the masked ones."""

    def __init__(self, encoder: nn.Module, views: MaskedCropViews, *, in_channels: int, decoder_dim: int = 64,
                 decoder_depth: int = 2, decoder_heads: int = 4, norm_pix_loss: bool = True):
        super().__init__()
        self.encoder = encoder
        self.views = views
        self.norm_pix_loss = norm_pix_loss
        self.patch_size, self.grid = tuple(encoder.patch_size), tuple(encoder.grid)
        self.decoder = MaeDecoder(encoder.embed_dim, math.prod(self.grid), math.prod(self.patch_size) * in_channels,
                                  dim=decoder_dim, depth=decoder_depth, num_heads=decoder_heads)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, mask = batch["view"], batch["mask"]
        num_visible = int((~mask[0]).sum())
        # Every sample has the same number of visible tokens, so their (sorted) indices form a (B, V) tensor.
        visible = (~mask).nonzero()[:, 1].view(x.shape[0], num_visible)
        pred = self.decoder(encode_visible(self.encoder, x, visible), visible)
        loss = masked_patch_loss(pred, patchify(x, self.patch_size), mask, self.norm_pix_loss)
        return {"loss": loss}


@TASKS.register("mae_3d", encoder_families=("vit",))
def mae_3d(encoder: nn.Module, mask_ratio: float = 0.75, crop_size: int | Sequence[int] | None = None,
           norm_pix_loss: bool = True, decoder_dim: int = 64, decoder_depth: int = 2, decoder_heads: int = 4,
           flip_probability: float = 0.5) -> nn.Module:
    """`crop_size` defaults to the encoder's `img_size`; any other value is refused (the ViT takes only that)."""
    if not isinstance(encoder, MonaiViT3d):
        raise UserError(f"mae_3d needs a MONAI ViT encoder (vit_3d, vit_tiny_3d, vit_small_3d, vit_base_3d), got "
                        f"{type(encoder).__name__}; set encoder.name=vit_3d")
    if crop_size is not None and as_triple(crop_size, "crop_size") != tuple(encoder.img_size):
        raise UserError(f"mae_3d crop_size={crop_size} differs from the encoder's img_size {encoder.img_size}; "
                        f"drop task.options.crop_size or set encoder.options.img_size to it")
    in_channels = encoder.vit.patch_embedding.patch_embeddings.in_channels
    views = MaskedCropViews(crop_size=tuple(encoder.img_size), patch_size=tuple(encoder.patch_size),
                            mask_ratio=mask_ratio, flip_probability=flip_probability)
    return MaskedAutoencoder3d(encoder, views, in_channels=in_channels, decoder_dim=decoder_dim,
                               decoder_depth=decoder_depth, decoder_heads=decoder_heads, norm_pix_loss=norm_pix_loss)
