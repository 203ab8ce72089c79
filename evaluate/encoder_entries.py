"""The encoders of an evaluation: one entry per encoder (its replicates, one per split seed, and its digest), plus
the random-init baseline. Given the cohort, each encoder's card decides how the cohort is prepared for it
(`rafmedia.evaluate.preparation`): the entry's model then prepares its inputs, and its `info` says what was done
(`preparation`) and under which licence the weights are shared (`licence`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rafmedia.core.errors import UserError
from rafmedia.engine.encoders import create_encoder
from rafmedia.engine.export import load_encoder
from rafmedia.evaluate.encoder_sources import load_any_encoder
from rafmedia.evaluate.preparation import Preparation, plan_preparation, prepared
from rafmedia.evaluate.results import digest
from rafmedia.shards.description import UNKNOWN_LICENCE
from rafmedia.shards.store import CohortStore

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
    info: dict[str, Any] = field(default_factory=dict)  # "preparation" (note and details) and "licence"


def parse_encoder(item: str) -> tuple[str, str | None]:
    """`SPEC` or `SPEC=WEIGHTS`: an export (`run/encoder.safetensors`), or `timm:NAME=w.safetensors`,
    `monai:NAME=w.pt`, `package.module:factory=w.safetensors` (`rafmedia.evaluate.encoder_sources`)."""
    spec, _, weights = item.partition("=")
    return spec, weights or None


def build_entries(encoders: list[str], *, options: dict[str, dict[str, Any]], seeds: list[int],
                  random_baseline: bool, cohort: str | Path | None = None,
                  channel: str | None = "image") -> list[EncoderEntry]:
    """One entry per encoder (named by its card, else by its spec and weights file; by card and file when names
    clash), plus the random baseline when asked: the first export's architecture re-initialised per seed, or, with no
    export, the first encoder's factory without weights.

    Args:
        encoders: `evaluate.encoders`: exports or SPEC=WEIGHTS items.
        options: `evaluate.encoder_options`: factory options by spec.
        seeds: one replicate per seed.
        random_baseline: also build the random-init baseline (last entry).
        cohort: the cohort store to prepare for each encoder's card (`plan_preparation`; a `UserError` when it
            cannot be); None: every cohort used as stored, as before cards recorded their preprocessing.
        channel: the cohort channel the encoders are fed (None: every channel alike, `plan_preparation`).
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
    store = CohortStore(cohort) if cohort is not None else None
    entries = []
    for item, model, info, card, name in loaded:
        if names.count(name) > 1:
            name = f"{name} ({Path(item).parent.name}/{Path(item).name})"
        preparation = _plan(card, store, name, channel)
        model = prepared(model, preparation)  # one module for every seed: the runner embeds a checkpoint once
        entries.append(EncoderEntry(name=name, source=item, digest=_prepared_digest(info["digest"], preparation),
                                    replicates=[Replicate(seed, model) for seed in seeds],
                                    info=_entry_info(card, preparation)))
    if random_baseline:
        entry = random_baseline_entry(loaded, options=options, seeds=seeds)
        cards = [card for _, _, _, card, _ in loaded if card is not None]
        preparation = _plan(cards[0] if cards else None, store, entry.name, channel)  # as the export it re-inits
        wrapped = {id(r.model): prepared(r.model, preparation) for r in entry.replicates}  # shared stays shared
        entry.replicates = [Replicate(r.seed, wrapped[id(r.model)]) for r in entry.replicates]
        entry.digest, entry.info = _prepared_digest(entry.digest, preparation), {
            **_entry_info(None, preparation), "licence": "none (random weights)"}
        entries.append(entry)
    return entries


def _plan(card: dict[str, Any] | None, store: CohortStore | None, name: str, channel: str | None) -> Preparation:
    if store is None:
        return Preparation(note="no cohort given to prepare for; used as stored")
    return plan_preparation(card, store, encoder_name=name, channel=channel)


def _prepared_digest(encoder_digest: str, preparation: Preparation) -> str:
    """The encoder's digest, changed only when the preparation changes its inputs (cached cells stay valid)."""
    return encoder_digest if preparation.is_identity else digest(encoder_digest, preparation.key())


def _entry_info(card: dict[str, Any] | None, preparation: Preparation) -> dict[str, Any]:
    return {"preparation": {"note": preparation.note, **preparation.details},
            "licence": (card or {}).get("licence") or UNKNOWN_LICENCE}


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
