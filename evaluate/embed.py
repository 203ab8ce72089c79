"""Embedding extraction: batched, no grad, optionally under an alteration, with seeded randomness."""
from __future__ import annotations

import numpy as np
import torch

from rafmedia.shards.alterations import Alteration
from rafmedia.shards.stream import normalize_intensity


@torch.no_grad()
def extract_embeddings(encoder: torch.nn.Module, volumes_NCDHW: torch.Tensor, *, batch_size: int = 16,
                       alteration: Alteration | None = None, seed: int = 0) -> np.ndarray:
    """Embeds raw (un-normalised) volumes: [alteration ->] per-volume z-score -> encoder. Returns (N, D) float64.

    The alteration of batch i draws from a generator seeded with (seed, i), so results do not depend on
    which other subjects are embedded in the same call.
    """
    encoder.eval()
    chunks = []
    for start in range(0, len(volumes_NCDHW), batch_size):
        x_BCDHW = volumes_NCDHW[start:start + batch_size]
        if alteration is not None:
            x_BCDHW = alteration(x_BCDHW, torch.Generator().manual_seed(seed * 1_000_003 + start))
        chunks.append(encoder(normalize_intensity(x_BCDHW)).double())
    return torch.cat(chunks).numpy()


def embedding_stability(clean_ND: np.ndarray, altered_ND: np.ndarray) -> dict[str, float]:
    """Label-free robustness: mean cosine similarity of clean vs altered embeddings, and normalised drift
    = mean ||altered - clean|| / mean ||clean - mean(clean)|| (drift relative to the embedding spread)."""
    cosine = np.sum(clean_ND * altered_ND, axis=1) / (
        np.linalg.norm(clean_ND, axis=1) * np.linalg.norm(altered_ND, axis=1)).clip(min=1e-12)
    spread = np.linalg.norm(clean_ND - clean_ND.mean(axis=0), axis=1).mean()
    drift = np.linalg.norm(altered_ND - clean_ND, axis=1).mean() / max(spread, 1e-12)
    return {"cosine": float(cosine.mean()), "drift": float(drift)}
