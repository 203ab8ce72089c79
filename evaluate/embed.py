"""Embedding extraction: batched, no grad, optionally under an alteration, with seeded randomness.

Three entry points share one preprocessing, [alteration ->] per-volume z-score -> encoder, and return float64:

- `extract_embeddings`: whole volumes, one encoder call per batch of subjects;
- `extract_patch_embeddings`: volumes larger than the encoder's input, cut into a regular grid of patches
  (MONAI's `SlidingWindowSplitter`), each patch embedded, patch embeddings pooled (mean or max) per subject;
- `extract_embeddings_distributed`: every rank embeds subjects i with i % world_size == rank; the shares are
  gathered by subject index, so every rank gets the one-process result in subject order.

The last two draw the alteration of subject i from a generator seeded with `seed * 1_000_003 + i`, i.e. exactly
what `extract_embeddings(..., batch_size=1)` draws, whatever the batch size, the rank or the other subjects.
On CUDA they run the encoder under bf16 autocast (`amp=None` means on for CUDA, off on the CPU).

`Embedder` is what an evaluation cell calls: one cohort's subjects through the per-subject embedding cache, each
rank embedding its share.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from monai.inferers import SlidingWindowSplitter
from tqdm.auto import tqdm

from rafmedia.core.errors import UserError
from rafmedia.core.profiling import StageClock
from rafmedia.core.registry import unknown_name_error
from rafmedia.engine.distributed import gather_objects
from rafmedia.evaluate.cache import CLEAN, CacheKey, EmbeddingCache, cached_embeddings
from rafmedia.shards.alterations import Alteration, alteration_seed, create_alteration
from rafmedia.shards.volumes import VolumeSource, as_volume_source, normalize_intensity

PATCH_POOLINGS = ("mean", "max")
SEED_STRIDE = 1_000_003  # subject i (or batch start i) draws from seed * SEED_STRIDE + i


@torch.no_grad()
def extract_embeddings(encoder: torch.nn.Module, volumes_NCDHW: torch.Tensor, *, batch_size: int = 16,
                       alteration: Alteration | None = None, seed: int = 0) -> np.ndarray:
    """Embeds raw (un-normalised) volumes: [alteration ->] per-volume z-score -> encoder. Returns (N, D) float64.

    The alteration of the batch starting at subject i draws from a generator seeded with (seed, i); with
    `batch_size=1` that is one generator per subject, as in `extract_patch_embeddings`.
    """
    encoder.eval()
    chunks = []
    for start in range(0, len(volumes_NCDHW), batch_size):
        x_BCDHW = volumes_NCDHW[start:start + batch_size]
        if alteration is not None:
            x_BCDHW = alteration(x_BCDHW, torch.Generator().manual_seed(seed * SEED_STRIDE + start))
        chunks.append(encoder(normalize_intensity(x_BCDHW)).double())
    return torch.cat(chunks).numpy()


def extract_patch_embeddings(encoder: torch.nn.Module, volumes_NCDHW: torch.Tensor, *,
                             patch_size: int | Sequence[int], overlap: float = 0.0, pooling: str = "mean",
                             batch_size: int = 16, alteration: Alteration | None = None, seed: int = 0,
                             device: torch.device | str | None = None, amp: bool | None = None,
                             pad_mode: str = "constant") -> np.ndarray:
    """Embeds each volume as the pooled embedding of a regular grid of patches. Returns (N, D) float64.

    Each volume is altered (generator seeded with (seed, subject index)) and z-scored as a whole, then cut
    by `monai.inferers.SlidingWindowSplitter`: patches start at voxel 0 and step by round(patch * (1 - overlap))
    along each axis. Padding: where the grid does not end exactly on the volume's far edge (or the volume is
    smaller than a patch), the far end of that axis is padded just enough for the last patch to fit, with
    `pad_mode` ("constant": zeros, i.e. the volume's mean after the z-score; or "replicate", "reflect").
    Every grid patch counts equally in the pooling, padded or not; no patch is dropped.

    Args:
        encoder: a module honouring the encoder contract, whose input size is `patch_size`.
        volumes_NCDHW: raw volumes (N, C, D, H, W).
        patch_size: patch edge (int) or (d, h, w).
        overlap: fraction of a patch shared by neighbouring patches, in [0, 1).
        pooling: "mean" or "max" of the patch embeddings, per embedding dimension.
        batch_size: patches per encoder call.
        alteration, seed: as in `extract_embeddings` with batch_size=1.
        device: where the encoder runs (it is moved there); None: where its parameters are.
        amp: bf16 autocast; None = on for CUDA, off on the CPU.
        pad_mode: `torch.nn.functional.pad` mode for the far-edge padding.
    """
    grid = _patch_grid(patch_size, overlap, pooling, pad_mode)
    return _embed_subjects(encoder, volumes_NCDHW, list(range(len(volumes_NCDHW))), batch_size=batch_size,
                           alteration=alteration, seed=seed, device=device, amp=amp, grid=grid)


def extract_embeddings_distributed(encoder: torch.nn.Module, volumes_NCDHW: torch.Tensor, *, batch_size: int = 16,
                                   alteration: Alteration | None = None, seed: int = 0,
                                   patch_size: int | Sequence[int] | None = None, overlap: float = 0.0,
                                   pooling: str = "mean", device: torch.device | str | None = None,
                                   amp: bool | None = None, pad_mode: str = "constant") -> np.ndarray:
    """Every rank embeds the subjects i with i % world_size == rank; returns all (N, D) float64 on every rank.

    Needs the process group joined (`engine.distributed.init_distributed`); with none it is one process doing
    all subjects. Whole volumes, or grid patches when `patch_size` is given (`extract_patch_embeddings`).
    Every rank must pass the same volumes, alteration and seed.
    """
    grid = None if patch_size is None else _patch_grid(patch_size, overlap, pooling, pad_mode)
    return shared_by_rank(len(volumes_NCDHW), lambda mine: _embed_subjects(
        encoder, volumes_NCDHW, mine, batch_size=batch_size, alteration=alteration, seed=seed, device=device, amp=amp,
        grid=grid))


def shared_by_rank(count: int, compute: Callable[[list[int]], np.ndarray]) -> np.ndarray:
    """Rows 0..count-1 computed across the ranks and returned whole on every rank, in row order.

    Rank r computes the rows i with i % world_size == r (`compute(rows)` -> (len(rows), D)); the shares are
    gathered by row index. A rank with no rows (count < world_size) computes nothing. One process: `compute` of all.
    """
    rank, world_size = _rank_and_world_size()
    mine = list(range(rank, count, world_size))
    shares = gather_objects((mine, np.asarray(compute(mine)) if mine else None))
    parts = [share for _, share in shares if share is not None]
    if not parts:
        return np.empty((0, 0))
    out_ND = np.empty((count, parts[0].shape[1]), dtype=np.result_type(*parts))
    for rows, share in shares:
        if share is not None:
            out_ND[rows] = share
    return out_ND


# ---- internals --------------------------------------------------------------------------------------
def _rank_and_world_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _patch_grid(patch_size, overlap: float, pooling: str, pad_mode: str):
    if pooling not in PATCH_POOLINGS:
        raise unknown_name_error("patch pooling", pooling, PATCH_POOLINGS)
    sizes = (patch_size,) * 3 if isinstance(patch_size, int) else tuple(int(size) for size in patch_size)
    if len(sizes) != 3 or min(sizes) < 1:
        raise UserError(f"patch_size must be a positive int or three positive ints (d, h, w), got {patch_size!r}")
    if not 0.0 <= float(overlap) < 1.0:
        raise UserError(f"overlap must be a fraction in [0, 1), got {overlap!r}")
    splitter = SlidingWindowSplitter(patch_size=sizes, overlap=float(overlap), pad_mode=pad_mode, pad_value=0.0)
    return splitter, pooling


def embed_subjects(encoder: torch.nn.Module, volumes: torch.Tensor | VolumeSource, indices: Sequence[int], *,
                   batch_size: int = 16, alteration: Alteration | None = None, seed: int = 0,
                   patch_size: int | Sequence[int] | None = None, overlap: float = 0.0, pooling: str = "mean",
                   device: torch.device | str | None = None, amp: bool | None = None,
                   clock: StageClock | None = None, progress: bool = False, desc: str = "embed") -> np.ndarray:
    """Embeds the subjects `indices` of `volumes`, subject i altered with its own generator (seed, i), so a
    subject's embedding does not depend on which others are embedded with it (what a per-subject cache needs).
    Whole volumes, or the pooled grid patches of `extract_patch_embeddings` when `patch_size` is given.

    `volumes` is a tensor (N, C, D, H, W) in memory or a source streaming them from a store in batches
    (`rafmedia.shards.volumes.StoreVolumes`, read by DataLoader workers while this process embeds): the encoder sees
    the same batches of `batch_size` subjects either way, so the embeddings are bit-identical. With a `clock`,
    stages "read" (the wait for each batch), "alter" and "embed" (the encoder forward) are timed into it.
    `progress`: a progress bar (`desc`) over the subjects.
    """
    grid = None if patch_size is None else _patch_grid(patch_size, overlap, pooling, "constant")
    return _embed_subjects(encoder, volumes, list(indices), batch_size=batch_size, alteration=alteration,
                           seed=seed, device=device, amp=amp, grid=grid, clock=clock, progress=progress, desc=desc)


def _embed_subjects(encoder: torch.nn.Module, volumes: torch.Tensor | VolumeSource, indices: list[int], *,
                    batch_size: int, alteration: Alteration | None, seed: int, device, amp: bool | None, grid,
                    clock: StageClock | None = None, progress: bool = False, desc: str = "embed") -> np.ndarray:
    """Embeds subjects `indices` of `volumes`, altering subject i with its own generator; (len(indices), D) float64."""
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    device = _device(encoder, device)
    encoder.eval()
    clock = clock or StageClock()  # a throwaway clock keeps the loop free of `if clock` branches
    rows = []
    bar = tqdm(total=len(indices), desc=desc, unit="subject", disable=not progress, leave=False)
    with bar, torch.no_grad(), _autocast(device, amp):
        # whole volumes: one encoder call per batch; grid patches: a subject's patches in calls of batch_size
        for subjects, x_BCDHW in as_volume_source(volumes).batches(indices, batch_size if grid is None else 1,
                                                                   clock=clock):
            if alteration is not None:
                with clock.stage("alter", volumes=len(subjects), voxels=x_BCDHW.numel()):
                    x_BCDHW = torch.cat([_altered(x_BCDHW[j:j + 1], i, alteration, seed)
                                         for j, i in enumerate(subjects)])
            with clock.stage("embed", volumes=len(subjects), voxels=x_BCDHW.numel()):
                # z-scored one subject at a time, as a subject's embedding must not depend on its batch-mates
                x_BCDHW = torch.cat([normalize_intensity(x_BCDHW[j:j + 1]) for j in range(len(subjects))])
                if grid is None:
                    rows.append(_encode(encoder, x_BCDHW, device))
                else:
                    rows.append(_pooled_patches(encoder, x_BCDHW, grid, batch_size, device)[None])
            del x_BCDHW  # before the next batch arrives: at most one batch held here
            bar.update(len(subjects))
    if not rows:
        return np.zeros((0, int(encoder.embed_dim)))
    return torch.cat(rows).numpy()


def _altered(x_1CDHW: torch.Tensor, index: int, alteration: Alteration, seed: int) -> torch.Tensor:
    """Subject `index` (its volume `x_1CDHW`) altered with its own generator (seed, index)."""
    return alteration(x_1CDHW, torch.Generator().manual_seed(seed * SEED_STRIDE + index))


def _pooled_patches(encoder: torch.nn.Module, x_1CDHW: torch.Tensor, grid, batch_size: int,
                    device: torch.device) -> torch.Tensor:
    splitter, pooling = grid
    patches_PCDHW = torch.cat([patch for patch, _location in splitter(x_1CDHW)])
    emb_PD = torch.cat([_encode(encoder, patches_PCDHW[start:start + batch_size], device)
                        for start in range(0, len(patches_PCDHW), batch_size)])
    return emb_PD.mean(dim=0) if pooling == "mean" else emb_PD.amax(dim=0)


def _encode(encoder: torch.nn.Module, x_BCDHW: torch.Tensor, device: torch.device) -> torch.Tensor:
    return encoder(x_BCDHW.to(device, non_blocking=True)).double().cpu()


def _device(encoder: torch.nn.Module, device) -> torch.device:
    if device is not None:
        encoder.to(device)
        return torch.device(device)
    parameter = next(encoder.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _autocast(device: torch.device, amp: bool | None):
    """bf16 autocast on CUDA (None = automatic); off on the CPU, where bf16 would only lose precision."""
    if amp and device.type != "cuda":
        warnings.warn(f"amp=True is ignored on {device.type}: mixed precision is used on CUDA only", stacklevel=4)
    if (amp is None or amp) and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def embedding_stability(clean_ND: np.ndarray, altered_ND: np.ndarray) -> dict[str, float]:
    """Label-free robustness: mean cosine similarity of clean vs altered embeddings, and normalised drift
    = mean ||altered - clean|| / mean ||clean - mean(clean)|| (drift relative to the embedding spread)."""
    cosine = np.sum(clean_ND * altered_ND, axis=1) / (
        np.linalg.norm(clean_ND, axis=1) * np.linalg.norm(altered_ND, axis=1)).clip(min=1e-12)
    spread = np.linalg.norm(clean_ND - clean_ND.mean(axis=0), axis=1).mean()
    drift = np.linalg.norm(altered_ND - clean_ND, axis=1).mean() / max(spread, 1e-12)
    return {"cosine": float(cosine.mean()), "drift": float(drift)}


@dataclass
class Embedder:
    """Embeddings of one cohort's subjects through the per-subject cache (when there is one): a killed or repeated
    evaluation embeds only the (model, subject, alteration, severity, seed) it has not embedded yet. An altered
    embedding draws from the alteration's own seed (`alteration_seed`), which is part of its cache key.

    Only the subjects whose embeddings are not cached are read: with a streamed source (`StoreVolumes`) a call
    holds one batch of volumes (plus the workers' read-ahead), whatever the cohort's size.

    Args:
        volumes: the cohort's raw volumes in manifest order: a tensor (N, C, D, H, W) in memory, or a source that
            streams them from the store (`rafmedia.shards.volumes.StoreVolumes`).
        subject_ids: their subject ids, in the same order.
        cohort_digest: the cohort's digest (cache keys of one cohort).
        batch_size: subjects per encoder call.
        patch_size: > 0: embed each volume as the mean of a grid of patches of this side.
        cache: the embedding cache, or None to embed everything.
        clock: where stages "read", "alter" and "embed" are timed (see `embed_subjects`), or None.
        progress: a progress bar per call.
    """

    volumes: torch.Tensor | VolumeSource
    subject_ids: list[str]
    cohort_digest: str
    batch_size: int = 16
    patch_size: int = 0
    cache: EmbeddingCache | None = None
    clock: StageClock | None = None
    progress: bool = False

    def __call__(self, model: torch.nn.Module, model_digest: str, indices: np.ndarray, *, alteration: str = CLEAN,
                 severity: int = 0) -> np.ndarray:
        """Embeddings of subjects `indices` (rows of the cohort), in that order; across ranks, each embeds a share."""
        indices = np.asarray(indices)
        seed = 0 if alteration == CLEAN else alteration_seed(alteration, severity)
        return shared_by_rank(len(indices), lambda rows: self._embed(model, model_digest, indices[rows],
                                                                     alteration=alteration, severity=severity,
                                                                     seed=seed))

    def _embed(self, model, model_digest: str, indices: np.ndarray, *, alteration: str, severity: int,
               seed: int) -> np.ndarray:
        def compute(keys: list[CacheKey]) -> np.ndarray:
            wanted = [position[key.subject] for key in keys]
            altered = None if alteration == CLEAN else create_alteration(alteration, severity=severity)
            return embed_subjects(model, self.volumes, wanted, batch_size=self.batch_size, alteration=altered,
                                  seed=seed, patch_size=self.patch_size or None, clock=self.clock,
                                  progress=self.progress, desc=f"embed {alteration}" + (f" s{severity}" if severity
                                                                                         else ""))

        subject_ids = [self.subject_ids[i] for i in indices]
        position = {subject: int(i) for subject, i in zip(subject_ids, indices)}
        if self.cache is None:
            return compute([CacheKey(model_digest, "", subject) for subject in subject_ids])
        keys = [CacheKey(model_digest, self.cohort_digest, subject, alteration, severity, seed)
                for subject in subject_ids]
        return cached_embeddings(self.cache, keys, compute)
