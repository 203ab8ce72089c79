"""Typed configuration at the edge: dataclass schema <- packaged defaults <- YAML file <- key=value overrides.

The schema is the `RafConfig` tree below; each slice is defined next to the code that uses it and is
passed inward on its own. Validation errors are `UserError`s naming the dotted key, the expected type
and, for unknown keys, the closest valid key.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from rafmedia.core.errors import UserError
from rafmedia.core.files import atomic_write_text
from rafmedia.core.registry import did_you_mean
from rafmedia.engine.batches import DataConfig
from rafmedia.engine.encoders import EncoderConfig
from rafmedia.engine.tasks import TaskConfig
from rafmedia.engine.train import TrainConfig
from rafmedia.evaluate.runner import EvaluateConfig
from rafmedia.launch.slurm import SlurmConfig
from rafmedia.shards.ingest import IngestConfig
from rafmedia.shards.store import StoreConfig
from rafmedia.shards.synth import CohortConfig
from rafmedia.shards.wds_export import ExportConfig

DEFAULT_CONFIG = "default"
RESOLVED_CONFIG = "resolved_config.yaml"


@dataclass
class RafConfig:
    """The whole configuration tree. Each command reads only the slices it needs."""

    cohort: CohortConfig = field(default_factory=CohortConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


def packaged_configs() -> list[str]:
    """Names of the YAML configs shipped with rafmedia (usable as `--config NAME`)."""
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("rafmedia.configs").iterdir()
                  if p.name.endswith(".yaml"))


def read_yaml(name_or_path: str) -> dict[str, Any]:
    """Reads a config file by path, or a packaged config by name (e.g. "tiny")."""
    path = Path(name_or_path)
    if path.is_file():
        text = path.read_text(encoding="utf-8")
    elif name_or_path in packaged_configs():
        text = resources.files("rafmedia.configs").joinpath(f"{name_or_path}.yaml").read_text(encoding="utf-8")
    else:
        raise UserError(f"config file '{name_or_path}' not found;{did_you_mean(name_or_path, packaged_configs())} "
                        f"(give a YAML path or a packaged config: {', '.join(packaged_configs())})")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise UserError(f"config file '{name_or_path}' is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file '{name_or_path}' must hold a mapping of sections, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=0.001' -> (['train', 'lr'], 0.001). Values are parsed as YAML ('[1, 2]', 'true', 'null')."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"override '{text}' is not of the form key=value (for example train.steps=100)")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip().split("."), parsed


def _schema_fields(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def merge(base: dict[str, Any], update: dict[str, Any], cls, prefix: str = "") -> dict[str, Any]:
    """Deep-merges `update` into `base` following the schema `cls`; unknown keys raise with "did you mean"."""
    fields = _schema_fields(cls)
    merged = dict(base)
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise UserError(f"unknown config key '{dotted}';{did_you_mean(dotted, [prefix + f for f in fields])} "
                            f"(valid keys{' under ' + prefix.rstrip('.') if prefix else ''}: {', '.join(fields)})")
        kind = fields[key]
        if dataclasses.is_dataclass(kind) and isinstance(value, dict):
            merged[key] = merge(merged.get(key, {}), value, kind, f"{dotted}.")
        elif typing.get_origin(kind) is dict and isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def apply_override(tree: dict[str, Any], path: list[str], value: Any) -> None:
    """Sets one dotted key in the plain tree, in place; list items by index (cohort.sites.2.noise_std=0.09).

    Unknown keys are not checked here: `build` reports them with the closest valid key.
    """
    node: Any = tree
    for depth, key in enumerate(path[:-1]):
        node = node[_index(node, key, path[:depth + 1])] if isinstance(node, list) else node.setdefault(key, {})
        if not isinstance(node, (dict, list)):
            raise UserError(f"config key '{'.'.join(path[:depth + 1])}' is a value, not a section: "
                            f"cannot set '{'.'.join(path)}'")
    if isinstance(node, list):
        node[_index(node, path[-1], path)] = value
    else:
        node[path[-1]] = value


def _index(items: list, key: str, dotted: list[str]) -> int:
    if not key.isdigit() or int(key) >= len(items):
        raise UserError(f"config key '{'.'.join(dotted)}': '{key}' is not an index of this list (0 to {len(items) - 1})")
    return int(key)


def build(cls, data: Any, prefix: str = ""):
    """Builds dataclass `cls` from plain data, checking and coercing every value's type."""
    if not isinstance(data, dict):
        raise UserError(f"config key '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    fields = _schema_fields(cls)
    merge({}, data, cls, prefix)  # reports unknown keys
    return cls(**{key: _coerce(data[key], kind, f"{prefix}{key}") for key, kind in fields.items() if key in data})


def _coerce(value: Any, kind, dotted: str):
    origin = typing.get_origin(kind)
    if dataclasses.is_dataclass(kind):
        return build(kind, value, f"{dotted}.")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key '{dotted}' must be a list, got {value!r}")
        (item_kind,) = typing.get_args(kind)
        return [_coerce(item, item_kind, f"{dotted}.{index}") for index, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"config key '{dotted}' must be a mapping, got {value!r}")
        return dict(value)
    if kind is Any:
        return value
    return _coerce_scalar(value, kind, dotted)


def _coerce_scalar(value: Any, kind, dotted: str):
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-3" as a string
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    raise UserError(f"config key '{dotted}' must be {names.get(kind, kind)}, got {value!r}")


def load_config(config_file: str | None = None, overrides: list[str] = ()) -> RafConfig:
    """Schema defaults <- packaged default.yaml <- `config_file` <- `overrides`, validated."""
    tree = dataclasses.asdict(RafConfig())
    tree = merge(tree, read_yaml(DEFAULT_CONFIG), RafConfig)
    if config_file:
        layer = read_yaml(config_file)
        _reset_options_of_renamed(tree, {section: (layer.get(section) or {}).get("name") for section in NAMED_SECTIONS
                                         if isinstance(layer.get(section), dict)})
        tree = merge(tree, layer, RafConfig)
    parsed = [parse_override(text) for text in overrides]
    _reset_options_of_renamed(tree, {path[0]: value for path, value in parsed
                                     if len(path) == 2 and path[0] in NAMED_SECTIONS and path[1] == "name"})
    for path, value in parsed:
        apply_override(tree, path, value)
    return build(RafConfig, tree)


# Sections whose `options` belong to the component `name` picks: when a layer picks another component, the options
# written for the previous one are dropped (the new one starts from its factory's defaults plus what the layer sets).
NAMED_SECTIONS = ("encoder", "task")


def _reset_options_of_renamed(tree: dict[str, Any], new_names: dict[str, Any]) -> None:
    for section, name in new_names.items():
        if name is not None and name != tree[section].get("name"):
            tree[section]["options"] = {}


def write_resolved(config: RafConfig, out_dir: str | Path, sections: list[str]) -> Path:
    """Writes the slices a command used, fully resolved, to `out_dir/resolved_config.yaml`."""
    tree = dataclasses.asdict(config)
    text = yaml.safe_dump({name: tree[name] for name in sections}, sort_keys=False)
    return atomic_write_text(Path(out_dir) / RESOLVED_CONFIG, text)
