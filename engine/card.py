"""What an encoder's card says about how it was made, besides its architecture: the preprocessing its inputs went
through, the data's licence and sources, the weights' licence, the code version and the config.

`raf pretrain` adds these sections to `encoder.card.json` (`card_sections`); the evaluator reads `preprocessing`
back to prepare each cohort the same way (`rafmedia.evaluate.preparation`), the leaderboard shows `licence`, and
`raf export --hf` copies them into `config.json` and the model card (docs/checkpoints.md).
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import re
import subprocess
import warnings
from pathlib import Path
from typing import Any

from rafmedia.engine.batches import DataConfig
from rafmedia.engine.encoders import EncoderConfig
from rafmedia.engine.tasks import TaskConfig
from rafmedia.engine.train import TrainConfig
from rafmedia.shards.description import UNKNOWN_LICENCE, describe_store, store_provenance
from rafmedia.shards.store import CohortStore

UNSPECIFIED_LICENCE = "unspecified"  # encoder.licence's default: the weights' owner has not said
# Licences that let anyone use the weights commercially: claiming one over non-commercial data deserves a warning.
PERMISSIVE_LICENCES = ("apache-2.0", "mit", "bsd-2-clause", "bsd-3-clause", "cc0-1.0", "cc-by-4.0", "cc-by-sa-4.0",
                       "isc", "unlicense", "mpl-2.0", "openrail")
_NON_COMMERCIAL = re.compile(r"(^|[^a-z])nc([^a-z]|$)|non[- ]?commercial")
_REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout when rafmedia runs from a git working tree


class LicenceWarning(UserWarning):
    """Weights claimed under a permissive licence were trained on data whose licence does not allow it (NC) or is
    not known."""


def card_sections(*, store: CohortStore, channels: list[str], kind: str, input_size: list[int] | None,
                  licence: str, config: dict[str, Any]) -> dict[str, Any]:
    """The card's `preprocessing`, `provenance` (data licence and sources), `licence`, `code_version` and `config`.

    Args:
        store: the cohort the encoder was trained on.
        channels: the store channels the encoder takes, in order ([] for label maps).
        kind: the task's input kind ("image", "paired", "label").
        input_size: the (d, h, w) the encoder was trained on (crop or ViT img_size), or None.
        licence: the weights' licence (`encoder.licence`).
        config: the resolved config sections used (data, encoder, task, train).
    """
    provenance = store_provenance(store)
    for message in licence_warnings(licence, provenance):
        warnings.warn(message, LicenceWarning, stacklevel=2)
    preprocessing = {**describe_store(store, channels), "input": kind,
                     "input_size": None if input_size is None else [int(side) for side in input_size]}
    return {"preprocessing": preprocessing, "provenance": provenance, "licence": licence,
            "code_version": code_version(), "config": config}


def trained_card(store: CohortStore, *, data: DataConfig, encoder: EncoderConfig, task: TaskConfig,
                 train_config: TrainConfig, kind: str, input_size: list[int] | None) -> dict[str, Any]:
    """The card sections of an encoder pretrained on `store` (`pretrain_encoder`'s config slices `data`, `encoder`,
    `task`, `train_config`): `data` (cohort, licence, sources), `preprocessing`, `licence`, `code_version` and
    `config`."""
    channels = [] if kind == "label" else (data.channels if kind == "paired" else [data.channel])
    sections = card_sections(store=store, channels=channels, kind=kind, input_size=input_size,
                             licence=encoder.licence, config=config_sections(data=data, encoder=encoder, task=task,
                                                                             train=train_config))
    provenance = sections.pop("provenance")
    return {"data": {"cohort": str(store.path), "num_subjects": len(store.subject_ids()), "input": kind,
                     "channels": data.channels or [data.channel], "source": data.source,
                     "licence": provenance["licence"], "sources": provenance["sources"]}, **sections}


def config_sections(**sections: Any) -> dict[str, Any]:
    """Dataclass config slices as plain JSON-able dicts, e.g. `config_sections(data=data, encoder=encoder)`."""
    return {name: dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
            for name, value in sections.items()}


def encoder_input_size(encoder: Any, views: Any) -> list[int] | None:
    """The input size an encoder is trained on: a ViT's fixed `img_size`, else the task views' crop side."""
    size = getattr(encoder, "img_size", None) or getattr(views, "crop_size", None)
    if size is None:
        return None
    return [int(size)] * 3 if isinstance(size, (int, float)) else [int(side) for side in size]


def licence_warnings(licence: str, provenance: dict[str, Any]) -> list[str]:
    """One message per data source whose licence is non-commercial or unknown, when the weights claim a permissive
    licence; none otherwise."""
    if not is_permissive(licence):
        return []
    sources = provenance.get("sources") or [{"name": "the training data", "licence": provenance.get("licence")}]
    messages = []
    for source in sources:
        data_licence = str(source.get("licence") or UNKNOWN_LICENCE)
        if is_non_commercial(data_licence) or data_licence.lower() == UNKNOWN_LICENCE:
            what = "non-commercial" if is_non_commercial(data_licence) else "unknown"
            messages.append(f"encoder.licence is '{licence}' (permissive) but data source '{source.get('name')}' has "
                            f"{'a' if what == 'non-commercial' else 'an'} {what} licence '{data_licence}': weights "
                            "trained on it may not be shareable under that licence; check the data's terms, or set "
                            "encoder.licence to match them")
    return messages


def is_permissive(licence: str) -> bool:
    return str(licence).strip().lower() in PERMISSIVE_LICENCES


def is_non_commercial(licence: str) -> bool:
    return bool(_NON_COMMERCIAL.search(str(licence).lower()))


def code_version() -> dict[str, Any]:
    """rafmedia's installed version and, when the code runs from a git checkout, its commit and whether the working
    tree has uncommitted changes (`git` None otherwise)."""
    try:
        version = importlib.metadata.version("rafmedia")
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {"rafmedia": version, "git": _git_state(_REPO_ROOT)}


def _git_state(folder: Path) -> dict[str, Any] | None:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()
    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != folder:
            return None  # rafmedia installed inside someone else's repository: that commit says nothing about it
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None
