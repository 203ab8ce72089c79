"""The alteration contract and registry."""
from __future__ import annotations

import torch

from rafmedia.engine.errors import UserError
from rafmedia.engine.registry import Registry

ALTERATIONS: Registry["Alteration"] = Registry("alteration")
NUM_SEVERITIES = 5


class Alteration:
    """A graded alteration. Subclasses set `name`, `parameter_name`, `severity_parameters` and `apply`."""

    name: str = ""
    parameter_name: str = ""
    severity_parameters: tuple[float, ...] = ()

    def __init__(self, severity: int = 3, parameter: float | None = None):
        if parameter is None:
            if not 1 <= int(severity) <= NUM_SEVERITIES:
                raise UserError(f"alteration '{self.name}': severity must be 1 to {NUM_SEVERITIES}, got {severity}")
            parameter = self.severity_parameters[int(severity) - 1]
        self.severity = int(severity)
        self.parameter = float(parameter)

    def __call__(self, x_BCDHW: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if x_BCDHW.ndim != 5:
            raise ValueError(f"alterations take (B, C, D, H, W) tensors, got shape {tuple(x_BCDHW.shape)}")
        generator = generator if generator is not None else torch.Generator(device=x_BCDHW.device).manual_seed(0)
        return self.apply(x_BCDHW, generator)

    def apply(self, x_BCDHW: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(severity={self.severity}, {self.parameter_name}={self.parameter})"


def create_alteration(name: str, severity: int = 3, parameter: float | None = None) -> Alteration:
    """Builds a registered alteration at a severity (1-5), or at an explicit parameter value."""
    return ALTERATIONS.create(name, severity=severity, parameter=parameter)


def list_alterations() -> list[str]:
    return ALTERATIONS.names()


def register(cls: type[Alteration]) -> type[Alteration]:
    """Class decorator: registers an Alteration subclass under its `name`."""
    ALTERATIONS.register(cls.name)(cls)
    return cls
