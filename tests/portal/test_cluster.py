"""Scoring on a cluster (`raf portal worker --slurm`) on the one-node SLURM of the launch tests: a submission is scored
by a `raf evaluate` job whose id the submission records and `raf jobs` lists, to the score and report the plain
worker's scoring gives the same weights; a worker killed while its job runs is restarted and adopts the job (one job
in the accounting); a cancelled job fails its submission with a reason naming the job and its state."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import threading
import time

import pytest
import yaml

from rafmedia.core.files import write_json
from rafmedia.evaluate.cache import EmbeddingCache
from rafmedia.evaluate.results import ResultsStore
from rafmedia.evaluate.runner import run_evaluation
from rafmedia.launch.cli import main
from rafmedia.launch.portal_cluster import job_config, job_outcome, restore_non_finite
from rafmedia.portal.challenges import evaluate_config
from rafmedia.portal.db import Submission, open_database
from rafmedia.portal.scoring import ScoringPlan, leaderboard_score, redact, scoring_plan
from rafmedia.portal.settings import PortalRoot
from rafmedia.shards.store import CohortStore
from tests.launch import test_slurm
from tests.portal.conftest import RAF, run_worker

cluster = test_slurm.cluster  # the launch tests' one-node SLURM (launch/local_slurm.sh), one per module
LEASE_S = 3.0
SLURM_OPTIONS = ["--poll", "0.3", "--time", "10", "slurm.cpus_per_task=1", "slurm.mem_gb=2"]


def submission(sessions, public_id: str) -> Submission:
    with sessions() as db:
        return db.query(Submission).filter_by(public_id=public_id).one()


def start_worker(site, env, log, *options: str) -> subprocess.Popen:
    with open(log, "w") as output:  # the worker writes through its own copy of the descriptor
        return subprocess.Popen([str(RAF), "portal", "worker", str(site.root), "--slurm", *SLURM_OPTIONS, *options],
                                env=env, stdout=output, stderr=subprocess.STDOUT)


def wait_for_job(sessions, public_id: str, worker: subprocess.Popen, log) -> str:
    """The job id the worker records for the submission, once it has submitted (or adopted) it."""
    deadline = time.monotonic() + 180
    while not (job_id := submission(sessions, public_id).external_job):
        assert time.monotonic() < deadline and worker.poll() is None, f"no job recorded: {log.read_text()[-3000:]}"
        time.sleep(0.1)
    return job_id


def score_plainly(plan: ScoringPlan, out) -> dict:
    """What the plain worker computes for a submission (`score_submission`: `run_evaluation` on its plan, `redact`,
    `leaderboard_score`), in this process, into folders of its own."""
    report = run_evaluation(plan.config, progress=False, results=ResultsStore(out / "results.sqlite"),
                            cache=EmbeddingCache(out / "embeddings.zarr"))
    public = redact(report, subject_ids=CohortStore(plan.config.cohort).subject_ids(), display_name=plan.name)
    return {"score": json.dumps(leaderboard_score(next(iter(report["encoders"].values())))),
            "report": write_json(out / "report.json", public).read_text()}


def test_slurm_jobs_score_like_the_plain_worker_a_restarted_worker_adopts_its_job_a_cancelled_one_fails(
        cluster, site, tmp_path, capsys, monkeypatch):
    settings_file = site.root / "portal.yaml"
    original = settings_file.read_text()
    settings_file.write_text(yaml.safe_dump({**yaml.safe_load(original), "lease_seconds": LEASE_S}))
    sessions = open_database(PortalRoot(site.root).database_url)
    try:
        with sessions() as db:  # other tests' leftovers: scored first
            if db.query(Submission).filter(Submission.status.in_(["queued", "running"])).count():
                assert run_worker(site.root).returncode == 0
        uploads = [site.upload(site.new_participant(who), encoder, name=name)
                   for who, encoder, name in (("cluster-a", "random2", "cluster twin"),
                                              ("cluster-b", "random0", "to be cancelled"))]
        assert [response.status_code for response in uploads] == [201, 201], uploads[0].text
        scored_id, cancelled_id = (response.json()["id"] for response in uploads)
        reference: dict = {}
        plan = scoring_plan(PortalRoot(site.root), sessions, submission(sessions, scored_id).id)
        plainly = threading.Thread(target=lambda: reference.update(score_plainly(plan, tmp_path / "reference")),
                                   daemon=True)
        plainly.start()  # meanwhile, on the other core

        first = start_worker(site, cluster, tmp_path / "first.log")  # --max-jobs 1: claims the older submission
        try:
            job_id = wait_for_job(sessions, scored_id, first, tmp_path / "first.log")
            os.kill(first.pid, signal.SIGKILL)  # while its job is queued or running
            first.wait()
        finally:
            if first.poll() is None:
                first.kill()
        alive = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], env=cluster, capture_output=True,
                               text=True, check=False).stdout.strip()
        assert alive in ("PENDING", "CONFIGURING", "RUNNING"), alive  # the job outlives its worker
        killed = submission(sessions, scored_id)
        assert (killed.status, killed.attempts, killed.external_job) == ("running", 1, job_id)
        assert submission(sessions, cancelled_id).status == "queued"

        time.sleep(LEASE_S + 0.5)  # the dead worker's lease expires
        second = start_worker(site, cluster, tmp_path / "second.log", "--once", "--max-jobs", "2")
        try:
            cancelled_job = wait_for_job(sessions, cancelled_id, second, tmp_path / "second.log")
            subprocess.run(["scancel", cancelled_job], env=cluster, check=True)
            assert second.wait(timeout=300) == 0, (tmp_path / "second.log").read_text()[-3000:]
        finally:
            if second.poll() is None:
                second.kill()
        said = (tmp_path / "second.log").read_text()
        assert f"adopting SLURM job {job_id}" in said and said.count("submitted SLURM job") == 1, said[-3000:]
    finally:
        settings_file.write_text(original)

    scored, cancelled = submission(sessions, scored_id), submission(sessions, cancelled_id)
    assert (scored.status, scored.attempts, scored.external_job) == ("scored", 2, job_id), scored.reason
    assert (cancelled.status, cancelled.external_job, cancelled.score_json) == ("failed", cancelled_job, "")
    assert f"SLURM job {cancelled_job} ended CANCELLED" in cancelled.reason, cancelled.reason

    # one job for the adopted submission, in the accounting and in jobs.jsonl; `raf jobs` lists both
    names = {f"raf-score-{public_id}-v1": public_id for public_id in (scored_id, cancelled_id)}
    done = subprocess.run(["sacct", "-n", "-X", "-P", "--starttime", "2000-01-01", "-o", "JobID,JobName,State"],
                          env=cluster, capture_output=True, text=True, check=True).stdout
    jobs = sorted((job, names[name], state.split()[0]) for job, name, state in
                  (line.split("|") for line in done.splitlines()) if name in names)  # "CANCELLED by 0"
    assert jobs == sorted([(job_id, scored_id, "COMPLETED"), (cancelled_job, cancelled_id, "CANCELLED")]), done
    recorded = [json.loads(line) for line in (site.root / "jobs" / "jobs.jsonl").read_text().splitlines()]
    assert sorted(entry["job_id"] for entry in recorded if entry["command"] in names) == sorted([job_id, cancelled_job])
    monkeypatch.setenv("SLURM_CONF", cluster["SLURM_CONF"])
    capsys.readouterr()
    assert main(["jobs", f"slurm.folder={site.root / 'jobs'}"]) == 0
    listing = {line.split()[0]: line.split()[2] for line in capsys.readouterr().out.splitlines()[1:]}
    assert (listing[job_id], listing[cancelled_job]) == ("COMPLETED", "CANCELLED")

    # the same numbers as the plain worker's scoring, to the bit (NaN included), and the same published report
    plainly.join(timeout=300)
    assert scored.score_json == reference["score"]
    published = (site.root / "submissions" / scored.folder / "report.json").read_text()
    assert published == reference["report"] and str(site.root) not in published


def test_cluster_options_need_slurm_and_the_protocol_is_the_phases(site, capsys):
    assert main(["portal", "worker", str(site.root), "--once", "--partition", "gpu", "--time", "5"]) == 2
    assert "--partition, --time only apply with --slurm" in capsys.readouterr().err
    assert main(["portal", "worker", str(site.root), "--slurm", "--once", "evaluate.seeds=[0]"]) == 2
    error = capsys.readouterr().err
    assert "slurm.* overrides only, not evaluate.seeds=[0]" in error and "the phase's" in error


def test_the_job_resolves_exactly_the_phase_protocol_with_nothing_of_the_packaged_defaults():
    # default.yaml sets ordinal_targets [severity] and four segmentation structures; a config-file layer would be
    # merged into them, the job's one-section override replaces them
    config = evaluate_config({"seeds": [0, 1], "segmentation": {"structures": {"heart": 2}}, "permutations": 7,
                              "c_grid": [1e-05, 0.5]})
    config.cohort, config.encoders = "/data/private/cohort.zarr", ["/data/submissions/x/encoder.safetensors"]
    resolved = job_config(config)
    assert resolved == config
    assert resolved.ordinal_targets == [] and resolved.segmentation.structures == {"heart": 2}
    assert resolved.c_grid == [1e-05, 0.5] and resolved.cohort == config.cohort


def test_report_numbers_written_as_null_are_taken_back_exact_from_the_results_store():
    exact = {"raf": {"index": 0.25, "fairness": math.nan, "draws": [0.1, math.inf, math.nan]}, "n": None}
    read_back = {"raf": {"index": 0.25, "fairness": None, "draws": [0.1, None, None]}, "n": None, "extra": None}
    restored = restore_non_finite(read_back, exact)
    assert math.isnan(restored["raf"]["fairness"]) and restored["raf"]["draws"][1] == math.inf
    assert math.isnan(restored["raf"]["draws"][2]) and restored["raf"]["index"] == 0.25
    assert restored["n"] is None and restored["extra"] is None  # a true null stays null


@pytest.mark.parametrize("state, outcome", [("PENDING", "active"), ("RUNNING", "active"), ("REQUEUED", "active"),
                                            ("COMPLETED", "completed"), ("FAILED", "ended"), ("CANCELLED", "ended"),
                                            ("TIMEOUT", "ended"), ("OUT_OF_MEMORY", "ended"), ("NODE_FAIL", "ended")])
def test_job_states_are_read_as_running_succeeded_or_ended(state, outcome):
    assert job_outcome(state) == outcome
