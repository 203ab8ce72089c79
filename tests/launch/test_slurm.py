"""`raf submit` / `raf jobs` against a real one-node SLURM with accounting, started by launch/local_slurm.sh.

Not skipped in CI (root, apt): the script installs SLURM when it is missing. Elsewhere, without root and without
SLURM, the tests are skipped with the reason.
"""
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from rafmedia.engine.export import export_encoder, load_encoder
from tests.launch.helpers import RAF, losses, make_cohort

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "launch" / "local_slurm.sh"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0 and shutil.which("slurmctld") is None and not Path("/usr/sbin/slurmctld").exists():
        pytest.skip("no SLURM and not root to install it (CI installs it)")
    folder = Path(tempfile.mkdtemp(prefix="rafmedia-slurm-"))  # not under pytest's 0700 tmp: munged must reach it
    folder.chmod(0o755)
    ports = {"RAF_SLURM_CTLD_PORT": "7817", "RAF_SLURM_D_PORT": "7818", "RAF_SLURM_DBD_PORT": "7819",
             "RAF_SLURM_DB_PORT": "7307", "RAF_SLURM_NODE": "rafmedia-test"}  # a developer's own cluster is left alone
    env = {**os.environ, **ports}
    started = subprocess.run(["bash", str(SCRIPT), "start", str(folder)], env=env, capture_output=True, text=True,
                             timeout=600)
    assert started.returncode == 0, started.stderr[-3000:]
    try:
        yield {**os.environ, "SLURM_CONF": str(folder / "etc" / "slurm.conf"), "PYTHONWARNINGS": "ignore"}
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(folder)], env=env, capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("cohort"), num_subjects=24)


def raf(*args, env, cwd, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([str(RAF), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def release_requeued(job_id: str, env, deadline: float) -> None:
    """SLURM holds a requeued job back (its begin time is set about two minutes ahead); start it now instead."""
    while time.time() < deadline:
        state = subprocess.run(["squeue", "-h", "-o", "%T", "-j", job_id], env=env, capture_output=True,
                               text=True).stdout.strip()
        if state == "PENDING":
            # slurmd revokes the old run's credential with one-second resolution: a new run started within the
            # same second is refused ("Job credential revoked") and the job fails. SLURM's own delay avoids it.
            time.sleep(2)
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=env, capture_output=True)
            return
        time.sleep(0.2)


def diagnosis(job_id: str, env, jobs: Path) -> str:
    """What SLURM and the job's logs say, for a failed assertion."""
    history = subprocess.run(["sacct", "--duplicates", "-n", "-X", "-P", "-o", "JobID,State,ExitCode,Start,End,Reason",
                              "-j", job_id], env=env, capture_output=True, text=True).stdout
    control = Path(env["SLURM_CONF"]).parents[1] / "log" / "slurmctld.log"
    lines = [line for line in control.read_text(errors="replace").splitlines() if f"JobId={job_id}" in line]
    logs = "\n".join(f"== {path.name}\n{path.read_text(errors='replace')[-1500:]}" for path in sorted(jobs.glob(f"{job_id}/*log*")))
    return f"sacct:\n{history}\nslurmctld:\n" + "\n".join(lines[-30:]) + f"\n{logs}"


PRETRAIN = ["slurm.cpus_per_task=1", "slurm.mem_gb=2", "train.num_threads=1", "train.log_every=1"]


def test_a_two_task_pretraining_job_finishes_and_its_encoder_loads(cluster, cohort, tmp_path):
    done = raf("submit", "pretrain", "tiny", "--cohort", str(cohort), "--out", str(tmp_path / "p"), "--wait",
               "slurm.tasks_per_node=2", "train.wrapper=ddp", "train.steps=6", f"slurm.folder={tmp_path / 'jobs'}",
               *PRETRAIN, env=cluster, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    encoder, card = load_encoder(tmp_path / "p" / "encoder.safetensors")
    assert card["world_size"] == 2 and card["steps"] == 6
    assert len(losses(tmp_path / "p")) == 6

    listing = raf("jobs", f"slurm.folder={tmp_path / 'jobs'}", env=cluster, cwd=tmp_path)
    job_id = done.stdout.split("submitted pretrain job ")[1].split()[0]
    assert f"{job_id}" in listing.stdout and "COMPLETED" in listing.stdout
    tail = raf("jobs", "--tail", job_id, f"slurm.folder={tmp_path / 'jobs'}", env=cluster, cwd=tmp_path)
    assert f"encoder: {tmp_path / 'p' / 'encoder.safetensors'}" in tail.stdout


def test_a_failing_job_under_wait_exits_1_with_its_error_and_a_bad_config_is_refused_before_queueing(
        cluster, cohort, tmp_path):
    jobs = f"slurm.folder={tmp_path / 'jobs'}"
    failed = raf("submit", "pretrain", "tiny", "--cohort", str(cohort), "--out", str(tmp_path / "p"), "--wait", jobs,
                 "data.channel=nosuch", *PRETRAIN, env=cluster, cwd=tmp_path)  # only the store knows its channels
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert "failed" in failed.stderr and "nosuch" in failed.stderr and "Traceback" not in failed.stderr

    refused = raf("submit", "pretrain", "tiny", "--cohort", str(cohort), jobs, "task.name=mae_3d", env=cluster,
                  cwd=tmp_path)
    assert refused.returncode == 2 and "needs an encoder of family vit" in refused.stderr
    missing = raf("submit", "pretrain", "tiny", "--cohort", str(tmp_path / "nowhere"), jobs, env=cluster, cwd=tmp_path)
    assert missing.returncode == 2 and "cohort store not found" in missing.stderr
    assert len((tmp_path / "jobs" / "jobs.jsonl").read_text().splitlines()) == 1  # only the first was queued


def test_an_evaluation_array_over_several_checkpoints_returns_every_result(cluster, cohort, tmp_path):
    import torch

    from rafmedia.engine.encoders import create_encoder

    for seed in range(3):
        torch.manual_seed(seed)
        export_encoder(create_encoder("cnn3d_small", width=8), tmp_path / "ckpt" / f"seed{seed}.safetensors",
                       architecture="cnn3d_small", options={"width": 8}, card={"name": f"seed {seed}"})
    done = raf("submit", "evaluate", "tiny", "--encoder", str(tmp_path / "ckpt" / "*.safetensors"), "--cohort",
               str(cohort), "--out", str(tmp_path / "eval"), "--wait", f"slurm.folder={tmp_path / 'jobs'}",
               "slurm.cpus_per_task=1", "slurm.mem_gb=2", "evaluate.seeds=[0]", "evaluate.severities=[2]",
               "evaluate.random_baseline=false", env=cluster, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("submitted evaluate job") == 3
    reports = sorted((tmp_path / "eval").glob("*/report.json"))
    assert [path.parent.name for path in reports] == [f"ckpt-seed{seed}__{cohort.parent.name}" for seed in range(3)]
    for seed, path in enumerate(reports):
        assert list(json.loads(path.read_text())["encoders"]) == [f"seed {seed}"]
    # the array tasks' stores, ranked together
    board = raf("leaderboard", str(tmp_path / "eval" / "*"), "--out", str(tmp_path / "board"), env=cluster, cwd=tmp_path)
    assert board.returncode == 0, board.stderr[-2000:]
    rows = [row.split(",") for row in (tmp_path / "board" / "leaderboard.csv").read_text().splitlines()[1:]]
    indices = {f"seed {seed}": json.loads(path.read_text())["encoders"][f"seed {seed}"]["raf"]["index"]
               for seed, path in enumerate(reports)}
    assert sorted(row[1] for row in rows) == sorted(indices)
    assert [float(row[3]) for row in rows] == pytest.approx(sorted(indices.values(), reverse=True), abs=1e-12)
    assert all(float(row[3]) == pytest.approx(indices[row[1]], abs=1e-12) for row in rows)


def test_an_ingest_array_and_its_consolidation_job_equal_a_one_process_ingest(cluster, tmp_path):
    from tests.shards.test_ingest import TARGET, assert_same_store, write_cohort

    listing = write_cohort(tmp_path / "files", 5)
    with listing.open("a") as rows:  # a subject whose image is missing: reported by the consolidation, not fatal
        rows.write("s99,s99_t1.nii.gz,s99_t2.nii.gz,s99_seg.nii.gz,site-a,F,50\n")
    jobs = tmp_path / "jobs"
    done = raf("submit", "ingest", "default", "--input", str(listing), "--out", str(tmp_path / "array"),
               "--num-tasks", "2", "--wait", f"slurm.folder={jobs}", "slurm.cpus_per_task=1", "slurm.mem_gb=2",
               "ingest.workers=1", TARGET, env=cluster, cwd=tmp_path)
    # the tasks succeed; the consolidation job reports the bad subject and, without --skip-bad, fails
    assert done.returncode == 1, done.stderr[-3000:]
    assert "1 of 6 subjects were bad" in done.stderr and "Traceback" not in done.stderr
    recorded = [json.loads(line) for line in (jobs / "jobs.jsonl").read_text().splitlines()]
    assert [entry["command"] for entry in recorded] == ["raf-ingest", "raf-ingest", "raf-consolidate"]
    tasks, consolidation = [entry["job_id"] for entry in recorded[:2]], recorded[2]["job_id"]
    states = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "JobID,State,Start,End", "-j",
                             ",".join([*tasks, consolidation])], env=cluster, capture_output=True, text=True).stdout
    rows = {line.split("|")[0]: line.split("|")[1:] for line in states.splitlines()}
    assert [rows[task][0] for task in tasks] == ["COMPLETED", "COMPLETED"], states
    assert rows[consolidation][0] == "FAILED", states
    assert rows[consolidation][1] >= max(rows[task][2] for task in tasks), states  # started after both ended

    reference = raf("shards", "ingest", "--input", str(listing), "--out", str(tmp_path / "one"), "--skip-bad",
                    "--quiet", "ingest.workers=1", TARGET, env=cluster, cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert_same_store(tmp_path / "one" / "cohort.zarr", tmp_path / "array" / "cohort.zarr")
    report = json.loads((tmp_path / "array" / "cohort.zarr" / "ingest_report.json").read_text())
    assert report["num_tasks"] == 2 and report["counts"]["ingested"] == 5
    assert [bad["subject_id"] for bad in report["bad"]] == ["s99"]


@pytest.mark.parametrize("interruption", ["scontrol requeue", "USR1"])
def test_a_requeued_or_signalled_job_resumes_to_the_uninterrupted_losses(interruption, cluster, cohort, tmp_path):
    options = ["train.steps=40", "train.checkpoint_every=5", *PRETRAIN]
    straight = raf("pretrain", "--config", "tiny", "--cohort", str(cohort), "--out", str(tmp_path / "straight"),
                   "--quiet", *options, env=cluster, cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]

    out = tmp_path / "job"
    submitted = raf("submit", "pretrain", "tiny", "--cohort", str(cohort), "--out", str(out),
                    f"slurm.folder={tmp_path / 'jobs'}", *options, env=cluster, cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    job_id = submitted.stdout.split("submitted pretrain job ")[1].split()[0]
    deadline = time.time() + 300
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and len(losses(out)) >= 8):
        time.sleep(0.2)
    assert len(losses(out)) < 40, "the job finished before it could be interrupted"
    if interruption == "USR1":
        subprocess.run(["scancel", "--signal=USR1", job_id], env=cluster, check=True)
    else:
        subprocess.run(["scontrol", "requeue", job_id], env=cluster, check=True)

    release_requeued(job_id, cluster, deadline)
    while time.time() < deadline:
        state = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id], env=cluster,
                               capture_output=True, text=True).stdout.split()
        if state and state[0] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            break
        time.sleep(1)
    assert state[0] == "COMPLETED", diagnosis(job_id, cluster, tmp_path / "jobs")
    runs = subprocess.run(["sacct", "--duplicates", "-n", "-X", "-P", "-o", "State", "-j", job_id], env=cluster,
                          capture_output=True, text=True).stdout.split()
    assert runs[0] == "REQUEUED" and runs[-1] == "COMPLETED", runs  # it did run twice
    assert losses(out) == losses(tmp_path / "straight")
