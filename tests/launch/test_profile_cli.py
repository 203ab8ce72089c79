"""`raf profile` and `raf evaluate --profile` through the command line (in process, on the tiny session cohort):
the files exist and parse, the printed table names the bound, and the evaluation profile has the evaluator's stages."""
import json

import pytest
import torch

from rafmedia.engine.encoders import create_encoder
from rafmedia.engine.export import export_encoder
from rafmedia.launch.cli import main

TINY_RUN = ["encoder.options.width=4", "train.batch_size=4", "train.num_threads=1", "task.options.crop_size=12",
            "task.options.max_shift=2", "data.patch_size=16"]


def test_raf_profile_prints_the_bound_and_writes_json_html_and_a_trace(small_cohort, tmp_path, capsys):
    store, _ = small_cohort
    out = tmp_path / "profile"
    code = main(["profile", "--cohort", str(store.path), "--out", str(out), "--quiet", "--steps", "1",
                 "--warmup-steps", "0", "--trace-steps", "1", "--isolated-steps", "1", "--read-subjects", "1",
                 "--config", "tiny", *TINY_RUN])
    printed = capsys.readouterr().out
    assert code == 0
    profile = json.loads((out / "profile.json").read_text())
    assert profile["kind"] == "pretraining" and profile["bound"] in profile["step_path"]
    assert f"bound: {profile['bound']} (marked *)" in printed and f"*{profile['bound']}" in printed
    assert profile["trace"] and profile["trace"][0] in printed
    html = (out / "profile.html").read_text()
    assert html.startswith("<!doctype html>") and html.count("data:image/png;base64,") == 2  # waterfall, throughput
    assert "views (torch CPU)" in html and (out / "resolved_config.yaml").is_file()


def test_raf_profile_refuses_a_missing_cohort_with_the_fix(tmp_path, capsys):
    assert main(["profile", "--out", str(tmp_path), "--quiet"]) == 2
    assert "pass --cohort STORE" in capsys.readouterr().err


@pytest.fixture()
def encoder(tmp_path):
    torch.manual_seed(0)
    return export_encoder(create_encoder("cnn3d_small", width=4), tmp_path / "enc" / "encoder.safetensors",
                          architecture="cnn3d_small", options={"width": 4}, card={"name": "random"})


def test_raf_evaluate_profile_writes_the_evaluator_stages(small_cohort, encoder, tmp_path, capsys):
    store, _ = small_cohort
    out = tmp_path / "eval"
    code = main(["evaluate", "--cohort", str(store.path), "--encoder", str(encoder), "--out", str(out), "--profile",
                 "--config", "tiny", "--quiet", "evaluate.seeds=[0]", "evaluate.alterations=[gaussian_noise]",
                 "evaluate.severities=[1]", "evaluate.bootstrap_resamples=20", "evaluate.permutations=19",
                 "evaluate.few_shot=[1.0]", "evaluate.group_by=[sex]", "evaluate.intersections=false",
                 "evaluate.random_baseline=false", "evaluate.targets=[disease]", "evaluate.ordinal_targets=[]",
                 "evaluate.c_grid=[1.0]", "evaluate.num_workers=0"])
    assert code == 0
    profile = json.loads((out / "profile.json").read_text())
    names = [stage["name"] for stage in profile["stages"]]
    assert profile["kind"] == "evaluation" and names[-1] == "report" and (out / "profile.html").is_file()
    assert profile["bound"] == max(profile["stages"], key=lambda stage: stage["seconds"])["name"]
    assert {"read", "embed", "probe", "bootstrap"} <= set(names)  # timed inside the evaluator
    assert "profile.html" in capsys.readouterr().out
