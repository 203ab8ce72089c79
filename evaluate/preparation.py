"""Prepare a cohort the way an encoder's card says its inputs were prepared, or refuse.

`plan_preparation(card, store)` compares the card's `preprocessing` (written by `raf pretrain`,
`rafmedia.engine.card`) with the evaluation cohort's description (`rafmedia.shards.description.describe_store`,
the same helper on both sides) and returns a `Preparation`:

- spacing differs by more than `SPACING_TOLERANCE` (relative) -> each volume is resampled to the card's spacing on
  the fly (trilinear, `torch.nn.functional.interpolate` with align_corners=True: the first and last voxel centres
  stay in place, as `scipy.ndimage.zoom(order=1)` does);
- orientation differs -> the array axes are permuted and flipped to the card's axis codes (always possible between
  two sets of axis codes); a cohort whose orientation is not recorded is refused;
- the channel the evaluator reads is missing, or its intensity policy differs from the card's -> `UserError` naming
  the encoder, the cohort, the mismatch and the fix. A synthetic or unrecorded policy on either side cannot be
  compared: the note says so and the cohort is used (both sides share the per-volume z-score).
- a card without `preprocessing` (older exports, timm/monai/module specs) -> the cohort is used as stored.

`PreparedEncoder` applies a preparation to whatever reaches the encoder (whole volumes, grid patches, the
segmentation stage's volumes), after the evaluator's per-volume z-score: trilinear interpolation commutes with that
affine map, so this equals z-scoring the resampled volume with the stored volume's statistics. Dense outputs
(`forward_features`, `forward_pyramid`) are turned back to the cohort's axis order, so label maps still align.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rafmedia.core.errors import UserError
from rafmedia.shards.description import describe_store
from rafmedia.shards.store import CohortStore

SPACING_TOLERANCE = 0.01  # relative: 1.5 vs 1.51 mm is the same grid for an encoder
INCOMPARABLE_POLICIES = ("synthetic", "unknown")
AXIS_PAIRS = ("LR", "AP", "SI")
NO_PREPROCESSING = "no preprocessing recorded; cohort used as stored"


@dataclass
class Preparation:
    """How a cohort's arrays become the encoder's inputs: axis permutation and flips (to the card's orientation),
    then a resampling to the card's spacing.

    Attributes:
        permutation: card axis t holds the cohort's array axis `permutation[t]`.
        flips: after the permutation, card axes reversed.
        zoom: output voxels per input voxel along each card axis (cohort spacing / card spacing), or None.
        note: what was done, for people (printed by `raf evaluate`, kept in the report).
        details: the same as data (for the report and the encoder's digest).
    """

    permutation: tuple[int, int, int] = (0, 1, 2)
    flips: tuple[bool, bool, bool] = (False, False, False)
    zoom: tuple[float, float, float] | None = None
    note: str = NO_PREPROCESSING
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def is_identity(self) -> bool:
        return self.permutation == (0, 1, 2) and not any(self.flips) and self.zoom is None

    def key(self) -> str:
        """A canonical text of what changes the encoder's inputs (part of the encoder entry's digest)."""
        return json.dumps({"permutation": self.permutation, "flips": self.flips, "zoom": self.zoom})

    def geometry(self, x_BCDHW: torch.Tensor) -> torch.Tensor:
        """Reorients, then resamples (trilinear) a batch of volumes or patches to the card's grid."""
        x_BCDHW = x_BCDHW.permute(0, 1, *(2 + axis for axis in self.permutation))
        flipped = [2 + axis for axis, flip in enumerate(self.flips) if flip]
        if flipped:
            x_BCDHW = x_BCDHW.flip(flipped)
        if self.zoom is None:
            return x_BCDHW.contiguous()
        size = [max(1, round(side * zoom)) for side, zoom in zip(x_BCDHW.shape[2:], self.zoom)]
        return F.interpolate(x_BCDHW.float(), size=size, mode="trilinear", align_corners=True)

    def restore(self, features_BFDHW: torch.Tensor) -> torch.Tensor:
        """A dense output on the card's axes back on the cohort's axes (flips undone, then the permutation)."""
        flipped = [2 + axis for axis, flip in enumerate(self.flips) if flip]
        if flipped:
            features_BFDHW = features_BFDHW.flip(flipped)
        inverse = [self.permutation.index(axis) for axis in range(3)]
        return features_BFDHW.permute(0, 1, *(2 + axis for axis in inverse))


class PreparedEncoder(nn.Module):
    """An encoder that prepares its inputs first (`Preparation.geometry`); the encoder contract otherwise."""

    def __init__(self, encoder: nn.Module, preparation: Preparation):
        super().__init__()
        self.encoder, self.preparation = encoder, preparation
        self.embed_dim = int(encoder.embed_dim)

    def forward(self, x_BCDHW: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.preparation.geometry(x_BCDHW))

    def forward_features(self, x_BCDHW: torch.Tensor) -> torch.Tensor:
        return self.preparation.restore(self.encoder.forward_features(self.preparation.geometry(x_BCDHW)))


class PreparedPyramidEncoder(PreparedEncoder):
    """`PreparedEncoder` for encoders with `forward_pyramid` (their levels, each back on the cohort's axes)."""

    def forward_pyramid(self, x_BCDHW: torch.Tensor) -> list[torch.Tensor]:
        return [self.preparation.restore(level) for level in self.encoder.forward_pyramid(self.preparation.geometry(
            x_BCDHW))]


def prepared(encoder: nn.Module, preparation: Preparation) -> nn.Module:
    """`encoder` itself when the preparation changes nothing, else wrapped to apply it."""
    if preparation.is_identity:
        return encoder
    wrapper = PreparedPyramidEncoder if hasattr(encoder, "forward_pyramid") else PreparedEncoder
    return wrapper(encoder, preparation).eval()


# ---- the plan --------------------------------------------------------------------------------------------------------
def plan_preparation(card: dict[str, Any] | None, store: CohortStore, *, encoder_name: str,
                     channel: str | None = "image") -> Preparation:
    """How to prepare `channel` of `store` for the encoder of `card` (module docstring); `UserError` when it cannot
    be prepared. `channel` None (studies that embed every channel alike, such as the weak-label study): the first
    channel the encoder was trained on that the cohort has, else the cohort's first channel."""
    recorded = (card or {}).get("preprocessing")
    if not recorded:
        return Preparation(note=NO_PREPROCESSING, details={"recorded": False})
    if channel is None:
        stored = stored_channels(store)
        channel = next((name for name in recorded.get("channels") or [] if name in stored),
                       stored[0] if stored else "image")
    _check_channel(store, channel, encoder_name)
    cohort = describe_store(store, [channel])
    where = f"encoder '{encoder_name}' on cohort {store.path}"
    permutation, flips, orientation_note = _orientation(recorded.get("orientation"), cohort["orientation"], where)
    zoom, spacing_note = _spacing(recorded.get("spacing"), cohort["spacing"], permutation)
    intensity_note = _intensity(recorded, cohort["intensity"][channel]["policy"], channel, where)
    notes = [spacing_note, orientation_note, intensity_note]
    if recorded.get("input_size"):
        notes.append(f"trained on inputs of {'x'.join(map(str, recorded['input_size']))} voxels")
    details = {"recorded": True, "card": {key: recorded.get(key) for key in ("orientation", "spacing", "channels",
                                                                            "input", "input_size")},
               "cohort": {key: cohort[key] for key in ("orientation", "spacing")}, "permutation": list(permutation),
               "flips": list(flips), "zoom": None if zoom is None else list(zoom)}
    return Preparation(permutation, flips, zoom, note="; ".join(note for note in notes if note), details=details)


def stored_channels(store: CohortStore) -> list[str]:
    """The channels of the store's first subject."""
    subjects = store.subject_ids()
    return list(store.subject_attrs(subjects[0]).get("channels", [])) if subjects else []


def _check_channel(store: CohortStore, channel: str, encoder_name: str) -> None:
    stored = stored_channels(store)
    if channel not in stored:
        raise UserError(f"encoder '{encoder_name}' needs channel '{channel}', which cohort {store.path} does not have "
                        f"(its channels: {', '.join(stored) or 'none'}); ingest the matching acquisition as channel "
                        f"'{channel}' (listing column image:{channel}), or evaluate another cohort")


def _orientation(card_codes: str | None, cohort_codes: str | None,
                 where: str) -> tuple[tuple[int, int, int], tuple[bool, bool, bool], str]:
    """(permutation, flips, note) taking the cohort's axis codes to the card's."""
    if not card_codes:
        return (0, 1, 2), (False, False, False), ""
    if not cohort_codes:
        raise UserError(f"{where}: the encoder was trained on {card_codes} arrays but the cohort records no "
                        "orientation (subject attrs 'orientation' or 'direction'); re-ingest it with `raf shards "
                        f"ingest` and ingest.orientation={card_codes}")
    card_codes, cohort_codes = card_codes.upper(), cohort_codes.upper()
    if card_codes == cohort_codes:
        return (0, 1, 2), (False, False, False), f"orientation {card_codes} (matches)"
    try:
        permutation, flips = axis_transform(cohort_codes, card_codes)
    except ValueError:
        raise UserError(f"{where}: cannot reorient the cohort's axis codes '{cohort_codes}' to the encoder's "
                        f"'{card_codes}'; re-ingest it with ingest.orientation={card_codes}") from None
    return permutation, flips, f"orientation {cohort_codes} -> reoriented to {card_codes} on the fly"


def axis_transform(from_codes: str, to_codes: str) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """(permutation, flips) taking arrays with axis codes `from_codes` (e.g. "LPS") to `to_codes` (e.g. "RAS"):
    output axis t is input axis permutation[t], reversed where flips[t]. `ValueError` for codes that are not one
    of L/R, A/P and S/I each."""
    pair_of = {code: pair for pair in AXIS_PAIRS for code in pair}
    from_pairs = [pair_of.get(code) for code in from_codes]
    to_pairs = [pair_of.get(code) for code in to_codes]
    if any(sorted(pairs, key=str) != sorted(AXIS_PAIRS) for pairs in (from_pairs, to_pairs)):
        raise ValueError(f"axis codes '{from_codes}' and '{to_codes}' do not name the same three axes")
    permutation = tuple(from_pairs.index(pair) for pair in to_pairs)
    return permutation, tuple(from_codes[permutation[axis]] != to_codes[axis] for axis in range(3))


def _spacing(card_spacing: list[float] | None, cohort_spacing: list[float] | None,
             permutation: tuple[int, int, int]) -> tuple[tuple[float, float, float] | None, str]:
    """(zoom per card axis or None, note)."""
    if not card_spacing or not cohort_spacing:
        return None, "spacing not recorded on both sides; used as stored"
    cohort_on_card_axes = [float(cohort_spacing[axis]) for axis in permutation]
    zoom = tuple(cohort / float(card) for cohort, card in zip(cohort_on_card_axes, card_spacing))
    if all(abs(factor - 1.0) <= SPACING_TOLERANCE for factor in zoom):
        return None, f"spacing {_mm(card_spacing)} (matches)"
    return zoom, f"cohort spacing {_mm(cohort_on_card_axes)} -> resampled to {_mm(card_spacing)} on the fly"


def _mm(spacing: list[float]) -> str:
    values = [float(value) for value in spacing]
    return f"{values[0]:g} mm" if len(set(values)) == 1 else f"[{', '.join(f'{v:g}' for v in values)}] mm"


def _intensity(recorded: dict[str, Any], cohort_policy: dict[str, Any], channel: str, where: str) -> str:
    """The intensity note; `UserError` when both policies are known and differ."""
    if recorded.get("input") == "label":
        return "the encoder was trained on label maps: no intensity policy to compare"
    channels = recorded.get("channels") or [channel]
    trained = channel if channel in channels else channels[0]
    card_policy = ((recorded.get("intensity") or {}).get(trained) or {}).get("policy") or {"name": "unknown"}
    then = "per-volume z-score"
    names = (card_policy.get("name"), cohort_policy.get("name"))
    if card_policy == cohort_policy:
        return f"intensity: {_policy_text(cohort_policy)} + {then} (matches)"
    if names[0] in INCOMPARABLE_POLICIES or names[1] in INCOMPARABLE_POLICIES:
        return (f"intensity: encoder {_policy_text(card_policy)}, cohort {_policy_text(cohort_policy)}: cannot be "
                f"compared; both get the {then}")
    raise UserError(
        f"{where}: intensity policy differs for channel '{channel}': the encoder was trained on "
        f"'{trained}' with {_policy_text(card_policy)}, the cohort was ingested with {_policy_text(cohort_policy)}; "
        f"re-ingest the cohort with ingest.intensity.{channel}={json.dumps(card_policy)} (or "
        "ingest.intensity.default), or evaluate an encoder trained with the cohort's policy")


def _policy_text(policy: dict[str, Any]) -> str:
    options = {key: value for key, value in policy.items() if key != "name"}
    return str(policy.get("name")) + (f" {json.dumps(options, sort_keys=True)}" if options else "")
