from dataclasses import dataclass

import pytest

from rafmedia.core.errors import UserError
from rafmedia.core.registry import Registry, did_you_mean


def test_did_you_mean_finds_the_closest_name():
    assert did_you_mean("gausian_noise", ["bias_field", "gaussian_noise"]) == " did you mean 'gaussian_noise'?"
    assert did_you_mean("zzz", ["bias_field"]) == ""


def test_unknown_name_and_unknown_option_are_user_errors_with_suggestions():
    registry = Registry("widget")

    @registry.register("square")
    def square(side: int = 1):
        return side * side

    assert registry.create("square", side=3) == 9
    with pytest.raises(UserError, match="unknown widget 'sqare'; did you mean 'square'"):
        registry.create("sqare")
    with pytest.raises(UserError, match="has no option 'sid'; did you mean 'side'"):
        registry.create("square", sid=2)


def test_a_factory_passing_its_options_to_a_dataclass_takes_that_dataclass_fields_and_no_others():
    @dataclass
    class Look:
        side: int = 1
        colour: str = "red"

    registry = Registry("widget")

    @registry.register("square", options_from=Look)
    def square(scale: int = 1, **look_options):
        return scale, Look(**look_options)

    @registry.register("anything")
    def anything(**options):
        return options

    assert registry.create("square", scale=2, side=3) == (2, Look(side=3, colour="red"))
    assert registry.options("square") == {"scale", "side", "colour"} and registry.accepts("square", "colour")
    with pytest.raises(UserError, match=r"widget 'square' has no option 'sied'; did you mean 'side'\? "
                                        r"\(options: colour, scale, side\)"):
        registry.create("square", sied=2)
    assert registry.options("anything") is None and registry.create("anything", sied=2) == {"sied": 2}


def test_accepts_reads_the_factory_signature_and_unregister_removes_a_name():
    registry = Registry("widget")

    @registry.register("narrow")
    def narrow(seed: int = 0):
        return seed

    @registry.register("open")
    def open_ended(**anything):
        return anything

    assert registry.accepts("narrow", "seed") and not registry.accepts("narrow", "c_grid")
    assert registry.accepts("open", "c_grid")  # **kwargs without options_from takes anything
    registry.unregister("narrow")
    assert registry.names() == ["open"] and "narrow" not in registry
    with pytest.raises(UserError, match="unknown widget 'narrow'"):
        registry.unregister("narrow")
    registry.register("narrow")(narrow)  # the name is free again
    assert registry.create("narrow", seed=3) == 3
