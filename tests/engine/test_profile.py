"""`raf profile`'s engine: stage counts equal what was asked, the bound is the slowest stage on the step path,
the workers figure is the documented formula over the measured rates, cold reads read exactly the chunk files,
and the end-to-end trace is valid JSON. One real run on a tiny cohort (real zarr store, real loop and loader)."""
import json
import math
import os

import pytest

from rafmedia.core.profiling import StageClock, stage_row
from rafmedia.engine.batches import DataConfig
from rafmedia.engine.encoders import EncoderConfig
from rafmedia.engine.profile import (ALL_REDUCE, END_TO_END, FORWARD_BACKWARD, FORWARD_BACKWARD_2X, LOADER, LOADER_2X,
                                     OPTIMIZER, VIEWS, ProfileSettings, RunShape, analyse, measure_store,
                                     profile_pretraining, read_amplification)
from rafmedia.engine.tasks import TaskConfig
from rafmedia.engine.train import TrainConfig
from rafmedia.shards.store import SUBJECTS

BATCH = 4


def shape(**changes) -> RunShape:
    values = {"source": "stream", "batch_size": BATCH, "num_workers": 1, "patches_per_subject": 4, "chunk_size": 16,
                  "volume_shape": (32, 32, 32), "patch_size": (16, 16, 16), "cpu_count": 8}
    return RunShape(**{**values, **changes})


def test_read_amplification_matches_hand_counts():
    assert read_amplification((64,) * 3, (64,) * 3, (32,) * 3) == pytest.approx(1.0)  # the patch is the volume
    # side 8, patch 4, chunk 4: origins 0..4 overlap 1, 2, 2, 2, 1 chunks -> 8/5 chunks of 4 voxels per 4 voxels
    assert read_amplification((8,) * 3, (4,) * 3, (4,) * 3) == pytest.approx(1.6 ** 3)


def test_the_bound_workers_and_advice_follow_the_rules_on_a_loader_bound_stream():
    # one worker: 4 patches in 0.4 s = 10/s; at 2x patches per visit 15/s; main process 0.1 + 0.2 + 0.02 s per step
    stages = [stage_row(LOADER, 0.4, 1, patches=4), stage_row(LOADER_2X, 0.4, 1, patches=6),
              stage_row(VIEWS, 0.1, 1, patches=4), stage_row(FORWARD_BACKWARD, 0.2, 1, patches=4),
              stage_row(OPTIMIZER, 0.02, 1, patches=4), stage_row(END_TO_END, 1.0, 1, patches=8)]
    result = analyse(stages, shape(), end_to_end_rate=8.0)
    assert result["bound"] == "loader (1 workers)" and result["step_path"]["loader (1 workers)"] == pytest.approx(10)
    main_rate = BATCH / (0.1 + 0.2 + 0.02)  # 12.5 samples/s
    assert result["main_process_rate"] == pytest.approx(main_rate)
    assert result["workers_needed"] == math.ceil(main_rate / 10) == 2
    assert result["end_to_end_fraction_of_bound"] == pytest.approx(0.8)
    advice = " | ".join(result["advice"])
    assert "data.num_workers=2 (now 1)" in advice and "ceil(12.5 / 10.0) = 2" in advice
    assert "data.patches_per_subject=8 (now 4)" in advice and "x1.50" in advice
    assert "train.batch_size" not in advice  # the loader bounds the step: a bigger batch does not help
    # two cores: one stays with the main process, so one worker is all that helps and the advice says so
    assert not [line for line in analyse(stages, shape(cpu_count=2), 8.0)["advice"] if "num_workers" in line]


def test_a_model_bound_memory_run_advises_the_batch_size_from_the_two_measured_rates():
    stages = [stage_row(VIEWS, 0.1, 1, patches=4), stage_row(FORWARD_BACKWARD, 0.8, 1, patches=4),
              stage_row(FORWARD_BACKWARD_2X, 1.2, 1, patches=8), stage_row(OPTIMIZER, 0.05, 1, patches=4)]
    result = analyse(stages, shape(source="memory"), end_to_end_rate=4.0)
    assert result["bound"] == FORWARD_BACKWARD and "loader (1 workers)" not in result["step_path"]
    assert any("train.batch_size=8 (now 4)" in line and "5.0 samples/s at batch 4 and 6.7 at 8 (x1.33)" in line
               for line in result["advice"])


def test_cold_and_warm_reads_read_exactly_the_chunk_files_and_decode_every_voxel(small_cohort):
    store, _config = small_cohort
    subjects = store.subject_ids()[:3]
    clock, notes = StageClock(), {}
    measure_store(clock, store, subjects, ["image"], notes)
    rows = {row["name"]: row for row in clock.stages()}
    on_disk = sum(os.path.getsize(os.path.join(root, name)) for subject in subjects
                  for root, _, names in os.walk(store.path / SUBJECTS / subject / "image" / "c") for name in names)
    assert rows["store read (cold)"]["bytes"] == rows["store read (warm)"]["bytes"] == on_disk > 0
    assert rows["chunk decode"]["voxels"] == 3 * 32 ** 3 and rows["chunk decode"]["volumes"] == 3 and not notes


@pytest.fixture(scope="module")
def profiled(small_cohort, tmp_path_factory):
    store, _ = small_cohort
    settings = ProfileSettings(steps=3, warmup_steps=1, trace_steps=1, isolated_steps=2, read_subjects=2)
    data = DataConfig(cohort=str(store.path), source="stream", patch_size=16, patches_per_subject=2, num_workers=1)
    train_config = TrainConfig(steps=10, batch_size=BATCH, warmup_steps=1, log_every=1, num_threads=1)
    out = tmp_path_factory.mktemp("profile")
    profile = profile_pretraining(data=data, encoder=EncoderConfig(name="cnn3d_small", options={"width": 4}),
                                  task=TaskConfig(name="contrastive_two_crop", options={"crop_size": 12, "max_shift": 2}),
                                  train_config=train_config, out_dir=out, settings=settings, progress=False)
    return profile, settings


def test_every_stage_counts_the_work_it_was_asked_to_do(profiled):
    profile, settings = profiled
    rows = {row["name"]: row for row in profile["stages"]}
    asked = settings.isolated_steps * BATCH
    for name in (LOADER, VIEWS, FORWARD_BACKWARD, OPTIMIZER):
        assert rows[name]["calls"] == settings.isolated_steps and rows[name]["patches"] == asked, name
    assert rows[LOADER]["voxels"] == asked * 16 ** 3 and rows[LOADER]["volumes"] == asked / 2  # 2 patches per visit
    assert rows[END_TO_END]["patches"] == settings.steps * BATCH and rows[END_TO_END]["calls"] == settings.steps
    assert rows[ALL_REDUCE]["note"].startswith("not measured: one process")


def test_the_bound_is_the_slowest_stage_on_the_step_path_and_workers_follow_the_formula(profiled):
    profile, _ = profiled
    rows = {row["name"]: row for row in profile["stages"]}
    path = {"loader (1 workers)": rows[LOADER]["patches_per_s"],
            **{name: rows[name]["patches_per_s"] for name in (VIEWS, FORWARD_BACKWARD, OPTIMIZER)}}
    assert profile["step_path"] == pytest.approx(path)
    assert profile["bound"] == min(path, key=path.get)
    main_seconds = sum(rows[name]["seconds"] / rows[name]["calls"] for name in (VIEWS, FORWARD_BACKWARD, OPTIMIZER))
    assert profile["workers_needed"] == math.ceil(BATCH / main_seconds / rows[LOADER]["patches_per_s"])
    assert profile["end_to_end_rate"] == pytest.approx(rows[END_TO_END]["patches_per_s"])


def test_the_trace_of_the_end_to_end_steps_is_valid_json(profiled):
    profile, _ = profiled
    assert len(profile["trace"]) == 1
    with open(profile["trace"][0], encoding="utf-8") as handle:
        events = json.load(handle)["traceEvents"]
    names = {event.get("name") for event in events}
    assert any(name and name.startswith("ProfilerStep") for name in names)
    assert {"data", "forward_backward", "optimizer"} <= names  # the loop's phases
