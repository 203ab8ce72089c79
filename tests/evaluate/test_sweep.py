"""Evaluation sweeps: the SQLite results store, re-runs that compute only missing cells, several cohorts, the
leaderboard, and subjects shared out among two torchrun ranks (real processes, gloo)."""
import csv
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rafmedia.engine.distributed import free_port
from rafmedia.engine.encoders import create_encoder
from rafmedia.engine.export import export_encoder
from rafmedia.evaluate.results import CellKey, ResultsStore

BIN = Path(sys.executable).parent
FAST = ["--config", "tiny", "--quiet", "evaluate.seeds=[0]", "evaluate.alterations=[gaussian_noise]",
        "evaluate.severities=[1,3]", "evaluate.bootstrap_resamples=50", "evaluate.permutations=49"]


def raf(*args, cwd, launcher=()):
    """`raf ARGS`, or `LAUNCHER -m rafmedia.launch.cli ARGS` (torchrun runs a module)."""
    command = [*launcher, "-m", "rafmedia.launch.cli", *args] if launcher else [str(BIN / "raf"), *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=900,
                          env={"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PATH": f"{BIN}:/usr/bin:/bin"})


def export(folder: Path, seed: int, width: int = 8) -> Path:
    torch.manual_seed(seed)
    return export_encoder(create_encoder("cnn3d_small", width=width), folder / f"seed{seed}" / "encoder.safetensors",
                          architecture="cnn3d_small", options={"width": width}, card={"name": f"seed {seed}"})


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohorts")
    for name, seed in (("siteA", 1), ("siteB", 2)):
        done = raf("synth", "--out", str(out / name), "--config", "tiny", "--quiet", "cohort.num_subjects=24",
                   f"cohort.seed={seed}", cwd=out)
        assert done.returncode == 0, done.stderr
    return out


def cell_rows(store: Path) -> dict[tuple[str, str], tuple]:
    with sqlite3.connect(store) as connection:
        rows = connection.execute("SELECT encoder, cohort, created, seconds, rowid FROM cells").fetchall()
    return {(row[0], row[1]): row[2:] for row in rows}


def test_a_cell_is_written_whole_or_not_at_all(tmp_path):
    store = ResultsStore(tmp_path / "results.sqlite")
    key = CellKey("enc", "coh", "set")
    with pytest.raises(TypeError):
        store.put(key, encoder="e", encoder_source="s", cohort="c", cohort_path="p", seconds=1.0,
                  result={"raf": object()})  # fails while serialising: nothing may be left behind
    assert not store.has(key) and len(store) == 0
    store.put(key, encoder="e", encoder_source="s", cohort="c", cohort_path="p", seconds=1.0,
              result={"raf": {"index": float("nan"), "values": [1, 2]}})
    cell = store.get(key)
    assert cell.result["raf"]["values"] == [1, 2] and cell.result["raf"]["index"] != cell.result["raf"]["index"]
    assert store.get(CellKey("enc", "coh", "other settings")) is None


def test_a_rerun_computes_only_the_missing_cells_and_the_leaderboard_ranks_them(cohorts, tmp_path):
    first, second = export(tmp_path / "ckpt", 0), export(tmp_path / "ckpt", 1)
    out = tmp_path / "sweep"
    args = ["evaluate", "--cohort", str(cohorts / "siteA"), "--cohort", str(cohorts / "siteB"), "--out", str(out), *FAST]
    done = raf(*args, "--encoder", str(first), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    before = cell_rows(out / "results.sqlite")
    assert set(before) == {(name, cohort) for name in ("seed 0", "random-init cnn3d_small") for cohort in ("siteA", "siteB")}
    report_a = json.loads((out / "siteA" / "report.json").read_text())

    # A second checkpoint by glob: only its two cells are computed; the others are read back unchanged.
    done = raf(*args, "--encoder", str(tmp_path / "ckpt" / "seed*" / "encoder.safetensors"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    after = cell_rows(out / "results.sqlite")
    assert set(after) - set(before) == {("seed 1", "siteA"), ("seed 1", "siteB")}
    assert all(after[cell] == before[cell] for cell in before)  # same rowid, time stamp and duration: not recomputed
    again = json.loads((out / "siteA" / "report.json").read_text())
    assert again["encoders"]["seed 0"]["raf"] == report_a["encoders"]["seed 0"]["raf"]
    assert list(again["encoders"]) == ["seed 0", "seed 1", "random-init cnn3d_small"]

    # Changing a setting that changes the numbers recomputes (a new key), it never reuses a stale cell.
    done = raf(*args, "--encoder", str(first), "evaluate.severities=[2]", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    with sqlite3.connect(out / "results.sqlite") as connection:
        assert connection.execute("SELECT COUNT(*) FROM cells").fetchone()[0] == 6 + 4  # seed 0 and random, 2 cohorts
    with sqlite3.connect(out / "results.sqlite") as connection:
        assert connection.execute("SELECT COUNT(DISTINCT settings_digest) FROM cells").fetchone()[0] == 2

    board = raf("leaderboard", str(out), cwd=tmp_path)
    assert board.returncode == 0, board.stderr
    rows = list(csv.DictReader((out / "leaderboard.csv").open()))
    store = ResultsStore(out / "results.sqlite")
    latest = {}
    for cell in store.cells():
        latest[(cell.encoder, cell.cohort)] = cell.result["raf"]["index"]
    for cohort in ("siteA", "siteB"):
        ranked = [row for row in rows if row["cohort"] == cohort]
        assert [row["encoder"] for row in ranked] == sorted(
            [name for name, c in latest if c == cohort], key=lambda name: -latest[(name, cohort)])
        assert [int(row["rank"]) for row in ranked] == list(range(1, len(ranked) + 1))
        for row in ranked:
            assert float(row["RAF"]) == pytest.approx(latest[(row["encoder"], cohort)], abs=1e-12)
    means = [row for row in rows if row["cohort"] == "all cohorts (mean)"]
    assert {row["encoder"] for row in means} == {"seed 0", "seed 1", "random-init cnn3d_small"}
    assert "| rank | encoder |" in board.stdout and (out / "leaderboard.html").read_text().count("<tr>") == len(rows) + 1


def clean_keys_by_writer(cache: Path) -> dict[str, set]:
    """The (encoder digest, subject) of every clean embedding in a cache, by the process id that wrote its batch."""
    import zarr

    written: dict[str, set] = {}
    for attrs_file in cache.glob("*/*/*/zarr.json"):
        batch = attrs_file.parent
        pid = batch.name.split("-")[1]  # batches are named <time ns>-<pid>-<random>
        keys = zarr.open_array(str(batch), mode="r").attrs["keys"]
        written.setdefault(pid, set()).update((batch.parents[1].name, s) for s, alteration, *_ in keys
                                              if alteration == "clean")
    return written


def test_two_torchrun_ranks_share_the_subjects_and_give_the_one_process_report(cohorts, tmp_path):
    encoders = [export(tmp_path / "ckpt", seed) for seed in (0, 1)]
    args = ["evaluate", "--cohort", str(cohorts / "siteA"), *FAST, *sum((["--encoder", str(e)] for e in encoders), [])]
    single = raf(*args, "--out", str(tmp_path / "one"), cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    ranks = raf(*args, "--out", str(tmp_path / "two"), cwd=tmp_path,
                launcher=[str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port())])
    assert ranks.returncode == 0, ranks.stderr[-20000:]  # long enough to show every rank's error
    one = json.loads((tmp_path / "one" / "report.json").read_text())["encoders"]
    two = json.loads((tmp_path / "two" / "report.json").read_text())["encoders"]
    assert list(two) == list(one)
    for name in one:
        for key, value in one[name]["raf"].items():
            assert two[name]["raf"][key] == pytest.approx(value, abs=1e-9), key
        assert two[name]["probes"]["disease"]["auroc"] == pytest.approx(one[name]["probes"]["disease"]["auroc"], abs=1e-9)
    assert len(cell_rows(tmp_path / "two" / "results.sqlite")) == 3
    assert ranks.stdout.count("report:") == 1  # rank 0 writes and speaks
    # each rank embedded its share of every encoder's subjects: disjoint, together every subject
    written = clean_keys_by_writer(tmp_path / "two" / "embeddings.zarr")
    assert len(written) == 2
    first, second = written.values()
    assert not first & second
    assert first | second == set().union(*clean_keys_by_writer(tmp_path / "one" / "embeddings.zarr").values())
    for digest in {digest for digest, _ in first | second}:
        shares = [{s for d, s in keys if d == digest} for keys in (first, second)]
        assert abs(len(shares[0]) - len(shares[1])) <= 1, digest  # subject i on rank i mod 2
