"""DINO self-distillation (Caron et al., ICCV 2021) in 3D: `dino_3d`.

A student (the encoder + a DINO head) learns to match, on every crop of a volume, the output distribution a
teacher gives on the *other* global crops of that volume. The teacher is a copy of the student updated only
by an exponential moving average of the student's weights (`on_step_end`), never by gradients; it is a
submodule (`task.teacher`) with `requires_grad=False`, so the optimizer never sees it and checkpoints carry it.

What keeps DINO from collapsing, and so what the defaults keep: the teacher's outputs are *centred* (a running
mean of its outputs, `center`, is subtracted: no single prototype can dominate) and *sharpened* (teacher
temperature 0.04 against the student's 0.1: the uniform output is not a fixed point either); the head's last
layer is weight-normalised with unit norm, so the logits stay bounded. Unlike DINO's ViT recipe, the head has
BatchNorm by default (`head_batch_norm`, DINO's `use_bn_in_head`): on the 36-subject synthetic cohort the
BN-free head collapsed to a uniform teacher within 20-40 steps with every temperature, lr and crop scale tried
(cnn3d_small's pooled embeddings barely differ between subjects at init, so after centering nothing is left
to sharpen); with BatchNorm the student learns to agree with the teacher (see the test). The defaults
(64 prototypes, teacher momentum 0.99, center momentum 0.99, large overlapping crops) were picked the same way.

Views (`MultiCropViews`): two global crops and `num_local_crops` small crops per volume, each cut at its own
random place and size, resized, flipped and intensity-jittered, every draw from the pipeline's generator.
Encoders with a fixed input size (a ViT's `img_size`) get every crop resampled to that size.

The trainer exports `task.encoder`, the student; the teacher's encoder (`task.teacher.encoder`), DINO's
choice for evaluation, is in the checkpoint.
"""
from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from rafmedia.core.errors import UserError
from rafmedia.engine.tasks.base import TASKS
from rafmedia.engine.views import FlipOptions, IntensityOptions, draw_flips, flip_samples, resized_crops, uniform
from rafmedia.shards.sampling import as_triple

Size3 = tuple[int, int, int]


# ---------------------------------------------------------------------------------------------- views
@dataclass
class MultiCropViews(FlipOptions, IntensityOptions):
    """DINO's multi-crop: per volume, 2 global crops and `num_local_crops` local crops.

    A crop's side is a fraction of the volume's smallest side drawn from `global_scale` / `local_scale` (a
    fraction of the side, not of the volume), its corner uniform where it fits; it is resampled to
    `global_size` / `local_size` voxels, then flipped per axis, intensity-jittered and noised. Every crop of
    sample b comes from volume b.

    Returns `global_crops` (B, 2, C, g, g, g) and `local_crops` (B, num_local_crops, C, l, l, l).
    """

    global_size: Size3 = (24, 24, 24)
    local_size: Size3 = (12, 12, 12)
    global_scale: tuple[float, float] = (0.6, 1.0)
    local_scale: tuple[float, float] = (0.25, 0.5)
    num_local_crops: int = 4
    noise_std: float = 0.1  # IntensityOptions' setting, with this view maker's default

    def __post_init__(self):
        for name in ("global_scale", "local_scale"):
            low, high = getattr(self, name)
            if not 0 < low <= high <= 1:
                raise UserError(f"{name} must be two fractions 0 < low <= high <= 1 of the volume's side, "
                                f"got {getattr(self, name)}")
        if self.num_local_crops < 0:
            raise UserError(f"num_local_crops must be >= 0, got {self.num_local_crops}")

    def __call__(self, volumes_BCDHW: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        global_crops = [self._crop(volumes_BCDHW, generator, self.global_scale, self.global_size) for _ in range(2)]
        local_crops = [self._crop(volumes_BCDHW, generator, self.local_scale, self.local_size)
                       for _ in range(self.num_local_crops)]
        batch, channels = volumes_BCDHW.shape[:2]
        empty = volumes_BCDHW.new_zeros((batch, 0, channels, *self.local_size))
        return {"global_crops": torch.stack(global_crops, dim=1),
                "local_crops": torch.stack(local_crops, dim=1) if local_crops else empty}

    def _crop(self, volumes_BCDHW: torch.Tensor, generator: torch.Generator, scale: tuple[float, float],
              size: Size3) -> torch.Tensor:
        starts, sides = self._place(volumes_BCDHW, generator, scale)
        return self._augment(resized_crops(volumes_BCDHW, starts, sides, size), generator)

    @staticmethod
    def _place(volumes_BCDHW: torch.Tensor, generator: torch.Generator,
               scale: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample's crop corner (B, 3) and side (B,): a `scale` fraction of the smallest side, placed uniformly."""
        batch, spatial = volumes_BCDHW.shape[0], torch.tensor(volumes_BCDHW.shape[2:])
        smallest = int(spatial.min())
        sides = (uniform(generator, scale[0], scale[1], (batch,)) * smallest).round().long().clamp(1, smallest)
        starts = (torch.rand((batch, 3), generator=generator) * (spatial - sides[:, None] + 1)).long()
        return starts, sides

    def _augment(self, x_BCDHW: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x_BCDHW = flip_samples(x_BCDHW, draw_flips(generator, len(x_BCDHW), self.flip_probability))
        return self.augment_intensity(x_BCDHW, generator)


@dataclass
class PairedMultiCropViews(MultiCropViews):
    """Multi-crop of two acquisitions of each subject, (B, 2, D, H, W) (`data.channels`): the two global crops are
    cut at one place, global crop 0 from channel 0 and global crop 1 from channel 1, each flipped and jittered on
    its own; each local crop is cut at its own place from a channel drawn per sample. Since DINO's teacher scores
    each global crop and the student learns to match it on the *other* crops, the student learns to predict, from
    one acquisition, what the teacher says of the other, in both directions.

    Returns `global_crops` (B, 2, 1, g, g, g), `local_crops` (B, num_local_crops, 1, l, l, l) and, for checks,
    `local_channels` (B, num_local_crops), the channel of each local crop.
    """

    def __call__(self, volumes_BCDHW: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        if volumes_BCDHW.ndim != 5 or volumes_BCDHW.shape[1] != 2:
            raise UserError(f"dino_paired needs two channels of each subject, (B, 2, D, H, W), got shape "
                            f"{tuple(volumes_BCDHW.shape)}; set data.channels to two channel names, e.g. "
                            "data.channels=[image,exhale]")
        starts, sides = self._place(volumes_BCDHW, generator, self.global_scale)
        both = resized_crops(volumes_BCDHW, starts, sides, self.global_size)
        global_crops = [self._augment(both[:, channel:channel + 1], generator) for channel in range(2)]
        batch, rows = volumes_BCDHW.shape[0], torch.arange(volumes_BCDHW.shape[0])
        local_crops, channels = [], []
        for _ in range(self.num_local_crops):
            starts, sides = self._place(volumes_BCDHW, generator, self.local_scale)
            channel = torch.randint(0, 2, (batch,), generator=generator)
            crop = resized_crops(volumes_BCDHW, starts, sides, self.local_size)[rows, channel][:, None]
            local_crops.append(self._augment(crop, generator))
            channels.append(channel)
        empty = volumes_BCDHW.new_zeros((batch, 0, 1, *self.local_size))
        return {"global_crops": torch.stack(global_crops, dim=1),
                "local_crops": torch.stack(local_crops, dim=1) if local_crops else empty,
                "local_channels": torch.stack(channels, dim=1) if channels else torch.zeros(batch, 0, dtype=torch.long)}


# ---------------------------------------------------------------------------------------------- head and schedules
class DinoHead(nn.Module):
    """MLP (Linear-GELU-Linear-GELU-Linear to `bottleneck_dim`), L2-normalised, then a weight-normalised linear
    layer onto `out_dim` prototypes whose weight rows have unit norm (DINO's `norm_last_layer=True`)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 256, bottleneck_dim: int = 64,
                 batch_norm: bool = False):
        super().__init__()
        def norm() -> nn.Module:
            return nn.BatchNorm1d(hidden_dim) if batch_norm else nn.Identity()

        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), norm(), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 norm(), nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck_dim))  # directions; their norm is fixed to 1
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(x_ND), dim=-1)
        return F.linear(z, F.normalize(self.prototypes, dim=-1))


def cosine_momentum(step: int, total_steps: int, base: float) -> float:
    """Teacher EMA momentum: `base` at step 0, rising along a half cosine to exactly 1 at step total_steps - 1."""
    progress = min(1.0, step / max(1, total_steps - 1))
    return 1.0 - (1.0 - base) * 0.5 * (1.0 + math.cos(math.pi * progress))


def teacher_temperature(step: int, *, start: float, end: float, warmup_steps: int) -> float:
    """Linear warmup from `start` (step 0) to `end` (step `warmup_steps` and after)."""
    if step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


def dino_cross_entropy(teacher_probs_GBK: torch.Tensor, student_logits_VBK: torch.Tensor,
                       student_temp: float) -> torch.Tensor:
    """Mean over pairs (global crop g of the teacher, crop v != g of the student) of the batch-mean
    cross-entropy -sum_k q_g log softmax(s_v / student_temp); the first G student crops are the global ones."""
    log_probs = F.log_softmax(student_logits_VBK / student_temp, dim=-1)
    terms = [-(teacher_probs_GBK[g] * log_probs[v]).sum(dim=-1).mean()
             for g in range(teacher_probs_GBK.shape[0]) for v in range(log_probs.shape[0]) if v != g]
    return torch.stack(terms).mean()


def _mean_across_ranks_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place mean over ranks (a no-op in one process), so every rank keeps the same center."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


# ---------------------------------------------------------------------------------------------- task
class Dino3d(nn.Module):
    """DINO: student = `encoder` + `head`; teacher = their EMA copy (`teacher.encoder`, `teacher.head`)."""

    def __init__(self, encoder: nn.Module, views: MultiCropViews, *, out_dim: int = 256, hidden_dim: int = 256,
                 bottleneck_dim: int = 64, student_temp: float = 0.1, teacher_temp: float = 0.04,
                 warmup_teacher_temp: float = 0.04, warmup_teacher_temp_steps: int = 0,
                 teacher_momentum: float = 0.996, center_momentum: float = 0.9, head_batch_norm: bool = False):
        super().__init__()
        if not 0.0 <= teacher_momentum <= 1.0 or not 0.0 <= center_momentum < 1.0:
            raise UserError(f"teacher_momentum must be in [0, 1] and center_momentum in [0, 1), got "
                            f"{teacher_momentum} and {center_momentum}")
        if min(student_temp, teacher_temp, warmup_teacher_temp) <= 0:
            raise UserError("student_temp, teacher_temp and warmup_teacher_temp must be positive")
        self.encoder = encoder
        self.views = views
        self.head = DinoHead(encoder.embed_dim, out_dim, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim,
                            batch_norm=head_batch_norm)
        self.teacher = nn.ModuleDict({"encoder": copy.deepcopy(encoder), "head": copy.deepcopy(self.head)})
        self.teacher.requires_grad_(False)
        self.student_temp, self.teacher_momentum, self.center_momentum = student_temp, teacher_momentum, center_momentum
        self.teacher_temp, self.warmup_teacher_temp = teacher_temp, warmup_teacher_temp
        self.warmup_teacher_temp_steps = warmup_teacher_temp_steps
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))  # drives the temperature schedule

    def current_teacher_temp(self) -> float:
        return teacher_temperature(int(self.steps_done), start=self.warmup_teacher_temp, end=self.teacher_temp,
                                   warmup_steps=self.warmup_teacher_temp_steps)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        global_crops, local_crops = batch["global_crops"], batch["local_crops"]
        batch_size, num_global = global_crops.shape[:2]
        globals_flat = global_crops.transpose(0, 1).flatten(0, 1)  # crop-major: (G * B, C, ...)
        student = [self.head(self.encoder(globals_flat))]
        if local_crops.shape[1]:  # local crops have another size: a second encoder call
            student.append(self.head(self.encoder(local_crops.transpose(0, 1).flatten(0, 1))))
        student_VBK = torch.cat(student).view(-1, batch_size, self.center.shape[1])
        with torch.no_grad():
            teacher_logits = self.teacher["head"](self.teacher["encoder"](globals_flat))
            teacher_GBK = F.softmax((teacher_logits - self.center) / self.current_teacher_temp(), dim=-1)
            teacher_GBK = teacher_GBK.view(num_global, batch_size, -1)
        loss = dino_cross_entropy(teacher_GBK, student_VBK, self.student_temp)
        if self.training:
            self.update_center(teacher_logits)
        return {"loss": loss, **self._logs(teacher_GBK, student_VBK.detach())}

    @torch.no_grad()
    def update_center(self, teacher_logits_NK: torch.Tensor) -> None:
        """center <- m * center + (1 - m) * mean of the teacher's logits over the batch (and ranks)."""
        batch_mean = _mean_across_ranks_(teacher_logits_NK.mean(dim=0, keepdim=True))
        self.center.mul_(self.center_momentum).add_(batch_mean, alpha=1.0 - self.center_momentum)

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        """Teacher <- m * teacher + (1 - m) * student, m on the cosine schedule; advances the temperature."""
        momentum = cosine_momentum(step, total_steps, self.teacher_momentum)
        student = list(self.encoder.parameters()) + list(self.head.parameters())
        teacher = list(self.teacher["encoder"].parameters()) + list(self.teacher["head"].parameters())
        torch._foreach_mul_(teacher, momentum)
        torch._foreach_add_(teacher, [p.detach() for p in student], alpha=1.0 - momentum)
        self.steps_done.fill_(step + 1)

    def exported_encoder(self) -> nn.Module:
        """What `raf pretrain` exports: the teacher's encoder, as DINO evaluates it (Caron et al. 2021)."""
        return self.teacher["encoder"]

    @torch.no_grad()
    def _logs(self, teacher_GBK: torch.Tensor, student_VBK: torch.Tensor) -> dict[str, torch.Tensor]:
        # Collapse shows as per-sample entropy -> log K (uniform) or batch-mean entropy -> 0 (one prototype).
        entropy = -(teacher_GBK * teacher_GBK.clamp(min=1e-12).log()).sum(dim=-1).mean()
        marginal = teacher_GBK.mean(dim=(0, 1))
        batch_entropy = -(marginal * marginal.clamp(min=1e-12).log()).sum()
        # Agreement: student crop v's top prototype equals the teacher's on a global crop other than v.
        teacher_top, student_top = teacher_GBK.argmax(dim=-1), student_VBK.argmax(dim=-1)
        matches = [(student_top[v] == teacher_top[g]).float().mean()
                   for g in range(len(teacher_top)) for v in range(len(student_top)) if v != g]
        return {"teacher_entropy": entropy, "teacher_batch_entropy": batch_entropy,
                "agreement": torch.stack(matches).mean(), "teacher_temp": self.current_teacher_temp()}


def _dino(views_class: type[MultiCropViews], encoder: nn.Module, *, out_dim: int = 64, hidden_dim: int = 256,
          bottleneck_dim: int = 64, student_temp: float = 0.1, teacher_temp: float = 0.04,
          warmup_teacher_temp: float = 0.04, warmup_teacher_temp_steps: int = 0, teacher_momentum: float = 0.99,
          center_momentum: float = 0.99, global_size: int | Sequence[int] | None = None,
          global_scale: Sequence[float] = (0.8, 1.0), local_size: int | Sequence[int] = 12,
          local_scale: Sequence[float] = (0.4, 0.6), head_batch_norm: bool = True, **view_options) -> nn.Module:
    """A `Dino3d` whose views are made by `views_class`; every DINO factory's options (see `dino_3d`)."""
    views = _multi_crop_views(views_class, encoder, global_size=global_size, local_size=local_size,
                              global_scale=global_scale, local_scale=local_scale, **view_options)
    return Dino3d(encoder, views, out_dim=out_dim, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim,
                  student_temp=student_temp, teacher_temp=teacher_temp, warmup_teacher_temp=warmup_teacher_temp,
                  warmup_teacher_temp_steps=warmup_teacher_temp_steps, teacher_momentum=teacher_momentum,
                  center_momentum=center_momentum, head_batch_norm=head_batch_norm)


def _with_dino_options(factory):
    """Gives `factory(encoder, **options)` `_dino`'s keyword signature, which the registry reads to list and check
    a task's options (`Registry.options`), so the two DINO factories share one list of defaults."""
    parameters = list(inspect.signature(_dino).parameters.values())[1:]  # all but views_class
    factory.__signature__ = inspect.Signature(parameters)
    return factory


@TASKS.register("dino_3d", options_from=MultiCropViews)
@_with_dino_options
def dino_3d(encoder: nn.Module, **options) -> nn.Module:
    """DINO on one acquisition (`MultiCropViews`). Options: the head and schedule settings of `_dino` (out_dim 64,
    teacher_momentum 0.99, center_momentum 0.99, head_batch_norm True, ...) and the other `MultiCropViews` settings
    (num_local_crops, flip_probability, noise_std, ...).

    `global_size` defaults to the encoder's `img_size` when it has one (ViT), else 24. A fixed-size encoder
    gets its local crops resampled to its `img_size` too (they still cover `local_scale` of the volume)."""
    return _dino(MultiCropViews, encoder, **options)


@TASKS.register("dino_paired", data="paired", options_from=PairedMultiCropViews)
@_with_dino_options
def dino_paired(encoder: nn.Module, **options) -> nn.Module:
    """`dino_3d` (the same `Dino3d` module, options and defaults) whose views are the two acquisitions of each
    subject (`PairedMultiCropViews`): global crops of channel 0 and channel 1 at one place, local crops of either."""
    return _dino(PairedMultiCropViews, encoder, **options)


def _multi_crop_views(views_class: type[MultiCropViews], encoder: nn.Module, *, global_size, local_size, global_scale,
                      local_scale, **view_options) -> MultiCropViews:
    """The view maker of a DINO task: crop sizes from the options, or the encoder's fixed `img_size` (ViT)."""
    fixed = getattr(encoder, "img_size", None)
    if fixed is not None:
        fixed = as_triple(fixed, "encoder img_size")
        if global_size is not None and as_triple(global_size, "global_size") != fixed:
            raise UserError(f"dino global_size={global_size} but the encoder takes inputs of exactly {fixed} "
                            f"(its img_size); drop task.options.global_size or set it to the encoder's img_size")
    return views_class(global_size=fixed or as_triple(global_size or 24, "global_size"),
                       local_size=fixed or as_triple(local_size, "local_size"),
                       global_scale=tuple(global_scale), local_scale=tuple(local_scale), **view_options)
