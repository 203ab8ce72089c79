"""benchmarks/recipes.py: candidates chosen on validation only, a recipe `raf pretrain -c` loads, a confirmation on the
held-out subjects with t-intervals, and monitor evidence; plus every packaged recipe is a valid pretraining config."""
import json

import numpy as np
import pytest
from scipy import stats

from rafmedia.engine.batches import DataConfig
from rafmedia.engine.pretrain import validate_pretraining
from rafmedia.engine.tasks import list_tasks
from rafmedia.launch.config import RECIPES, load_config, packaged_configs
from tests.benchmark_support import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("recipes")


def _scipy_interval(values):
    values = np.asarray(values)
    return stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values))


def test_intervals_and_the_non_overlap_rule_against_scipy_and_a_hand_case(bench):
    comparison = bench.compare({"linear": [0.80, 0.82, 0.84]}, {"linear": [0.60, 0.62, 0.64]})["linear"]
    low, high = _scipy_interval([0.80, 0.82, 0.84])
    assert comparison["pretrained"]["low"] == pytest.approx(low) and comparison["pretrained"]["high"] == pytest.approx(high)
    assert comparison["pretrained"]["mean"] - low == pytest.approx(4.3027 * 0.02 / np.sqrt(3), rel=1e-4)  # t_{.975,2}
    assert comparison["beats"] and not comparison["worse"]
    assert comparison["difference"]["mean"] == pytest.approx(0.2)
    close = bench.compare({"knn": [0.70, 0.80, 0.75]}, {"knn": [0.65, 0.70, 0.72]})["knn"]
    assert not close["beats"] and not close["worse"]  # the means differ, the intervals overlap


def test_the_three_way_split_is_disjoint_stratified_and_seeded(bench):
    rows = [{"subject_id": f"s{i}", "disease": int(i % 3 == 0)} for i in range(100)]
    split = bench.split_three(rows, bench.RecipePreset())
    parts = [set(split[name].tolist()) for name in ("pool", "validation", "test")]
    assert sum(len(p) for p in parts) == 100 and set.union(*parts) == set(range(100))
    assert [len(p) for p in parts] == [60, 20, 20]
    for part in parts[1:]:
        assert sum(rows[i]["disease"] for i in part) in (6, 7)  # a third of 20, stratified
    assert all(np.array_equal(split[k], bench.split_three(rows, bench.RecipePreset())[k]) for k in split)


def test_quick_run_chooses_on_validation_writes_a_loadable_recipe_and_logs_monitors(bench, tmp_path, capsys):
    [result] = bench.main(["--quick", "--out", str(tmp_path)])
    quick = bench.QUICK
    scores = {c["name"]: c["score"] for c in result["candidates"]}
    assert set(scores) == set(bench.CANDIDATES["rotation"]) and result["chosen"] == max(scores, key=scores.get)
    for candidate in result["candidates"]:
        assert candidate["score"] == pytest.approx(np.mean([candidate["validation"][a] for a in ("linear", "knn")]))
        assert all(0.0 <= value <= 1.0 for value in candidate["validation"].values())
    config = load_config(result["recipe"])  # what `raf pretrain -c` reads
    chosen = bench.CANDIDATES["rotation"][result["chosen"]]
    assert config.task.name == "rotation" and config.task.options == chosen.options
    assert config.encoder.options == chosen.encoder_options and config.train.steps == quick.steps
    assert config.train.monitor_every == quick.monitor_every
    test = result["test"]
    for adaptor, comparison in test["comparison"].items():
        assert len(test["pretrained"][adaptor]) == len(test["random"][adaptor]) == len(quick.seeds)
        low, high = _scipy_interval(test["pretrained"][adaptor])
        assert comparison["pretrained"]["low"] == pytest.approx(low) and comparison["pretrained"]["high"] == pytest.approx(high)
        assert comparison["beats"] == (comparison["pretrained"]["low"] > comparison["random"]["high"])
    for found in result["evidence"]:
        assert [step for step, _ in found["rankme"]] == [0, 2, 3]  # every 2 steps and the last of 4
        assert all(1.0 <= value <= found["dim"] for _, value in found["rankme"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert sum(saved["split"].values()) == quick.num_subjects and saved["results"][0]["chosen"] == result["chosen"]
    printed = capsys.readouterr().out
    assert "| rotation | " + result["chosen"] + " | linear |" in printed


@pytest.mark.parametrize("name", [name for name in packaged_configs() if name.startswith(f"{RECIPES}/")])
def test_every_packaged_recipe_is_a_valid_pretraining_config(name):
    config = load_config(name)
    assert config.task.name == name.removeprefix(f"{RECIPES}/") and config.task.name in list_tasks()
    validate_pretraining(DataConfig(cohort="unused", channels=config.data.channels), config.encoder, config.task,
                         config.train)
