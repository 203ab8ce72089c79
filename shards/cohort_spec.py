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
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from rafmedia.core.errors import UserError
from rafmedia.core.registry import did_you_mean

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
        from rafmedia.shards.alterations import list_alterations
        from rafmedia.shards.alterations.base import NUM_SEVERITIES

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
def packaged_specs() -> list[str]:
    """Names of the example specs shipped in rafmedia/configs/cohorts (usable in place of a path)."""
    folder = resources.files(SPEC_PACKAGE).joinpath(SPEC_FOLDER)
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_spec(name_or_path: str | Path) -> CohortSpec:
    """Reads and validates a spec from a YAML path or a packaged name (e.g. "example")."""
    path = Path(name_or_path)
    if path.is_file():
        text = path.read_text(encoding="utf-8")
    elif str(name_or_path) in packaged_specs():
        text = resources.files(SPEC_PACKAGE).joinpath(SPEC_FOLDER, f"{name_or_path}.yaml").read_text(encoding="utf-8")
    else:
        raise UserError(f"cohort spec '{name_or_path}' not found;{did_you_mean(str(name_or_path), packaged_specs())} "
                        f"(give a YAML path or a packaged spec: {', '.join(packaged_specs())})")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise UserError(f"cohort spec '{name_or_path}' is not valid YAML: {str(error).splitlines()[0]}") from None
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
    spec = _build(CohortSpec, data, "")
    spec.validate()
    return spec


def spec_to_dict(spec: CohortSpec) -> dict[str, Any]:
    return dataclasses.asdict(spec)


def _build(cls, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise UserError(f"key '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = did_you_mean(prefix + str(key), [prefix + n for n in names])
            raise UserError(f"unknown key '{prefix}{key}';{close} "
                            f"(valid keys{' under ' + prefix.rstrip('.') if prefix else ''}: {', '.join(names)})")
    return cls(**{key: _coerce(value, hints[key], f"{prefix}{key}") for key, value in data.items()})


def _coerce(value: Any, kind, key: str):
    args = typing.get_args(kind)
    if type(None) in args:  # Optional[X]
        if value is None:
            return None
        kind = next(arg for arg in args if arg is not type(None))
    origin = typing.get_origin(kind)
    if dataclasses.is_dataclass(kind):
        return _build(kind, value, f"{key}.")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"key '{key}' must be a list, got {value!r}")
        return [_coerce(item, typing.get_args(kind)[0], f"{key}.{index}") for index, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"key '{key}' must be a mapping, got {value!r}")
        item_kind = typing.get_args(kind)[1]
        return {str(k): _coerce(v, item_kind, f"{key}.{k}") for k, v in value.items()}
    return _scalar(value, kind, key)


def _scalar(value: Any, kind, key: str):
    if kind is Any:
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    names = {int: "a whole number", float: "a number", str: "a string"}
    raise UserError(f"key '{key}' must be {names.get(kind, kind)}, got {value!r}")
