"""Two of Taleb et al.'s (NeurIPS 2020) five 3D pretext tasks: contrastive predictive coding and exemplar networks.

- `cpc_3d`: each volume gives a 3D grid of overlapping patches (side `patch_size`, stride `patch_size // 2`),
  each embedded by the encoder. A causal context network aggregates the rows 0..i along the depth axis and
  predicts the embeddings of rows i+1..i+K (van den Oord et al. 2018, 3D as in Taleb et al.). The loss is
  InfoNCE where each prediction must pick its own target among every patch embedding of that row offset in
  the batch (the other patches of the same volume and of the other volumes are the negatives).
- `exemplar`: every volume is its own class (Dosovitskiy et al. 2014; Taleb's 3D version). Two heavily
  augmented crops of one volume are a positive pair; a triplet loss pushes the anchor closer to its positive
  than to the crops of the other volumes in the batch, by a margin.

Both follow `rafmedia.engine.tasks`' contract: `task.views` is a picklable view maker, `task(batch)` returns
`{"loss": ..., **logs}`, `task.encoder` is what gets exported. The module registers its tasks with `TASKS`
when `rafmedia.engine.tasks` imports it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rafmedia.engine.tasks.base import TASKS, mlp_head
from rafmedia.engine.views import IntensityOptions, TwoCropViews, crop, random_crop_starts


# ---------------------------------------------------------------------------------------------- CPC views
def patch_grid(volumes_BCDHW: torch.Tensor, starts_B3: torch.Tensor, grid: int, patch_size: int,
               stride: int) -> torch.Tensor:
    """The `grid`^3 patches of side `patch_size`, `stride` apart, whose first corner is `starts_B3[b]`.

    Returns (B, G, G, G, C, P, P, P): patch (i, j, k) of sample b starts at `starts_B3[b] + stride * (i, j, k)`.
    """
    regions = crop(volumes_BCDHW, starts_B3, stride * (grid - 1) + patch_size)
    patches = regions.unfold(2, patch_size, stride).unfold(3, patch_size, stride).unfold(4, patch_size, stride)
    return patches.permute(0, 2, 3, 4, 1, 5, 6, 7).contiguous()  # (B, C, G, G, G, P, P, P) -> grid first


@dataclass
class PatchGridViews(IntensityOptions):
    """A grid of overlapping patches at a random place in each volume; each patch jittered and noised on its own
    (so neighbouring patches cannot be matched by their shared intensity offset alone)."""

    grid: int = 3
    patch_size: int = 16
    stride: int | None = None  # None: half the patch size
    intensity_scale: float = 0.1  # IntensityOptions' settings, with this view maker's defaults
    intensity_shift: float = 0.1
    noise_std: float = 0.1

    def __post_init__(self):
        self.stride = self.stride or self.patch_size // 2

    @property
    def extent(self) -> int:
        return self.stride * (self.grid - 1) + self.patch_size

    def __call__(self, volumes_BCDHW: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        batch = volumes_BCDHW.shape[0]
        starts = random_crop_starts(generator, volumes_BCDHW.shape[2:], self.extent, batch)
        patches = patch_grid(volumes_BCDHW, starts, self.grid, self.patch_size, self.stride)
        flat = self.augment_intensity(patches.flatten(0, 3), generator)  # each patch is one sample here
        return {"patches": flat.view(patches.shape), "starts": starts}


# ---------------------------------------------------------------------------------------------- CPC task
def cpc_info_nce(predictions_ND: torch.Tensor, targets_ND: torch.Tensor,
                 temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE (van den Oord et al. 2018): prediction n must score its own target n above all other targets.

    Scores are dot products of L2-normalised vectors over `temperature`. Returns the loss and the fraction of
    predictions whose best-scoring target is their own.
    """
    scores = F.normalize(predictions_ND, dim=1) @ F.normalize(targets_ND, dim=1).t() / temperature
    labels = torch.arange(len(scores), device=scores.device)
    return F.cross_entropy(scores, labels), (scores.argmax(dim=1) == labels).float().mean()


class CausalContext(nn.Module):
    """Context of row i from rows 0..i only (along grid axis 1 of (B, G, G, G, E)).

    A running mean over the rows (a masked aggregation: row i averages rows <= i), then a convolution that mixes
    neighbours inside the same row only (kernel 1x3x3), so no row ever sees a later one.
    """

    def __init__(self, embed_dim: int, context_dim: int):
        super().__init__()
        self.embed = nn.Linear(embed_dim, context_dim)
        self.mix = nn.Sequential(nn.ReLU(inplace=True),
                                 nn.Conv3d(context_dim, context_dim, kernel_size=(1, 3, 3), padding=(0, 1, 1)),
                                 nn.ReLU(inplace=True),
                                 nn.Conv3d(context_dim, context_dim, kernel_size=1))

    def forward(self, z_BGGGE: torch.Tensor) -> torch.Tensor:
        h = self.embed(z_BGGGE)
        counts = torch.arange(1, h.shape[1] + 1, device=h.device, dtype=h.dtype).view(1, -1, 1, 1, 1)
        running_mean = h.cumsum(dim=1) / counts
        return self.mix(running_mean.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)  # back to (B, G, G, G, C)


class ContrastivePredictiveCoding3d(nn.Module):
    """3D CPC: predict the embeddings of the next `prediction_steps` rows from the context of the rows above."""

    def __init__(self, encoder: nn.Module, views: PatchGridViews, context_dim: int = 128, projection_dim: int = 64,
                 prediction_steps: int = 2, temperature: float = 0.1):
        super().__init__()
        if not 1 <= prediction_steps < views.grid:
            raise ValueError(f"prediction_steps={prediction_steps} must be in [1, grid - 1 = {views.grid - 1}]")
        self.encoder = encoder
        self.views = views
        self.temperature = temperature
        self.target = nn.Linear(encoder.embed_dim, projection_dim)
        self.context = CausalContext(encoder.embed_dim, context_dim)
        self.predictors = nn.ModuleList(nn.Linear(context_dim, projection_dim) for _ in range(prediction_steps))

    def embed_patches(self, patches_BGGGCPPP: torch.Tensor) -> torch.Tensor:
        grid_shape = patches_BGGGCPPP.shape[:4]
        return self.encoder(patches_BGGGCPPP.flatten(0, 3)).view(*grid_shape, -1)

    def predictions(self, z_BGGGE: torch.Tensor) -> list[torch.Tensor]:
        """Prediction for step s (1-based) from row i, for i in 0..G-1-s: (B, G-s, G, G, projection_dim)."""
        context = self.context(z_BGGGE)
        grid = z_BGGGE.shape[1]
        return [predictor(context[:, :grid - step]) for step, predictor in enumerate(self.predictors, start=1)]

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        z = self.embed_patches(batch["patches"])
        targets = self.target(z)
        losses, accuracies = [], []
        for step, prediction in enumerate(self.predictions(z), start=1):
            loss, accuracy = cpc_info_nce(prediction.flatten(0, 3), targets[:, step:].flatten(0, 3), self.temperature)
            losses.append(loss)
            accuracies.append(accuracy)
        return {"loss": torch.stack(losses).mean(), "accuracy": torch.stack(accuracies).mean().detach()}


@TASKS.register("cpc_3d", options_from=PatchGridViews)
def cpc_3d(encoder: nn.Module, prediction_steps: int = 2, context_dim: int = 128, projection_dim: int = 64,
           temperature: float = 0.1, **view_options) -> nn.Module:
    """`view_options` are `PatchGridViews` settings (grid, patch_size, stride, noise_std, ...)."""
    return ContrastivePredictiveCoding3d(encoder, PatchGridViews(**view_options), context_dim=context_dim,
                                         projection_dim=projection_dim, prediction_steps=prediction_steps,
                                         temperature=temperature)


# ---------------------------------------------------------------------------------------------- exemplar
def triplet_loss(anchors_ND: torch.Tensor, positives_ND: torch.Tensor, margin: float) -> torch.Tensor:
    """Batch-all triplet loss: mean over anchors i and negatives j != i of
    max(0, margin + |a_i - p_i| - |a_i - p_j|), on L2-normalised embeddings (Euclidean distances).

    The negatives of anchor i are the positives (other crops) of the other volumes in the batch.
    """
    anchors, positives = F.normalize(anchors_ND, dim=1), F.normalize(positives_ND, dim=1)
    distances = torch.cdist(anchors, positives)  # (N, N): [i, j] = |a_i - p_j|
    positive = distances.diagonal()[:, None]
    off_diagonal = ~torch.eye(len(distances), dtype=torch.bool, device=distances.device)
    return F.relu(margin + positive - distances)[off_diagonal].mean()


class ExemplarNetwork(nn.Module):
    """Exemplar-CNN in 3D: two heavily augmented crops of a volume must be closer than crops of other volumes."""

    def __init__(self, encoder: nn.Module, views: TwoCropViews, projection_dim: int = 64, hidden_dim: int = 256,
                 margin: float = 0.5):
        super().__init__()
        self.encoder = encoder
        self.views = views
        self.margin = margin
        self.head = mlp_head(encoder.embed_dim, hidden_dim, projection_dim)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        z_a, z_b = self.head(self.encoder(torch.cat([batch["view_a"], batch["view_b"]]))).chunk(2)
        loss = triplet_loss(z_a, z_b, self.margin)
        distances = torch.cdist(F.normalize(z_a.detach(), dim=1), F.normalize(z_b.detach(), dim=1))
        accuracy = (distances.argmin(dim=1) == torch.arange(len(distances), device=distances.device)).float().mean()
        return {"loss": loss, "pair_accuracy": accuracy}


# "heavily augmented": wider shifts and jitter than contrastive_two_crop, plus blur, gamma and quarter turns
EXEMPLAR_VIEWS = {"max_shift": 16, "intensity_scale": 0.3, "intensity_shift": 0.3, "blur_sigma": 1.0, "gamma": 0.3,
                  "rotate90": True}


@TASKS.register("exemplar", options_from=TwoCropViews)
def exemplar(encoder: nn.Module, margin: float = 0.5, projection_dim: int = 64, hidden_dim: int = 256,
             **view_options) -> nn.Module:
    """`view_options` are `TwoCropViews` settings; unset ones take `EXEMPLAR_VIEWS`, then TwoCropViews' defaults."""
    views = TwoCropViews(**{**EXEMPLAR_VIEWS, **view_options})
    return ExemplarNetwork(encoder, views, projection_dim=projection_dim, hidden_dim=hidden_dim, margin=margin)
