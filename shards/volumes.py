"""Whole volumes of a cohort store in memory: read them once into one (N, C, D, H, W) tensor, z-scored per volume.

The in-memory data stage of pretraining (`data.source: memory`) and of evaluation; cohorts larger than memory
stream patches instead (`rafmedia.shards.streaming`).
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from rafmedia.shards.store import CohortStore


def normalize_intensity(x_BCDHW: torch.Tensor) -> torch.Tensor:
    """Per-sample z-score over all voxels (MONAI NormalizeIntensity with nonzero=False), float32."""
    x_BCDHW = x_BCDHW.float()
    flat = x_BCDHW.flatten(1)
    shape = (-1,) + (1,) * (x_BCDHW.ndim - 1)
    return (x_BCDHW - flat.mean(dim=1).view(shape)) / flat.std(dim=1).clamp(min=1e-6).view(shape)


def load_volumes(store: CohortStore, subject_ids: list[str], *, channel: str = "image", normalize: bool = True,
                 progress: bool = True, desc: str = "load volumes") -> torch.Tensor:
    """Reads whole volumes into one (N, 1, D, H, W) float32 tensor, z-scored per volume if `normalize`."""
    volumes = [torch.from_numpy(np.asarray(store.read(subject, channel), dtype=np.float32))
               for subject in tqdm(subject_ids, desc=desc, unit="subject", disable=not progress)]
    volumes_NCDHW = torch.stack(volumes).unsqueeze(1)
    return normalize_intensity(volumes_NCDHW) if normalize else volumes_NCDHW
