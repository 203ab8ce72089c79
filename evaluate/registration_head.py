"""Registration as a downstream task: a small head on a frozen encoder's feature maps of two acquisitions of one
subject that predicts the dense displacement field between them.

Convention (as `rafmedia.shards.breathing`): the fixed volume (exhale) is the moving one (inhale) resampled through
the field, `fixed(x) = moving(x + u(x))`, u (3, D, H, W) in voxels on the fixed grid. The head reads the two feature
maps (B, F, d, h, w) (`dense_features`, computed once under `no_grad` like the segmentation head's, each channel
standardised with the training set's statistics), concatenated, through four 3x3x3 convolutions (a receptive field
of 9 feature cells, 36 voxels for a stride-4 map), and upsamples the (B, 3, d, h, w) output trilinearly to the
volume. Its last layer starts at zero, so an untrained head is the identity. It is trained on training subjects
only, by the mean squared error to their known field inside the fixed body (the synthetic breathing pair records
it), with Adam.

`IntensityGrid` is the raw-intensity baseline: the same head fed the z-scored volumes themselves, each cell of the
encoder's grid unfolded into factor^3 channels (space-to-depth), so it sees every voxel and nothing learned.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from rafmedia.core.errors import UserError
from rafmedia.evaluate.segmentation_head import encoder_features

LOSS_STRIDE = 2  # the training loss's grid, in voxels per cell (see `fit_registration_head`)
FAILED_FIT = 0.5  # a fit whose training error is above this share of the zero field's has failed
MAX_FIT_ATTEMPTS = 3


class IntensityGrid(nn.Module):
    """An 'encoder' without weights: `forward_features` is the volume (B, 1, D, H, W) unfolded into cells of side
    `factor`, (B, factor^3, D / factor, H / factor, W / factor)."""

    def __init__(self, factor: int = 4):
        super().__init__()
        self.factor = factor

    def forward_features(self, x_BCDHW: torch.Tensor) -> torch.Tensor:
        batch, channels, *spatial = x_BCDHW.shape
        f = self.factor
        if any(size % f for size in spatial):
            raise UserError(f"IntensityGrid: the volume's sides {spatial} must be multiples of its factor {f}")
        d, h, w = (size // f for size in spatial)
        cells = x_BCDHW.reshape(batch, channels, d, f, h, f, w, f).permute(0, 1, 3, 5, 7, 2, 4, 6)
        return cells.reshape(batch, channels * f**3, d, h, w)


class RegistrationHead(nn.Module):
    """Standardise both feature maps, concatenate, four 3x3x3 convolutions to 3 channels, upsample (module docstring)."""

    def __init__(self, in_channels: int, *, hidden_channels: int = 32):
        super().__init__()
        layers: list[nn.Module] = []
        width = 2 * in_channels
        for _ in range(3):
            layers += [nn.Conv3d(width, hidden_channels, kernel_size=3, padding=1), nn.ReLU()]
            width = hidden_channels
        self.predict = nn.Sequential(*layers, nn.Conv3d(width, 3, kernel_size=3, padding=1))
        for layer in layers[::2]:  # He init: PyTorch's default shrinks ReLU activations layer by layer, so slow to fit
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.predict[-1].weight)  # an untrained head is the identity (u = 0)
        nn.init.zeros_(self.predict[-1].bias)
        self.register_buffer("feature_mean", torch.zeros(1, in_channels, 1, 1, 1))
        self.register_buffer("feature_std", torch.ones(1, in_channels, 1, 1, 1))
        # voxels per unit of the last layer's output: the training fields' RMS, so the layers work at unit scale
        self.register_buffer("field_scale", torch.ones(()))

    def set_feature_statistics(self, features_NFDHW: torch.Tensor) -> None:
        self.feature_mean.copy_(features_NFDHW.mean(dim=(0, 2, 3, 4), keepdim=True))
        self.feature_std.copy_(features_NFDHW.std(dim=(0, 2, 3, 4), keepdim=True).clamp(min=1e-6))

    def forward(self, moving_BFdhw: torch.Tensor, fixed_BFdhw: torch.Tensor,
                size: tuple[int, int, int]) -> torch.Tensor:
        """The displacement field (B, 3, *size) in voxels on the fixed grid."""
        both = torch.cat([(moving_BFdhw - self.feature_mean) / self.feature_std,
                          (fixed_BFdhw - self.feature_mean) / self.feature_std], dim=1)
        return F.interpolate(self.predict(both) * self.field_scale, size=tuple(size), mode="trilinear",
                             align_corners=False)


def fit_registration_head(moving_NFdhw: torch.Tensor, fixed_NFdhw: torch.Tensor, fields_N3DHW: torch.Tensor,
                          weights_NDHW: torch.Tensor, *, steps: int, lr: float, seed: int, batch_size: int = 4,
                          hidden_channels: int = 32) -> tuple[RegistrationHead, dict[str, float]]:
    """Trains a `RegistrationHead` on cached feature maps: Adam on the mean squared error to the true fields,
    weighted per voxel by `weights` (the fixed body), on a grid `LOSS_STRIDE` times coarser than the volume.

    A fit whose final training error is above `FAILED_FIT` times the zero field's has failed (seen with Adam at
    3e-3: the first steps killed the ReLUs and the head predicted a near-constant field, for every encoder alike);
    it is redone with the next seed and a third of the learning rate, up to `MAX_FIT_ATTEMPTS` times, and the
    attempts are reported. Returns (the head in eval mode, {"train_mse_zero", "train_mse", "attempts", "lr"})."""
    # The loss is taken on a grid LOSS_STRIDE times coarser than the volume (fields and body averaged over each
    # cell): the fields are smooth, and the full-resolution loss cost 8x the time for the same fit.
    targets = F.avg_pool3d(fields_N3DHW.float(), LOSS_STRIDE)
    weights = F.avg_pool3d(weights_NDHW.float()[:, None], LOSS_STRIDE)
    zero = _training_error(None, moving_NFdhw, fixed_NFdhw, targets, weights, batch_size)
    for attempt in range(MAX_FIT_ATTEMPTS):
        rate = lr / 3**attempt
        head = _fit_once(moving_NFdhw, fixed_NFdhw, targets, weights, steps=steps, lr=rate, seed=seed + attempt,
                         batch_size=batch_size, hidden_channels=hidden_channels, field_scale=fields_N3DHW)
        error = _training_error(head, moving_NFdhw, fixed_NFdhw, targets, weights, batch_size)
        if error < FAILED_FIT * zero:
            break
    return head, {"train_mse_zero": zero, "train_mse": error, "attempts": attempt + 1, "lr": rate}


def _weighted_mse(predicted: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (weights * (predicted - targets) ** 2).sum() / (3 * weights.sum()).clamp(min=1e-6)


def _fit_once(moving_NFdhw, fixed_NFdhw, targets, weights, *, steps: int, lr: float, seed: int, batch_size: int,
              hidden_channels: int, field_scale: torch.Tensor) -> RegistrationHead:
    with torch.random.fork_rng(devices=[]):  # the head's initial weights come from `seed`
        torch.manual_seed(seed)
        head = RegistrationHead(moving_NFdhw.shape[1], hidden_channels=hidden_channels)
    head.set_feature_statistics(torch.cat([moving_NFdhw, fixed_NFdhw]))
    head.field_scale.fill_(float(field_scale.pow(2).mean().sqrt().clamp(min=1e-3)))
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    size = tuple(targets.shape[2:])
    head.train()
    for _ in range(steps):
        batch = torch.randperm(len(moving_NFdhw), generator=generator)[:batch_size]
        loss = _weighted_mse(head(moving_NFdhw[batch], fixed_NFdhw[batch], size), targets[batch], weights[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head.eval()


@torch.no_grad()
def _training_error(head, moving_NFdhw, fixed_NFdhw, targets, weights, batch_size: int) -> float:
    """The weighted MSE over the whole training set (of a zero field when `head` is None)."""
    total, mass = 0.0, 0.0
    for start in range(0, len(targets), batch_size):
        part = slice(start, start + batch_size)
        predicted = (torch.zeros_like(targets[part]) if head is None else
                     head(moving_NFdhw[part], fixed_NFdhw[part], tuple(targets.shape[2:])))
        total += float((weights[part] * (predicted - targets[part]) ** 2).sum())
        mass += 3 * float(weights[part].sum())
    return total / max(mass, 1e-6)


@torch.no_grad()
def predict_fields(encoder: nn.Module, head: RegistrationHead, moving_NCDHW: torch.Tensor, fixed_NCDHW: torch.Tensor,
                   *, batch_size: int = 4) -> np.ndarray:
    """Predicted fields (N, 3, D, H, W) float32 for raw volume pairs (z-scored in `encoder_features`)."""
    size = tuple(moving_NCDHW.shape[2:])
    chunks = []
    for start in range(0, len(moving_NCDHW), batch_size):
        moving = encoder_features(encoder, moving_NCDHW[start:start + batch_size], batch_size=batch_size)
        fixed = encoder_features(encoder, fixed_NCDHW[start:start + batch_size], batch_size=batch_size)
        chunks.append(head(moving, fixed, size).float().cpu())
    return torch.cat(chunks).numpy()


def moved_landmarks(field_3DHW: np.ndarray, fixed_K3: np.ndarray) -> np.ndarray:
    """Where a field sends fixed-grid points: q + u(q), u interpolated trilinearly (K, 3)."""
    fixed = np.asarray(fixed_K3, dtype=np.float64).reshape(-1, 3)
    if not len(fixed):
        return fixed
    moved = np.stack([ndimage.map_coordinates(field_3DHW[axis].astype(np.float64), fixed.T, order=1, mode="nearest")
                      for axis in range(3)], axis=1)
    return fixed + moved


def target_registration_error(field_3DHW: np.ndarray, moving_K3: np.ndarray, fixed_K3: np.ndarray,
                              spacing: tuple[float, float, float]) -> np.ndarray:
    """Per landmark, the distance in mm between its true moving position and where the field sends its fixed
    position (K,). A zero field gives the landmarks' own displacement."""
    error = (moved_landmarks(field_3DHW, fixed_K3) - np.asarray(moving_K3, dtype=np.float64)) * np.asarray(spacing)
    return np.linalg.norm(error, axis=1)


def dice_per_structure(pred_DHW: np.ndarray, ref_DHW: np.ndarray, structures: dict[str, int]) -> dict[str, float]:
    """Dice of each structure's mask; 1.0 when the structure is absent from both, as Metrics Reloaded counts it."""
    scores = {}
    for name, value in structures.items():
        pred, ref = pred_DHW == value, ref_DHW == value
        total = int(pred.sum()) + int(ref.sum())
        scores[name] = 1.0 if total == 0 else 2.0 * int((pred & ref).sum()) / total
    return scores
