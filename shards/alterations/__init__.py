"""Graded image alterations behind one registry: `list_alterations()`, `create_alteration(name, severity=...)`.

An alteration is called on a batched channel-first tensor `(B, C, D, H, W)` with a `torch.Generator` and
returns a tensor of the same shape. Each has five severities (1 mild to 5 severe) mapped to one
continuous parameter (`SEVERITY_PARAMETERS`), or takes the parameter directly. `alteration_seed(name, severity)`
is the seed an evaluation draws that alteration's randomness from.

Every alteration, its parameter and the value at each severity: `severity_table()`, reproduced in
docs/alterations.md (a test keeps the two equal); `raf alter preview VOLUME` shows them.
"""
# Each module registers its alterations when it is imported; a new module is added to this line.
from rafmedia.shards.alterations import acquisition, appearance, ct, geometry, intensity, kspace, resolution  # noqa: F401
from rafmedia.shards.alterations.base import (ALTERATIONS, Alteration, alteration_seed, create_alteration,
                                              list_alterations)

__all__ = ["ALTERATIONS", "Alteration", "alteration_seed", "create_alteration", "list_alterations"]
