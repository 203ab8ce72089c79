"""Robustness summaries against hand-computed cases (ImageNet-C CE / mCE, ROOD-MRI weighted degradation)."""
import numpy as np
import pytest

from rafmedia.core.errors import UserError
from rafmedia.evaluate.robustness import corruption_summary, mean_corruption_error, severity_weighted_degradation

SEVERITIES = [1, 2, 3, 4, 5]


def rood_weights(severities):
    """(2/3)^s normalised, written out independently of metrics.severity_weights."""
    raw = np.array([(2.0 / 3.0) ** s for s in severities])
    return raw / raw.sum()


def test_degradation_of_a_metric_dropping_by_a_tenth_per_severity():
    clean = 0.9
    metric = [clean - 0.1 * s for s in SEVERITIES]
    result = severity_weighted_degradation(clean, metric, SEVERITIES)
    # Closed form: sum_s s q^s / sum_s q^s with q = 2/3 over s = 1..5, times 0.1.
    q = 2.0 / 3.0
    closed = 0.1 * sum(s * q ** s for s in SEVERITIES) / sum(q ** s for s in SEVERITIES)
    assert result["absolute"] == pytest.approx(closed, abs=1e-12)
    assert result["degradation"] == pytest.approx(closed / clean, abs=1e-12)
    assert result["normalised"] == pytest.approx(closed / clean, abs=1e-12)  # floor 0: same as degradation


def test_degradation_normalised_by_the_no_skill_floor():
    # AUROC 0.9 -> 0.5 (chance) at every severity: all above-chance skill is lost.
    result = severity_weighted_degradation(0.9, [0.5] * 5, SEVERITIES, floor=0.5)
    assert result["normalised"] == pytest.approx(1.0) and result["degradation"] == pytest.approx(0.4 / 0.9)
    # Below chance cannot lose more than everything.
    assert severity_weighted_degradation(0.9, [0.2] * 5, SEVERITIES, floor=0.5)["normalised"] == 1.0
    assert np.isnan(severity_weighted_degradation(0.5, [0.4] * 5, SEVERITIES, floor=0.5)["normalised"])


def test_degradation_is_monotone_and_ignores_gains():
    small = severity_weighted_degradation(0.8, [0.78, 0.76, 0.74, 0.72, 0.70], SEVERITIES)
    large = severity_weighted_degradation(0.8, [0.75, 0.70, 0.65, 0.60, 0.55], SEVERITIES)
    assert large["degradation"] > small["degradation"] > 0
    # A gain at severity 1 does not offset the loss at severity 2: only w_2 * 0.1 remains.
    mixed = severity_weighted_degradation(0.8, [0.9, 0.7], [1, 2])
    assert mixed["absolute"] == pytest.approx(rood_weights([1, 2])[1] * 0.1)
    assert severity_weighted_degradation(0.8, [0.8] * 5, SEVERITIES)["degradation"] == 0.0
    # Earlier severities weigh more: the same 0.1 drop costs more at severity 1 than at severity 5.
    early = severity_weighted_degradation(0.8, [0.7, 0.8, 0.8, 0.8, 0.8], SEVERITIES)["degradation"]
    late = severity_weighted_degradation(0.8, [0.8, 0.8, 0.8, 0.8, 0.7], SEVERITIES)["degradation"]
    assert early == pytest.approx(late * 1.5 ** 4)


def test_degradation_rejects_mismatched_severities():
    with pytest.raises(UserError, match="one metric value per severity"):
        severity_weighted_degradation(0.8, [0.7, 0.6], SEVERITIES)


def test_corruption_error_against_itself_is_one_and_mce_is_the_mean():
    errors = {"noise": [0.1, 0.2, 0.3], "blur": [0.2, 0.2, 0.5]}
    summary = corruption_summary(errors, errors, clean_error=0.05, baseline_clean_error=0.05)
    assert summary["ce"] == {"noise": pytest.approx(1.0), "blur": pytest.approx(1.0)}
    assert summary["mce"] == pytest.approx(1.0) and summary["relative_mce"] == pytest.approx(1.0)
    baseline = {"noise": [0.2, 0.4, 0.6], "blur": [0.3, 0.3, 0.3]}
    summary = corruption_summary(errors, baseline, clean_error=0.1, baseline_clean_error=0.1)
    # noise: 0.6 / 1.2 = 0.5; blur: 0.9 / 0.9 = 1.0 -> mCE 0.75.
    assert summary["ce"]["noise"] == pytest.approx(0.5) and summary["ce"]["blur"] == pytest.approx(1.0)
    assert summary["mce"] == pytest.approx(0.75)
    # relative: noise (0.3) / (0.9) = 1/3; blur (0.6) / (0.6) = 1 -> mean 2/3.
    assert summary["relative_mce"] == pytest.approx((1 / 3 + 1) / 2)
    assert mean_corruption_error({"a": 0.5, "b": 1.0, "c": 1.5}) == pytest.approx(1.0)


def test_undefined_corruption_error_is_nan_and_flagged():
    summary = corruption_summary({"noise": [0.1], "blur": [0.2]}, {"noise": [0.0], "blur": [0.4]})
    assert np.isnan(summary["ce"]["noise"]) and np.isnan(summary["mce"]) and summary["undefined"] == ["noise"]
    with pytest.raises(UserError, match="blur"):
        corruption_summary({"noise": [0.1]}, {"noise": [0.1], "blur": [0.2]})
    with pytest.raises(UserError, match="at least one"):
        mean_corruption_error({})
