"""The scaling benchmark runs real 1- and 2-rank `raf pretrain` runs (gloo) and the stream loader in --quick mode;
the step-time model's arithmetic is checked against cases computed by hand."""
import json
import math

import pytest

from tests.benchmark_support import load_benchmark

_load = load_benchmark


model = _load("scaling_model")


def test_scaling_quick_runs_one_and_two_gloo_ranks_and_the_loader(small_cohort, tmp_path, capsys):
    bench = _load("scaling")
    store, _ = small_cohort
    result = bench.main(["--quick", "--cohort", str(store.path), "--data", str(tmp_path),
                         "--json", str(tmp_path / "scaling.json")])
    quick = bench.QUICK
    runs = result["runs"]
    assert [(r["kind"], r["ranks"], r["batch_per_rank"]) for r in runs] == [("strong", 1, 4), ("strong", 2, 2)]
    for run in runs:
        assert run["step_s"] > 0 and run["wall_s"] > run["step_s"] * (quick.steps - quick.warmup)
        assert run["samples_per_s"] == pytest.approx(run["ranks"] * run["batch_per_rank"] / run["step_s"])
        assert run["predicted_step_s"] > 0
    assert sorted(result["loader_patches_per_s"]) == list(quick.workers)
    assert all(rate > 0 and math.isfinite(rate) for rate in result["loader_patches_per_s"].values())
    # the gradients all-reduced are the task's: the tiny config's cnn3d_small (width 8) with its projection head
    task, shape = bench.build_task(quick)
    assert result["model_parameters"]["gradient_elements"] == sum(p.numel() for p in task.parameters())
    assert shape == [32, 32, 32]
    assert json.loads((tmp_path / "scaling.json").read_text())["runs"][1]["ranks"] == 2
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| strong")]
    assert len(table) == 2 and table[0].split(" | ")[8] == "1.00x"
    # the loop's data wait and compute are parts of its step (with the quickstart's model, nearly all of it:
    # RESULTS.md; this tiny one logs every step, which takes a larger share)
    for run in runs:
        assert 0.5 * run["step_s"] < run["data_wait_s"] + run["compute_s"] <= 1.001 * run["step_s"]


def test_read_metrics_averages_the_steps_after_the_warmup(tmp_path):
    bench = _load("scaling")
    records = [{"step": 0, "step_seconds": 9.0}, {"step": 1, "step_seconds": 0.2, "data_wait_s": 0.05},
               {"step": 2, "step_seconds": 0.4, "data_wait_s": 0.15, "compute_s": 0.25}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert bench.read_metrics(tmp_path, warmup=1) == pytest.approx({"step_s": 0.3, "data_wait_s": 0.1,
                                                                     "compute_s": 0.25})


def test_allreduce_terms_by_hand():
    gb = 1e9
    bandwidths = {"gpus_per_node": 8, "intra_bytes_per_s": 100e9, "inter_bytes_per_s": 10e9, "intra_latency_s": 0.0,
                  "inter_latency_s": 0.0}
    assert model.allreduce_seconds(gb, 1, **bandwidths) == 0.0
    assert model.allreduce_seconds(gb, 2, **bandwidths) == pytest.approx(2 * 0.5 * gb / 100e9)  # 10 ms
    # 16 GPUs = 2 nodes: 2*7/8*1 GB/100 GB/s = 17.5 ms in the node + 2*1/2*(1/8 GB)/10 GB/s = 12.5 ms between
    assert model.allreduce_seconds(gb, 16, **bandwidths) == pytest.approx(0.0175 + 0.0125)
    # latency: 2(g-1) hops in the node and 2(m-1) between nodes
    with_latency = model.allreduce_seconds(0.0, 16, **{**bandwidths, "intra_latency_s": 1e-6, "inter_latency_s": 1e-5})
    assert with_latency == pytest.approx(14e-6 + 2e-5)


def test_step_time_by_hand():
    # device 90 ms compute (60 ms backward) + an all-reduce of 75 ms half hidden: 75 - 0.5*60 = 45 ms exposed
    assert model.exposed_comm_seconds(0.075, 0.09, overlap=0.5) == pytest.approx(0.045)
    assert model.step_seconds(load_s=0.05, compute_s=0.09, allreduce_s=0.075, overlap=0.5) == pytest.approx(0.135)
    # a loader slower than the device bounds the step; with no workers it is serial instead
    assert model.step_seconds(load_s=0.2, compute_s=0.09, allreduce_s=0.0, overlap=1.0) == pytest.approx(0.2)
    assert model.step_seconds(load_s=0.2, compute_s=0.09, allreduce_s=0.0, overlap=1.0, workers=0,
                              host_s=0.01) == pytest.approx(0.3)
    assert model.load_seconds(32, 4, 2.0) == pytest.approx(4.0)
    assert model.workers_needed(32, device_s=0.5, patches_per_s_per_worker=10.0) == 7  # 32 / 5 = 6.4


def test_predict_by_hand():
    # 1e12 FLOPs per sample at 50% of 1e15 FLOP/s = 2 ms per sample; batch 10: 20 ms compute
    workload = model.Workload("w", side=64, batch_per_gpu=10, flops_per_sample=1e12, parameters=250_000_000, mfu=0.5)
    machine = model.Machine(peak_flops=1e15, intra_bytes_per_s=100e9, inter_bytes_per_s=10e9, overlap=1.0,
                            worker_voxels_per_s=64 ** 3 * 100.0, workers_per_gpu=4, chunk_side=64,
                            stored_bytes_per_voxel=1.0, patches_per_visit=2)
    single = model.predict(workload, machine, 1)
    assert single.compute_ms == pytest.approx(20.0) and single.allreduce_ms == 0.0
    assert single.step_ms == pytest.approx(25.0) and single.bound == "loader"  # 10 patches / (4 x 100/s)
    assert single.workers_needed == 5  # 10 / (0.020 s x 100/s)
    assert single.storage_mb_per_s_needed == pytest.approx(10 / 0.020 * 128 ** 3 / 2 / 1e6)  # at the device's rate
    # 1 GB of gradients over 8 GPUs: 17.5 ms plus latency, hidden behind 13.3 ms of backward only in part
    eight = model.predict(workload, replace_workers(machine, 8), 8)
    reduce_ms = 1e3 * (2 * 7 / 8 * 1e9 / 100e9 + 14 * 3e-6)
    assert eight.allreduce_ms == pytest.approx(reduce_ms)
    assert eight.exposed_comm_ms == pytest.approx(reduce_ms - 2 / 3 * 20.0) and eight.bound == "all-reduce"
    assert eight.step_ms == pytest.approx(20.0 + reduce_ms - 2 / 3 * 20.0)
    assert eight.samples_per_s == pytest.approx(8 * 10 / (eight.step_ms / 1e3))
    # the largest batch at which the all-reduce still shows: reduce_ms / (2/3 x 2 ms) = 13.17 -> 13
    assert model.comm_bound_batch(workload, machine, 8) == 13


def replace_workers(machine, workers):
    import dataclasses

    return dataclasses.replace(machine, workers_per_gpu=workers)


def test_parameters_from_a_raf_profile(tmp_path):
    stages = [{"name": "patch sampling (1 worker)", "voxels_per_s": 5e6},
              {"name": "gradient all-reduce", "mb_per_s": 800.0}]
    cpu = tmp_path / "cpu.json"
    cpu.write_text(json.dumps({"device": "cpu", "stages": stages}))
    machine, used = model.parameters_from_profile(cpu, model.Machine())
    assert used == {"worker_voxels_per_s": 5e6} and machine.inter_bytes_per_s == model.Machine().inter_bytes_per_s
    cuda = tmp_path / "cuda.json"
    cuda.write_text(json.dumps({"device": "cuda:0", "stages": stages}))
    machine, used = model.parameters_from_profile(cuda, model.Machine())
    assert machine.inter_bytes_per_s == pytest.approx(8e8) and machine.worker_voxels_per_s == 5e6
