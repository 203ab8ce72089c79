"""YAML to typed dataclasses, for every YAML file rafmedia reads (the run configuration, cohort specs).

A schema is a tree of dataclasses; the values come from YAML (a path, or a file shipped in a package, by name)
and `key=value` overrides. `Schema` merges those layers as plain data following the tree, then builds the
dataclasses, checking and coercing each value against its annotation. Errors are `UserError`s naming the dotted
key, the expected type and, for an unknown key, the closest valid one:

    schema = Schema(RunConfig, key_label="config key")
    tree = schema.merge(dataclasses.asdict(RunConfig()), read_yaml("run.yaml", package="mypkg.configs"))
    schema.apply_override(tree, *parse_override("train.lr=1e-3"))
    config = schema.build(tree)

Annotations understood: nested dataclasses, `list[X]`, `dict[str, X]`, `X | None`, `Any`, and the scalars
bool, int, float and str. The scalar coercions are the ones YAML needs: an integral float is an int (`2.0`), a
string holding a number is a float (YAML 1.1 reads `1e-3` as a string), and a number is accepted as a string.
"""
from __future__ import annotations

import dataclasses
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import yaml

from rafmedia.core.errors import UserError
from rafmedia.core.registry import did_you_mean

TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def packaged_names(package: str, folder: str = "") -> list[str]:
    """Names (without `.yaml`) of the YAML files shipped in `package` (or in its sub-folder `folder`)."""
    files = resources.files(package)
    files = files.joinpath(folder) if folder else files
    return sorted(p.name.removesuffix(".yaml") for p in files.iterdir() if p.name.endswith(".yaml"))


def read_yaml(name_or_path: str | Path, *, package: str, folder: str = "", what: str = "config file",
              packaged: str = "config") -> Any:
    """Parses a YAML file given by path, or by the name of one shipped in `package`/`folder` ("tiny").

    Args:
        name_or_path: a path to a YAML file, or a packaged name (see `packaged_names`).
        package: the package holding the shipped files, e.g. "rafmedia.configs".
        folder: the sub-folder of `package` holding them ("" for the package itself).
        what: how errors name the file ("config file" -> "config file 'x.yaml' not found").
        packaged: how errors name a shipped file ("config" -> "give a YAML path or a packaged config: ...").

    Returns:
        The parsed document (None for an empty file).
    """
    path, name = Path(name_or_path), str(name_or_path)
    names = packaged_names(package, folder)
    if path.is_file():
        text = path.read_text(encoding="utf-8")
    elif name in names:
        shipped = resources.files(package).joinpath(folder) if folder else resources.files(package)
        text = shipped.joinpath(f"{name}.yaml").read_text(encoding="utf-8")
    else:
        raise UserError(f"{what} '{name}' not found;{did_you_mean(name, names)} "
                        f"(give a YAML path or a packaged {packaged}: {', '.join(names)})")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise UserError(f"{what} '{name}' is not valid YAML: {str(error).splitlines()[0]}") from None


def parse_override(text: str, *, example: str = "section.key=value") -> tuple[list[str], Any]:
    """'train.lr=0.001' -> (['train', 'lr'], 0.001). Values are parsed as YAML ('[1, 2]', 'true', 'null').

    Args:
        text: one `dotted.key=value` override.
        example: an override the error for a malformed `text` shows.
    """
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"override '{text}' is not of the form key=value (for example {example})")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip().split("."), parsed


def _schema_fields(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation of dataclass `cls` (string annotations evaluated)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _optional_of(kind: Any) -> Any:
    """X for `X | None` (Optional[X]); None for any other annotation."""
    args = typing.get_args(kind)
    if type(None) not in args:
        return None
    rest = [arg for arg in args if arg is not type(None)]
    return rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]


class Schema:
    """Reads plain data (parsed YAML, overrides) into the dataclass tree rooted at `root`.

    Args:
        root: the dataclass at the top of the tree.
        key_label: how errors name a key ("config key" -> "config key 'train.lr' must be a number, got 'fast'").
        type_names: words for expected scalar types, over `TYPE_NAMES` (e.g. {int: "a whole number"}).
    """

    def __init__(self, root: type, *, key_label: str = "key", type_names: Mapping[type, str] | None = None):
        self.root = root
        self.key_label = key_label
        self.type_names = {**TYPE_NAMES, **(type_names or {})}

    def merge(self, base: dict[str, Any], update: dict[str, Any], cls: type | None = None,
              prefix: str = "") -> dict[str, Any]:
        """Deep-merges `update` into a copy of `base` following the schema; an unknown key is a `UserError`.

        A section (dataclass) is merged key by key, a `dict[str, X]` value entry by entry; anything else (lists
        included) is replaced.

        Args:
            base: plain data of dataclass `cls`, e.g. `dataclasses.asdict(cls())`.
            update: the layer to put over it.
            cls: the dataclass both describe (default: the root).
            prefix: the dotted key of `cls` in the tree, with a trailing dot ("train.").
        """
        cls = cls or self.root
        fields = self._check_keys(cls, update, prefix)
        merged = dict(base)
        for key, value in update.items():
            kind = _optional_of(fields[key]) or fields[key]
            if dataclasses.is_dataclass(kind) and isinstance(value, dict):
                merged[key] = self.merge(merged.get(key) or {}, value, kind, f"{prefix}{key}.")
            elif typing.get_origin(kind) is dict and isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
        return merged

    def apply_override(self, tree: dict[str, Any], path: list[str], value: Any) -> None:
        """Sets one dotted key in the plain tree, in place; list items by index (cohort.sites.2.noise_std=0.09).

        Unknown keys are not checked here: `build` reports them with the closest valid key.
        """
        node: Any = tree
        for depth, key in enumerate(path[:-1]):
            if isinstance(node, list):
                node = node[self._index(node, key, path[:depth + 1])]
            else:
                node = node.setdefault(key, {})
            if not isinstance(node, (dict, list)):
                raise UserError(f"{self.key_label} '{'.'.join(path[:depth + 1])}' is a value, not a section: "
                                f"cannot set '{'.'.join(path)}'")
        if isinstance(node, list):
            node[self._index(node, path[-1], path)] = value
        else:
            node[path[-1]] = value

    def build(self, data: Any, cls: type | None = None, prefix: str = ""):
        """Builds dataclass `cls` (default: the root) from plain data, checking and coercing every value.

        Keys missing from `data` keep the dataclass defaults.
        """
        cls = cls or self.root
        if not isinstance(data, dict):
            raise UserError(f"{self.key_label} '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
        fields = self._check_keys(cls, data, prefix)
        return cls(**{key: self._coerce(data[key], kind, f"{prefix}{key}") for key, kind in fields.items()
                      if key in data})

    def _check_keys(self, cls: type, data: dict[str, Any], prefix: str) -> dict[str, Any]:
        fields = _schema_fields(cls)
        for key in data:
            if key not in fields:
                dotted = f"{prefix}{key}"
                close = did_you_mean(dotted, [prefix + name for name in fields])
                raise UserError(f"unknown {self.key_label} '{dotted}';{close} "
                                f"(valid keys{' under ' + prefix.rstrip('.') if prefix else ''}: {', '.join(fields)})")
        return fields

    def _index(self, items: list, key: str, dotted: list[str]) -> int:
        if not key.isdigit() or int(key) >= len(items):
            raise UserError(f"{self.key_label} '{'.'.join(dotted)}': '{key}' is not an index of this list "
                            f"(0 to {len(items) - 1})")
        return int(key)

    def _coerce(self, value: Any, kind: Any, dotted: str):
        inner = _optional_of(kind)
        if inner is not None:
            if value is None:
                return None
            kind = inner
        origin = typing.get_origin(kind)
        if dataclasses.is_dataclass(kind):
            return self.build(value, kind, f"{dotted}.")
        if origin is list:
            if not isinstance(value, (list, tuple)):
                raise UserError(f"{self.key_label} '{dotted}' must be a list, got {value!r}")
            (item_kind,) = typing.get_args(kind)
            return [self._coerce(item, item_kind, f"{dotted}.{index}") for index, item in enumerate(value)]
        if origin is dict:
            if not isinstance(value, dict):
                raise UserError(f"{self.key_label} '{dotted}' must be a mapping, got {value!r}")
            item_kind = typing.get_args(kind)[1]
            return {str(key): self._coerce(item, item_kind, f"{dotted}.{key}") for key, item in value.items()}
        if kind is Any:
            return value
        return self._scalar(value, kind, dotted)

    def _scalar(self, value: Any, kind: Any, dotted: str):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int:
            if number and isinstance(value, int):
                return value
            if number and value.is_integer():
                return int(value)
        if kind is float:
            if number:
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)  # YAML 1.1 reads "1e-3" as a string
                except ValueError:
                    pass
        if kind is str and (isinstance(value, str) or number):
            return str(value)
        raise UserError(f"{self.key_label} '{dotted}' must be {self.type_names.get(kind, kind)}, got {value!r}")
