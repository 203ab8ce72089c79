"""The cohort-build spec: typed dataclasses read from YAML, validated with errors that name the key.

A spec says which stores to aggregate, which subjects to keep, how to split them and what to plant in the
splits (held-out sites, altered "challenging" cases, subgroup imbalance). See `configs/cohorts/example.yaml`.
Everything that can be checked without the data is checked in `load_spec` (unknown keys, fractions,
split names, alteration names and severities); values that need the manifests (attribute names and
values) are checked by the builder, with the same "did you mean" answers.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rafmedia.core.config import Schema, packaged_names, read_yaml
from rafmedia.core.errors import UserError
from rafmedia.core.registry import did_you_mean
from rafmedia.shards.alterations import list_alterations
from rafmedia.shards.alterations.base import NUM_SEVERITIES

SPEC_PACKAGE = "rafmedia.configs"
SPEC_FOLDER = "cohorts"
TRAIN = "train"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
# A filter on one metadata column: a value, a list of values, or {min: x, max: y} (both inclusive).
Filter = Any


@dataclass
class SourceSpec:
    """One cohort store to aggregate, optionally filtered by metadata (`where`)."""

    name: str = ""
    store: str = ""  # a cohort store, or a folder holding cohort.zarr; relative paths are from the current folder
    where: dict[str, Filter] = field(default_factory=dict)


@dataclass
class OutOfDistributionSpec:
    """Subjects matching any `hold_out` value are never trained on; they go to `splits` only."""

    hold_out: dict[str, list[Any]] = field(default_factory=dict)  # e.g. {site: [site-c]}
    splits: list[str] = field(default_factory=list)  # default: every split except train
    fraction: float | None = None  # share of held-out units in each listed split; None: all held-out units, spread


@dataclass
class AlterationSpec:
    """One alteration given to challenging cases (see `raf list alterations`)."""

    name: str = ""
    severity: int = 3
    weight: float = 1.0  # relative share among the challenging cases


@dataclass
class ChallengingSpec:
    """An exact `fraction` of each listed split is altered at read time; the alteration is recorded per subject."""

    fraction: float = 0.0
    splits: list[str] = field(default_factory=list)  # default: every split except train
    alterations: list[AlterationSpec] = field(default_factory=list)


@dataclass
class ImbalanceSpec:
    """Subsample one split so the counts of `attribute`'s values stand exactly in `ratio`."""

    split: str = TRAIN
    attribute: str = ""
    ratio: dict[str, int] = field(default_factory=dict)  # e.g. {F: 1, M: 3}; 0 drops a value


@dataclass
class CohortSpec:
    """A whole cohort build."""

    name: str = ""
    seed: int = 0
    sources: list[SourceSpec] = field(default_factory=list)
    select: dict[str, Filter] = field(default_factory=dict)
    splits: dict[str, float] = field(default_factory=lambda: {"train": 0.6, "public_test": 0.2, "hidden_test": 0.2})
    stratify: list[str] = field(default_factory=list)
    group_by: str | None = None
    out_of_distribution: OutOfDistributionSpec | None = None
    challenging: ChallengingSpec | None = None
    imbalance: list[ImbalanceSpec] = field(default_factory=list)

    def validate(self) -> None:
        """Checks what needs no data; raises a UserError naming the key, the value and the allowed values."""
        if not _NAME.match(self.name):
            raise UserError(f"key 'name': '{self.name}' must be letters, digits, '_' or '-' (it names the build)")
        if not self.sources:
            raise UserError("key 'sources' is empty: list at least one {name: ..., store: ...}")
        names = [source.name for source in self.sources]
        for index, source in enumerate(self.sources):
            if not _NAME.match(source.name) or names.count(source.name) > 1:
                raise UserError(f"key 'sources.{index}.name': '{source.name}' must be a unique name of letters, "
                                f"digits, '_' or '-' (names: {names})")
            if not source.store:
                raise UserError(f"key 'sources.{index}.store' is missing: give the path of a cohort store")
        self._validate_splits()
        if self.out_of_distribution is not None:
            self._validate_ood(self.out_of_distribution)
        if self.challenging is not None:
            self._validate_challenging(self.challenging)
        for index, entry in enumerate(self.imbalance):
            self._check_split_names(f"imbalance.{index}.split", [entry.split])
            if not entry.attribute:
                raise UserError(f"key 'imbalance.{index}.attribute' is missing: name the metadata column to balance")
            if not entry.ratio or any(not isinstance(v, int) or v < 0 for v in entry.ratio.values()) \
                    or not any(entry.ratio.values()):
                raise UserError(f"key 'imbalance.{index}.ratio': {entry.ratio} must map values to whole numbers >= 0, "
                                "at least one positive (e.g. {F: 1, M: 3}), so the ratio can be met exactly")

    def _validate_splits(self) -> None:
        if not self.splits:
            raise UserError("key 'splits' is empty: give fractions, e.g. "
                            "{train: 0.6, public_test: 0.2, hidden_test: 0.2}")
        for name, fraction in self.splits.items():
            if not _NAME.match(name):
                raise UserError(f"key 'splits.{name}': split names must be letters, digits, '_' or '-'")
            if not 0 < fraction <= 1:
                raise UserError(f"key 'splits.{name}': fraction must be in (0, 1], got {fraction}")
        total = sum(self.splits.values())
        if abs(total - 1.0) > 1e-6:
            listed = ", ".join(f"{name}={fraction:g}" for name, fraction in self.splits.items())
            raise UserError(f"key 'splits': fractions must sum to 1, got {total:g} ({listed})")

    def _validate_ood(self, ood: OutOfDistributionSpec) -> None:
        if not ood.hold_out:
            raise UserError("key 'out_of_distribution.hold_out' is empty: give e.g. {site: [site-c]}")
        ood.splits = ood.splits or [name for name in self.splits if name != TRAIN]
        self._check_split_names("out_of_distribution.splits", ood.splits)
        if TRAIN in ood.splits:
            raise UserError(f"key 'out_of_distribution.splits': held-out cases never go to '{TRAIN}'; "
                            f"list test splits only (from: {', '.join(n for n in self.splits if n != TRAIN)})")
        if ood.fraction is not None and not 0 < ood.fraction < 1:
            raise UserError(f"key 'out_of_distribution.fraction': must be in (0, 1) or null, got {ood.fraction}")

    def _validate_challenging(self, challenging: ChallengingSpec) -> None:
        challenging.splits = challenging.splits or [name for name in self.splits if name != TRAIN]
        self._check_split_names("challenging.splits", challenging.splits)
        if not 0 <= challenging.fraction <= 1:
            raise UserError(f"key 'challenging.fraction': must be in [0, 1], got {challenging.fraction}")
        if not challenging.alterations:
            raise UserError("key 'challenging.alterations' is empty: list e.g. [{name: gaussian_noise, severity: 3}]")
        for index, alteration in enumerate(challenging.alterations):
            key = f"challenging.alterations.{index}"
            if alteration.name not in list_alterations():
                raise UserError(f"key '{key}.name': unknown alteration '{alteration.name}';"
                                f"{did_you_mean(alteration.name, list_alterations())} "
                                f"(choose from: {', '.join(list_alterations())})")
            if not 1 <= alteration.severity <= NUM_SEVERITIES:
                raise UserError(f"key '{key}.severity': must be 1 to {NUM_SEVERITIES}, got {alteration.severity}")
            if alteration.weight <= 0:
                raise UserError(f"key '{key}.weight': must be positive, got {alteration.weight}")

    def _check_split_names(self, key: str, names: list[str]) -> None:
        for name in names:
            if name not in self.splits:
                raise UserError(f"key '{key}': unknown split '{name}';{did_you_mean(name, self.splits)} "
                                f"(splits: {', '.join(self.splits)})")


# ---- reading --------------------------------------------------------------------------------------
# The spec's errors name a key "key 'x'" and an integer "a whole number", as they always have.
SCHEMA = Schema(CohortSpec, type_names={int: "a whole number"})


def packaged_specs() -> list[str]:
    """Names of the example specs shipped in rafmedia/configs/cohorts (usable in place of a path)."""
    return packaged_names(SPEC_PACKAGE, SPEC_FOLDER)


def load_spec(name_or_path: str | Path) -> CohortSpec:
    """Reads and validates a spec from a YAML path or a packaged name (e.g. "example")."""
    data = read_yaml(name_or_path, package=SPEC_PACKAGE, folder=SPEC_FOLDER, what="cohort spec", packaged="spec")
    try:
        return spec_from_dict(data)
    except UserError as error:
        raise UserError(f"cohort spec '{name_or_path}': {error}") from None


def spec_from_dict(data: Any) -> CohortSpec:
    """Builds and validates a `CohortSpec` from plain data (as parsed from YAML)."""
    if not isinstance(data, dict):
        raise UserError(f"a cohort spec must be a mapping of keys, got {type(data).__name__}")
    if isinstance(data.get("imbalance"), dict):  # one entry may be written without the list
        data = {**data, "imbalance": [data["imbalance"]]}
    spec = SCHEMA.build(data)
    spec.validate()
    return spec


def spec_to_dict(spec: CohortSpec) -> dict[str, Any]:
    """The spec as plain data (what `spec_from_dict` reads back)."""
    return dataclasses.asdict(spec)
