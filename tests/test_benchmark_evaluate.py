"""The evaluation benchmark runs end to end in --quick mode: both throughput paths embed the same subjects
identically, and the stage breakdown of the full evaluation counts the work the evaluation must do."""
import math

from tests.benchmark_support import load_benchmark as _load


def test_evaluate_benchmark_quick_times_both_paths_and_every_stage(capsys):
    from rafmedia.evaluate import embed, runner, scan_level

    bench = _load("evaluate")
    originals = {(module, name): getattr(module, name)
                 for module, name in ((scan_level, "fit_probes"), (embed, "create_alteration"), (runner, "load_cohort"))}
    result = bench.main(["--quick", "--no-clean-run"])
    assert all(getattr(module, name) is function for (module, name), function in originals.items())  # unwrapped

    part1 = result["throughput"]
    paths = list(part1["max_abs_embedding_difference"])
    assert paths[0] == "extract_embeddings"
    assert set(part1["seconds"]) == {"raw"} | {f"{path}{suffix}" for path in paths
                                               for suffix in ("", " + metrics", " + metrics, gaussian_noise s3")}
    assert all(math.isfinite(s) and s > 0 for s in part1["seconds"].values())
    assert all(math.isfinite(r) and r > 0 for r in part1["over_raw"].values())
    # the evaluator's float64 embeddings are the raw forward's on the pre-normalised batches (same work compared)
    assert all(difference <= 1e-5 for difference in part1["max_abs_embedding_difference"].values())

    part2 = result["evaluation"]
    config = part2["config"]
    assert config.alterations == bench.QUICK_ALTERATIONS and config.severities == [1, 3]
    entries, levels = 2, len(config.alterations) * len(config.severities)  # the encoder and its random baseline
    num_test = 24 - int(24 * (1 - config.test_fraction))  # sklearn's ceil(test_fraction * N) of 24 subjects
    calls, subjects = part2["calls"], part2["subjects"]
    # every subject of every replicate clean, every test subject at every level (whatever the runner's batching)
    assert subjects["embed clean"] == entries * len(config.seeds) * 24
    assert subjects["embed altered"] == subjects["alter volumes"] == entries * levels * num_test
    assert calls["load cohort volumes"] == 1 and calls["RAF bootstrap"] == entries
    assert all(math.isfinite(s) and s >= 0 for s in part2["stages"].values())
    assert part2["total_s"] > 0 and part2["other_s"] >= -1e-6  # exclusive stage times cannot exceed the total

    printed = capsys.readouterr().out
    assert "| path | s / pass | subjects / s | time / raw |" in printed
    assert "| stage | calls | subjects | s | subjects / s | share |" in printed
    assert "torch " in printed and "nproc" in printed
    rows = [line for line in printed.splitlines() if line.startswith("| ") and not line.startswith("| path")
            and not line.startswith("| stage")]
    assert len(rows) == len(part1["seconds"]) + len(part2["stages"]) + 2  # paths; stages, other and total
