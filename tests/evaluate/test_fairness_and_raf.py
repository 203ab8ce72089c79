"""Per-group metrics of the evaluator against scikit-learn on the same predictions; RAF components by hand."""
import numpy as np
import pytest
from sklearn.metrics import accuracy_score, roc_auc_score

from rafmedia.evaluate import raf
from rafmedia.evaluate.runner import EvaluateConfig, ProbeFit, fairness_results


def test_per_group_metrics_match_sklearn_on_the_same_predictions():
    rng = np.random.default_rng(0)
    n = 120
    rows = [{"site": f"s{i % 3}", "sex": "F" if i % 4 == 0 else "M"} for i in range(n)]
    y = rng.integers(0, 2, n)
    fits = {}
    for seed in (0, 1):
        test_idx = rng.permutation(n)[:60]
        scores = np.clip(y[test_idx] * 0.3 + rng.uniform(size=60), 0, 1)
        fits[(seed, "disease")] = ProbeFit(None, test_idx, np.array([]), scores, (scores > 0.5).astype(int))
    config = EvaluateConfig(group_by=["site", "sex"], bootstrap_resamples=50, min_group_size=18)
    result = fairness_results(fits, y, rows, config)
    groups = {attribute: np.array([row[attribute] for row in rows]) for attribute in ("site", "sex")}
    for attribute, out in result.items():
        for group, values in out["groups"].items():
            aurocs, accuracies = [], []
            for fit in fits.values():
                member = groups[attribute][fit.test_idx] == group
                aurocs.append(roc_auc_score(y[fit.test_idx][member], fit.scores[member]))
                accuracies.append(accuracy_score(y[fit.test_idx][member], fit.predictions[member]))
            assert values["auroc"] == pytest.approx(np.mean(aurocs), abs=1e-12)
            assert values["accuracy"] == pytest.approx(np.mean(accuracies), abs=1e-12)
            assert values["small_group"] == (values["n_test"] < 18)
        accuracy = {g: v["accuracy"] for g, v in out["groups"].items()}
        assert out["accuracy"]["gap"] == pytest.approx(max(accuracy.values()) - min(accuracy.values()))
        assert out["accuracy"]["worst_group"] == min(accuracy, key=accuracy.get)


def test_raf_components_hand_computed():
    assert raf.performance_component(0.8) == pytest.approx(0.6)
    assert raf.performance_component(0.4) == 0.0
    # Clean skill 0.3; noise keeps 0.3 then 0.15 of it at severities 1, 2: retained 1.0 and 0.5.
    robust = raf.robustness_component(0.8, {"noise": {1: 0.8, 2: 0.65}})
    w1, w2 = 2 / 3, 4 / 9
    assert robust == pytest.approx((w1 * 1.0 + w2 * 0.5) / (w1 + w2))
    assert raf.fairness_component({"sex": 0.1, "site": 0.25}) == pytest.approx(0.75)
    assert raf.raf_index(0.6, robust, 0.75) == pytest.approx((0.6 * robust * 0.75) ** (1 / 3))
