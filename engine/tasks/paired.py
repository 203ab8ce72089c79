"""Contrastive learning on paired acquisitions: two channels of one subject on one grid are a positive pair.

`contrastive_paired` (registered with `data="paired"`): the data pipeline feeds the view maker the two channels
named in `data.channels` stacked as (B, 2, D, H, W): end-inhale/end-exhale CT, T1/PET, two time points. The
view maker crops channel 0 (`view_a`) and channel 1 (`view_b`) at one location (or up to `max_shift` voxels
apart per axis), each with its own flips, contrast, blur, intensity jitter and noise; the encoder sees one
channel per view. The loss is `info_nce` through `TwoCropContrastive`'s BatchNorm projection head: only the
views differ from two-crop contrastive learning, so the task reuses that module as is.

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
from rafmedia.engine.views import (crop, flip_samples, gaussian_blur, gaussian_noise, intensity_jitter,
                                   random_crop_starts, random_gamma)


def paired_crop_starts(generator: torch.Generator, volume_shape, crop_size: int, batch: int,
                       max_shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Corners (B, 3) of two crops: a uniform over the volume, b = a + U{-max_shift..max_shift} per axis, clipped
    into the volume (which never increases the shift).

    The torch-generator twin of `rafmedia.shards.sampling.PairedSampler.plan` (which draws from a numpy
    Generator per subject visit); both place view b the same way.
    """
    starts_a = random_crop_starts(generator, volume_shape, crop_size, batch)
    shift = torch.randint(-max_shift, max_shift + 1, (batch, 3), generator=generator)
    highs = torch.tensor([size - crop_size for size in volume_shape])  # the last valid corner per axis
    return starts_a, torch.minimum((starts_a + shift).clamp(min=0), highs)


@dataclass
class PairedViews:
    """`view_a` from channel 0 and `view_b` from channel 1 of each (B, 2, D, H, W) volume, cropped at one location
    (corners at most `max_shift` voxels apart per axis), each augmented on its own.

    Also returns the crops' corners, `origin_a` and `origin_b` (B, 3), for checks; the task ignores them.
    """

    crop_size: int = 40
    max_shift: int = 0
    flip_probability: float = 0.5
    intensity_scale: float = 0.2
    intensity_shift: float = 0.2
    noise_std: float = 0.2
    blur_sigma: float = 0.0  # max blur sigma (voxels), applied to half the views
    gamma: float = 0.0  # max |log gamma| of the contrast change

    def __call__(self, volumes_BCDHW: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        if volumes_BCDHW.ndim != 5 or volumes_BCDHW.shape[1] != 2:
            raise UserError(f"contrastive_paired needs two channels of each subject, (B, 2, D, H, W), got shape "
                            f"{tuple(volumes_BCDHW.shape)}; set data.channels to two channel names, e.g. "
                            "data.channels=[inhale,exhale]")
        batch, spatial = volumes_BCDHW.shape[0], volumes_BCDHW.shape[2:]
        starts_a, starts_b = paired_crop_starts(generator, spatial, self.crop_size, batch, self.max_shift)
        view_a = self._augment(crop(volumes_BCDHW[:, :1], starts_a, self.crop_size), generator)
        view_b = self._augment(crop(volumes_BCDHW[:, 1:], starts_b, self.crop_size), generator)
        return {"view_a": view_a, "view_b": view_b, "origin_a": starts_a, "origin_b": starts_b}

    def _augment(self, x_BCDHW: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        flips = torch.rand((x_BCDHW.shape[0], 3), generator=generator) < self.flip_probability
        x_BCDHW = random_gamma(flip_samples(x_BCDHW, flips), generator, self.gamma)
        x_BCDHW = gaussian_blur(x_BCDHW, generator, self.blur_sigma)
        x_BCDHW = intensity_jitter(x_BCDHW, generator, self.intensity_scale, self.intensity_shift)
        return gaussian_noise(x_BCDHW, generator, self.noise_std)


@TASKS.register("contrastive_paired", data="paired")
def contrastive_paired(encoder: nn.Module, temperature: float = 0.2, projection_dim: int = 64, hidden_dim: int = 256,
                       crop_size: int = 40, max_shift: int = 0, flip_probability: float = 0.5,
                       intensity_scale: float = 0.2, intensity_shift: float = 0.2, noise_std: float = 0.2,
                       blur_sigma: float = 0.0, gamma: float = 0.0) -> nn.Module:
    if max_shift < 0:
        raise UserError(f"contrastive_paired: max_shift must be >= 0 voxels, got {max_shift}")
    views = PairedViews(crop_size=crop_size, max_shift=max_shift, flip_probability=flip_probability,
                        intensity_scale=intensity_scale, intensity_shift=intensity_shift, noise_std=noise_std,
                        blur_sigma=blur_sigma, gamma=gamma)
    # the batch keys (view_a, view_b) are TwoCropContrastive's: same head, same info_nce, different views
    return TwoCropContrastive(encoder, views, projection_dim=projection_dim, hidden_dim=hidden_dim,
                              temperature=temperature)
