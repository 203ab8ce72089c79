"""Encoder export and import: weights as safetensors plus a JSON model card next to them.

The card names the registered architecture and its options, so `load_encoder` can rebuild the module;
weights are only ever read through safetensors (no unpickling).
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


def card_path(weights: str | Path) -> Path:
    weights = Path(weights)
    return weights.with_name(weights.name.removesuffix(".safetensors") + CARD_SUFFIX)


def export_encoder(encoder: torch.nn.Module, weights: str | Path, *, architecture: str, options: dict[str, Any],
                   card: dict[str, Any]) -> Path:
    """Writes `weights` (safetensors) and its model card atomically; returns the weights path."""
    state = {key: value.detach().cpu().contiguous() for key, value in encoder.state_dict().items()}
    atomic_write(weights, lambda tmp: save_file(state, str(tmp), metadata={"architecture": architecture}))
    write_json(card_path(weights), {"format": "rafmedia.encoder/1", "architecture": architecture,
                                    "options": options, "embed_dim": int(encoder.embed_dim), **card})
    return Path(weights)


def load_encoder(weights: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuilds an exported encoder from its card and safetensors weights; returns (encoder, card)."""
    weights = Path(weights)
    if not weights.is_file():
        raise UserError(f"encoder weights not found: {weights}")
    card_file = card_path(weights)
    if not card_file.is_file():
        raise UserError(f"{weights} has no model card {card_file.name} next to it; export it with `raf pretrain`")
    card = read_json(card_file)
    encoder = create_encoder(card["architecture"], **card.get("options", {}))
    state = load_file(str(weights))
    result = encoder.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise UserError(f"{weights} does not fit architecture '{card['architecture']}' with options {card.get('options')}: "
                        f"missing keys {_some(result.missing_keys)}, unexpected keys {_some(result.unexpected_keys)}")
    return encoder.eval(), card


def _some(keys: list[str], limit: int = 5) -> str:
    keys = sorted(keys)
    return str(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
