"""Scoring on a cluster: `raf portal worker ROOT --slurm` scores each submission in a SLURM job and follows it.

The job is `raf evaluate` run through submitit exactly as `raf submit evaluate` runs it (`launch.slurm.submit`: a
checkpointable `RafJob` calling the CLI's own entry), on the phase's private split with the phase's protocol, into
the submission's work folder. The protocol travels as one `evaluate={...}` override that replaces the whole section,
so nothing of configs/default.yaml leaks into it. The job writes the results store and embedding cache the plain
worker uses: either kind of worker re-embeds nothing the other finished (their results-store cells differ only in
the settings digest: the schema writes the job's age_bins as floats). The compute node never opens the portal's
database: it needs only the portal root on a filesystem it shares with the login node.

On the login node the worker
- claims a submission (`submissions.claim`), submits its job, named `raf-score-<submission>-v<protocol version>`,
  and records the job id in `Submission.external_job`;
- renews the lease while the job is pending or running (`scoring.Heartbeat`; the stage names the job and its
  state), so that no other worker takes the submission over;
- when the job has ended: COMPLETED publishes the report the job wrote, as the plain worker does
  (`scoring.publish_score`); every other end (FAILED, CANCELLED, TIMEOUT, OUT_OF_MEMORY, NODE_FAIL, ...) fails the
  submission with a reason naming the job, its state and its last error line.

A worker killed and restarted (or another worker, once the lease expired) finds the job again through
`external_job`, or by its name in the queue when the worker died between submitting and recording, and follows it
instead of submitting a second one; a job of an older protocol version is never adopted. Only the lease holder
records a score, so nothing is scored twice. Submissions that carry their own code are scored on this machine, in
the sandbox (`scoring.score_submission`): a job would run their code outside it.
"""
from __future__ import annotations

import getpass
import json
import math
import os
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy.exc import OperationalError

from rafmedia.core.errors import UserError
from rafmedia.evaluate.config import EvaluateConfig
from rafmedia.evaluate.results import RESULTS_FILE, ResultsStore
from rafmedia.launch.config import load_config
from rafmedia.launch.slurm import Entry, SlurmConfig, executor, last_error, log_paths, submit
from rafmedia.portal import submissions
from rafmedia.portal.db import open_database
from rafmedia.portal.scoring import (LOG_LIMIT, Heartbeat, ScoringPlan, publish_score, record_external_job,
                                     score_submission, scoring_plan)
from rafmedia.portal.settings import PortalRoot

REPORT_JSON = "report.json"  # what `raf evaluate` writes into its --out folder (the job's: the work folder)
# SLURM job states of a job that may still run (squeue --help, sacct --helpformat); every other state is an end
ACTIVE_STATES = frozenset({"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED",
                           "COMPLETING", "CONFIGURING", "SIGNALING", "STAGE_OUT", "STOPPED", "SPECIAL_EXIT",
                           "UNKNOWN"})
UNKNOWN_GRACE_S = 600.0  # a job neither squeue nor sacct knows for this long is given up


def worker_slurm_config(root: str | Path, *, config_file: str | None = None, overrides: Sequence[str] = (),
                        partition: str | None = None, time_min: int | None = None,
                        gpus: int | None = None) -> SlurmConfig:
    """The jobs' resources: the slurm section of the packaged defaults <- `config_file` <- `slurm.*` overrides <-
    the --partition / --time / --gpus flags. Logs and jobs.jsonl go to ROOT/jobs unless slurm.folder names
    another folder."""
    foreign = [item for item in overrides if not item.strip().startswith("slurm.")]
    if foreign:
        raise UserError(f"raf portal worker takes slurm.* overrides only, not {', '.join(foreign)} (the scoring "
                        "protocol is the phase's, set by the challenge's organisers)")
    slurm = load_config(config_file, list(overrides)).slurm
    for key, value in (("partition", partition), ("time_min", time_min), ("gpus_per_node", gpus)):
        if value is not None:
            setattr(slurm, key, value)
    if slurm.folder == load_config().slurm.folder:  # not chosen: beside the submissions, on the shared filesystem
        slurm.folder = str(PortalRoot(root).path / "jobs")
    slurm.folder = str(Path(slurm.folder).resolve())  # the compute node and `raf jobs` read it from elsewhere
    slurm.validate()
    return slurm


def job_name(plan: ScoringPlan) -> str:
    """One name per submission and protocol version: a job of another version is never adopted."""
    return f"raf-score-{plan.public_id}-v{plan.protocol_version}"


def job_override(config: EvaluateConfig) -> str:
    """`config` (cohort and encoders included) as one flow-style YAML override that replaces the whole evaluate
    section of configs/default.yaml (a config file would be merged into it key by key)."""
    return "evaluate=" + yaml.safe_dump(asdict(config), default_flow_style=True, sort_keys=False,
                                          width=math.inf).strip()


def job_config(config: EvaluateConfig) -> EvaluateConfig:
    """The evaluate section the job resolves from `job_override(config)`: equal to `config`, though the schema
    has coerced its values (age_bins [0, 40] -> [0.0, 40.0]), which its results store's settings digest sees."""
    resolved = load_config(None, [job_override(config)]).evaluate
    if resolved != config:  # an invariant: the job scores the phase's protocol and nothing else
        raise RuntimeError(f"the scoring job would not run the phase's protocol: {resolved} != {config}")
    return resolved


def job_argv(config: EvaluateConfig, work: Path) -> list[str]:
    """`raf evaluate` with the phase's protocol (`job_override`) into the submission's work folder."""
    job_config(config)
    return ["evaluate", "--quiet", "--out", str(work), job_override(config)]


def job_outcome(state: str) -> str:
    """"active" while the job may still run, "completed" after it succeeded, else "ended"."""
    if state in ACTIVE_STATES:
        return "active"
    return "completed" if state == "COMPLETED" else "ended"


def _run(command: list[str]) -> str:
    """The command's output; "" when it failed or hung (asked again at the next poll)."""
    try:
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return ""
    return done.stdout if done.returncode == 0 else ""


def queued_jobs() -> dict[str, tuple[str, str]]:
    """Job id -> (name, state) of this user's jobs that squeue knows (pending, running, just ended)."""
    listing = _run(["squeue", "-h", "-u", getpass.getuser(), "-o", "%i|%j|%T"])
    jobs = {}
    for line in listing.splitlines():
        job_id, name, state = (line.split("|") + ["", ""])[:3]
        jobs[job_id.strip()] = (name.strip(), state.strip() or "UNKNOWN")
    return jobs


def job_records(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """Job id -> (name, state) from the accounting (sacct: finished jobs too), then from the queue (squeue); a job
    that neither knows is ("", "UNKNOWN")."""
    records: dict[str, tuple[str, str]] = {}
    if job_ids:
        accounting = _run(["sacct", "-n", "-P", "-X", "-o", "JobID,JobName,State", "-j", ",".join(job_ids)])
        for line in accounting.splitlines():
            job_id, name, state = (line.split("|") + ["", ""])[:3]
            records[job_id] = (name, state.split()[0] if state.strip() else "UNKNOWN")  # "CANCELLED by 0"
    missing = [job_id for job_id in job_ids if records.get(job_id, ("", "UNKNOWN"))[1] == "UNKNOWN"]
    queue = queued_jobs() if missing else {}
    for job_id in missing:
        records[job_id] = queue.get(job_id, records.get(job_id, ("", "UNKNOWN")))
    return {job_id: records.get(job_id, ("", "UNKNOWN")) for job_id in job_ids}


def restore_non_finite(value: Any, exact: Any) -> Any:
    """`value` read back from a report.json (whose writer turns NaN and infinities into null) with those numbers
    taken from `exact`, the same part of the report as the results store kept it."""
    if value is None and isinstance(exact, float) and not math.isfinite(exact):
        return exact
    if isinstance(value, dict) and isinstance(exact, dict):
        return {key: restore_non_finite(item, exact[key]) if key in exact else item for key, item in value.items()}
    if isinstance(value, list) and isinstance(exact, list) and len(value) == len(exact):
        return [restore_non_finite(item, twin) for item, twin in zip(value, exact)]
    return value


def report_from_work(work: Path, config: EvaluateConfig) -> dict[str, Any]:
    """The report `run_evaluation` returned in the job: its report.json, with every encoder's numbers made exact
    from the results store (the cells of this protocol on this split), and its config section the phase's own
    (the job's equals it, `job_config`, but as the schema coerced it: 0.0 for 0)."""
    report = json.loads((work / REPORT_JSON).read_text(encoding="utf-8"))
    report["config"] = asdict(config)
    settings = job_config(config).settings_digest()
    cells = {cell.encoder: cell.result for cell in ResultsStore(work / RESULTS_FILE).cells(settings)
             if cell.cohort_path == config.cohort}  # later cells of a name replace earlier ones
    for name, result in report["encoders"].items():
        if name in cells:
            report["encoders"][name] = restore_non_finite(result, cells[name])
    return report


@dataclass
class Followed:
    """A claimed submission whose job this worker follows."""

    submission_id: int
    token: str
    job_id: str
    plan: ScoringPlan
    beat: Heartbeat
    state: str = "UNKNOWN"
    last_seen: float = 0.0  # when squeue or sacct last knew the job (time.monotonic)


class ClusterScoring:
    """Starts (submits or adopts) and follows the jobs of the submissions this worker claims."""

    def __init__(self, root: PortalRoot, sessions, *, slurm: SlurmConfig, entry: Entry, worker: str, log=print):
        self.root, self.sessions, self.slurm, self.entry = root, sessions, slurm, entry
        self.worker, self.log = worker, log

    def start(self, submission_id: int, token: str) -> Followed | bool:
        """The job of a just-claimed submission, adopted or submitted; for a submission scored here instead (one
        carrying its own code), or given up, whether its score was recorded."""
        plan = scoring_plan(self.root, self.sessions, submission_id)
        if plan.runs_code:
            self.log(f"worker {self.worker}: submission {submission_id} carries its own code: scoring it here, in "
                     "the sandbox")
            return score_submission(self.root, self.sessions, submission_id, token, log=self.log)
        name = job_name(plan)
        job_id = self.adoptable(plan, name)
        if job_id:
            self.log(f"worker {self.worker}: submission {submission_id}: adopting SLURM job {job_id} ({name})")
        else:
            # submitit: the optional extra rafmedia[slurm], whose presence `run_cluster_worker` checked
            from submitit.core.utils import FailedJobError

            plan.work.mkdir(parents=True, exist_ok=True)
            (plan.work / REPORT_JSON).unlink(missing_ok=True)  # an earlier protocol's: never published as this one's
            try:
                job_id = str(submit(self.slurm, job_argv(plan.config, plan.work), entry=self.entry, job_name=name,
                                    out=str(plan.work)).job_id)
            except FailedJobError as error:  # sbatch refused it (a partition, account or limit of this cluster)
                raise UserError(f"SLURM refused the job of submission {submission_id}: {error}; fix the worker's "
                                "slurm options (the submission is claimed again when its lease expires)") from None
            self.log(f"worker {self.worker}: submission {submission_id}: submitted SLURM job {job_id} ({name}); "
                     f"follow it with: raf jobs slurm.folder={self.slurm.folder}")
        if not record_external_job(self.sessions, submission_id, token, job_id):
            self.log(f"worker {self.worker}: submission {submission_id}: the lease went to another worker, which "
                     f"follows job {job_id}")
            return False
        expected = 1 + len(plan.config.alterations) * len(plan.config.severities)
        beat = Heartbeat(self.sessions, submission_id, token, lease_s=self.root.settings.lease_seconds,
                         cache=plan.work / "embeddings.zarr", expected=expected)
        beat.stage = f"SLURM job {job_id}"
        beat.start()
        return Followed(submission_id, token, job_id, plan, beat, last_seen=time.monotonic())

    def adoptable(self, plan: ScoringPlan, name: str) -> str:
        """The id of this submission's job for its protocol version: the recorded one when SLURM still knows it
        under this name, else one of that name in the queue; "" when none."""
        if plan.external_job and job_records([plan.external_job])[plan.external_job][0] == name:
            return plan.external_job
        return next((job_id for job_id, (queued, _) in sorted(queued_jobs().items()) if queued == name), "")

    def update(self, followed: Followed, state: str) -> bool | None:
        """Takes a new state of the job; None while it may still run, else whether a score was recorded."""
        if followed.beat.lost:
            followed.beat.stopped.set()
            self.log(f"worker {self.worker}: submission {followed.submission_id}: the lease went to another "
                     f"worker, which follows job {followed.job_id}")
            return False
        now = time.monotonic()
        if state != "UNKNOWN":
            followed.last_seen = now
        gone = state == "UNKNOWN" and now - followed.last_seen > UNKNOWN_GRACE_S  # neither queue nor accounting
        if state != followed.state:
            followed.state = state
            followed.beat.set_stage(f"SLURM job {followed.job_id}: {state}")
        if job_outcome(state) == "active" and not gone:
            return None
        followed.beat.stopped.set()
        return self.finish(followed, state)

    def finish(self, followed: Followed, state: str) -> bool:
        """Publishes the report of a COMPLETED job, or fails the submission naming the job, its state and its last
        error; whether a score was recorded."""
        plan, job_id = followed.plan, followed.job_id
        log = self.job_log(job_id) if plan.show_logs else ""
        if job_outcome(state) == "completed" and (plan.work / REPORT_JSON).is_file():
            try:
                report = report_from_work(plan.work, plan.config)
            except (ValueError, KeyError) as error:  # a report.json cut short (a full disk): said, not published
                return self.give_up(followed, f"SLURM job {job_id} COMPLETED but its {REPORT_JSON} is unreadable "
                                              f"({type(error).__name__}: {error})", log)
            recorded = publish_score(self.root, self.sessions, followed.submission_id, followed.token,
                                     report=report, log=log)
            self.log(f"worker {self.worker}: submission {followed.submission_id}: job {job_id} COMPLETED; "
                     + ("score recorded" if recorded else "score not recorded (see the submission's reason)"))
            return recorded
        stderr = self.job_files(job_id)[1]
        error = last_error(stderr) if stderr else "no log written"
        return self.give_up(followed, f"SLURM job {job_id} ended {state}: {error}" if job_outcome(state) != "completed"
                            else f"SLURM job {job_id} COMPLETED without writing {REPORT_JSON}: {error}", log)

    def give_up(self, followed: Followed, why: str, log: str) -> bool:
        """Fails the submission with `why` (server paths removed); False: no score recorded."""
        submissions.fail(self.sessions, followed.submission_id, followed.token, log=log, reason=self.scrub(why))
        self.log(f"worker {self.worker}: submission {followed.submission_id} failed: {why}")
        return False

    def job_files(self, job_id: str) -> tuple[Path | None, Path | None]:
        """The job's stdout and stderr logs (None when not written)."""
        paths = log_paths({"job_id": job_id, "folder": str(Path(self.slurm.folder) / job_id)})
        out = next((path for path in paths if path.suffix == ".out"), None)
        return out, next((path for path in paths if path.suffix == ".err"), None)

    def job_log(self, job_id: str) -> str:
        text = "".join(path.read_text(encoding="utf-8", errors="replace") for path in self.job_files(job_id) if path)
        return self.scrub(text)[-LOG_LIMIT:]

    def scrub(self, text: str) -> str:
        """Server paths out of what participants may read."""
        return text.replace(str(self.root.path), "<portal>")


def run_cluster_worker(root: str | Path, *, slurm: SlurmConfig, entry: Entry, once: bool = False, poll_s: float = 2.0,
                       max_jobs: int = 1, name: str = "", log=print) -> int:
    """Scores submissions as SLURM jobs (module docstring) until stopped, or with `once` until the queue is empty
    and every job it followed has ended; returns how many scores it recorded. At most `max_jobs` jobs are
    followed at once; stopping the worker leaves its jobs running, for the next worker to adopt.

    Args:
        slurm: the jobs' resources (`worker_slurm_config`).
        entry: the function that runs a `raf` command line in the job (the CLI's `main`, see `RafJob`).
        poll_s: seconds between looks at the queue and at the jobs' states.
    """
    if max_jobs < 1:
        raise UserError(f"--max-jobs must be >= 1, got {max_jobs}")
    root = PortalRoot(root)
    executor(slurm, "raf-score")  # no SLURM here, or a bad slurm section: said before anything is claimed
    sessions = open_database(root.database_url)
    worker = name or f"{socket.gethostname()}-{os.getpid()}"
    scoring = ClusterScoring(root, sessions, slurm=slurm, entry=entry, worker=worker, log=log)
    log(f"worker {worker}: scoring submissions of {root.path} as SLURM jobs (logs and jobs.jsonl in {slurm.folder}; "
        f"lease {root.settings.lease_seconds:.0f} s)")
    done, following = 0, []
    while True:
        try:
            queue_empty = False
            while len(following) < max_jobs and not queue_empty:
                claimed = submissions.claim(sessions, worker, lease_s=root.settings.lease_seconds,
                                            max_attempts=root.settings.max_attempts)
                queue_empty = claimed is None
                if claimed is not None:
                    started = scoring.start(*claimed)
                    if isinstance(started, Followed):
                        following.append(started)
                    else:
                        done += started
            records = job_records([followed.job_id for followed in following])
            for followed in list(following):
                recorded = scoring.update(followed, records[followed.job_id][1])
                if recorded is not None:
                    following.remove(followed)
                    done += recorded
        except OperationalError as error:  # the database restarting: the leases hold for a while, try again
            log(f"worker {worker}: the database is unreachable ({str(error.orig or error).partition(chr(10))[0]}); "
                f"trying again in {max(poll_s, 2.0):.0f} s")
        if once and queue_empty and not following:
            return done
        time.sleep(poll_s)
