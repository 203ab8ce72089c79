"""Typed configuration at the edge: dataclass schema <- packaged defaults <- YAML file <- key=value overrides.

The schema is the `RafConfig` tree below; each slice is defined next to the code that uses it and is
passed inward on its own. Validation errors are `UserError`s naming the dotted key, the expected type
and, for unknown keys, the closest valid key.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rafmedia.core.config import Schema, packaged_names, parse_override, read_yaml
from rafmedia.core.errors import UserError
from rafmedia.core.files import atomic_write_text
from rafmedia.engine.batches import DataConfig
from rafmedia.engine.encoders import EncoderConfig
from rafmedia.engine.tasks import TaskConfig
from rafmedia.engine.train import TrainConfig
from rafmedia.evaluate.config import EvaluateConfig
from rafmedia.launch.slurm import SlurmConfig
from rafmedia.shards.ingest import IngestConfig
from rafmedia.shards.store import StoreConfig
from rafmedia.shards.synth import CohortConfig
from rafmedia.shards.synth_brain import BrainCohortConfig
from rafmedia.shards.wds_export import ExportConfig

DEFAULT_CONFIG = "default"
RESOLVED_CONFIG = "resolved_config.yaml"


@dataclass
class RafConfig:
    """The whole configuration tree. Each command reads only the slices it needs."""

    cohort: CohortConfig = field(default_factory=CohortConfig)
    brain_cohort: BrainCohortConfig = field(default_factory=BrainCohortConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


CONFIG_PACKAGE = "rafmedia.configs"
RECIPES = "recipes"  # configs/recipes/<task>.yaml: each pretext task's recipe (benchmarks/recipes.py), `-c recipes/<task>`
OVERRIDE_EXAMPLE = "train.steps=100"
SCHEMA = Schema(RafConfig, key_label="config key")


def packaged_configs() -> list[str]:
    """Names of the YAML configs shipped with rafmedia (usable as `--config NAME`), recipes as `recipes/<task>`."""
    try:
        recipes = packaged_names(CONFIG_PACKAGE, RECIPES)
    except FileNotFoundError:  # an install without recipes
        recipes = []
    return packaged_names(CONFIG_PACKAGE) + [f"{RECIPES}/{name}" for name in recipes]


def read_config_file(name_or_path: str) -> dict[str, Any]:
    """Reads a config file by path, or a packaged config by name (e.g. "tiny"), as plain sections."""
    folder, name = "", str(name_or_path)
    if name.startswith(f"{RECIPES}/") and not Path(name).is_file():
        folder, name = RECIPES, name.removeprefix(f"{RECIPES}/").removesuffix(".yaml")
    data = read_yaml(name, package=CONFIG_PACKAGE, folder=folder, what="recipe" if folder else "config file",
                     packaged=f"recipe, as {RECIPES}/<task>" if folder else "config") or {}
    if not isinstance(data, dict):
        raise UserError(f"config file '{name_or_path}' must hold a mapping of sections, got {type(data).__name__}")
    return data


def load_config(config_file: str | None = None, overrides: list[str] = ()) -> RafConfig:
    """Schema defaults <- packaged default.yaml <- `config_file` <- `overrides`, validated."""
    tree = dataclasses.asdict(RafConfig())
    tree = SCHEMA.merge(tree, read_config_file(DEFAULT_CONFIG))
    if config_file:
        layer = read_config_file(config_file)
        _reset_options_of_renamed(tree, {section: (layer.get(section) or {}).get("name") for section in NAMED_SECTIONS
                                         if isinstance(layer.get(section), dict)})
        tree = SCHEMA.merge(tree, layer)
    parsed = [parse_override(text, example=OVERRIDE_EXAMPLE) for text in overrides]
    _reset_options_of_renamed(tree, {path[0]: value for path, value in parsed
                                     if len(path) == 2 and path[0] in NAMED_SECTIONS and path[1] == "name"})
    for path, value in parsed:
        SCHEMA.apply_override(tree, path, value)
    return SCHEMA.build(tree)


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
