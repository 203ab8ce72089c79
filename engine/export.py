"""Weights as safetensors plus a JSON card next to them, written atomically and read back with clear errors.

One mechanism for every exported module: `save_with_card` writes both files, `read_card` finds and checks the card
(its `format` names what the weights are), `load_weights` fills a module rebuilt from the card and names the keys
that do not fit. Weights are only ever read through safetensors (no unpickling).

- Encoders (`raf pretrain`): `export_encoder` / `load_encoder`, card format `rafmedia.encoder/1`; the card names
  the registered architecture and its options, so `load_encoder` can rebuild the module.
- The shape prior (`rafmedia.engine.tasks.shape`): `export_extra` / `load_shape_prior`, `rafmedia.shape_prior/1`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from rafmedia.core.errors import UserError
from rafmedia.core.files import atomic_write, read_json, write_json
from rafmedia.engine.encoders import create_encoder

CARD_SUFFIX = ".card.json"
ENCODER_FORMAT = "rafmedia.encoder/1"


def card_path(weights: str | Path) -> Path:
    """The card next to `weights`: `encoder.safetensors` -> `encoder.card.json`."""
    weights = Path(weights)
    return weights.with_name(weights.name.removesuffix(".safetensors") + CARD_SUFFIX)


def save_with_card(module: torch.nn.Module, weights: str | Path, card: dict[str, Any], *,
                   metadata: dict[str, str]) -> tuple[Path, Path]:
    """Writes `module`'s state dict to `weights` (safetensors, `metadata` in its header) and `card` next to it
    (`card_path`), each atomically; returns both paths."""
    state = {key: value.detach().cpu().contiguous() for key, value in module.state_dict().items()}
    atomic_write(weights, lambda tmp: save_file(state, str(tmp), metadata=metadata))
    return Path(weights), write_json(card_path(weights), card)


def read_card(weights: str | Path, *, card_format: str, what: str, how_to_export: str) -> dict[str, Any]:
    """The card of `weights`, after checking that both files exist and that the card is a `card_format` one.

    Args:
        what: what the weights hold, for the errors ("encoder", "shape prior").
        how_to_export: the fix when the card is missing ("export it with `raf pretrain`").
    """
    weights = Path(weights)
    if not weights.is_file():
        raise UserError(f"{what} weights not found: {weights}")
    card_file = card_path(weights)
    if not card_file.is_file():
        raise UserError(f"{weights} has no model card {card_file.name} next to it; {how_to_export}")
    card = read_json(card_file)
    if card.get("format") != card_format:
        raise UserError(f"{card_file} is a '{card.get('format')}' card, not a {what} card ({card_format})")
    return card


def load_weights(module: torch.nn.Module, weights: str | Path, card: dict[str, Any]) -> torch.nn.Module:
    """Loads `weights` into `module` (rebuilt from `card`), every key matching; returns it in eval mode."""
    result = module.load_state_dict(load_file(str(weights)), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise UserError(f"{weights} does not fit architecture '{card['architecture']}' with options "
                        f"{card.get('options')}: missing keys {_some(result.missing_keys)}, unexpected keys "
                        f"{_some(result.unexpected_keys)}")
    return module.eval()


def export_encoder(encoder: torch.nn.Module, weights: str | Path, *, architecture: str, options: dict[str, Any],
                   card: dict[str, Any]) -> Path:
    """Writes `weights` (safetensors) and its model card atomically; returns the weights path."""
    save_with_card(encoder, weights, {"format": ENCODER_FORMAT, "architecture": architecture, "options": options,
                                      "embed_dim": int(encoder.embed_dim), **card},
                   metadata={"architecture": architecture})
    return Path(weights)


def load_encoder(weights: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuilds an exported encoder from its card and safetensors weights; returns (encoder, card)."""
    card = read_card(weights, card_format=ENCODER_FORMAT, what="encoder",
                     how_to_export="export it with `raf pretrain`")
    encoder = create_encoder(card["architecture"], **card.get("options", {}))
    return load_weights(encoder, weights, card), card


def _some(keys: list[str], limit: int = 5) -> str:
    keys = sorted(keys)
    return str(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
