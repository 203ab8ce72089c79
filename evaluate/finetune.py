"""Gradient adaptors: an encoder trained with a linear head on the labelled volumes, under a fixed compute budget.

Three ways of choosing what trains, one training loop:

- `finetune_full`: every parameter of the encoder, plus the head;
- `finetune_partial`: the encoder's last blocks (`tail_blocks`) plus the head, the rest frozen (and kept in eval
  mode, so a frozen batch norm's running statistics stay as they were);
- `lora`: low-rank adapters (Hu et al. 2021, "LoRA") on every `nn.Linear` of the encoder, through the `peft`
  library (`inject_adapter_in_model`), plus the head; the base weights stay frozen. An encoder without Linear
  layers (the CNNs) is not applicable.

They take volumes, not embeddings: `fit(encoder, volumes_NCDHW, labels_N)` trains a copy of `encoder` (the
caller's model is never changed), `scores(volumes_NCDHW)` gives the positive-class probability (the `(N, C)`
probabilities for more classes), `predict(volumes_NCDHW)` a label. Volumes are raw: each is z-scored as the
embedder does (`normalize_intensity`). The probe registry tags them `inputs="volumes"`.

The compute budget is the same for every adaptor: `steps` AdamW steps of `batch_size` volumes drawn with
replacement from the labelled set (samples seen = steps x batch_size), the same augmentation ("none", or random
flips along each spatial axis), every random draw (head init, batches, flips) from generators seeded by `seed`,
`threads` torch threads on the CPU. `seconds_` is the wall time of the fit.
"""
from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rafmedia.core.errors import UserError
from rafmedia.core.registry import unknown_name_error
from rafmedia.engine.torchvision_compat import import_torchvision
from rafmedia.shards.volumes import normalize_intensity

AUGMENTATIONS = ("none", "flips")
CONTAINERS = (nn.Sequential, nn.ModuleList)
LORA_EXTRA = "pip install 'rafmedia[lora]'"


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch on `count` threads for the block (0: leave as it is); small fits on a shared CPU run far faster on one."""
    before = torch.get_num_threads()
    if count > 0:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def encoder_blocks(encoder: nn.Module) -> list[nn.Module]:
    """The encoder's blocks in forward order, found from its module tree without naming an architecture.

    Descends through a module that holds a single parameter-holding child and no parameters of its own (a
    wrapper such as `vit` or `features`). There, the parameter-holding children are the blocks: the items of a
    `Sequential` / `ModuleList` (the CNN's conv blocks), or each child with a container child contributing its items
    instead (the ViT's patch embedding, transformer blocks and final norm; Swin's patch embedding and stages).
    An encoder may also define `trainable_tail()` itself (see `tail_modules`).
    """
    module = encoder
    while True:
        holders = [child for child in module.children() if holds_parameters(child)]
        if len(holders) != 1 or any(True for _ in module.parameters(recurse=False)):
            break
        module = holders[0]
    if isinstance(module, CONTAINERS):
        return holders or [module]
    blocks = []
    for child in holders:
        blocks += [item for item in child if holds_parameters(item)] if isinstance(child, CONTAINERS) else [child]
    return blocks or [module]


def holds_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def tail_modules(encoder: nn.Module, tail_blocks: int) -> list[nn.Module]:
    """What `finetune_partial` trains: the encoder's own `trainable_tail()` when it has one, else its last
    `tail_blocks` blocks (`encoder_blocks`)."""
    hook = getattr(encoder, "trainable_tail", None)
    if callable(hook):
        return list(hook())
    blocks = encoder_blocks(encoder)
    if tail_blocks < 1 or tail_blocks >= len(blocks):
        raise UserError(f"finetune_partial tail_blocks must be in [1, {len(blocks) - 1}] for this encoder, which has "
                        f"{len(blocks)} blocks; got {tail_blocks} (use finetune_full to train all of them)")
    return blocks[-tail_blocks:]


def linear_layer_names(encoder: nn.Module) -> list[str]:
    """The names of the encoder's `nn.Linear` layers (attention projections and MLPs of a transformer): LoRA's
    targets."""
    return [name for name, module in encoder.named_modules() if isinstance(module, nn.Linear)]


def flip(x_BCDHW: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each volume flipped along each spatial axis with probability 1/2 (draws from `generator`)."""
    flips_B3 = torch.rand(len(x_BCDHW), 3, generator=generator) < 0.5
    out = []
    for x_CDHW, axes in zip(x_BCDHW, flips_B3.tolist()):
        dims = [1 + axis for axis, flipped in enumerate(axes) if flipped]
        out.append(torch.flip(x_CDHW, dims) if dims else x_CDHW)
    return torch.stack(out)


class Classifier(nn.Module):
    """An encoder's pooled embedding followed by a linear head."""

    def __init__(self, encoder: nn.Module, num_classes: int, generator: torch.Generator):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(int(encoder.embed_dim), num_classes)
        bound = 1.0 / np.sqrt(int(encoder.embed_dim))  # torch's default Linear init, drawn from our generator
        with torch.no_grad():
            self.head.weight.uniform_(-bound, bound, generator=generator)
            self.head.bias.uniform_(-bound, bound, generator=generator)

    def forward(self, x_BCDHW: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x_BCDHW))


@dataclass
class VolumeAdaptor:
    """The training loop every gradient adaptor shares; subclasses say what trains (`prepare`)."""

    steps: int = 50
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.01
    augmentation: str = "flips"
    threads: int = 1
    seed: int = 0

    def not_applicable(self, encoder: nn.Module) -> str | None:
        """Why this adaptor cannot adapt `encoder` (None: it can)."""
        return None

    def prepare(self, encoder: nn.Module) -> list[nn.Module]:
        """Sets `requires_grad` on the encoder copy (in place) and returns the modules that run in train mode."""
        raise NotImplementedError

    def fit(self, encoder: nn.Module, volumes_NCDHW: torch.Tensor, labels_N: np.ndarray) -> VolumeAdaptor:
        reason = self.not_applicable(encoder)
        if reason:
            raise UserError(f"{type(self).__name__} cannot adapt this encoder: {reason}")
        self.classes_, codes_N = np.unique(np.asarray(labels_N), return_inverse=True)
        if len(self.classes_) < 2:
            raise UserError(f"a fine-tuning adaptor needs at least two classes in the training labels; got "
                            f"{self.classes_.tolist()}: check the target column and the label budget")
        began = time.perf_counter()
        with torch_threads(self.threads):
            generator = torch.Generator().manual_seed(self.seed)
            model = copy.deepcopy(encoder)
            model.requires_grad_(False)
            training = self.prepare(model)
            self.network_ = Classifier(model, len(self.classes_), generator).to(self.device_of(model))
            self.num_trainable_ = sum(p.numel() for p in model.parameters() if p.requires_grad)
            self._train(normalize_intensity(torch.as_tensor(volumes_NCDHW)), torch.as_tensor(codes_N), training,
                        generator)
        self.seconds_ = time.perf_counter() - began
        return self

    def _train(self, x_NCDHW: torch.Tensor, y_N: torch.Tensor, training: list[nn.Module],
               generator: torch.Generator) -> None:
        parameters = [p for p in self.network_.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=self.lr, weight_decay=self.weight_decay)
        self.network_.eval()
        for module in [*training, self.network_.head]:
            module.train()
        self.steps_taken_ = 0
        device = self.device()
        for _ in range(self.steps):
            batch_B = torch.randint(0, len(x_NCDHW), (self.batch_size,), generator=generator)
            x_BCDHW = x_NCDHW[batch_B]
            if self.augmentation == "flips":
                x_BCDHW = flip(x_BCDHW, generator)
            loss = nn.functional.cross_entropy(self.network_(x_BCDHW.to(device)), y_N[batch_B].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            self.steps_taken_ += 1
        self.network_.eval()
        self.samples_seen_ = self.steps_taken_ * self.batch_size

    @torch.no_grad()
    def probabilities(self, volumes_NCDHW: torch.Tensor) -> np.ndarray:
        """(N, C) class probabilities of raw volumes, in batches of `batch_size`."""
        x_NCDHW = normalize_intensity(torch.as_tensor(volumes_NCDHW))
        with torch_threads(self.threads):
            chunks = [torch.softmax(self.network_(x_NCDHW[start:start + self.batch_size].to(self.device())), dim=1)
                      for start in range(0, len(x_NCDHW), self.batch_size)]
        return torch.cat(chunks).double().cpu().numpy()

    @staticmethod
    def device_of(model: nn.Module) -> torch.device:
        parameter = next(model.parameters(), None)
        return parameter.device if parameter is not None else torch.device("cpu")

    def device(self) -> torch.device:
        """Where the encoder's copy lives (the caller's encoder's device): batches are moved there, draws stay on the
        CPU generator so a fit draws the same batches and flips on any device."""
        return self.device_of(self.network_.encoder)

    def scores(self, volumes_NCDHW: torch.Tensor) -> np.ndarray:
        """Probability of the positive class (binary targets); `(N, C)` probabilities for more classes."""
        probabilities_NC = self.probabilities(volumes_NCDHW)
        return probabilities_NC[:, 1] if probabilities_NC.shape[1] == 2 else probabilities_NC

    def predict(self, volumes_NCDHW: torch.Tensor) -> np.ndarray:
        return self.classes_[self.probabilities(volumes_NCDHW).argmax(axis=1)]


@dataclass
class FullFineTune(VolumeAdaptor):
    """Every encoder parameter trains (batch norms in train mode)."""

    def prepare(self, encoder: nn.Module) -> list[nn.Module]:
        encoder.requires_grad_(True)
        return [encoder]


@dataclass
class PartialFineTune(VolumeAdaptor):
    """The encoder's last `tail_blocks` blocks train (`tail_modules`); the rest is frozen, in eval mode."""

    tail_blocks: int = 2

    def not_applicable(self, encoder: nn.Module) -> str | None:
        if callable(getattr(encoder, "trainable_tail", None)) or len(encoder_blocks(encoder)) > self.tail_blocks:
            return None
        return f"it has {len(encoder_blocks(encoder))} block(s), not more than tail_blocks={self.tail_blocks}"

    def prepare(self, encoder: nn.Module) -> list[nn.Module]:
        tail = tail_modules(encoder, self.tail_blocks)
        for module in tail:
            module.requires_grad_(True)
        return tail


def import_peft():
    """peft's `LoraConfig` and `inject_adapter_in_model`; a clear error naming the extra when it is missing."""
    import_torchvision()  # peft imports transformers, which imports torchvision: the CPU-torch shim must come first
    try:
        import peft  # optional extra `lora`: only the LoRA adaptor needs it
    except ImportError:
        raise UserError(f"the lora adaptor needs the peft library: {LORA_EXTRA}") from None
    return peft.LoraConfig, peft.inject_adapter_in_model


def peft_missing() -> str | None:
    """Why peft cannot be used here (None when it imports)."""
    try:
        import_peft()
    except UserError as missing:
        return str(missing)
    return None


@dataclass
class LoraAdaptor(VolumeAdaptor):
    """LoRA adapters of rank `rank` (scale `alpha / rank`) on every `nn.Linear` of the encoder; base weights frozen.

    The adapted layer computes W x + (alpha / rank) B A x with A (rank x in) and B (out x rank, zero at the start),
    so it trains rank x (in + out) parameters per layer; `merged_weight` gives W + (alpha / rank) B A.
    """

    rank: int = 4
    alpha: float = 8.0
    lr: float = 3e-3

    def not_applicable(self, encoder: nn.Module) -> str | None:
        if not linear_layer_names(encoder):
            return ("it has no nn.Linear layer to put adapters on (LoRA targets attention and MLP projections: use a "
                    "ViT or Swin encoder, or finetune_partial)")
        return peft_missing()

    def prepare(self, encoder: nn.Module) -> list[nn.Module]:
        lora_config, inject = import_peft()
        config = lora_config(r=self.rank, lora_alpha=self.alpha, lora_dropout=0.0, bias="none",
                             target_modules=linear_layer_names(encoder))
        inject(config, encoder)  # in place: each targeted Linear becomes a peft LoRA layer around it
        for name, parameter in encoder.named_parameters():
            parameter.requires_grad_("lora_" in name)
        return [module for name, module in encoder.named_modules() if "lora_" in name]


def check_augmentation(augmentation: str) -> str:
    if augmentation not in AUGMENTATIONS:
        raise unknown_name_error("fine-tuning augmentation", augmentation, AUGMENTATIONS)
    return augmentation


def check_budget(steps: int, batch_size: int, lr: float, threads: int) -> None:
    """The compute budget's values, checked before any fit."""
    if steps < 1 or batch_size < 1 or lr <= 0 or threads < 0:
        raise UserError(f"a fine-tuning budget needs steps >= 1, batch_size >= 1, lr > 0 and threads >= 0 (0: torch's "
                        f"default); got steps={steps}, batch_size={batch_size}, lr={lr}, threads={threads}")
