"""Label-free latent tests: silhouette against scikit-learn and a by-hand definition, kNN OOD and Frechet
distances against statistical properties of Gaussian samples."""
import numpy as np
import pytest
from sklearn.metrics import silhouette_score
from sklearn.preprocessing import StandardScaler

from rafmedia.core.errors import UserError
from rafmedia.evaluate.latent import (LATENT_TESTS, frechet_matrix, headline, knn_ood_score, latent_results,
                                      list_latent_tests, register_latent_test, site_silhouette)
from rafmedia.evaluate.metrics import rankme


def sites_embeddings(seed: int, shift: float, num_per_site: int = 60, dim: int = 6):
    """Three sites whose embedding means differ by `shift` on every axis."""
    rng = np.random.default_rng(seed)
    sites = np.repeat(["a", "b", "c"], num_per_site)
    emb = rng.normal(size=(len(sites), dim)) * rng.uniform(0.5, 5.0, dim)
    emb += shift * np.repeat([0.0, 1.0, 2.0], num_per_site)[:, None]
    return emb, sites


def silhouette_by_hand(points, groups):
    """Rousseeuw (1987): s_i = (b_i - a_i) / max(a_i, b_i), a_i the mean distance to the own group (without
    i), b_i the smallest mean distance to another group; s_i = 0 for singleton groups."""
    distances = np.linalg.norm(points[:, None] - points[None], axis=2)
    values = []
    for i, group in enumerate(groups):
        same = (groups == group) & (np.arange(len(groups)) != i)
        if not same.any():
            values.append(0.0)
            continue
        a = distances[i, same].mean()
        b = min(distances[i, groups == other].mean() for other in set(groups) if other != group)
        values.append((b - a) / max(a, b))
    return float(np.mean(values))


def test_site_silhouette_matches_sklearn_and_the_definition():
    for shift in (0.0, 2.0, 6.0):
        emb, sites = sites_embeddings(seed=0, shift=shift)
        z = StandardScaler().fit_transform(emb)
        ours = site_silhouette(emb, sites)
        assert ours == pytest.approx(silhouette_score(z, sites), abs=1e-12)
        assert ours == pytest.approx(silhouette_by_hand(z, sites), abs=1e-10)
    mixed = site_silhouette(*sites_embeddings(seed=1, shift=0.0))
    separated = site_silhouette(*sites_embeddings(seed=1, shift=30.0))
    assert abs(mixed) < 0.05 and separated > 0.5


def test_site_silhouette_is_nan_when_undefined():
    emb = np.random.default_rng(2).normal(size=(5, 3))
    assert np.isnan(site_silhouette(emb, np.array(["a"] * 5)))
    assert np.isnan(site_silhouette(emb, np.array(list("abcde"))))
    with pytest.raises(UserError, match="one group per embedding"):
        site_silhouette(emb, np.array(["a", "b"]))


def test_knn_ood_scores_shifted_gaussian_higher_than_held_out_sample():
    rng = np.random.default_rng(3)
    scales = rng.uniform(0.5, 4.0, 8)
    train = rng.normal(size=(400, 8)) * scales
    held_out = rng.normal(size=(200, 8)) * scales
    shifted = (rng.normal(size=(200, 8)) + 1.5) * scales  # 1.5 standard deviations on every axis
    in_scores, in_summary = knn_ood_score(train, held_out, k=10)
    out_scores, out_summary = knn_ood_score(train, shifted, k=10)
    assert in_scores.shape == (200,) and out_scores.shape == (200,)
    # Held-out scans of the training distribution look like left-out training scans: score about 1,
    # about 5% above the training 95th percentile, AUROC about 0.5.
    assert in_summary["mean"] == pytest.approx(1.0, abs=0.1)
    assert in_summary["exceed_rate"] < 0.15 and abs(in_summary["auroc"] - 0.5) < 0.1
    assert out_summary["mean"] > in_summary["mean"] + 0.5
    assert out_summary["exceed_rate"] > 0.5 and out_summary["auroc"] > 0.9
    # Larger shifts score higher.
    assert knn_ood_score(train, shifted * 2.0, k=10)[1]["mean"] > out_summary["mean"]


def test_knn_ood_leaves_each_training_point_out_and_clips_k():
    # Training points 0, 1, 3 on a line (standardised by their std), one test point at 10.
    train = np.array([[0.0], [1.0], [3.0]])
    std = train.std()
    scores, summary = knn_ood_score(train, np.array([[10.0]]), k=5)
    assert summary["k"] == 2
    # Left-out mean distances to the 2 others: 0 -> (1 + 3) / 2, 1 -> (1 + 2) / 2, 3 -> (2 + 3) / 2.
    reference = np.mean([2.0, 1.5, 2.5]) / std
    assert summary["reference"] == pytest.approx(reference)
    assert scores[0] == pytest.approx(((10 - 3) + (10 - 1)) / 2 / std / reference)
    with pytest.raises(UserError, match="at least 2 training"):
        knn_ood_score(train[:1], train, k=3)


def test_frechet_smaller_within_a_gaussian_than_between_shifted_gaussians():
    rng = np.random.default_rng(4)
    emb = np.concatenate([rng.normal(size=(300, 5)), rng.normal(size=(300, 5)), rng.normal(size=(300, 5)) + 1.0])
    groups = np.repeat(["same1", "same2", "shifted"], 300)
    result = frechet_matrix(emb, groups)
    matrix = np.array(result["matrix"])
    assert matrix[0, 1] < 0.3 * min(matrix[0, 2], matrix[1, 2])
    assert result["farthest"] == "shifted"


def test_latent_results_run_every_registered_test_and_summarise_them():
    emb, sites = sites_embeddings(seed=5, shift=30.0, num_per_site=40)
    rows = [{"site": site, "sex": "F" if i % 2 else "M"} for i, site in enumerate(sites)]
    in_site_a, other_sites = np.flatnonzero(sites == "a"), np.flatnonzero(sites != "a")
    result = latent_results(emb, rows, ["site", "sex"], seed=0, split=(in_site_a, other_sites))
    assert result["embed_dim"] == 6 and result["rankme"] == pytest.approx(rankme(emb))
    assert result["site"]["silhouette"] > 0.5 and abs(result["sex"]["silhouette"]) < 0.05
    assert result["site"]["leakage_auroc"] > 0.95 and set(result["site"]["frechet"]["groups"]) == {"a", "b", "c"}
    assert result["knn_ood"]["mean"] > 1.5  # other sites lie outside site a's distribution
    site = result["summary"]["site"]
    assert site["leakage AUROC"] == result["site"]["leakage_auroc"] and site["RankMe"] == result["rankme"]
    assert site["farthest group"] == result["site"]["frechet"]["farthest"]
    assert site["its mean Frechet distance"] == max(result["site"]["frechet"]["mean_to_others"].values())
    assert set(result["tables"]) == {"knn_ood"}  # a dict result without columns gets its own table
    numbers = headline(result)
    assert numbers["silhouette (sex)"] == result["sex"]["silhouette"] and numbers["RankMe"] == result["rankme"]
    assert "farthest group (site)" not in numbers  # not a number


def test_a_registered_latent_test_reaches_the_results_and_the_headline():
    @register_latent_test("mean_norm", scope="attribute", title="mean norm gap")
    def mean_norm_gap(emb_ND, groups_N, *, seed):
        norms = np.linalg.norm(emb_ND, axis=1)
        means = [norms[groups_N == g].mean() for g in np.unique(groups_N)]
        return float(max(means) - min(means))

    try:
        emb, sites = sites_embeddings(seed=6, shift=3.0, num_per_site=20)
        rows = [{"site": site} for site in sites]
        result = latent_results(emb, rows, ["site"], seed=0, split=(np.arange(30), np.arange(30, 60)))
        norms = np.linalg.norm(emb, axis=1)
        expected = max(norms[sites == g].mean() for g in "abc") - min(norms[sites == g].mean() for g in "abc")
        assert result["site"]["mean_norm"] == pytest.approx(expected)
        assert result["summary"]["site"]["mean norm gap"] == pytest.approx(expected)
        assert headline(result)["mean norm gap (site)"] == pytest.approx(expected)
    finally:
        LATENT_TESTS.unregister("mean_norm")
    assert "mean_norm" not in list_latent_tests()
