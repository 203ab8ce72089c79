"""Metric functions against independent references: scikit-learn, MONAI, scipy and hand-computed cases."""
import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

from rafmedia.core.errors import UserError
from rafmedia.evaluate.group_metrics import summarize_group_values
from rafmedia.evaluate.metrics import (bootstrap_ci, compute_accuracy, compute_auroc, compute_balanced_accuracy,
                                       corruption_error, frechet_distance, rankme, relative_corruption_error,
                                       severity_weights)


def test_auroc_matches_sklearn_including_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        labels = rng.integers(0, 2, 50)
        scores = np.round(rng.normal(size=50) + labels, 1)  # rounding creates ties
        assert compute_auroc(y_true=labels, y_score=scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert np.isnan(compute_auroc(y_true=[1, 1], y_score=[0.1, 0.2]))


def test_metrics_refuse_positional_arguments_and_scores_given_as_labels():
    labels, scores = np.array([0, 1, 1, 0]), np.array([0.2, 0.7, 0.9, 0.4])
    with pytest.raises(TypeError):
        compute_auroc(scores, labels)  # the old order (scores first) would have returned NaN silently
    with pytest.raises(TypeError):
        compute_accuracy(labels, labels)
    with pytest.raises(UserError, match="y_true must be one binary label"):
        compute_auroc(y_true=scores, y_score=labels)  # swapped by keyword: scores are not 0/1 labels
    assert compute_auroc(y_true=labels, y_score=scores) == roc_auc_score(labels, scores) == 1.0


def test_accuracy_and_balanced_accuracy_match_sklearn():
    rng = np.random.default_rng(1)
    labels, predictions = rng.integers(0, 2, 40), rng.integers(0, 2, 40)
    assert compute_accuracy(y_true=labels, y_pred=predictions) == pytest.approx(accuracy_score(labels, predictions))
    assert compute_balanced_accuracy(y_true=labels, y_pred=predictions) == pytest.approx(
        balanced_accuracy_score(labels, predictions))


def test_frechet_distance_matches_monai_fid():
    from monai.metrics import FIDMetric

    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 8))
    y = rng.normal(loc=0.5, scale=1.3, size=(150, 8)) @ rng.normal(size=(8, 8))
    ours = frechet_distance(x, y)
    monai = FIDMetric()(torch.from_numpy(x), torch.from_numpy(y)).item()
    assert ours == pytest.approx(monai, rel=1e-6)


def test_frechet_distance_of_gaussians_hand_computed():
    # Same covariance, means 3 apart along one axis: distance = 3^2 (trace terms cancel).
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4000, 2))
    assert frechet_distance(x, x + np.array([3.0, 0.0])) == pytest.approx(9.0, abs=1e-6)


def test_rankme_of_isotropic_and_collapsed_embeddings():
    assert rankme(np.eye(6)) == pytest.approx(6.0, rel=1e-4)  # equal singular values: full rank
    collapsed = np.outer(np.arange(1, 11), np.ones(6))
    assert rankme(collapsed) == pytest.approx(1.0, abs=1e-3)


def test_group_summary_hand_computed():
    summary = summarize_group_values({"a": 0.9, "b": 0.6, "c": float("nan")})
    assert summary["gap"] == pytest.approx(0.3) and summary["worst_group"] == "b" and summary["best_group"] == "a"
    assert summary["worst"] == 0.6
    # the population standard deviation over groups (numpy's ddof=0): 0.15, where the sample one would be 0.212
    assert summary["ratio"] == pytest.approx(0.6 / 0.9) and summary["std"] == pytest.approx(0.15)
    assert summary["std"] == pytest.approx(np.std([0.9, 0.6])) != pytest.approx(np.std([0.9, 0.6], ddof=1))
    errors = summarize_group_values({"a": 0.1, "b": 0.4}, higher_is_better=False)
    assert errors["worst_group"] == "b" and errors["worst"] == 0.4 and errors["gap"] == pytest.approx(0.3)


def test_group_summary_is_undefined_with_fewer_than_two_defined_groups():
    one = summarize_group_values({"a": 0.8, "b": float("nan")})
    assert np.isnan(one["gap"]) and np.isnan(one["ratio"]) and np.isnan(one["std"])  # not a gap of 0.0
    assert one["worst_group"] == "a" and one["num_groups_compared"] == 1
    assert np.isnan(summarize_group_values({})["gap"])


def test_corruption_errors_and_severity_weights_hand_computed():
    assert corruption_error([0.2, 0.4], [0.4, 0.8]) == pytest.approx(0.5)
    # (0.2-0.1 + 0.4-0.1) / (0.4-0.2 + 0.8-0.2) = 0.4 / 0.8
    assert relative_corruption_error([0.2, 0.4], 0.1, [0.4, 0.8], 0.2) == pytest.approx(0.5)
    weights = severity_weights([1, 2])
    assert weights == pytest.approx([(2 / 3) / (2 / 3 + 4 / 9), (4 / 9) / (2 / 3 + 4 / 9)])


def test_bootstrap_interval_brackets_the_estimate_and_shrinks_with_more_data():
    rng = np.random.default_rng(4)
    small, large = rng.integers(0, 2, 30), rng.integers(0, 2, 600)
    low_s, high_s = bootstrap_ci(lambda idx: small[idx].mean(), len(small), seed=0)
    low_l, high_l = bootstrap_ci(lambda idx: large[idx].mean(), len(large), seed=0)
    assert low_s <= small.mean() <= high_s and low_l <= large.mean() <= high_l
    assert high_l - low_l < high_s - low_s
