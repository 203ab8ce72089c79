"""The adaptor benchmark runs end to end in --quick mode: every encoder embedded once and never again, every
adaptor x budget x seed scored (LoRA not applicable to the CNNs, applicable to the ViT), the paired pretrained -
random differences equal to the per-seed differences of the two sides."""
import math

import numpy as np
import pytest

from tests.benchmark_support import load_benchmark


def test_adaptor_benchmark_quick_scores_every_adaptor_budget_and_seed(tmp_path, capsys):
    bench = load_benchmark("adaptors")
    summary = bench.main(["--quick", "--out", str(tmp_path)])
    results = summary["results"]
    assert set(results) == {"pretrained cnn", "random cnn", "random vit"}
    for name, result in results.items():
        assert result["subjects_embedded"] == 24 and result["subjects_embedded_on_rerun"] == 0
        block = result["block"]
        assert block["budgets"] == ["0.1", "1.0"] and block["seeds"] == [0, 1]
        assert block["results"]["lora"]["applicable"] is (name == "random vit")
        for outcome in block["results"].values():
            for at in (outcome.get("budgets") or {}).values():
                assert [s["seed"] for s in at["per_seed"]] == [0, 1]
                assert all(0 <= s["auroc"] <= 1 and s["seconds"] > 0 for s in at["per_seed"])
    pretrained, random = (results[name]["block"] for name in ("pretrained cnn", "random cnn"))
    for budget in ("0.1", "1.0"):
        # the same label subset per seed for both encoders
        assert [s["num_train"] for s in pretrained["results"]["mlp"]["budgets"][budget]["per_seed"]] == \
            [s["num_train"] for s in random["results"]["mlp"]["budgets"][budget]["per_seed"]]
        difference = bench.paired_difference(pretrained, random, "finetune_partial", budget)
        per_seed = [a["auroc"] - b["auroc"] for a, b in zip(
            pretrained["results"]["finetune_partial"]["budgets"][budget]["per_seed"],
            random["results"]["finetune_partial"]["budgets"][budget]["per_seed"])]
        assert difference["mean"] == pytest.approx(np.mean(per_seed))
    assert bench.paired_difference(pretrained, random, "lora", "1.0") is None
    assert math.isfinite(summary["wall_s"]) and (tmp_path / "adaptors.json").is_file()
    printed = capsys.readouterr().out
    assert "not applicable" in printed and "pretrained - random cnn (paired)" in printed
