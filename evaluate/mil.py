"""Attention multiple-instance learning (MIL) on patch embeddings of a frozen encoder, for weak patient-level labels.

A patient is a *bag* of instances: the embeddings of a regular grid of patches of its volumes (one instance per grid
position). Gated attention pooling (Ilse, Tomczak & Welling 2018, "Attention-based deep multiple instance learning",
eq. 9) weighs the instances,

    a_p = softmax_p( w^T (tanh(V h_p) * sigmoid(U h_p)) ),      z = sum_p a_p h_p,

and an ordinal head (`rafmedia.evaluate.ordinal_heads`: CORN, cumulative link, soft-kappa or cross-entropy) turns the
bag embedding z into a distribution over grades. The weights a_p say which patches the prediction came from, which is
what the localisation scores read (`rafmedia.evaluate.localisation`).

Channels (modalities) are fused in one of three ways (`build_bags`):

- "late": each channel embedded alone by the encoder; an instance is the concatenation of the channels' patch
  embeddings at one grid position, plus one "missing" indicator per channel (a missing channel's features are zeros,
  i.e. the training mean after standardisation);
- "early": the channels stacked as input channels of one encoder call (`inflate_input_channels`); a missing channel
  is a zero volume (its mean after the per-volume z-score);
- "per_channel": one bag per channel, scored separately (subjects missing that channel are left out).

The probe is registered as "attention_mil" with `targets="bags"`: it takes (N, P, F) bags, not (N, D) embeddings.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rafmedia.core.errors import UserError
from rafmedia.evaluate.ordinal_heads import (create_ordinal_head, expected_grade, list_ordinal_heads, median_grade,
                                             smooth_labels)
from rafmedia.evaluate.probes import PROBES

MIL_FUSIONS = ("late", "early", "per_channel")


class GatedAttentionMIL(nn.Module):
    """Instance projection -> gated attention pooling -> ordinal head. `forward` returns (logits, attention_BP)."""

    def __init__(self, in_features: int, *, num_classes: int, head: str, hidden: int = 32, attention: int = 16,
                 dropout: float = 0.1):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attention_v = nn.Linear(hidden, attention)
        self.attention_u = nn.Linear(hidden, attention)
        self.attention_w = nn.Linear(attention, 1)
        self.head = create_ordinal_head(head, hidden, num_classes)

    def forward(self, x_BPF: torch.Tensor, mask_BP: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h_BPH = self.project(x_BPF)
        logit_BP = self.attention_w(torch.tanh(self.attention_v(h_BPH)) * torch.sigmoid(self.attention_u(h_BPH)))[..., 0]
        if mask_BP is not None:
            logit_BP = logit_BP.masked_fill(~mask_BP, float("-inf"))
        attention_BP = torch.softmax(logit_BP, dim=1)
        return self.head((attention_BP[..., None] * h_BPH).sum(dim=1)), attention_BP


@dataclass
class AttentionMILProbe:
    """Gated attention MIL with an ordinal head, trained full-batch with Adam for a fixed number of `epochs` (a fixed
    compute budget on the CPU), seeded.

    Features are standardised with the training instances' mean and std. `label_smoothing` spreads that share of each
    label onto the neighbouring grades (uncertain raters). With `curriculum` the bags are presented easy to hard
    (baby steps, Bengio et al. 2009): epoch e trains on the easiest fraction 0.5 + 0.5 * min(1, 2e / epochs) of the
    training bags by `difficulty` (all of them from half-way on).

    Contract: `fit(bags_NPF, grades_N, difficulty_N=None)`; `probabilities(bags)` (N, K); `scores(bags)` the expected
    grade; `predict(bags)` the median grade; `attention(bags)` (N, P) weights summing to 1 per bag.
    """

    num_classes: int = 4
    head: str = "corn"
    hidden: int = 32
    attention_dim: int = 16
    dropout: float = 0.1
    epochs: int = 100
    lr: float = 3e-3
    weight_decay: float = 1e-2
    label_smoothing: float = 0.0
    curriculum: bool = False
    seed: int = 0

    def fit(self, bags_NPF: np.ndarray, grades_N: np.ndarray, difficulty_N: np.ndarray | None = None
            ) -> AttentionMILProbe:
        bags_NPF, grades_N = np.asarray(bags_NPF, dtype=np.float32), np.asarray(grades_N, dtype=np.int64)
        if bags_NPF.ndim != 3 or len(bags_NPF) != len(grades_N):
            raise UserError(f"attention_mil needs bags (N, P, F) and N grades; got {bags_NPF.shape} and {len(grades_N)}")
        if grades_N.min() < 0 or grades_N.max() >= self.num_classes:
            raise UserError(f"attention_mil grades must be in 0..{self.num_classes - 1}; got {sorted(set(grades_N))}")
        instances = bags_NPF.reshape(-1, bags_NPF.shape[-1])
        self.mean_, self.std_ = instances.mean(axis=0), instances.std(axis=0) + 1e-6
        order = np.argsort(difficulty_N, kind="stable") if self.curriculum and difficulty_N is not None else None
        with torch.random.fork_rng(devices=[]), one_thread():
            torch.manual_seed(self.seed)
            self.model_ = GatedAttentionMIL(bags_NPF.shape[-1], num_classes=self.num_classes, head=self.head,
                                            hidden=self.hidden, attention=self.attention_dim, dropout=self.dropout)
            x, target = self._tensor(bags_NPF), smooth_labels(torch.from_numpy(grades_N), self.num_classes,
                                                               self.label_smoothing)
            optimizer = torch.optim.AdamW(self.model_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
            self.model_.train()
            for epoch in range(self.epochs):
                chosen = slice(None) if order is None else torch.from_numpy(order[:self._curriculum_size(epoch, len(order))])
                logits, _ = self.model_(x[chosen])
                loss = self.model_.head.loss(logits, target[chosen])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        self.model_.eval()
        return self

    def _curriculum_size(self, epoch: int, count: int) -> int:
        return max(2, int(np.ceil(count * (0.5 + 0.5 * min(1.0, 2.0 * epoch / max(self.epochs, 1))))))

    def _tensor(self, bags_NPF: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(((np.asarray(bags_NPF, dtype=np.float32) - self.mean_) / self.std_).astype(np.float32))

    @torch.no_grad()
    def _forward(self, bags_NPF: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        logits, attention = self.model_(self._tensor(bags_NPF))
        return self.model_.head.probabilities(logits), attention

    def probabilities(self, bags_NPF: np.ndarray) -> np.ndarray:
        return self._forward(bags_NPF)[0].double().numpy()

    def scores(self, bags_NPF: np.ndarray) -> np.ndarray:
        """The expected grade of each bag (a continuous score for Spearman and AUROC)."""
        return expected_grade(self._forward(bags_NPF)[0]).double().numpy()

    def predict(self, bags_NPF: np.ndarray) -> np.ndarray:
        """The median grade of each bag's predicted distribution (optimal for the absolute error)."""
        return median_grade(self._forward(bags_NPF)[0]).numpy()

    def attention(self, bags_NPF: np.ndarray) -> np.ndarray:
        """(N, P) attention weights, each row summing to 1."""
        return self._forward(bags_NPF)[1].double().numpy()

    def occlusion(self, bags_NPF: np.ndarray, reference_PF: np.ndarray, *, chunk: int = 64) -> np.ndarray:
        """(N, P) drop of the expected grade when instance p is replaced by `reference_PF[p]` (what a reference,
        low-grade patient has at that position): instance-level occlusion sensitivity, one forward per instance."""
        drops = []
        for bag_PF in np.asarray(bags_NPF, dtype=np.float32):
            base = self.scores(bag_PF[None])[0]
            rows = []
            for start in range(0, len(bag_PF), chunk):
                positions = np.arange(start, min(start + chunk, len(bag_PF)))
                occluded = np.repeat(bag_PF[None], len(positions), axis=0)
                occluded[np.arange(len(positions)), positions] = reference_PF[positions]
                rows.append(base - self.scores(occluded))
            drops.append(np.concatenate(rows))
        return np.stack(drops)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread for these small full-batch fits: as fast on an idle 2-core box, and 10x faster than two
    threads when another process shares the cores (OpenMP threads spin waiting for each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@PROBES.register("attention_mil", targets="bags")
def attention_mil(num_classes: int = 4, head: str = "corn", hidden: int = 32, attention_dim: int = 16,
                  dropout: float = 0.1, epochs: int = 100, lr: float = 3e-3, weight_decay: float = 1e-2,
                  label_smoothing: float = 0.0, curriculum: bool = False, seed: int = 0) -> AttentionMILProbe:
    if head not in list_ordinal_heads():
        raise UserError(f"attention_mil head '{head}' is not an ordinal head (choose from: "
                        f"{', '.join(list_ordinal_heads())})")
    if num_classes < 2 or epochs < 1 or hidden < 1 or attention_dim < 1:
        raise UserError(f"attention_mil needs num_classes >= 2 and positive epochs, hidden and attention_dim; got "
                        f"num_classes={num_classes}, epochs={epochs}, hidden={hidden}, attention_dim={attention_dim}")
    if not 0 <= label_smoothing < 1:
        raise UserError(f"attention_mil label_smoothing must be in [0, 1), got {label_smoothing}")
    return AttentionMILProbe(num_classes=num_classes, head=head, hidden=hidden, attention_dim=attention_dim,
                             dropout=dropout, epochs=epochs, lr=lr, weight_decay=weight_decay,
                             label_smoothing=label_smoothing, curriculum=curriculum, seed=seed)


# ---- bags -------------------------------------------------------------------------------------------
def late_fusion_bags(patches_by_channel: dict[str, np.ndarray], present: dict[str, np.ndarray]) -> np.ndarray:
    """(N, P, C * D + C) bags: each channel's (N, P, D) patch embeddings concatenated per grid position, a missing
    channel's zeroed after standardising over the subjects that have it, then one 0/1 "missing" column per channel."""
    parts, flags = [], []
    for channel, patches_NPD in patches_by_channel.items():
        have_N = present[channel].astype(bool)
        if not have_N.any():
            raise UserError(f"no subject has channel '{channel}': drop it from evaluate.weak_labels.channels")
        valid = patches_NPD[have_N].reshape(-1, patches_NPD.shape[-1])
        standard_NPD = (patches_NPD - valid.mean(axis=0)) / (valid.std(axis=0) + 1e-6)
        parts.append(np.where(have_N[:, None, None], standard_NPD, 0.0))
        flags.append(np.broadcast_to((~have_N)[:, None, None], (*patches_NPD.shape[:2], 1)).astype(np.float64))
    return np.concatenate(parts + flags, axis=-1)


def inflate_input_channels(encoder: nn.Module, num_channels: int) -> nn.Module:
    """A copy of a one-channel encoder taking `num_channels` stacked channels: its first convolution's kernel repeated
    over the new input channels and divided by their number (the inflation of I3D and timm's `adapt_input_conv`), so a
    stack of identical channels gives the original output. Early fusion with an encoder pretrained on one channel."""
    inflated = copy.deepcopy(encoder)
    first = next((m for m in inflated.modules() if isinstance(m, (nn.Conv3d, nn.Conv2d))), None)
    if first is None:
        raise UserError("early fusion needs an encoder whose first layer is a convolution; use fusion 'late'")
    if first.in_channels == num_channels:
        return inflated
    if first.in_channels != 1 or first.groups != 1:
        raise UserError(f"early fusion can inflate a one-channel encoder only; this one takes {first.in_channels} "
                        "channels: use fusion 'late', or an encoder pretrained on the stacked channels")
    weight = first.weight.detach().repeat(1, num_channels, *([1] * (first.weight.ndim - 2))) / num_channels
    first.weight = nn.Parameter(weight)
    first.in_channels = num_channels
    return inflated


def bag_names(fusions: Sequence[str], channels: Sequence[str]) -> list[str]:
    """The bag kinds a fusion list produces: "late", "early", and one "channel:<name>" per channel for per_channel."""
    names = []
    for fusion in fusions:
        names += [f"channel:{channel}" for channel in channels] if fusion == "per_channel" else [fusion]
    return names
