"""Probes, few-shot subsets and ordinal metrics against scikit-learn, scipy and statistical properties."""
import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn.metrics import cohen_kappa_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler

from rafmedia.core.errors import UserError
from rafmedia.evaluate.metrics import compute_auroc
from rafmedia.evaluate.probes import (PROBES, create_probe, few_shot_indices, list_probes, quadratic_weighted_kappa,
                                      spearman)


def separable_embeddings(seed: int, num: int = 400, dim: int = 16):
    """Two unit Gaussian classes 4 standard deviations apart along a random direction: the Bayes AUROC is
    Phi(4 / sqrt 2) = 0.998 and the Bayes accuracy Phi(2) = 0.977."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, num)
    direction = rng.normal(size=dim)
    emb = rng.normal(size=(num, dim)) + 4.0 * np.outer(labels, direction / np.linalg.norm(direction))
    return emb, labels


def test_registry_lists_the_probes_with_target_kinds():
    assert {"logistic", "knn", "linear", "ordinal"} <= set(list_probes())
    assert PROBES.tags("linear")["targets"] == "continuous" and PROBES.tags("ordinal")["targets"] == "ordinal"
    with pytest.raises(UserError, match="did you mean 'knn'"):
        create_probe("knnn")
    with pytest.raises(UserError, match="euclidean"):
        create_probe("knn", metric="manhatan")


@pytest.mark.parametrize("name", ["logistic", "knn", "linear", "ordinal"])
def test_probe_auroc_near_one_when_separable_and_near_half_when_shuffled(name):
    emb, labels = separable_embeddings(seed=0)
    train, test = np.arange(200), np.arange(200, 400)
    probe = create_probe(name).fit(emb[train], labels[train])
    assert compute_auroc(y_true=labels[test], y_score=probe.scores(emb[test])) > 0.98
    assert np.mean(np.round(probe.predict(emb[test])) == labels[test]) > 0.9
    shuffled = np.random.default_rng(1).permutation(labels)
    probe = create_probe(name).fit(emb[train], shuffled[train])
    # 100 vs 100 test scans: the AUROC of an uninformative score has a standard deviation of about 0.04.
    assert abs(compute_auroc(y_true=shuffled[test], y_score=probe.scores(emb[test])) - 0.5) < 0.15


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("k", [10, 20])
def test_knn_scores_match_sklearn_and_brute_force_neighbour_fractions(metric, k):
    rng = np.random.default_rng(2)
    emb, labels = rng.normal(loc=1.0, size=(120, 8)) * np.arange(1, 9), rng.integers(0, 2, 120)
    query = rng.normal(loc=1.0, size=(30, 8)) * np.arange(1, 9)
    probe = create_probe("knn", k_grid=(k,), metric=metric).fit(emb, labels)
    scaler = StandardScaler().fit(emb)
    reference = KNeighborsClassifier(n_neighbors=k, metric=metric).fit(scaler.transform(emb), labels)
    np.testing.assert_allclose(probe.scores(query), reference.predict_proba(scaler.transform(query))[:, 1], atol=1e-12)
    # Independent of sklearn's neighbour search: count positive labels among the k closest by hand.
    z_train, z_query = scaler.transform(emb), scaler.transform(query)
    if metric == "cosine":
        z_train = z_train / np.linalg.norm(z_train, axis=1, keepdims=True)
        z_query = z_query / np.linalg.norm(z_query, axis=1, keepdims=True)
    distances = np.linalg.norm(z_query[:, None] - z_train[None], axis=2)
    nearest = np.argsort(distances, axis=1)[:, :k]
    np.testing.assert_allclose(probe.scores(query), labels[nearest].mean(axis=1), atol=1e-12)


def test_knn_clips_k_to_training_size_and_picks_k_from_grid():
    emb, labels = separable_embeddings(seed=3, num=6)
    labels[:2] = [0, 1]  # both classes present
    probe = create_probe("knn", k_grid=(20,)).fit(emb, labels)
    assert probe.k_ == 6
    # With all 6 training scans as neighbours every query gets the training share of positives.
    np.testing.assert_allclose(probe.scores(emb[:3]), labels.mean())
    emb, labels = separable_embeddings(seed=4, num=90)
    assert create_probe("knn").fit(emb, labels).k_ in (10, 20)


def test_linear_probe_ranks_a_continuous_target():
    rng = np.random.default_rng(5)
    emb = rng.normal(size=(300, 10))
    target = emb @ rng.normal(size=10) + 0.3 * rng.normal(size=300)
    probe = create_probe("linear").fit(emb[:200], target[:200])
    assert probe.alpha_ in (0.1, 1.0, 10.0, 100.0)
    assert spearman(target[200:], probe.scores(emb[200:])) > 0.95
    shuffled = rng.permutation(target)
    probe = create_probe("linear").fit(emb[:200], shuffled[:200])
    # Null Spearman over 100 items has a standard deviation of about 0.1.
    assert abs(spearman(shuffled[200:], probe.scores(emb[200:]))) < 0.3


def test_ordinal_probe_recovers_ordered_grades():
    rng = np.random.default_rng(6)
    emb = rng.normal(size=(500, 8))
    latent = emb @ rng.normal(size=8)
    grades = np.digitize(latent, np.quantile(latent, [0.2, 0.4, 0.6, 0.8])) * 2  # classes 0, 2, 4, 6, 8
    probe = create_probe("ordinal").fit(emb[:350], grades[:350])
    predicted = probe.predict(emb[350:])
    assert set(predicted.tolist()) <= {0, 2, 4, 6, 8}
    scores = probe.scores(emb[350:])
    assert scores.min() >= 0 and scores.max() <= 4  # expected rank over 5 classes
    assert quadratic_weighted_kappa(grades[350:], predicted) > 0.85
    assert spearman(grades[350:], scores) > 0.9


def test_few_shot_subsets_are_stratified_nested_and_seeded():
    labels = np.repeat([0, 1, 2], 100)
    one, ten, full = (few_shot_indices(labels, f, seed=7) for f in (0.01, 0.1, 1.0))
    assert np.bincount(labels[one]).tolist() == [1, 1, 1]  # 1% of 300 still keeps every class
    assert np.bincount(labels[ten]).tolist() == [10, 10, 10]
    np.testing.assert_array_equal(full, np.arange(300))
    assert set(one) <= set(ten) <= set(full)  # nested by construction
    np.testing.assert_array_equal(ten, few_shot_indices(labels, 0.1, seed=7))
    assert not np.array_equal(ten, few_shot_indices(labels, 0.1, seed=8))


def test_few_shot_keeps_rare_classes_and_rejects_bad_fractions():
    labels = np.array([0] * 270 + [1] * 25 + [2] * 5)
    counts = np.bincount(labels[few_shot_indices(labels, 0.1, seed=0)])
    assert counts.tolist() == [27, 3, 1]  # round half up: 2.5 -> 3, 0.5 -> 1
    assert np.bincount(labels[few_shot_indices(labels, 0.01, seed=0, min_per_class=2)]).tolist() == [3, 2, 2]
    for fraction in (0.0, 1.5):
        with pytest.raises(UserError, match="fraction"):
            few_shot_indices(labels, fraction, seed=0)


def test_quadratic_weighted_kappa_matches_sklearn():
    rng = np.random.default_rng(8)
    for _ in range(30):
        y_true = rng.integers(0, 5, 60)
        y_pred = np.clip(y_true + rng.integers(-2, 3, 60), 0, 4)
        expected = cohen_kappa_score(y_true, y_pred, weights="quadratic")
        assert quadratic_weighted_kappa(y_true, y_pred) == pytest.approx(expected, abs=1e-12)
    y_true, y_pred = rng.integers(1, 4, 40), rng.integers(1, 4, 40)
    labels = [0, 1, 2, 3, 4]  # a full rating scale wider than the observed values changes the weights
    assert quadratic_weighted_kappa(y_true, y_pred, labels=labels) == pytest.approx(
        cohen_kappa_score(y_true, y_pred, weights="quadratic", labels=labels), abs=1e-12)


def test_quadratic_weighted_kappa_hand_cases():
    assert quadratic_weighted_kappa([0, 1, 2, 3], [0, 1, 2, 3]) == pytest.approx(1.0)
    # Reversed ratings on a symmetric scale: observed disagreement is twice the chance level -> kappa = -1.
    assert quadratic_weighted_kappa([0, 1, 2], [2, 1, 0]) == pytest.approx(-1.0)
    assert np.isnan(quadratic_weighted_kappa([1, 1], [1, 1]))
    with pytest.raises(UserError, match=r"\[7\]"):
        quadratic_weighted_kappa([0, 7], [0, 1], labels=[0, 1])


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(9)
    for _ in range(30):
        y_true = rng.integers(0, 5, 50)  # many ties
        y_score = np.round(y_true + rng.normal(size=50), 1)
        assert spearman(y_true, y_score) == pytest.approx(spearmanr(y_true, y_score).statistic, abs=1e-12)
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))
