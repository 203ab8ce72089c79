"""The alteration contract and registry, and the seed of each alteration at each severity."""
from __future__ import annotations

import hashlib

import torch

from rafmedia.core.errors import UserError
from rafmedia.core.registry import Registry

ALTERATIONS: Registry["Alteration"] = Registry("alteration")
NUM_SEVERITIES = 5


class Alteration:
    """A graded alteration. Subclasses set `name`, `category`, `parameter_name`, `severity_parameters` and `apply`.

    Alterations that move anatomy (geometry, motion, truncation, ...) set `moves_anatomy = True` and override
    `apply_with_label`, transforming a label map with the same random draw (nearest neighbour); `apply(x)` of
    such a class should be `apply_with_label(x, None, generator)[0]`. Intensity-only alterations leave labels as
    they are. Called with `label=`, an alteration returns `(x, label)`; without, just `x`.
    """

    name: str = ""
    category: str = "acquisition"  # acquisition | appearance | geometry | ct: groups the docs table and previews
    parameter_name: str = ""
    severity_parameters: tuple[float, ...] = ()
    moves_anatomy: bool = False

    def __init__(self, severity: int = 3, parameter: float | None = None):
        if parameter is None:
            if not 1 <= int(severity) <= NUM_SEVERITIES:
                raise UserError(f"alteration '{self.name}': severity must be 1 to {NUM_SEVERITIES}, got {severity}")
            parameter = self.severity_parameters[int(severity) - 1]
        self.severity = int(severity)
        self.parameter = float(parameter)

    def __call__(self, x_BCDHW: torch.Tensor, generator: torch.Generator | None = None,
                 label: torch.Tensor | None = None):
        if x_BCDHW.ndim != 5:
            raise ValueError(f"alterations take (B, C, D, H, W) tensors, got shape {tuple(x_BCDHW.shape)}")
        generator = generator if generator is not None else torch.Generator(device=x_BCDHW.device).manual_seed(0)
        if label is None:
            return self.apply(x_BCDHW, generator)
        if label.ndim != 5 or label.shape[0] != x_BCDHW.shape[0] or label.shape[2:] != x_BCDHW.shape[2:]:
            raise ValueError(f"label shape {tuple(label.shape)} does not match image shape {tuple(x_BCDHW.shape)}")
        return self.apply_with_label(x_BCDHW, label, generator)

    def apply(self, x_BCDHW: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def apply_with_label(self, x_BCDHW: torch.Tensor, label_BCDHW: torch.Tensor | None,
                         generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Alters the image and, for alterations that move anatomy, the label map the same way."""
        return self.apply(x_BCDHW, generator), label_BCDHW

    def __repr__(self) -> str:
        return f"{type(self).__name__}(severity={self.severity}, {self.parameter_name}={self.parameter})"


def create_alteration(name: str, severity: int = 3, parameter: float | None = None) -> Alteration:
    """Builds a registered alteration at a severity (1-5), or at an explicit parameter value."""
    return ALTERATIONS.create(name, severity=severity, parameter=parameter)


def list_alterations() -> list[str]:
    return ALTERATIONS.names()


def alteration_seed(name: str, severity: int) -> int:
    """The seed of alteration `name` at `severity` (the random draws of every subject derive from it): 31 bits of
    SHA-256 of "name/severity", so the same in every process and Python version, and independent of what else is
    registered (registering a new alteration changes no other alteration's seed)."""
    digest = hashlib.sha256(f"{name}/{int(severity)}".encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFF_FFFF


def severity_table() -> str:
    """A Markdown table of every alteration: category, what it does, its parameter and the value at each severity."""
    header = "| alteration | category | what it does | parameter | " + " | ".join(
        f"s={s}" for s in range(1, NUM_SEVERITIES + 1))
    rows = [header + " |", "|" + " --- |" * (4 + NUM_SEVERITIES)]
    for name in list_alterations():
        cls = ALTERATIONS.get(name)
        summary = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split()).replace("|", "\\|")
        values = " | ".join(f"{value:g}" for value in cls.severity_parameters)
        rows.append(f"| `{name}` | {cls.category} | {summary} | `{cls.parameter_name}` | {values} |")
    return "\n".join(rows)


def register(cls: type[Alteration]) -> type[Alteration]:
    """Class decorator: registers an Alteration subclass under its `name`."""
    ALTERATIONS.register(cls.name)(cls)
    return cls
