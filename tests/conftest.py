"""Shared fixtures: a small synthetic cohort written once per test session (a real zarr store on disk)."""
from __future__ import annotations

import pytest

from rafmedia.shards.store import StoreConfig
from rafmedia.shards.synth import CohortConfig, SiteProfile, generate_cohort

NOISE = {"site-a": 0.02, "site-b": 0.04, "site-c": 0.12}


def small_cohort_config(**overrides) -> CohortConfig:
    sites = [SiteProfile(name=name, scanner=f"scanner-{name[-1]}", noise_std=noise, disease_prevalence=prevalence)
             for (name, noise), prevalence in zip(NOISE.items(), (0.25, 0.5, 0.5))]
    values = dict(num_subjects=36, shape=[32, 32, 32], seed=3, sex_ratio=0.5, workers=1, lesion_radius=[2.0, 3.0],
                  sites=sites)
    values.update(overrides)
    return CohortConfig(**values)


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory):
    """36 subjects at 32^3 over three sites with known noise levels; sexes 1:2 (F:M)."""
    out = tmp_path_factory.mktemp("cohort") / "cohort.zarr"
    config = small_cohort_config()
    store = generate_cohort(config, store_config=StoreConfig(chunk_size=16), out=out, progress=False)
    return store, config


def pytest_collection_modifyitems(config, items):
    """GPU tests are skipped, with a reason, on machines without CUDA (CI has none); all others always run."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
