"""Graded image alterations behind one registry: `list_alterations()`, `create_alteration(name, severity=...)`.

An alteration is called on a batched channel-first tensor `(B, C, D, H, W)` with a `torch.Generator` and
returns a tensor of the same shape. Each has five severities (1 mild to 5 severe) mapped to one
continuous parameter (`SEVERITY_PARAMETERS`), or takes the parameter directly.

| alteration      | parameter                                                  | s=1  | s=2  | s=3  | s=4  | s=5  |
| --------------- | ---------------------------------------------------------- | ---- | ---- | ---- | ---- | ---- |
| gaussian_noise  | noise std, as a fraction of each volume's intensity std    | 0.10 | 0.20 | 0.35 | 0.50 | 0.75 |
| bias_field      | std of the log of a smooth multiplicative field            | 0.10 | 0.20 | 0.30 | 0.45 | 0.60 |
"""
from rafmedia.shards.alterations.base import ALTERATIONS, Alteration, create_alteration, list_alterations
from rafmedia.shards.alterations import intensity  # noqa: F401  (registers the alterations)

__all__ = ["ALTERATIONS", "Alteration", "create_alteration", "list_alterations"]
