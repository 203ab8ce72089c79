"""The worker: claims queued submissions and scores each with the evaluator on its phase's private split.

`run_worker(root)` loops: claim (`submissions.claim`) -> score -> finish or fail. While a submission is scored a
heartbeat thread renews the lease and records the progress (embedding batches written to the submission's cache
out of those the protocol needs). Each submission scores into its own work folder (results store + embedding
cache), so a worker that takes over from a killed one re-embeds nothing that was finished, and re-scoring after a
protocol change is cheap.

What leaves the worker for the web: the leaderboard numbers (RAF index, P, R, F with intervals, their bootstrap
draws for rank intervals, the headline numbers), the log (shown only on phases that show logs) and the report
with every per-subject value removed (`redact`): aggregates only.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.exc import OperationalError

from rafmedia.core.errors import UserError
from rafmedia.core.files import atomic_write_text, sha256_file, write_json
from rafmedia.evaluate.cache import EmbeddingCache
from rafmedia.evaluate.config import EvaluateConfig
from rafmedia.evaluate.encoder_entries import EncoderEntry, Replicate
from rafmedia.evaluate.report import render_html
from rafmedia.evaluate.results import ResultsStore
from rafmedia.evaluate.runner import run_evaluation
from rafmedia.portal import submissions
from rafmedia.portal.challenges import evaluate_config, scoring_store
from rafmedia.portal.db import Submission, open_database
from rafmedia.portal.sandbox import Sandbox, SandboxedEncoder, SandboxLimits, detect
from rafmedia.portal.settings import PortalRoot

REPORT_HTML = "report.html"
REPORT_JSON = "report.json"
LOG_LIMIT = 200_000  # characters of log kept per submission


def submission_folder(root: PortalRoot, submission: Submission) -> Path:
    return root.submissions / submission.folder


def redact(report: dict[str, Any], *, subject_ids: list[str], display_name: str) -> dict[str, Any]:
    """The report with every per-subject value (ids, per-subject attributes, embedding projections), server path
    and bootstrap draw removed; refuses to return one in which a subject id still appears."""
    report = json.loads(json.dumps(report))
    report["cohort"].pop("subjects", None)
    report["cohort"]["path"] = "(the phase's split, on the server)"
    report["cohort"].pop("planted", None)  # the source cohort's recipe: not the split's
    config = report.get("config", {})
    config["cohort"], config["encoders"] = "(the phase's split)", [display_name]
    encoders = {}
    for result in report.get("encoders", {}).values():
        result.get("latent", {}).pop("projection", None)
        result.pop("raf_draws", None)
        result["source"] = display_name
        encoders[display_name] = result
    report["encoders"] = encoders
    text = json.dumps(report)
    leaked = [subject for subject in subject_ids if f'"{subject}"' in text]
    if leaked:
        raise RuntimeError(f"the redacted report still names {len(leaked)} subjects; not published")
    return report


def leaderboard_score(result: dict[str, Any]) -> dict[str, Any]:
    """The leaderboard's numbers of one scored cell: RAF components with intervals, draws, headline numbers."""
    raf = result["raf"]
    score = {key: raf[key] for key in ("index", "performance", "robustness", "fairness")}
    score.update({f"{key}_ci95": raf.get(f"{key}_ci95") for key in score})
    score["draws"] = result.get("raf_draws", {})
    score["headline"] = result.get("headline", {})
    return score


class Heartbeat(threading.Thread):
    """Renews a claimed submission's lease every third of it and records the scoring progress."""

    def __init__(self, sessions, submission_id: int, token: str, *, lease_s: float, cache: Path, expected: int):
        super().__init__(daemon=True)
        self.sessions, self.submission_id, self.token = sessions, submission_id, token
        self.lease_s, self.cache, self.expected = lease_s, cache, max(expected, 1)
        self.stage = "loading the split"
        self.stopped = threading.Event()
        self.lost = False

    def progress(self) -> float:
        """Embedding batches written out of those the protocol needs (a resumed run starts where it was)."""
        if not self.cache.is_dir():
            return 0.0
        batches = sum(1 for path in self.cache.glob("*/*/*")
                      if path.is_dir() and not any(part.startswith(".") for part in path.relative_to(self.cache).parts))
        return min(0.95, 0.9 * batches / self.expected)

    def renew(self) -> bool:
        """Extends the lease and records stage and progress; False (and `lost`) once another worker holds it.

        The lease is lost only when the UPDATE matched no row. A database that cannot be reached (restarting, a
        network blip) is tried again with a short back-off for up to a third of the lease, then left to the next
        beat; each failed try is logged on the worker's own stderr (not in the submission's log).
        """
        pause, give_up = 0.25, time.monotonic() + self.lease_s / 3
        while not self.lost:
            try:
                self.lost = not submissions.renew(self.sessions, self.submission_id, self.token,
                                                  lease_s=self.lease_s, stage=self.stage, progress=self.progress())
            except OperationalError as error:
                again = time.monotonic() + pause < give_up
                print(f"worker: the lease of submission {self.submission_id} was not renewed, the database is "
                      f"unreachable ({str(error.orig or error).strip().partition(chr(10))[0]}); "
                      + (f"trying again in {pause:.2f} s" if again else "trying again at the next beat"),
                      file=sys.__stderr__, flush=True)
                if not again or self.stopped.wait(pause):
                    break
                pause = min(2 * pause, 2.0)
            else:
                break
        return not self.lost

    def set_stage(self, stage: str) -> None:
        """Records a new stage at once (not at the next renewal)."""
        self.stage = stage
        self.renew()

    def run(self) -> None:
        while not self.stopped.wait(self.lease_s / 3) and self.renew():
            pass


@contextlib.contextmanager
def sandboxed_entries(root: PortalRoot, folder: Path, config, input_spec: dict[str, Any], *, show_logs: bool,
                      output: io.StringIO, enabled: bool):
    """For a submission with its own code: the evaluator's entry whose model embeds in a sandbox (started here,
    stopped on leaving); None for an encoder of the registry (the evaluator loads it itself)."""
    if not enabled:
        yield None
        return
    sandbox = Sandbox(folder, folder / "work" / "sandbox", SandboxLimits.from_settings(root.settings), detect(),
                      show_details=show_logs)
    try:
        with sandbox:
            sandbox.start(np.zeros((1, len(input_spec["channels"]), *input_spec["shape"]), np.float32))
            model = SandboxedEncoder(sandbox)
            yield [EncoderEntry(name=folder.name, source=folder.name, digest=submission_digest(folder),
                                replicates=[Replicate(seed, model) for seed in config.seeds])]
    finally:
        if show_logs:
            output.write(sandbox.log())


def submission_digest(folder: Path) -> str:
    """The weights, card and code of a submission in one SHA-256 (its embeddings' cache key)."""
    files = [folder / "encoder.safetensors", folder / "encoder.card.json", *sorted((folder / "code").rglob("*"))]
    lines = [f"{path.relative_to(folder)} {sha256_file(path)}" for path in files if path.is_file()]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def score_submission(root: PortalRoot, sessions, submission_id: int, token: str, *, log) -> bool:
    """Scores one claimed submission in this process (its own code in the sandbox); True when its score was
    recorded by this worker."""
    plan = scoring_plan(root, sessions, submission_id)
    plan.work.mkdir(exist_ok=True)
    expected = 1 + len(plan.config.alterations) * len(plan.config.severities)
    beat = Heartbeat(sessions, submission_id, token, lease_s=root.settings.lease_seconds,
                     cache=plan.work / "embeddings.zarr", expected=expected)
    beat.start()
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            beat.set_stage("embedding and probing")
            with sandboxed_entries(root, plan.folder, plan.config, plan.input_spec, show_logs=plan.show_logs,
                                   output=output, enabled=plan.runs_code) as entries:
                report = run_evaluation(plan.config, progress=False, results=ResultsStore(plan.work / "results.sqlite"),
                                        cache=EmbeddingCache(plan.work / "embeddings.zarr"), entries=entries)
            beat.set_stage("writing the report")
    except UserError as error:
        beat.stopped.set()
        return submissions.fail(sessions, submission_id, token, reason=str(error), log=_log(output, plan.show_logs))
    except Exception as error:  # the participant's model failing inside the evaluator: report, keep serving
        beat.stopped.set()
        log(traceback.format_exc())
        return submissions.fail(sessions, submission_id, token, log=_log(output, plan.show_logs),
                                reason=f"scoring failed: {type(error).__name__}: {error}"[:500])
    finally:
        beat.stopped.set()
    recorded = publish_score(root, sessions, submission_id, token, report=report, log=_log(output, plan.show_logs))
    if not recorded:
        log(f"submission {submission_id}: no score recorded (the lease went to another worker, or the report "
            "could not be published; the submission's reason says which)")
    return recorded


def _log(output: io.StringIO, show: bool) -> str:
    return output.getvalue()[-LOG_LIMIT:] if show else ""


def run_worker(root: str | Path, *, once: bool = False, poll_s: float = 2.0, name: str = "", log=print,
               patience_s: float = 600.0) -> int:
    """Scores submissions until stopped (Ctrl-C / SIGTERM), or until the queue is empty with `once`; returns how
    many it scored.

    A database that cannot be reached (restarting, failing over, a network blip) stops nothing: the claim, or the
    scoring of the submission this worker holds, is tried again after a pause growing from 0.5 to 30 s, each try
    logged. The submission keeps its lease token meanwhile, so scoring it again resumes from its cache without a
    new claim (and records nothing if another worker took it over). With `once`, a database unreachable for
    `patience_s` seconds ends the worker with a UserError.
    """
    root = PortalRoot(root)
    sessions = open_database(root.database_url)
    worker = name or f"{socket.gethostname()}-{os.getpid()}"
    log(f"worker {worker}: scoring submissions of {root.path} (lease {root.settings.lease_seconds:.0f} s)")
    done, down_since, pause = 0, 0.0, 0.0

    def wait_for_database(error: OperationalError, doing: str) -> None:
        nonlocal down_since, pause
        down_since = down_since or time.monotonic()
        reason = str(error.orig or error).strip().partition("\n")[0]
        if once and time.monotonic() - down_since > patience_s:
            raise UserError(f"the database of {root.path} was unreachable for {patience_s:.0f} s ({reason}); "
                            "check that it runs and that database_url in portal.yaml names it") from None
        pause = min(max(2 * pause, 0.5), 30.0)
        log(f"worker {worker}: the database is unreachable while {doing} ({reason}); trying again in {pause:.1f} s")
        time.sleep(pause)

    while True:
        try:
            claimed = submissions.claim(sessions, worker, lease_s=root.settings.lease_seconds,
                                        max_attempts=root.settings.max_attempts)
        except OperationalError as error:
            wait_for_database(error, "claiming a submission")
            continue
        down_since, pause = 0.0, 0.0
        if claimed is None:
            if once:
                return done
            time.sleep(poll_s)
            continue
        submission_id, token = claimed
        log(f"worker {worker}: scoring submission {submission_id}")
        began = time.perf_counter()
        while True:
            try:
                recorded = score_submission(root, sessions, submission_id, token, log=log)
                break
            except OperationalError as error:
                wait_for_database(error, f"scoring submission {submission_id} (scored again under the same lease)")
        down_since, pause = 0.0, 0.0
        done += recorded
        log(f"worker {worker}: submission {submission_id} done in {time.perf_counter() - began:.1f} s")


# Scoring elsewhere (`raf portal worker --slurm`, rafmedia.launch.portal_cluster): the evaluation runs in a job that
# writes the submission's work folder; the worker that holds the lease reads the plan here and publishes here.


@dataclass
class ScoringPlan:
    """What scoring one submission needs (`scoring_plan`): its folder, the phase's protocol filled in with the
    private split and the encoder, and what the worker records about it."""

    folder: Path  # ROOT/submissions/<folder>: the upload and the published report
    config: EvaluateConfig  # the phase's protocol; cohort: the phase's private store; encoders: the upload
    name: str  # the entry's name on the leaderboard
    show_logs: bool
    public_id: str
    protocol_version: int
    external_job: str  # the job scoring it, recorded by `record_external_job`
    runs_code: bool  # carries its own code: scored in the sandbox (`score_submission`), never elsewhere
    input_spec: dict[str, Any]  # the challenge's channels and volume shape (the sandbox's dummy pass)

    @property
    def work(self) -> Path:
        """Results store, embedding cache and any scoring job's outputs."""
        return self.folder / "work"


def scoring_plan(root: PortalRoot, sessions, submission_id: int) -> ScoringPlan:
    """The plan of one submission, read from the database."""
    with sessions() as db:
        submission = db.get(Submission, submission_id)
        phase = submission.phase
        folder = submission_folder(root, submission)
        config = evaluate_config(phase.challenge.protocol)
        config.cohort = str(scoring_store(root, phase).path)
        config.encoders = [str(folder / "encoder.safetensors")]
        return ScoringPlan(folder=folder, config=config, name=submission.name, show_logs=phase.show_logs,
                           public_id=submission.public_id, protocol_version=submission.protocol_version,
                           external_job=submission.external_job or "", runs_code=bool(submission.runs_code),
                           input_spec=phase.challenge.input)


def record_external_job(sessions, submission_id: int, token: str, job: str) -> bool:
    """Records the job scoring a claimed submission (`Submission.external_job`); False when this worker no longer
    holds the lease."""
    with sessions.begin() as db:
        return db.query(Submission).filter(Submission.id == submission_id, Submission.lease_owner == token,
                                           Submission.status == "running").update({"external_job": job[:64]}) == 1


def publish_score(root: PortalRoot, sessions, submission_id: int, token: str, *, report: dict[str, Any],
                  log: str) -> bool:
    """Publishes a finished evaluation of a claimed submission as `score_submission` does: the redacted report
    (JSON and HTML) in its folder, the leaderboard numbers of its entry (the report's first) in the database.
    True when recorded; False when the lease went to another worker, or when the report could not be published
    (the submission is then failed with the reason)."""
    with sessions() as db:
        submission = db.get(Submission, submission_id)
        folder, name = submission_folder(root, submission), submission.name
        subject_ids = scoring_store(root, submission.phase).subject_ids()
    try:
        result = next(iter(report["encoders"].values()))
        public = redact(report, subject_ids=subject_ids, display_name=name)
        write_json(folder / REPORT_JSON, public)
        atomic_write_text(folder / REPORT_HTML, render_html(public))
    except Exception as error:  # a report the evaluator should not have written: fail it, keep serving
        return submissions.fail(sessions, submission_id, token, log=log,
                                reason=f"scoring failed: {type(error).__name__}: {error}"[:500])
    return submissions.finish(sessions, submission_id, token, score=leaderboard_score(result), log=log)
