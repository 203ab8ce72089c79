"""Graded image alterations behind one registry: `list_alterations()`, `create_alteration(name, severity=...)`.

An alteration is called on a batched channel-first tensor `(B, C, D, H, W)` with a `torch.Generator` and
returns a tensor of the same shape. Each has five severities (1 mild to 5 severe) mapped to one
continuous parameter (`SEVERITY_PARAMETERS`), or takes the parameter directly.

| alteration      | parameter                                                  | s=1  | s=2  | s=3  | s=4  | s=5  |
| --------------- | ---------------------------------------------------------- | ---- | ---- | ---- | ---- | ---- |
| gaussian_noise  | noise std, as a fraction of each volume's intensity std    | 0.10 | 0.20 | 0.35 | 0.50 | 0.75 |
| bias_field      | std of the log of a smooth multiplicative field            | 0.10 | 0.20 | 0.30 | 0.45 | 0.60 |
| rician_noise    | quadrature noise std / mean intensity above min (1/SNR)    | 0.03 | 0.06 | 0.10 | 0.15 | 0.22 |
| poisson_noise   | relative noise std at the mean intensity (1/sqrt(counts))  | 0.03 | 0.06 | 0.10 | 0.15 | 0.22 |
| gibbs_ringing   | MONAI GibbsNoise alpha (k-space ball radius shrinks)       | 0.35 | 0.45 | 0.55 | 0.65 | 0.75 |
| kspace_spike    | spike magnitude / max k-space magnitude                    | 0.25 | 0.5  | 1.0  | 1.5  | 2.5  |
| motion          | max rotation in degrees (shift 0.5 vox/deg, moved lines)   | 1.0  | 2.0  | 3.5  | 5.0  | 8.0  |
| ghosting        | attenuation of every N-th phase-encoding line              | 0.15 | 0.30 | 0.45 | 0.60 | 0.80 |
| anisotropic_blur| max Gaussian std per axis in voxels (each x U(0.25, 1))    | 0.5  | 1.0  | 1.5  | 2.0  | 3.0  |
| thick_slices    | slab thickness along D in voxels (averaged, resampled)     | 2    | 3    | 4    | 5    | 6    |
| dropped_slices  | fraction of slices along D set to zero (at least one)      | 0.03 | 0.06 | 0.10 | 0.15 | 0.25 |
| fov_truncation  | fraction of H or W cut off and zeroed (label too)          | 0.10 | 0.20 | 0.30 | 0.40 | 0.50 |
"""
from rafmedia.shards.alterations.base import ALTERATIONS, Alteration, create_alteration, list_alterations
from rafmedia.shards.alterations import intensity  # noqa: F401  (registers the alterations)
from rafmedia.shards.alterations import acquisition, kspace, resolution  # noqa: F401  (registers the alterations)
from rafmedia.shards.alterations import appearance, ct, geometry  # noqa: F401  (registers the alterations)

__all__ = ["ALTERATIONS", "Alteration", "create_alteration", "list_alterations"]
