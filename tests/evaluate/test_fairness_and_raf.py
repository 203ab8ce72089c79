"""Per-group metrics of the evaluator against scikit-learn and fairlearn on the same predictions; the RAF index and
its components by hand; its bootstrap intervals."""
import fairlearn.metrics as fairlearn_metrics
import numpy as np
import pytest
from sklearn.metrics import accuracy_score, roc_auc_score

from rafmedia.core.errors import UserError
from rafmedia.evaluate import raf
from rafmedia.evaluate.fairness import fairness_results
from rafmedia.evaluate.groups import group_labels
from rafmedia.evaluate.scan_level import ProbeFit


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
    groups = group_labels(rows, ["site", "sex"], intersections=True)
    result = fairness_results(list(fits.values()), y, groups, seed=0, num_resamples=50, num_permutations=99,
                              min_group_size=18)
    assert set(result) == {"site", "sex", "site x sex"}
    groups = {**{attribute: np.array([row[attribute] for row in rows]) for attribute in ("site", "sex")},
              "site x sex": np.array([f"{row['site']} & {row['sex']}" for row in rows])}
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
        first = fits[(0, "disease")]
        member = groups[attribute][first.test_idx]
        demographic_parity = fairlearn_metrics.demographic_parity_difference(
            y[first.test_idx], first.predictions, sensitive_features=member)
        assert out["first_replicate"]["demographic_parity_difference"] == pytest.approx(demographic_parity, abs=1e-12)
        assert 0 < out["first_replicate"]["accuracy_gap_p_value"] <= 1


def test_raf_components_hand_computed():
    assert raf.performance_component(0.8) == pytest.approx(0.6)
    assert raf.performance_component(0.4) == 0.0
    assert raf.performance_component(0.55, chance=0.25) == pytest.approx(0.4)
    # Clean skill 0.3; noise loses 0 then 0.15 of AUROC at severities 1, 2 (weights (2/3), (4/9) normalised).
    w1, w2 = (2 / 3) / (2 / 3 + 4 / 9), (4 / 9) / (2 / 3 + 4 / 9)
    assert raf.degradation(0.8, {1: 0.8, 2: 0.65}) == pytest.approx(w2 * 0.15 / 0.3)
    assert raf.degradation(0.8, {1: 0.9, 2: 0.85}) == 0.0  # gains do not count
    assert raf.degradation(0.45, {1: 0.45}) == 1.0  # no skill: nothing can be kept
    robust = raf.robustness_component(0.8, {"noise": {1: 0.8, 2: 0.65}, "blur": {1: 0.5, 2: 0.5}})
    assert robust == pytest.approx(1 - (w2 * 0.5 + 1.0) / 2)
    assert raf.fairness_component({"sex": 0.1, "site": 0.25}) == pytest.approx(1 - 0.175)
    assert raf.raf_index(0.6, robust, 0.825) == pytest.approx((0.6 + robust + 0.825) / 3)
    weights = raf.RafWeights(performance=2, robustness=1, fairness=0)
    assert raf.raf_index(0.6, 0.3, 0.9, weights) == pytest.approx((2 * 0.6 + 0.3) / 3)
    assert raf.raf_index(0.6, 0.3, float("nan")) == pytest.approx(0.45)  # no groups: F undefined, left out
    with pytest.raises(UserError, match="raf_weights"):
        raf.raf_index(0.6, 0.3, 0.9, raf.RafWeights(0, 0, 0))


def test_raf_point_and_intervals_on_per_subject_inputs():
    rng = np.random.default_rng(3)
    n = 200
    labels = rng.integers(0, 2, n)
    clean = labels * 1.0 + rng.normal(0, 0.7, n)
    noisy = {s: labels * 1.0 + rng.normal(0, 0.7 + 0.3 * s, n) for s in (1, 2, 3)}
    groups = {"sex": np.where(rng.uniform(size=n) < 0.5, "F", "M")}
    predictions = (clean > 0.5).astype(int)
    inputs = raf.RafInputs(labels, clean, predictions, {"noise": noisy}, groups)
    point = raf.raf_point(inputs)
    auroc = roc_auc_score(labels, clean)
    assert point["performance"] == pytest.approx(2 * (auroc - 0.5))
    lost = sum(w * max(0.0, auroc - roc_auc_score(labels, noisy[s]))
               for s, w in zip((1, 2, 3), np.array([2 / 3, 4 / 9, 8 / 27]) / (2 / 3 + 4 / 9 + 8 / 27)))
    assert point["robustness"] == pytest.approx(1 - lost / (auroc - 0.5))
    correct = predictions == labels
    gap = abs(accuracy_score(labels[groups["sex"] == "F"], predictions[groups["sex"] == "F"])
              - accuracy_score(labels[groups["sex"] == "M"], predictions[groups["sex"] == "M"]))
    assert point["fairness"] == pytest.approx(1 - gap) and correct.any()
    with_ci = raf.raf_with_intervals(inputs, num_resamples=200, seed=0)
    for key in ("index", "performance", "robustness", "fairness"):
        low, high = with_ci[f"{key}_ci95"]
        assert low <= point[key] <= high and high - low > 0
    half = raf.raf_with_intervals(raf.RafInputs(labels[:50], clean[:50], predictions[:50],
                                                {"noise": {s: v[:50] for s, v in noisy.items()}},
                                                {"sex": groups["sex"][:50]}), num_resamples=200, seed=0)
    width = lambda values: values["performance_ci95"][1] - values["performance_ci95"][0]  # noqa: E731
    assert width(half) > 1.4 * width(with_ci)  # a quarter of the subjects: about twice as wide


def test_raf_over_replicates_averages_p_and_f_and_takes_r_where_it_was_measured():
    rng = np.random.default_rng(5)
    replicates = []
    for r in range(3):
        labels = rng.integers(0, 2, 80)
        scores = labels * (0.5 + r) + rng.normal(0, 1, 80)
        altered = {"noise": {1: labels * 0.5 + rng.normal(0, 1.5, 80)}} if r == 0 else {}
        replicates.append(raf.RafInputs(labels, scores, (scores > 0.5).astype(int), altered,
                                        {"sex": np.where(rng.uniform(size=80) < 0.5, "F", "M")}))
    singles = [raf.raf_point(replicate) for replicate in replicates]
    combined = raf.raf_point(replicates)
    assert combined["performance"] == pytest.approx(np.mean([s["performance"] for s in singles]))
    assert combined["fairness"] == pytest.approx(np.mean([s["fairness"] for s in singles]))
    assert combined["robustness"] == pytest.approx(singles[0]["robustness"])
    assert np.isnan(singles[1]["robustness"])
    with_ci = raf.raf_with_intervals(replicates, num_resamples=100, seed=1)
    assert with_ci["index_ci95"][0] <= combined["index"] <= with_ci["index_ci95"][1]
