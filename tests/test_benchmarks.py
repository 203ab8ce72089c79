"""The loader benchmark runs end to end in --quick mode (tiny volumes): every loader delivers, data is cached."""
import json
import math

import pytest

from tests.benchmark_support import load_benchmark

_load = load_benchmark


def test_loader_benchmark_quick_runs(tmp_path):
    loader = _load("loader")
    rows = loader.main(["--quick", "--data", str(tmp_path), "--caches", "cold", "--json", str(tmp_path / "rows.json")])
    names = [row.loader.split(":")[0].split(" ")[0] for row in rows]
    assert names == ["ours", "TorchIO", "MONAI", "TorchIO", "MONAI", "raw"]
    assert [row.data for row in rows[1:5]] == [".nii.gz", ".nii.gz", ".nii", ".nii"]
    config = loader.QUICK
    for row in rows:
        assert row.patches >= config.num_patches() and math.isfinite(row.patches_per_s) and row.patches_per_s > 0
        assert row.mb_per_s == pytest.approx(row.patches_per_s * config.patch ** 3 * 4 / 1e6)
    assert len(json.loads((tmp_path / "rows.json").read_text())) == 6
    folder = tmp_path / "quick"
    batch = next(loader.ours(folder, config))
    assert tuple(batch.shape) == (config.batch, 1, config.patch, config.patch, config.patch)
    stamps = {path: path.stat().st_mtime_ns for path in loader.data_files(folder)}
    loader.prepare_data(folder, config)  # cached: nothing is rendered or rewritten
    assert {path: path.stat().st_mtime_ns for path in loader.data_files(folder)} == stamps


def test_alteration_benchmark_quick_covers_every_alteration_and_its_peers():
    from rafmedia.shards.alterations import list_alterations

    bench = _load("alterations")
    rows = bench.main(["--quick", "--repeats", "1"])
    assert sorted({row.alteration for row in rows}) == list_alterations()
    assert {row.batch for row in rows} == {1, 2}  # --quick: a single volume and a batch of 2
    with_torchio = {row.alteration for row in rows if "TorchIO" in row.peers}
    assert {"gaussian_noise", "bias_field", "motion", "ghosting", "kspace_spike", "anisotropic_blur", "gamma",
            "elastic"} <= with_torchio
    assert all(row.ours > 0 and math.isfinite(row.ours) for row in rows)
    assert bench.geometric_mean_ratio(rows, "TorchIO") > 0 and bench.geometric_mean_ratio(rows, "MONAI") > 0


def test_train_step_benchmark_quick_times_both_loops_and_counts_the_model_flops():
    """Both loops run; the FLOP count agrees with a hand count of the convolutions (3x the forward, less the
    input gradient of the first convolution, which nothing needs)."""
    import torch

    bench = _load("train_step")
    result = bench.main(["--quick"])
    assert result["ours_s"] > 0 and result["raw_s"] > 0 and math.isfinite(result["ours_over_raw"])
    assert result["mfu"] is None  # no device peak on a CPU

    preset = bench.PRESETS["quick"]
    task = bench.build_task(preset, torch.device("cpu"))
    batch = bench.in_memory_batches(preset, task.views, torch.device("cpu"))[0]
    layers = []
    for module in task.modules():
        if isinstance(module, torch.nn.Conv3d):
            module.register_forward_hook(lambda m, inputs, output: layers.append(
                2 * m.in_channels * m.out_channels * math.prod(m.kernel_size) * output.numel() // m.out_channels))
        elif isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda m, inputs, output: layers.append(2 * m.in_features * output.numel()))
    task(batch)
    pairs = 2 * preset.batch_size
    similarity = 2 * pairs * pairs * 64  # the (2B x D) @ (D x 2B) of InfoNCE, projection_dim 64
    expected = 3 * (sum(layers) + similarity) - layers[0]
    assert result["flops"] == pytest.approx(expected, rel=1e-6)


def test_pretraining_benchmark_quick_prints_one_row_per_task_with_aurocs(tmp_path, capsys):
    bench = _load("pretraining_helps")
    rows = bench.main(["--quick", "--out", str(tmp_path), "--tasks", "rotation,contrastive_two_crop"])
    assert [row.task for row in rows] == ["rotation", "contrastive_two_crop"]
    for row in rows:
        assert row.steps == bench.QUICK.steps and row.pretrain_s > 0 and math.isfinite(row.final_loss)
        for target in bench.TARGETS:
            for encoder in ("pretrained", "random"):
                aurocs = row.auroc[target][encoder]
                assert len(aurocs) == bench.QUICK.repeats and all(0 <= value <= 1 for value in aurocs)
        summary = row.summary("disease")
        assert summary["difference"] == pytest.approx(summary["pretrained"] - summary["random"])
    # the random encoder is the pretraining's starting point, so both tasks get the same random-encoder figures
    assert rows[0].auroc["disease"]["random"] == rows[1].auroc["disease"]["random"]
    printed = capsys.readouterr().out
    table = [line for line in printed.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| task | encoder | steps") and len(table) == 1 + len(rows)
    assert [line.split(" | ")[0].removeprefix("| ") for line in table[1:]] == ["rotation", "contrastive_two_crop"]
    assert len(json.loads((tmp_path / "results.json").read_text())) == 2
