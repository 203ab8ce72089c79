"""Graded image alterations behind one registry: `list_alterations()`, `create_alteration(name, severity=...)`.

An alteration is called on a batched channel-first tensor `(B, C, D, H, W)` with a `torch.Generator` and
returns a tensor of the same shape. Each has five severities (1 mild to 5 severe) mapped to one
continuous parameter (`SEVERITY_PARAMETERS`), or takes the parameter directly.

Every alteration, its parameter and the value at each severity: `severity_table()`, reproduced in
docs/alterations.md (a test keeps the two equal); `raf alter preview VOLUME` shows them.
"""
from rafmedia.shards.alterations import intensity  # noqa: F401  (registers the alterations)
from rafmedia.shards.alterations import (  # noqa: F401  (registers the alterations)  # noqa: F401  (registers the alterations)
    acquisition, appearance, ct, geometry, kspace, resolution)
from rafmedia.shards.alterations.base import ALTERATIONS, Alteration, create_alteration, list_alterations

__all__ = ["ALTERATIONS", "Alteration", "create_alteration", "list_alterations"]
