"""The encoders of an evaluation: one entry per encoder (its replicates, one per split seed, and its digest), plus
the random-init baseline."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rafmedia.core.errors import UserError
from rafmedia.engine.encoders import create_encoder
from rafmedia.engine.export import load_encoder
from rafmedia.evaluate.encoder_sources import load_any_encoder
from rafmedia.evaluate.results import digest

RANDOM_SOURCE = "random initialisation"  # the source of the random-init baseline entry


@dataclass
class Replicate:
    seed: int
    model: torch.nn.Module


@dataclass
class EncoderEntry:
    name: str
    source: str
    replicates: list[Replicate]
    digest: str  # the results store's key of this encoder


def parse_encoder(item: str) -> tuple[str, str | None]:
    """`SPEC` or `SPEC=WEIGHTS`: an export (`run/encoder.safetensors`), or `timm:NAME=w.safetensors`,
    `monai:NAME=w.pt`, `package.module:factory=w.safetensors` (`rafmedia.evaluate.encoder_sources`)."""
    spec, _, weights = item.partition("=")
    return spec, weights or None


def build_entries(encoders: list[str], *, options: dict[str, dict[str, Any]], seeds: list[int],
                  random_baseline: bool) -> list[EncoderEntry]:
    """One entry per encoder (named by its card, else by its spec and weights file; by card and file when names
    clash), plus the random baseline when asked: the first export's architecture re-initialised per seed, or, with no
    export, the first encoder's factory without weights.

    Args:
        encoders: `evaluate.encoders`: exports or SPEC=WEIGHTS items.
        options: `evaluate.encoder_options`: factory options by spec.
        seeds: one replicate per seed.
        random_baseline: also build the random-init baseline (last entry).
    """
    if len(set(encoders)) != len(encoders):
        raise UserError(f"an encoder is given twice: {encoders}")
    loaded = []
    for item in encoders:
        spec, weights = parse_encoder(item)
        model, info = load_any_encoder(spec, weights=weights, options=options.get(spec))
        card = load_encoder(spec)[1] if info["source"] == "rafmedia" else None
        name = (card or {}).get("name") or (spec if weights is None else f"{spec} ({Path(weights).name})")
        loaded.append((item, model, info, card, name))
    names = [name for *_, name in loaded]
    entries = []
    for item, model, info, card, name in loaded:
        if names.count(name) > 1:
            name = f"{name} ({Path(item).parent.name}/{Path(item).name})"
        entries.append(EncoderEntry(name=name, source=item, replicates=[Replicate(seed, model) for seed in seeds],
                                    digest=info["digest"]))
    if random_baseline:
        entries.append(random_baseline_entry(loaded, options=options, seeds=seeds))
    return entries


def random_baseline_entry(loaded: list[tuple], *, options: dict[str, dict[str, Any]], seeds: list[int]) -> EncoderEntry:
    """The random-init baseline of `loaded` (item, model, info, card, name per encoder), one replicate per seed."""
    cards = [card for _, _, _, card, _ in loaded if card is not None]
    if cards:
        card = cards[0]
        replicates = []
        for seed in seeds:
            torch.manual_seed(seed)
            replicates.append(Replicate(seed, create_encoder(card["architecture"], **card.get("options", {})).eval()))
        return EncoderEntry(name=f"random-init {card['architecture']}", source=RANDOM_SOURCE,
                            replicates=replicates, digest=digest("random-init", card["architecture"],
                                                                 card.get("options", {}), seeds))
    spec, _ = parse_encoder(loaded[0][0])
    model, info = load_any_encoder(spec, options=options.get(spec))  # one fixed initialisation
    return EncoderEntry(name=f"random-init {spec}", source=RANDOM_SOURCE,
                        replicates=[Replicate(seed, model) for seed in seeds], digest=info["digest"])
