"""Contrastive learning on paired acquisitions: two channels of one subject on one grid are a positive pair.

`contrastive_paired` (registered with `data="paired"`): the data pipeline feeds the view maker the two channels
named in `data.channels` stacked as (B, 2, D, H, W): end-inhale/end-exhale CT, T1/PET, two time points. The
view maker crops channel 0 (`view_a`) and channel 1 (`view_b`) at one location (or up to `max_shift` voxels
apart per axis), each with its own flips, contrast, blur, intensity jitter and noise (the settings of
`TwoCropViews`); the encoder sees one channel per view. The loss is `info_nce` through `TwoCropContrastive`'s
BatchNorm projection head: only the views differ from two-crop contrastive learning, so the task reuses that module
as is.

Where two crops of one scan teach invariance to position and augmentation, the pair teaches what two contrasts
(or two breathing phases) of one body share: its anatomy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rafmedia.core.errors import UserError
from rafmedia.engine.tasks.base import TASKS
from rafmedia.engine.tasks.contrastive import TwoCropContrastive
from rafmedia.engine.views import TwoCropViews


@dataclass
class PairedViews(TwoCropViews):
    """`view_a` from channel 0 and `view_b` from channel 1 of each (B, 2, D, H, W) volume, cropped at one location
    (corners at most `max_shift` voxels apart per axis), each augmented on its own: `TwoCropViews` (same
    settings, same draws) with the two views taken from the two channels.

    Also returns the crops' corners, `origin_a` and `origin_b` (B, 3), for checks; the task ignores them.
    """

    max_shift: int = 0  # TwoCropViews' setting, with this view maker's default: one place in both channels

    def __post_init__(self):
        super().__post_init__()
        if self.max_shift < 0:
            raise UserError(f"contrastive_paired: max_shift must be >= 0 voxels, got {self.max_shift}")

    def __call__(self, volumes_BCDHW: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        if volumes_BCDHW.ndim != 5 or volumes_BCDHW.shape[1] != 2:
            raise UserError(f"contrastive_paired needs two channels of each subject, (B, 2, D, H, W), got shape "
                            f"{tuple(volumes_BCDHW.shape)}; set data.channels to two channel names, e.g. "
                            "data.channels=[inhale,exhale]")
        starts_a, starts_b, sides_a, sides_b = self.corners(generator, volumes_BCDHW.shape[2:], volumes_BCDHW.shape[0])
        view_a = self.augment(self.crops(volumes_BCDHW[:, :1], starts_a, sides_a), generator)
        view_b = self.augment(self.crops(volumes_BCDHW[:, 1:], starts_b, sides_b), generator)
        return {"view_a": view_a, "view_b": view_b, "origin_a": starts_a, "origin_b": starts_b}


@TASKS.register("contrastive_paired", data="paired", options_from=PairedViews)
def contrastive_paired(encoder: nn.Module, temperature: float = 0.2, projection_dim: int = 64, hidden_dim: int = 256,
                       **view_options) -> nn.Module:
    """`view_options` are `PairedViews` settings (crop_size, max_shift, noise_std, ...)."""
    # the batch keys (view_a, view_b) are TwoCropContrastive's: same head, same info_nce, different views
    return TwoCropContrastive(encoder, PairedViews(**view_options), projection_dim=projection_dim,
                              hidden_dim=hidden_dim, temperature=temperature)
