"""The submission queue, kept in the database so that nothing is lost when a process dies.

- `enqueue` checks the phase is open and the participant's limits (per day: the last 24 hours; per phase: in
  all; per team and day: submissions by any member of the team, a user without a team counting alone), then adds
  a `queued` row.
- `claim` gives a worker the oldest queued submission, or one whose lease expired (its worker died), in one
  UPDATE that only one worker can win: the row changes only while it is still claimable, and the worker reads
  back which row carries its own lease token. A submission whose workers died `max_attempts` times is failed.
- `renew` extends the lease and records progress; `finish` and `fail` write the outcome only while the worker
  still holds the lease, so a worker presumed dead cannot overwrite the work of the one that took over: a
  submission is scored exactly once. `finish` also stores what participants may see of the score
  (`leaderboard.release`: rounded, and with the phase's Ladder only when it beats the team's best released score).
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
from rafmedia.portal import leaderboard
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
    if phase.team_daily_limit:
        team_today = db.scalar(select(func.count()).select_from(Submission).where(
            Submission.user_id.in_(team_members(db, user)), Submission.phase_id == phase.id,
            Submission.created_at > now - DAY_S)) or 0
        if team_today >= phase.team_daily_limit:
            who = f"your team '{user.team}'" if user.team else "you (in no team, you count as a team of one)"
            raise LimitReached(f"{who} reached the limit of {phase.team_daily_limit} submissions per team and day "
                               f"to phase '{phase.name}', counting every member's; the oldest of today's counts no "
                               "more 24 hours after it was made")


def team_members(db: Session, user: User, *, lock: bool = False) -> list[int]:
    """Ids of the users of `user`'s team (only `user` when it has no team); `lock`: hold their rows until the
    transaction ends (PostgreSQL; SQLite has one writer at a time anyway)."""
    if not user.team:
        return [user.id]
    query = select(User.id).where(User.team == user.team).order_by(User.id)
    return list(db.scalars(query.with_for_update() if lock else query))


def enqueue(db: Session, user: User, phase: Phase, *, name: str, folder: str, architecture: str,
            public_id: str, runs_code: bool = False) -> Submission:
    check_can_submit(db, user, phase)
    submission = Submission(public_id=public_id, user_id=user.id, phase_id=phase.id, name=name[:100],
                            architecture=architecture[:64], runs_code=runs_code, folder=folder, status="queued",
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
            # PostgreSQL locks the candidate row until this transaction ends and other workers' SELECTs skip it, so
            # several workers claim different rows at once; SQLite renders no FOR UPDATE (it has one writer at a
            # time) and relies on the conditional UPDATE below, which PostgreSQL keeps as a second check.
            candidate = db.scalar(select(Submission.id).where(dead).order_by(Submission.id).limit(1)
                                  .with_for_update(skip_locked=True))
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
    """Records the score and what participants may see of it (`released`, in the same transaction); False (and
    nothing written) when this worker no longer holds the lease."""
    with sessions.begin() as db:
        if db.execute(update(Submission).where(_mine(submission_id, token)).values(
                status="scored", score_json=json.dumps(score), log=log, progress=1.0, stage="scored",
                finished_at=time.time(), lease_owner="", reason="")).rowcount != 1:
            return False
        shown = released(db, db.get(Submission, submission_id), score)
        db.execute(update(Submission).where(Submission.id == submission_id).values(released_json=json.dumps(shown)))
        return True


def released(db: Session, submission: Submission, score: dict[str, Any]) -> dict[str, Any]:
    """`leaderboard.release` of a new score, against what was released of the earlier scores of the submitter's
    team in the same phase and protocol version. The team's user rows are locked first, so that two scores of one
    team recorded at the same time are released one after the other, never both against the same best."""
    user, phase = submission.user, submission.phase
    if not phase.ladder:  # nothing to compare with
        return leaderboard.release(score, previous=[], ladder=False)
    earlier = db.scalars(select(Submission.released_json).where(
        Submission.user_id.in_(team_members(db, user, lock=True)), Submission.phase_id == phase.id,
        Submission.protocol_version == submission.protocol_version, Submission.status == "scored",
        Submission.id != submission.id, Submission.released_json != ""))
    return leaderboard.release(score, previous=[json.loads(text) for text in earlier], ladder=phase.ladder,
                               step=phase.ladder_step, team=user.team)


def fail(sessions: sessionmaker, submission_id: int, token: str, *, reason: str, log: str) -> bool:
    with sessions.begin() as db:
        return db.execute(update(Submission).where(_mine(submission_id, token)).values(
            status="failed", reason=reason[:2000], log=log, stage="failed", finished_at=time.time(),
            lease_owner="")).rowcount == 1


def rescore_phase(db: Session, phase: Phase) -> int:
    """Raises the phase's protocol version and queues its scored submissions again; returns how many. What was
    released of their old scores is cleared: each new score is released anew (the Ladder replaying in the order
    they are scored), and nothing of the old ones stays visible meanwhile."""
    phase.protocol_version += 1
    return db.execute(update(Submission).where(Submission.phase_id == phase.id, Submission.status == "scored")
                      .values(status="queued", stage="queued for re-scoring", progress=0.0, attempts=0,
                              protocol_version=phase.protocol_version, released_json="")).rowcount
