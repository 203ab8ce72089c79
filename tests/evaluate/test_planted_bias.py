"""End to end on synthetic cohorts: a planted performance bias (one site scanned with heavy noise) is found by the
evaluator with the right sign and size and a significant permutation p-value; in a control cohort where every site
is scanned alike, no site gap is significant. (The calibration of the test over many seeds, p > 0.05 in at least
95% of unbiased seeds, is checked on the fairness module in test_fairness.py.)"""
import pytest
import torch

from rafmedia.engine.encoders import create_encoder
from rafmedia.engine.export import export_encoder
from rafmedia.evaluate.config import EvaluateConfig
from rafmedia.evaluate.runner import run_evaluation
from rafmedia.shards.store import StoreConfig
from rafmedia.shards.synth import SiteProfile, generate_cohort
from tests.conftest import small_cohort_config


def site_fairness(tmp_path, noise_c: float) -> dict:
    sites = [SiteProfile(name=name, scanner=f"scanner-{name}", noise_std=noise, disease_prevalence=0.5)
             for name, noise in (("site-a", 0.02), ("site-b", 0.02), ("site-c", noise_c))]
    store = generate_cohort(small_cohort_config(num_subjects=300, sites=sites, seed=11), store_config=StoreConfig(
        chunk_size=16), out=tmp_path / "cohort.zarr", progress=False)
    torch.manual_seed(0)
    weights = export_encoder(create_encoder("cnn3d_small", width=16), tmp_path / "encoder.safetensors",
                             architecture="cnn3d_small", options={"width": 16}, card={"name": "random"})
    config = EvaluateConfig(cohort=str(store.path), encoders=[str(weights)], random_baseline=False, seeds=[0, 1, 2],
                            alterations=[], bootstrap_resamples=100, permutations=199, group_by=["site", "sex"])
    return run_evaluation(config, progress=False)["encoders"]["random"]["fairness"]


def test_a_planted_noisy_site_is_the_worst_group_with_a_large_significant_gap(tmp_path):
    fairness = site_fairness(tmp_path, noise_c=0.5)
    site = fairness["site"]
    assert site["accuracy"]["worst_group"] == "site-c" and site["auroc"]["worst_group"] == "site-c"
    clean_sites = [site["groups"][name]["accuracy"] for name in ("site-a", "site-b")]
    assert site["accuracy"]["gap"] == pytest.approx(max(clean_sites) - site["groups"]["site-c"]["accuracy"])
    assert site["accuracy"]["gap"] > 0.25  # disease is near chance under the noise, well above it elsewhere
    assert site["first_replicate"]["accuracy_gap_p_value"] < 0.05
    assert site["first_replicate"]["auroc_gap_p_value"] < 0.05
    assert fairness["sex"]["first_replicate"]["accuracy_gap_p_value"] > 0.05  # nothing was planted by sex


def test_a_control_cohort_scanned_alike_shows_no_significant_site_gap(tmp_path):
    fairness = site_fairness(tmp_path, noise_c=0.02)
    assert fairness["site"]["first_replicate"]["accuracy_gap_p_value"] > 0.05
    assert fairness["site"]["accuracy"]["gap"] < 0.2
