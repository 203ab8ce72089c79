"""The `raf` command as a user runs it: real subprocesses, exit codes, one-line errors, a tiny quickstart."""
import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from rafmedia.launch.cli import build_parser, main
from rafmedia.launch.commands import LISTINGS

RAF = [sys.executable, "-m", "rafmedia.launch.cli"]


def raf(*args, cwd=None):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([*RAF, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


@pytest.mark.parametrize("args, message", [
    (["sinth"], "unknown command 'sinth'; did you mean 'synth'"),
    (["submit", "pretrian", "tiny"], "'pretrian' is not a choice for what; did you mean 'pretrain'? (choose from: "
     "pretrain, evaluate, ingest)"),
    (["synth", "train.lrr=1"], "did you mean 'train.lr'"),
    (["synth", "cohort.num_subjects=many"], "'cohort.num_subjects' must be an integer"),
    (["pretrain", "--cohort", "/no/such/store"], "cohort store not found: /no/such/store"),
    (["evaluate", "--cohort", "/no/such/store", "--encoder", "x.safetensors"], "cohort store not found"),
    (["report", "/no/such/folder"], "report.json not found"),
    (["synth", "--config", "nope.yaml"], "config file 'nope.yaml' not found"),
    (["pretrain", "--cohort", "x", "task.name=mae_3d"], "task 'mae_3d' needs an encoder of family vit, but encoder "
     "'cnn3d_small' is a cnn; set encoder.name to one of: vit_3d, vit_base_3d, vit_small_3d, vit_tiny_3d"),
    (["pretrain", "--cohort", "x", "task.name=contrastive_paired"], "set data.channels to the two channel names"),
    (["pretrain", "--cohort", "x", "train.wrapper=horovod"], "unknown training wrapper 'horovod'"),
    (["pretrain", "--cohort", "x", "data.source=s3"], "data.source must be 'memory' or 'stream'"),
    (["submit", "evaluate", "tiny", "--num-tasks", "4"], "raf submit evaluate does not take --num-tasks"),
    (["submit", "ingest", "tiny", "--input", "x.csv", "--cohort", "s"], "raf submit ingest does not take --cohort"),
    (["submit", "ingest", "tiny", "--input", "/no/such.csv"], "--input /no/such.csv does not exist"),
])
def test_user_errors_exit_2_with_one_line_and_no_traceback(args, message, tmp_path, monkeypatch, capsys):
    """In-process through `main`, which the `raf` console script calls (a real process: the test below)."""
    monkeypatch.chdir(tmp_path)
    try:
        code = main(args)
    except SystemExit as stopped:  # argparse's usage errors
        code = stopped.code
    stderr = capsys.readouterr().err
    assert code == 2
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr
    assert message in lines[0]


@pytest.mark.parametrize("args, message", [(["sinth"], "did you mean 'synth'"),
                                           (["report", "/no/such/folder"], "report.json not found")])
def test_user_errors_of_the_real_command_exit_2_with_one_line(args, message, tmp_path):
    result = raf(*args, cwd=tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr and message in lines[0]


def _leaf_commands(parser=None, prefix=()):
    """Every runnable `raf` command, read from the parser itself so a new command cannot be forgotten."""
    parser = parser or build_parser()
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subparsers:
        return [" ".join(prefix)]
    return [leaf for name, sub in subparsers[0].choices.items() for leaf in _leaf_commands(sub, prefix + (name,))]


def test_every_subcommand_has_help_with_examples(capsys):
    commands = _leaf_commands()
    assert {"synth", "shards ingest", "shards consolidate", "shards datasheet", "cohort build"} <= set(commands)
    for command in commands:
        with pytest.raises(SystemExit) as exit_info:
            main(command.split() + ["--help"])
        text = capsys.readouterr().out
        assert exit_info.value.code == 0 and text.startswith("usage: raf " + command), command
        if command not in ("list", "report"):
            assert "examples:" in text, f"`raf {command} --help` has no examples"


def test_raf_list_prints_each_registry_and_launchers_in_detection_order(capsys):
    for what in LISTINGS:
        assert main(["list", what]) == 0
        names = capsys.readouterr().out.splitlines()  # one entry per line ("lora (targets=..., inputs=...)")
        assert names == LISTINGS[what]() and names, what
    main(["list", "launchers"])
    assert capsys.readouterr().out.split() == ["torchrun", "slurm", "openmpi", "mpich"]
    assert main(["list", "encoders"]) == 0 and "cnn3d_small" in capsys.readouterr().out
    assert main(["list", "launcher"]) == 2
    assert capsys.readouterr().err == ("raf: error: 'launcher' is not a choice for what; did you mean 'launchers'? "
                                       f"(choose from: {', '.join(sorted(LISTINGS))}) (see `raf list --help`)\n")


def test_tiny_quickstart_end_to_end(tmp_path):
    """The whole job on a tiny cohort: report files exist and RAF components are finite and within [0, 1]."""
    out = tmp_path / "run"
    result = raf("quickstart", "--config", "tiny", "--out", str(out), "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    html = out / "evaluate" / "report.html"
    assert str(html.resolve()) in result.stdout
    report = json.loads((out / "evaluate" / "report.json").read_text())
    assert set(report["encoders"]) == {"contrastive_two_crop cnn3d_small", "random-init cnn3d_small"}
    for entry in report["encoders"].values():
        for key in ("index", "performance", "robustness", "fairness"):
            assert np.isfinite(entry["raf"][key]) and 0.0 <= entry["raf"][key] <= 1.0
        assert set(entry["robustness"]) == {"clean", "gaussian_noise", "bias_field"}
        assert entry["robustness"]["gaussian_noise"]["severity"] == [1, 2, 3, 4, 5]
        assert set(entry["fairness"]["site"]["groups"]) == {"site-a", "site-b", "site-c"}
        assert len(entry["probes"]["disease"]["per_seed"]) == 3
    page = html.read_text()
    assert page.count("data:image/png;base64,") >= 5 and "Frechet" in page
    for folder in (out, out / "pretrain", out / "evaluate"):
        assert (folder / "resolved_config.yaml").is_file()
    assert (out / "pretrain" / "encoder.safetensors").is_file()
    assert (out / "cohort.zarr" / "planted.json").is_file()
    # every logged record carries the step accounting; the footprint names the store's size against its voxels'
    records = [json.loads(line) for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        assert 0 <= record["data_wait_s"] + record["compute_s"] <= record["step_seconds"] * 1.001
        assert record["samples_per_s"] > 0 and record["voxels_per_s"] > 0 and record["peak_rss_mb"] > 0
    footprint = json.loads((out / "pretrain" / "footprint.json").read_text())
    assert footprint["core_hours"] > 0 and footprint["bytes_read"] > 0
    assert footprint["store"]["store_bytes"] > 0 and footprint["store"]["source_bytes"] is None  # synthetic
    # `raf report` re-renders the same folder.
    again = raf("report", str(out / "evaluate"))
    assert again.returncode == 0 and (out / "evaluate" / "summary.png").stat().st_size > 10_000
