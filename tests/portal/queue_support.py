"""What a queue test's worker process runs (kept apart from the test files so that a spawned process imports only
the queue and SQLAlchemy, not torch): claim, hold the lease a moment, record a score naming the worker, until the
queue is empty."""
from __future__ import annotations

import time

from rafmedia.portal import submissions
from rafmedia.portal.db import open_database


def claim_until_empty(url: str, worker: str, start, results, hold_s: float = 0.01) -> None:
    """Waits at `start` (a Barrier) with the other workers, then claims and finishes submissions of the database at
    `url` until claim() finds none; puts (worker, [claimed ids in order]) on `results` even when it fails (an error
    ends the process with a non-zero exit code and its traceback on stderr)."""
    claimed = []
    sessions = open_database(url, migrate=False)
    try:
        start.wait(timeout=120)
        while (held := submissions.claim(sessions, worker, lease_s=60, max_attempts=3)) is not None:
            submission_id, token = held
            claimed.append(submission_id)
            time.sleep(hold_s)  # "scoring": the others must claim other rows meanwhile
            if not submissions.finish(sessions, submission_id, token, score={"worker": worker}, log=""):
                raise RuntimeError(f"{worker} lost the lease of submission {submission_id}")
    finally:
        sessions.kw["bind"].dispose()
        results.put((worker, claimed))
