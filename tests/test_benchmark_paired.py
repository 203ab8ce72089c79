"""benchmarks/paired_ssl.py --quick: every method is pretrained, scored with intervals, and compared on the same
test subjects."""
import json

import numpy as np

from tests.benchmark_support import load_benchmark


def test_paired_ssl_benchmark_quick_scores_every_method_with_intervals(tmp_path):
    bench = load_benchmark("paired_ssl")
    result = bench.main(["--quick", "--out", str(tmp_path)])
    methods = result["methods"]
    assert set(methods) == {*bench.TASKS, bench.RANDOM, "identity", "raw_intensity"}
    for name, scores in methods.items():
        for key, mean in scores["mean"].items():
            low, high = scores["ci95"][key]
            assert low <= mean <= high, (name, key)
            assert abs(np.mean(scores["per_subject"][key]) - mean) < 1e-12
    assert len(methods["identity"]["per_subject"]["registration.tre_mm"]) == result["num_test"]
    # a difference is the mean of the per-subject differences of the two methods' seed-averaged scores
    for a, b in bench.PAIRS:
        key = "registration.tre_mm"
        expected = np.mean(np.subtract(methods[a]["per_subject"][key], methods[b]["per_subject"][key]))
        assert abs(result["differences"][f"{a} - {b}"][key]["mean"] - expected) < 1e-12
    # the identity's TRE is the test landmarks' mean motion, several mm at the quick preset
    assert methods["identity"]["mean"]["registration.tre_mm"] > 3.0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["differences"].keys() == result["differences"].keys() and saved["num_pool"] + saved["num_test"] == 16
