"""Collapse and shortcut monitors: what the encoder's embedding of a fixed set of subjects looks like during training.

Every `train.monitor_every` steps the loop asks `EmbeddingMonitor.measure(encoder)` (rank 0 only). It embeds a fixed,
seeded set of subjects read once from the cohort store (in eval mode, under `torch.no_grad()`, train mode restored)
and returns three cheap numbers:

- `rankme`: the effective rank of the (N, D) embedding matrix (Garrido et al. 2023, "RankMe"): exp of the entropy
  of its normalised singular values, p_k = s_k / sum(s) + eps. D for an embedding that varies along every direction
  equally, 1 for a collapsed one. Computed on the embeddings **centred over the monitor set**: pooled post-ReLU
  features of whole volumes share one large mean vector (a random CNN's raw RankMe is ~1.3 of 128 on the synthetic
  cohort), which carries no information about the subjects; `rankme_raw` is Garrido's uncentred value.
- `std_mean`, `std_low_fraction`: per-dimension std of the L2-normalised centred embeddings, averaged over
  dimensions, and the fraction of dimensions whose std is below `STD_FLOOR / sqrt(D)` (about 1/sqrt(D) when the
  variation spreads over all dimensions, 0 in the dimensions it has left; the SimSiam collapse check).
- `spread`: root-mean-square distance of the embeddings from their mean over their root-mean-square norm: how much
  of the embedding differs between subjects at all (0 for a constant embedding, whose centred directions are noise).
- `site_leakage`: cross-validated balanced accuracy of a logistic regression predicting the acquisition site from the
  embeddings (`site_chance` = 1 / number of sites). Near 1 means the encoder separates sites: a shortcut (scanner
  noise and contrast) that contrastive tasks find before anatomy. Skipped, with a note, when the store has no `site`.

`collapse` is true, with a printed warning, when `spread` falls below `SPREAD_FLOOR`, RankMe below
`max(COLLAPSE_MIN_RANK, COLLAPSE_RANK_FRACTION * D)` or `std_mean` below `STD_FLOOR / sqrt(D)`. The monitor holds no
state between calls, so a resumed run logs the values the uninterrupted one would.
"""
from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.nn import functional as F

from rafmedia.engine.batches import DataConfig
from rafmedia.shards.store import CohortStore
from rafmedia.shards.volumes import load_volumes

RANKME_EPS = 1e-7  # Garrido et al.'s epsilon in p_k = s_k / sum(s) + eps
COLLAPSE_MIN_RANK = 2.0  # RankMe below a couple of directions is a collapse whatever D is
COLLAPSE_RANK_FRACTION = 0.01  # ... and so is below 1% of the embedding's dimension
SPREAD_FLOOR = 1e-4  # a random CNN's spread is ~0.2 on the synthetic cohort; float noise around a constant ~1e-7
STD_FLOOR = 0.1  # a dimension with std < 0.1 / sqrt(D) of the L2-normalised embeddings carries ~nothing
SITE_FOLDS = 3  # the monitor set is small (tens of subjects): 3 folds keep a few of each site per fold


def compute_rankme(emb_ND: np.ndarray, eps: float = RANKME_EPS) -> float:
    """RankMe: exp(-sum p_k log p_k) with p_k = s_k / sum(s) + eps over the singular values s of `emb_ND`."""
    singular = np.linalg.svd(np.asarray(emb_ND, dtype=np.float64), compute_uv=False)
    if singular.sum() <= 0:
        return 1.0  # all-zero embeddings: one (degenerate) direction, the fully collapsed case
    p = singular / singular.sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


def normalised_std(emb_ND: np.ndarray) -> tuple[float, float]:
    """(mean over dimensions of the std of the L2-normalised embeddings, fraction of dims below STD_FLOOR/sqrt(D))."""
    emb_ND = np.asarray(emb_ND, dtype=np.float64)
    unit_ND = emb_ND / np.maximum(np.linalg.norm(emb_ND, axis=1, keepdims=True), 1e-12)
    std_D = unit_ND.std(axis=0)
    floor = STD_FLOOR / math.sqrt(emb_ND.shape[1])
    return float(std_D.mean()), float((std_D < floor).mean())


def site_leakage(emb_ND: np.ndarray, sites_N: np.ndarray, *, seed: int, folds: int = SITE_FOLDS) -> float | None:
    """Cross-validated balanced accuracy of a logistic regression predicting the site; None when not estimable."""
    values, codes = np.unique(np.asarray(sites_N), return_inverse=True)
    folds = min(folds, int(np.bincount(codes).min()))
    if len(values) < 2 or folds < 2:
        return None
    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant (collapsed) features make the scaler and the solver complain
        predicted = cross_val_predict(model, emb_ND, codes, cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    return float(balanced_accuracy_score(codes, predicted))


def relative_spread(emb_ND: np.ndarray) -> float:
    """RMS distance of the rows from their mean, over the RMS norm of the rows (0: every row the same)."""
    emb_ND = np.asarray(emb_ND, dtype=np.float64)
    norm = math.sqrt(float((emb_ND ** 2).sum(axis=1).mean()))
    return 0.0 if norm == 0 else math.sqrt(float(((emb_ND - emb_ND.mean(axis=0)) ** 2).sum(axis=1).mean())) / norm


def is_collapsed(rankme: float, std_mean: float, spread: float, dim: int) -> bool:
    return (spread < SPREAD_FLOOR or rankme < max(COLLAPSE_MIN_RANK, COLLAPSE_RANK_FRACTION * dim)
            or std_mean < STD_FLOOR / math.sqrt(dim))


def summarise_embedding(emb_ND: np.ndarray, sites_N: np.ndarray | None, *, seed: int = 0) -> dict[str, object]:
    """The monitor's record for one (N, D) embedding matrix (and the subjects' sites, or None)."""
    emb_ND = np.nan_to_num(np.asarray(emb_ND, dtype=np.float64))
    spread = relative_spread(emb_ND)
    centred_ND = emb_ND - emb_ND.mean(axis=0) if spread >= SPREAD_FLOOR else np.zeros_like(emb_ND)
    rankme = compute_rankme(centred_ND)
    std_mean, std_low = normalised_std(centred_ND)
    record: dict[str, object] = {"rankme": round(rankme, 4), "rankme_raw": round(compute_rankme(emb_ND), 4),
                                 "std_mean": round(std_mean, 6), "std_low_fraction": round(std_low, 4),
                                 "spread": round(spread, 6), "dim": int(emb_ND.shape[1])}
    leakage = site_leakage(emb_ND, sites_N, seed=seed) if sites_N is not None else None
    if leakage is not None:
        record["site_leakage"] = round(leakage, 4)
        record["site_chance"] = round(1 / len(np.unique(sites_N)), 4)
    record["collapse"] = is_collapsed(rankme, std_mean, spread, emb_ND.shape[1])
    return record


@dataclass
class EmbeddingMonitor:
    """Measures the encoder on fixed inputs every `every` steps (and on the last step).

    Attributes:
        inputs_NCDHW: what the encoder embeds: z-scored volumes (or one-hot label maps), on the CPU.
        sites_N: each input's site, or None (the leakage probe is then skipped).
        every: steps between measurements; 0 turns the monitor off.
        seed: seeds the leakage probe's folds.
        batch_size: subjects per encoder call.
    """

    inputs_NCDHW: torch.Tensor
    sites_N: np.ndarray | None
    every: int
    seed: int = 0
    batch_size: int = 8

    def due(self, step: int, last: bool) -> bool:
        return self.every > 0 and (step % self.every == 0 or last)

    @torch.no_grad()
    def embed(self, encoder: nn.Module) -> np.ndarray:
        was_training = encoder.training
        encoder.eval()  # batch-norm running statistics: no update from the monitor's batches
        try:
            parameter = next(encoder.parameters())
            chunks = [encoder(self.inputs_NCDHW[start:start + self.batch_size].to(parameter.device, parameter.dtype))
                      for start in range(0, len(self.inputs_NCDHW), self.batch_size)]
        finally:
            encoder.train(was_training)
        return torch.cat(chunks).float().cpu().numpy()

    def measure(self, encoder: nn.Module, step: int) -> dict[str, object]:
        """The record logged under "monitor"; prints a warning when the embedding has collapsed."""
        record = summarise_embedding(self.embed(encoder), self.sites_N, seed=self.seed)
        if record["collapse"]:
            print(f"warning: step {step}: the embedding has collapsed (RankMe {record['rankme']:.2f} of "
                  f"{record['dim']} dimensions, mean std {record['std_mean']:.4f} vs {1 / math.sqrt(record['dim']):.4f} "
                  f"when spread, spread {record['spread']:.2g}): lower train.lr, strengthen the augmentation or check "
                  "the task's loss", file=sys.stderr, flush=True)
        return record


def monitor_subjects(subject_ids: list[str], count: int, seed: int) -> list[str]:
    """A fixed, seeded choice of `count` subjects (all when there are fewer), in store order."""
    if count >= len(subject_ids):
        return list(subject_ids)
    chosen = np.random.default_rng(seed).choice(len(subject_ids), size=count, replace=False)
    return [subject_ids[i] for i in sorted(chosen)]


def center_crop(x_NCDHW: torch.Tensor, size: int) -> torch.Tensor:
    starts = [max(0, (side - size) // 2) for side in x_NCDHW.shape[2:]]
    return x_NCDHW[:, :, starts[0]:starts[0] + size, starts[1]:starts[1] + size, starts[2]:starts[2] + size]


def build_monitor(store: CohortStore, *, every: int, count: int, seed: int, channel: str = "image",
                  num_classes: int | None = None, crop: int | None = None,
                  subject_ids: list[str] | None = None) -> EmbeddingMonitor | None:
    """Reads the monitor set from `store` once. None when `every` is 0 or the store has fewer than 4 subjects.

    Args:
        store: the cohort store pretraining reads.
        every: `train.monitor_every`.
        count: `train.monitor_subjects`, the size of the monitor set.
        seed: seeds the choice of subjects and the leakage probe's folds.
        channel: the image channel the encoder takes (paired tasks: their first channel).
        num_classes: label tasks: embed one-hot label maps of this many classes instead of an image channel.
        crop: embed the central `crop`^3 of each volume (encoders with a fixed input size fed streamed patches).
        subject_ids: choose among these subjects only (default: the whole store), e.g. a benchmark's train pool.
    """
    subject_ids = store.subject_ids() if subject_ids is None else subject_ids
    if every <= 0 or len(subject_ids) < 4:
        return None
    chosen = monitor_subjects(subject_ids, count, seed)
    if num_classes is not None:
        labels = torch.stack([torch.from_numpy(np.asarray(store.read_label(s), dtype=np.int64)) for s in chosen])
        inputs = F.one_hot(labels.clamp(0, num_classes - 1), num_classes).movedim(-1, 1).float()
    else:
        inputs = load_volumes(store, chosen, channel=channel, progress=False)
    if crop is not None:
        inputs = center_crop(inputs, crop)
    rows = {row["subject_id"]: row for row in store.read_manifest()}
    sites = [rows[s].get("site") for s in chosen]
    if any(site is None or site == "" for site in sites):
        print("note: the cohort has no 'site' column: the monitor's site-leakage probe is off", file=sys.stderr)
        sites_N = None
    else:
        sites_N = np.asarray([str(site) for site in sites])
    return EmbeddingMonitor(inputs, sites_N, every=every, seed=seed)


def pretraining_monitor(data: DataConfig, *, kind: str, num_classes: int | None, every: int, count: int,
                        seed: int) -> EmbeddingMonitor | None:
    """The monitor of a `pretrain_encoder` run: the task's input channel (label maps for label tasks, the first of
    `data.channels` for paired ones), central `data.patch_size` crops when pretraining streams patches."""
    channel = data.channels[0] if kind == "paired" and data.channels else data.channel
    return build_monitor(CohortStore(data.cohort), every=every, count=count, seed=seed, channel=channel,
                         num_classes=num_classes if kind == "label" else None,
                         crop=data.patch_size if data.source == "stream" else None)
