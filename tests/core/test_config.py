"""The shared YAML-to-dataclass loader on a small schema of its own: coercions, Optional, nested lists of dataclasses,
unknown keys answered with "did you mean", deep merge, overrides into list items, and YAML files by path or name."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import pytest

from rafmedia.core.config import Schema, packaged_names, parse_override, read_yaml
from rafmedia.core.errors import UserError


@dataclass
class Site:
    name: str = ""
    noise: float = 0.0
    enabled: bool = True


@dataclass
class Optimizer:
    lr: float = 1e-3
    steps: int = 10


@dataclass
class Run:
    seed: int = 0
    sites: list[Site] = field(default_factory=list)
    optimizer: Optimizer = field(default_factory=Optimizer)
    weights: dict[str, float] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    note: str | None = None
    held_out: Optimizer | None = None
    extra: Any = None


SCHEMA = Schema(Run, key_label="config key")


def test_values_are_coerced_to_their_annotations():
    run = SCHEMA.build({"seed": 2.0, "optimizer": {"lr": "1e-3", "steps": 5}, "weights": {"a": 2, 7: "0.5"},
                        "sites": [{"name": 3, "noise": 1}], "note": 12, "extra": [1, "x"]})
    assert run.seed == 2 and type(run.seed) is int  # an integral float is an int
    assert run.optimizer.lr == 0.001 and type(run.optimizer.lr) is float  # YAML 1.1 reads 1e-3 as a string
    assert run.weights == {"a": 2.0, "7": 0.5} and all(type(v) is float for v in run.weights.values())
    assert run.sites == [Site(name="3", noise=1.0, enabled=True)] and type(run.sites[0].noise) is float
    assert run.note == "12" and run.extra == [1, "x"]  # X | None coerced as X; Any kept as given
    assert run.held_out is None and run.optimizer.steps == 5


def test_optional_takes_none_or_the_inner_type():
    assert SCHEMA.build({"note": None, "held_out": None}) == Run()
    assert SCHEMA.build({"held_out": {"steps": 3.0}}).held_out == Optimizer(lr=1e-3, steps=3)
    with pytest.raises(UserError, match=r"config key 'held_out.steps' must be an integer, got 2.5"):
        SCHEMA.build({"held_out": {"steps": 2.5}})


@pytest.mark.parametrize("data, message", [
    ({"sede": 1}, "unknown config key 'sede'; did you mean 'seed'? (valid keys: seed, sites, optimizer, weights, "
                  "options, note, held_out, extra)"),
    ({"optimizer": {"lrr": 1}}, "unknown config key 'optimizer.lrr'; did you mean 'optimizer.lr'? (valid keys under "
                                "optimizer: lr, steps)"),
    ({"sites": [{"name": "a"}, {"nosie": 1}]}, "unknown config key 'sites.1.nosie'; did you mean 'sites.1.noise'? "
                                               "(valid keys under sites.1: name, noise, enabled)"),
    ({"seed": True}, "config key 'seed' must be an integer, got True"),
    ({"seed": "3"}, "config key 'seed' must be an integer, got '3'"),
    ({"optimizer": {"lr": "fast"}}, "config key 'optimizer.lr' must be a number, got 'fast'"),
    ({"sites": [{"enabled": "yes"}]}, "config key 'sites.0.enabled' must be true or false, got 'yes'"),
    ({"sites": {"name": "a"}}, "config key 'sites' must be a list, got {'name': 'a'}"),
    ({"weights": [1]}, "config key 'weights' must be a mapping, got [1]"),
    ({"weights": {"a": "heavy"}}, "config key 'weights.a' must be a number, got 'heavy'"),
    ({"optimizer": 3}, "config key 'optimizer' must be a mapping, got 3"),
    ({"note": True}, "config key 'note' must be a string, got True"),
])
def test_errors_name_the_dotted_key_and_what_was_expected(data, message):
    with pytest.raises(UserError) as error:
        SCHEMA.build(data)
    assert str(error.value) == message


def test_the_label_and_the_type_names_are_the_users():
    spec = Schema(Run, type_names={int: "a whole number"})
    with pytest.raises(UserError, match="^key 'seed' must be a whole number, got 'x'$"):
        spec.build({"seed": "x"})
    with pytest.raises(UserError, match="^unknown key 'sed'; did you mean 'seed'"):
        spec.build({"sed": 1})
    with pytest.raises(UserError, match="^key '<root>' must be a mapping, got \\[\\]$"):
        spec.build([])


def test_merge_follows_the_schema():
    base = dataclasses.asdict(Run(sites=[Site("a", 0.1)], weights={"a": 1.0, "b": 1.0}, options={"x": 1}))
    merged = SCHEMA.merge(base, {"optimizer": {"steps": 7}, "weights": {"b": 3.0}, "sites": [{"name": "z"}],
                                 "held_out": {"lr": 0.5}})
    assert merged["optimizer"] == {"lr": 1e-3, "steps": 7}  # a section is merged key by key
    assert merged["weights"] == {"a": 1.0, "b": 3.0}  # a dict entry by entry
    assert merged["sites"] == [{"name": "z"}]  # a list is replaced
    assert merged["held_out"] == {"lr": 0.5}  # an Optional section that was None
    assert base["optimizer"] == {"lr": 1e-3, "steps": 10} and base["weights"] == {"a": 1.0, "b": 1.0}  # untouched
    run = SCHEMA.build(merged)
    assert run.sites == [Site("z", 0.0, True)] and run.held_out == Optimizer(lr=0.5, steps=10)
    with pytest.raises(UserError, match="unknown config key 'optimizer.stesp'; did you mean 'optimizer.steps'"):
        SCHEMA.merge(base, {"optimizer": {"stesp": 1}})


def test_overrides_reach_list_items_and_nested_sections():
    tree = dataclasses.asdict(Run(sites=[Site("a", 0.1), Site("b", 0.2)]))
    for text in ["sites.1.noise=0.5", "optimizer.lr=1e-4", "options.depth=3", "weights={a: 2}", "seed=4"]:
        SCHEMA.apply_override(tree, *parse_override(text))
    run = SCHEMA.build(tree)
    assert run.sites == [Site("a", 0.1), Site("b", 0.5)]
    assert run.optimizer.lr == pytest.approx(1e-4) and run.options == {"depth": 3} and run.weights == {"a": 2.0}
    assert run.seed == 4
    with pytest.raises(UserError, match=r"config key 'sites.2': '2' is not an index of this list \(0 to 1\)"):
        SCHEMA.apply_override(tree, ["sites", "2", "noise"], 1.0)
    with pytest.raises(UserError, match="config key 'seed' is a value, not a section: cannot set 'seed.x'"):
        SCHEMA.apply_override(tree, ["seed", "x"], 1)
    SCHEMA.apply_override(tree, ["optimizer", "momentum"], 0.9)  # unknown keys are left to build
    with pytest.raises(UserError, match="unknown config key 'optimizer.momentum'"):
        SCHEMA.build(tree)


def test_parse_override_reads_yaml_values():
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a=true") == (["a"], True)
    assert parse_override("a= ") == (["a"], "")
    assert parse_override("a={x: [unclosed") == (["a"], "{x: [unclosed")  # not YAML: kept as the string
    with pytest.raises(UserError, match=r"^override 'a' is not of the form key=value \(for example s.k=1\)$"):
        parse_override("a", example="s.k=1")


def test_read_yaml_by_path_or_packaged_name(tmp_path):
    mine = tmp_path / "run.yaml"
    mine.write_text("seed: 3\nsites: [{name: a}]\n")
    assert read_yaml(mine, package="rafmedia.configs") == {"seed": 3, "sites": [{"name": "a"}]}
    assert {"default", "tiny"} <= set(packaged_names("rafmedia.configs"))
    assert "example" in packaged_names("rafmedia.configs", "cohorts")
    assert read_yaml("tiny", package="rafmedia.configs")["cohort"]["num_subjects"] == 48
    assert read_yaml("example", package="rafmedia.configs", folder="cohorts")["name"] == "synth-raf-v1"
    with pytest.raises(UserError, match="^cohort spec 'exampel' not found; did you mean 'example'\\? \\(give a YAML "
                                        "path or a packaged spec: "):
        read_yaml("exampel", package="rafmedia.configs", folder="cohorts", what="cohort spec", packaged="spec")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [unclosed\n")
    with pytest.raises(UserError, match="^config file '.*bad.yaml' is not valid YAML: "):
        read_yaml(bad, package="rafmedia.configs")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert read_yaml(empty, package="rafmedia.configs") is None
