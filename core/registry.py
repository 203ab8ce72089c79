"""A tiny registry with a `create_*` factory and "did you mean" answers, as in timm and MONAI.

Every swappable thing (encoders, pretext tasks, alterations, probes) has one `Registry`; code asks the
registry by name and never branches on names itself.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
from typing import Any, Callable, Generic, Iterable, TypeVar

from rafmedia.core.errors import UserError

T = TypeVar("T")


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Returns ` did you mean 'x'?` for the closest choice, or an empty string when none is close."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" did you mean '{close[0]}'?" if close else ""


def unknown_name_error(kind: str, name: str, choices: Iterable[str]) -> UserError:
    """A one-line error naming the unknown value, the closest valid one and all valid ones."""
    choices = sorted(choices)
    return UserError(f"unknown {kind} '{name}';{did_you_mean(name, choices)} (choose from: {', '.join(choices)})")


class Registry(Generic[T]):
    """Maps names to factories of one kind of component.

    Example:
        ENCODERS = Registry("encoder")

        @ENCODERS.register("cnn3d_small")
        def cnn3d_small(**kwargs): ...

        model = ENCODERS.create("cnn3d_small", width=16)
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}
        self._tags: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **tags: Any) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Registers a factory under `name`; `tags` are facts other code may ask without building it
        (e.g. an encoder's `family="vit"`, a task's `encoder_families=("vit",)`).

        One tag is read here: a factory that passes its `**kwargs` on to a dataclass names it with
        `options_from=ThatDataclass`, and its options are then its own keyword names plus that dataclass's fields
        (a factory taking `**kwargs` without the tag takes anything)."""
        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            assert name not in self._factories, f"{self.kind} '{name}' is registered twice"
            self._factories[name] = factory
            self._tags[name] = dict(tags)
            return factory

        return decorator

    def unregister(self, name: str) -> None:
        """Removes `name` (a plugin unloaded, a test's temporary entry); an unknown name is a `UserError`."""
        self.get(name)
        del self._factories[name], self._tags[name]

    def tags(self, name: str) -> dict[str, Any]:
        """The tags `name` was registered with (an unknown name is a `UserError`)."""
        self.get(name)
        return dict(self._tags[name])

    def names(self) -> list[str]:
        return sorted(self._factories)

    def get(self, name: str) -> Callable[..., T]:
        if name not in self._factories:
            raise unknown_name_error(self.kind, name, self._factories)
        return self._factories[name]

    def create(self, name: str, **kwargs) -> T:
        """Builds the named component; an option the factory does not take is a `UserError`."""
        factory = self.get(name)
        accepted = self.options(name)
        if accepted is not None:
            for key in kwargs:
                if key not in accepted:
                    raise UserError(f"{self.kind} '{name}' has no option '{key}';{did_you_mean(key, accepted)} "
                                    f"(options: {', '.join(sorted(accepted)) or 'none'})")
        return factory(**kwargs)

    def accepts(self, name: str, option: str) -> bool:
        """Whether the factory of `name` takes the keyword `option` (see `options`)."""
        accepted = self.options(name)
        return accepted is None or option in accepted

    def options(self, name: str) -> set[str] | None:
        """The option names the factory of `name` takes (see `register`), or None when it takes any."""
        return _keyword_names(self.get(name), self._tags[name].get("options_from"))

    def __contains__(self, name: str) -> bool:
        return name in self._factories


def _keyword_names(factory: Callable, options_from: type | None = None) -> set[str] | None:
    """Names a factory accepts as keywords; when it takes **kwargs, those plus the fields of the dataclass
    `options_from` it passes them to, or None without one (anything goes)."""
    parameters = inspect.signature(factory).parameters.values()
    named = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return named
    if options_from is None:
        return None
    return named | {field.name for field in dataclasses.fields(options_from) if field.init}
