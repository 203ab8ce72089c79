"""A new group metric, probe, latent test or alteration is one registered object: the evaluation computes it, the
results store keeps it, and report.json, report.html, report.md and the leaderboard show it with no other edit.
Alteration seeds come from the alteration's name, so registering one changes no other alteration's numbers."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score

from rafmedia.core.files import write_json
from rafmedia.engine.encoders import create_encoder
from rafmedia.engine.export import export_encoder
from rafmedia.evaluate import fairness
from rafmedia.evaluate.cache import CacheKey, EmbeddingCache
from rafmedia.evaluate.config import EvaluateConfig
from rafmedia.evaluate.embed import Embedder
from rafmedia.evaluate.group_metrics import GROUP_METRICS, register_group_metric, weighted_mean
from rafmedia.evaluate.latent import LATENT_TESTS, register_latent_test
from rafmedia.evaluate.leaderboard import leaderboard_rows, write_leaderboard
from rafmedia.evaluate.probes import PROBES
from rafmedia.evaluate.report import render_report
from rafmedia.evaluate.results import ResultsStore
from rafmedia.evaluate.runner import run_evaluation
from rafmedia.shards.alterations import ALTERATIONS, Alteration, alteration_seed, list_alterations
from rafmedia.shards.alterations.base import register


# ---- the dummies -------------------------------------------------------------------------------------------------
def weighted_error_rate(weights_RN: np.ndarray, y_true_N: np.ndarray, y_pred_N: np.ndarray) -> np.ndarray:
    """The share of wrong predictions among the weighted subjects (lower is better)."""
    return weighted_mean(weights_RN, (y_true_N != y_pred_N).astype(np.float64))


class Darkening(Alteration):
    """Darkens the volume by a factor and adds a little noise (a stand-in for a new alteration)."""

    name = "aaa_darkening"  # sorts before every other alteration
    category = "appearance"
    parameter_name = "factor"
    severity_parameters = (0.9, 0.8, 0.7, 0.6, 0.5)

    def apply(self, x_BCDHW: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return x_BCDHW * self.parameter + 0.05 * torch.randn(x_BCDHW.shape, generator=generator)


class NearestCentroid:
    """A categorical probe: the score is how much closer an embedding is to the positive class mean."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def fit(self, emb_ND, labels_N):
        self.means_ = [emb_ND[labels_N == c].mean(axis=0) for c in (0, 1)]
        return self

    def scores(self, emb_ND):
        return np.linalg.norm(emb_ND - self.means_[0], axis=1) - np.linalg.norm(emb_ND - self.means_[1], axis=1)

    def predict(self, emb_ND):
        return (self.scores(emb_ND) > 0).astype(int)


def mean_norm_gap(emb_ND, groups_N, *, seed):
    norms = np.linalg.norm(emb_ND, axis=1)
    means = [norms[groups_N == g].mean() for g in np.unique(groups_N)]
    return float(max(means) - min(means))


@pytest.fixture
def dummies():
    """The four dummies registered for one test, then removed again (the registries are process-wide)."""
    register_group_metric("error_rate", inputs=("y_true", "y_pred"), higher_is_better=False)(weighted_error_rate)
    register(Darkening)
    PROBES.register("nearest_centroid", targets="categorical")(NearestCentroid)
    register_latent_test("mean_norm", scope="attribute", title="mean norm gap")(mean_norm_gap)
    yield
    GROUP_METRICS.unregister("error_rate")
    ALTERATIONS.unregister(Darkening.name)
    PROBES.unregister("nearest_centroid")
    LATENT_TESTS.unregister("mean_norm")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    return export_encoder(create_encoder("cnn3d_small", width=8), tmp_path_factory.mktemp("enc") / "encoder.safetensors",
                          architecture="cnn3d_small", options={"width": 8}, card={"name": "plain"})


def fast_config(store, weights, **changes) -> EvaluateConfig:
    values = dict(cohort=str(store.path), encoders=[str(weights)], seeds=[0], severities=[1, 3], bootstrap_resamples=30,
                  permutations=29, min_group_size=4, few_shot=[1.0], intersections=False)
    return EvaluateConfig(**{**values, **changes})


# ---- the tests ---------------------------------------------------------------------------------------------------
def test_a_registered_group_metric_is_scored_per_group_like_scikit_learn(dummies):
    rng = np.random.default_rng(0)
    groups = rng.choice(["a", "b", "c"], 300)
    y_true, y_pred = rng.integers(0, 2, 300), rng.integers(0, 2, 300)
    result = fairness.classification_fairness(y_true, y_pred, None, groups, seed=0, num_resamples=20,
                                              num_permutations=20)
    assert "error_rate" in result["metrics"] and "auroc" not in result["metrics"]  # no scores: no AUROC
    for group in "abc":
        member = groups == group
        assert result["error_rate"]["groups"][group]["value"] == pytest.approx(
            1 - accuracy_score(y_true[member], y_pred[member]), abs=1e-12)
    values = {g: result["error_rate"]["groups"][g]["value"] for g in "abc"}
    assert result["error_rate_gap"] == pytest.approx(max(values.values()) - min(values.values()))
    assert result["error_rate"]["worst_group"] == max(values, key=values.get)  # lower is better: the highest is worst
    assert 0 < result["error_rate_gap_p_value"] <= 1


def test_a_dummy_metric_probe_latent_test_and_alteration_reach_every_output(dummies, small_cohort, weights, tmp_path):
    store, _ = small_cohort
    config = fast_config(store, weights, alterations=["aaa_darkening", "gaussian_noise"])
    results = ResultsStore(tmp_path / "results.sqlite")
    report = run_evaluation(config, progress=False, results=results)
    entry = report["encoders"]["plain"]

    # report.json: computed, with the numbers that belong together
    site = entry["fairness"]["site"]
    assert "error_rate" in site["metrics"]
    means = {group: values["error_rate"] for group, values in site["groups"].items()}
    accuracy = {group: values["accuracy"] for group, values in site["groups"].items()}
    assert means == pytest.approx({group: 1 - value for group, value in accuracy.items()})  # two routes, one number
    assert site["error_rate"]["gap"] == pytest.approx(max(means.values()) - min(means.values()))
    assert site["error_rate"]["worst_group"] == max(means, key=means.get)
    assert 0 < site["first_replicate"]["error_rate_gap_p_value"] <= 1
    knn_like = entry["probes"]["disease"]["nearest_centroid"]
    assert "nearest_centroid" in entry["probes"]["disease"]["other_probes"] and 0 <= knn_like["auroc"]["mean"] <= 1
    darkening = entry["robustness"]["aaa_darkening"]
    assert darkening["severity"] == [1, 3] and darkening["parameter"] == pytest.approx([0.9, 0.7])
    assert len(darkening["auroc"]) == 2 and "corruption_error" in darkening
    assert entry["latent"]["summary"]["site"]["mean norm gap"] == entry["latent"]["site"]["mean_norm"] >= 0

    # the results store keeps the cell whole
    cell = next(cell for cell in results.cells() if cell.encoder == "plain")
    assert cell.result["fairness"]["site"]["error_rate"]["gap"] == site["error_rate"]["gap"]

    # report.html and report.md show them
    write_json(tmp_path / "report.json", report)
    page = render_report(tmp_path).read_text(encoding="utf-8")
    markdown = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "<th>error_rate (mean)</th>" in page and f"<td>{site['error_rate']['gap']:.3f} / " in page
    assert "<th>nearest_centroid AUROC (mean ± std)</th>" in page
    assert "<td>aaa_darkening</td>" in page and "<th>mean norm gap</th>" in page
    assert "error_rate gap" in markdown and "nearest_centroid (disease)" in markdown
    assert "aaa_darkening" in markdown and "mean norm gap" in markdown

    # the leaderboard's CSV and HTML carry their headline numbers
    files = write_leaderboard(leaderboard_rows([results.path]), tmp_path / "board")
    with open(files["csv"], newline="", encoding="utf-8") as handle:
        row = next(row for row in csv.DictReader(handle) if row["encoder"] == "plain")
    assert float(row["error_rate gap (site)"]) == pytest.approx(site["error_rate"]["gap"])
    assert float(row["nearest_centroid AUROC (disease)"]) == pytest.approx(knn_like["auroc"]["mean"])
    assert float(row["mean norm gap (site)"]) == pytest.approx(entry["latent"]["site"]["mean_norm"])
    html = files["html"].read_text(encoding="utf-8")
    assert "<th>error_rate gap (sex)</th>" in html and "<th>mean norm gap (sex)</th>" in html


def test_registering_an_alteration_that_sorts_first_changes_no_other_alterations_numbers(small_cohort, weights,
                                                                                          tmp_path):
    store, _ = small_cohort
    seeds = {(name, severity): alteration_seed(name, severity) for name in list_alterations() for severity in range(1, 6)}
    config = fast_config(store, weights, alterations=["gaussian_noise", "bias_field"], random_baseline=False)
    digest = config.settings_digest()
    before = run_evaluation(config, progress=False, cache=EmbeddingCache(tmp_path / "before.zarr"))
    register(Darkening)
    try:
        assert list_alterations()[0] == Darkening.name
        assert {key: alteration_seed(*key) for key in seeds} == seeds
        assert config.settings_digest() == digest  # the cell's key: a results store serves it as before
        after = run_evaluation(config, progress=False, cache=EmbeddingCache(tmp_path / "after.zarr"))
    finally:
        ALTERATIONS.unregister(Darkening.name)
    assert json.dumps(after["encoders"]) == json.dumps(before["encoders"])  # (NaN != NaN: compare the text)


def test_the_alteration_seed_is_part_of_the_embedding_cache_key(tmp_path):
    volumes = torch.randn(4, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    cache = EmbeddingCache(tmp_path / "cache.zarr")
    embed = Embedder(volumes, [f"s{i}" for i in range(4)], "cohort", cache=cache)
    model = create_encoder("cnn3d_small", width=4).eval()
    altered = embed(model, "digest", np.arange(4), alteration="gaussian_noise", severity=3)
    seed = alteration_seed("gaussian_noise", 3)
    keys = [CacheKey("digest", "cohort", f"s{i}", "gaussian_noise", 3, seed) for i in range(4)]
    assert cache.missing(keys) == []
    assert cache.missing([keys[0]._replace(seed=seed + 1)]) == [keys[0]._replace(seed=seed + 1)]
    assert np.array_equal(np.stack([cache.get_many(keys)[key] for key in keys]), altered)
    clean = embed(model, "digest", np.arange(4))
    assert cache.missing([CacheKey("digest", "cohort", "s0")]) == [] and not np.allclose(clean, altered)


def test_alteration_seeds_are_fixed_numbers_of_the_name(tmp_path):
    # The same in every process and Python version: a fresh interpreter with another hash seed agrees.
    import subprocess
    import sys

    code = "from rafmedia.shards.alterations import alteration_seed as s; print(s('gaussian_noise', 2), s('motion', 5))"
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={"PYTHONHASHSEED": "123", "PATH": "/usr/bin:/bin"}).stdout.split()
    assert [int(value) for value in printed] == [alteration_seed("gaussian_noise", 2), alteration_seed("motion", 5)]
    assert alteration_seed("gaussian_noise", 2) != alteration_seed("gaussian_noise", 3)
    assert 0 <= alteration_seed("motion", 5) < 2 ** 31
