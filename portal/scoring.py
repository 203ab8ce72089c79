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
import io
import json
import os
import socket
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from rafmedia.core.errors import UserError
from rafmedia.core.files import atomic_write_text, write_json
from rafmedia.evaluate.cache import EmbeddingCache
from rafmedia.evaluate.report import render_html
from rafmedia.evaluate.results import ResultsStore
from rafmedia.evaluate.runner import run_evaluation
from rafmedia.portal import submissions
from rafmedia.portal.challenges import evaluate_config, scoring_store
from rafmedia.portal.db import Submission, open_database
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
        """Extends the lease and records stage and progress; False (and `lost`) once another worker holds it."""
        self.lost = self.lost or not submissions.renew(self.sessions, self.submission_id, self.token,
                                                       lease_s=self.lease_s, stage=self.stage,
                                                       progress=self.progress())
        return not self.lost

    def set_stage(self, stage: str) -> None:
        """Records a new stage at once (not at the next renewal)."""
        self.stage = stage
        self.renew()

    def run(self) -> None:
        while not self.stopped.wait(self.lease_s / 3) and self.renew():
            pass


def score_submission(root: PortalRoot, sessions, submission_id: int, token: str, *, log) -> bool:
    """Scores one claimed submission; True when its score was recorded by this worker."""
    with sessions() as db:
        submission = db.get(Submission, submission_id)
        phase = submission.phase
        folder = submission_folder(root, submission)
        config = evaluate_config(phase.challenge.protocol)
        store = scoring_store(root, phase)
        name, show_logs = submission.name, phase.show_logs
    config.cohort = str(store.path)
    config.encoders = [str(folder / "encoder.safetensors")]
    work = folder / "work"
    work.mkdir(exist_ok=True)
    expected = 1 + len(config.alterations) * len(config.severities)
    beat = Heartbeat(sessions, submission_id, token, lease_s=root.settings.lease_seconds,
                     cache=work / "embeddings.zarr", expected=expected)
    beat.start()
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            beat.set_stage("embedding and probing")
            report = run_evaluation(config, progress=False, results=ResultsStore(work / "results.sqlite"),
                                    cache=EmbeddingCache(work / "embeddings.zarr"))
            beat.set_stage("writing the report")
            result = next(iter(report["encoders"].values()))
            public = redact(report, subject_ids=store.subject_ids(), display_name=name)
            write_json(folder / REPORT_JSON, public)
            atomic_write_text(folder / REPORT_HTML, render_html(public))
    except UserError as error:
        beat.stopped.set()
        return submissions.fail(sessions, submission_id, token, reason=str(error),
                                log=_log(output, show_logs))
    except Exception as error:  # the participant's model failing inside the evaluator: report, keep serving
        beat.stopped.set()
        log(traceback.format_exc())
        return submissions.fail(sessions, submission_id, token, log=_log(output, show_logs),
                                reason=f"scoring failed: {type(error).__name__}: {error}"[:500])
    finally:
        beat.stopped.set()
    recorded = submissions.finish(sessions, submission_id, token, score=leaderboard_score(result),
                                  log=_log(output, show_logs))
    if not recorded:
        log(f"submission {submission_id}: the lease went to another worker; this worker's score is discarded")
    return recorded


def _log(output: io.StringIO, show: bool) -> str:
    return output.getvalue()[-LOG_LIMIT:] if show else ""


def run_worker(root: str | Path, *, once: bool = False, poll_s: float = 2.0, name: str = "", log=print) -> int:
    """Scores submissions until stopped (Ctrl-C / SIGTERM), or until the queue is empty with `once`; returns how
    many it scored."""
    root = PortalRoot(root)
    sessions = open_database(root.database_url)
    worker = name or f"{socket.gethostname()}-{os.getpid()}"
    log(f"worker {worker}: scoring submissions of {root.path} (lease {root.settings.lease_seconds:.0f} s)")
    done = 0
    while True:
        claimed = submissions.claim(sessions, worker, lease_s=root.settings.lease_seconds,
                                    max_attempts=root.settings.max_attempts)
        if claimed is None:
            if once:
                return done
            time.sleep(poll_s)
            continue
        submission_id, token = claimed
        log(f"worker {worker}: scoring submission {submission_id}")
        began = time.perf_counter()
        if score_submission(root, sessions, submission_id, token, log=log):
            done += 1
        log(f"worker {worker}: submission {submission_id} done in {time.perf_counter() - began:.1f} s")
