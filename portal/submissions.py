"""The submission queue, kept in the database so that nothing is lost when a process dies.

- `enqueue` checks the phase is open and the participant's limits (per day: the last 24 hours; per phase: in
  all), then adds a `queued` row.
- `claim` gives a worker the oldest queued submission, or one whose lease expired (its worker died), in one
  UPDATE that only one worker can win: the row changes only while it is still claimable, and the worker reads
  back which row carries its own lease token. A submission whose workers died `max_attempts` times is failed.
- `renew` extends the lease and records progress; `finish` and `fail` write the outcome only while the worker
  still holds the lease, so a worker presumed dead cannot overwrite the work of the one that took over: a
  submission is scored exactly once.
- `rescore_phase` queues every scored submission of a phase again after its protocol changed.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from rafmedia.core.errors import UserError
from rafmedia.portal.db import Phase, Submission, User

DAY_S = 24 * 3600


class LimitReached(UserError):
    """A submission limit; the web app answers 429."""


def counts(db: Session, user: User, phase: Phase, now: float | None = None) -> tuple[int, int]:
    """(submissions in the last 24 hours, submissions in all) of `user` to `phase`."""
    now = time.time() if now is None else now
    mine = select(func.count()).select_from(Submission).where(Submission.user_id == user.id,
                                                               Submission.phase_id == phase.id)
    return db.scalar(mine.where(Submission.created_at > now - DAY_S)) or 0, db.scalar(mine) or 0


def check_can_submit(db: Session, user: User, phase: Phase, now: float | None = None) -> None:
    now = time.time() if now is None else now
    if phase.frozen:
        raise LimitReached(f"phase '{phase.name}' is frozen by its organisers: no submission is accepted")
    if not phase.is_open(now):
        raise LimitReached(f"phase '{phase.name}' is not open now (it opens and closes at the times on the "
                           "challenge page)")
    today, total = counts(db, user, phase, now)
    if phase.daily_limit and today >= phase.daily_limit:
        raise LimitReached(f"you reached the limit of {phase.daily_limit} submissions per day to phase "
                           f"'{phase.name}'; the oldest of today's counts no more 24 hours after it was made")
    if phase.total_limit and total >= phase.total_limit:
        raise LimitReached(f"you reached the limit of {phase.total_limit} submissions to phase '{phase.name}'")


def enqueue(db: Session, user: User, phase: Phase, *, name: str, folder: str, architecture: str,
            public_id: str) -> Submission:
    check_can_submit(db, user, phase)
    submission = Submission(public_id=public_id, user_id=user.id, phase_id=phase.id, name=name[:100],
                            architecture=architecture, folder=folder, status="queued",
                            protocol_version=phase.protocol_version)
    db.add(submission)
    db.flush()
    return submission


def claim(sessions: sessionmaker, worker: str, *, lease_s: float, max_attempts: int) -> tuple[int, str] | None:
    """(id, lease token) of the submission this worker now holds (status running, lease for `lease_s`), or None."""
    with sessions.begin() as db:
        now = time.time()
        db.execute(update(Submission).where(Submission.status == "running", Submission.lease_expires < now,
                                            Submission.attempts >= max_attempts)
                   .values(status="failed", finished_at=now, lease_owner="",
                           reason=f"scoring stopped {max_attempts} times without finishing (the worker was "
                                  "killed or ran out of memory); contact the organisers"))
    for _ in range(5):  # another worker may win the same row: try the next one
        with sessions.begin() as db:
            now = time.time()
            dead = or_(Submission.status == "queued",
                       (Submission.status == "running") & (Submission.lease_expires < now))
            candidate = db.scalar(select(Submission.id).where(dead).order_by(Submission.id).limit(1))
            if candidate is None:
                return None
            token = f"{worker}:{uuid.uuid4().hex[:8]}"
            won = db.execute(update(Submission).where(Submission.id == candidate, dead)
                             .values(status="running", lease_owner=token, lease_expires=now + lease_s,
                                     started_at=func.coalesce(Submission.started_at, now),
                                     attempts=Submission.attempts + 1, stage="claimed")).rowcount
        if won == 1:
            return candidate, token
    return None


def _mine(submission_id: int, token: str):
    return (Submission.id == submission_id) & (Submission.lease_owner == token) & (Submission.status == "running")


def renew(sessions: sessionmaker, submission_id: int, token: str, *, lease_s: float, stage: str | None = None,
          progress: float | None = None) -> bool:
    """Extends the lease (and records progress); False when the lease was lost to another worker."""
    values: dict[str, Any] = {"lease_expires": time.time() + lease_s}
    if stage is not None:
        values["stage"] = stage[:64]
    if progress is not None:
        values["progress"] = float(progress)
    with sessions.begin() as db:
        return db.execute(update(Submission).where(_mine(submission_id, token)).values(**values)).rowcount == 1


def finish(sessions: sessionmaker, submission_id: int, token: str, *, score: dict[str, Any], log: str) -> bool:
    """Records the score; False (and nothing written) when this worker no longer holds the lease."""
    with sessions.begin() as db:
        return db.execute(update(Submission).where(_mine(submission_id, token)).values(
            status="scored", score_json=json.dumps(score), log=log, progress=1.0, stage="scored",
            finished_at=time.time(), lease_owner="", reason="")).rowcount == 1


def fail(sessions: sessionmaker, submission_id: int, token: str, *, reason: str, log: str) -> bool:
    with sessions.begin() as db:
        return db.execute(update(Submission).where(_mine(submission_id, token)).values(
            status="failed", reason=reason[:2000], log=log, stage="failed", finished_at=time.time(),
            lease_owner="")).rowcount == 1


def rescore_phase(db: Session, phase: Phase) -> int:
    """Raises the phase's protocol version and queues its scored submissions again; returns how many."""
    phase.protocol_version += 1
    return db.execute(update(Submission).where(Submission.phase_id == phase.id, Submission.status == "scored")
                      .values(status="queued", stage="queued for re-scoring", progress=0.0, attempts=0,
                              protocol_version=phase.protocol_version)).rowcount
