"""The submission queue on SQLite and on a real PostgreSQL server (tests/portal/postgres.py): claims go oldest first
and once each, only the lease holder renews and records an outcome, an expired lease passes to another worker,
the submission limits, several worker processes claiming from one queue at once, PostgreSQL's row locks, and a
database restart under a worker and under the web server (end to end, with `raf portal` processes)."""
from __future__ import annotations

import json
import math
import multiprocessing
import subprocess
import threading
import time

import httpx
import pytest
import yaml
from sqlalchemy import func, select, update
from sqlalchemy.exc import OperationalError

from rafmedia.core.errors import UserError
from rafmedia.engine.distributed import free_port
from rafmedia.launch.cli import main as raf
from rafmedia.portal import accounts, submissions
from rafmedia.portal.client import submit, wait_until_answers
from rafmedia.portal.db import Challenge, Phase, Submission, User, open_database
from rafmedia.portal.scoring import Heartbeat, run_worker
from rafmedia.portal.service import manage_user
from rafmedia.portal.settings import PortalRoot
from rafmedia.portal.submissions import DAY_S, LimitReached
from tests.portal.conftest import FAST_PROTOCOL, PASSWORD, RAF
from tests.portal.postgres import backend_url, shared_server
from tests.portal.queue_support import claim_until_empty

BACKENDS = ["sqlite", "postgresql"]
# the end-to-end test is about the database, not the scores: FAST_PROTOCOL with one split seed, one probe strength,
# one target and one attribute halves its scoring time
PG_PROTOCOL = {**FAST_PROTOCOL, "seeds": [0], "c_grid": [1.0], "targets": ["disease"], "group_by": ["sex"],
               "intersections": False}


@pytest.fixture(params=BACKENDS)
def url(request, tmp_path) -> str:
    """A fresh, empty database of each backend (migrated by the first open_database)."""
    return backend_url(request.param, tmp_path)


def new_phase(sessions, **options) -> tuple[int, int]:
    """(user id, phase id): a participant `ann` and a phase `final` of a new challenge, with `options` set."""
    with sessions.begin() as db:
        user = accounts.add_user(db, "ann", "long enough password")
        challenge = Challenge(slug="c1", title="c1")
        db.add(challenge)
        db.flush()
        phase = Phase(challenge_id=challenge.id, name="final", split="hidden_test", **options)
        db.add(phase)
        db.flush()
        return user.id, phase.id


def queue(sessions, count: int) -> list[int]:
    """Ids of `count` submissions queued by `ann` through `enqueue` (its limits lifted), oldest first."""
    user_id, phase_id = new_phase(sessions, daily_limit=0, total_limit=0)
    with sessions.begin() as db:
        user, phase = db.get(User, user_id), db.get(Phase, phase_id)
        return [submissions.enqueue(db, user, phase, name=f"s{index}", folder=f"f{index}",
                                    architecture="cnn3d_small", public_id=f"p{index}").id for index in range(count)]


def row(sessions, submission_id: int) -> Submission:
    with sessions() as db:
        return db.get(Submission, submission_id)


def test_claims_go_oldest_first_each_once_with_a_lease(url):
    sessions = open_database(url)
    ids = queue(sessions, 3)
    before = time.time()
    held = [submissions.claim(sessions, f"w{index}", lease_s=60, max_attempts=3) for index in range(3)]
    after = time.time()
    assert [submission_id for submission_id, _ in held] == ids
    assert len({token for _, token in held}) == 3 and all(token.startswith(f"w{i}:") for i, (_, token) in
                                                          enumerate(held))
    assert submissions.claim(sessions, "w3", lease_s=60, max_attempts=3) is None
    for submission_id, token in held:
        claimed = row(sessions, submission_id)
        assert (claimed.status, claimed.lease_owner, claimed.attempts, claimed.stage) == ("running", token, 1,
                                                                                          "claimed")
        assert before + 60 <= claimed.lease_expires <= after + 60 and before <= claimed.started_at <= after


def test_only_the_lease_holder_renews_and_records_an_outcome(url):
    sessions = open_database(url)
    first, second = queue(sessions, 2)
    (_, token_a), (_, token_b) = (submissions.claim(sessions, name, lease_s=60, max_attempts=3) for name in "ab")
    before = time.time()
    assert submissions.renew(sessions, first, token_a, lease_s=120, stage="embedding", progress=0.4)
    renewed = row(sessions, first)
    assert renewed.lease_expires >= before + 120 and (renewed.stage, renewed.progress) == ("embedding", 0.4)
    assert not submissions.renew(sessions, first, token_b, lease_s=999)  # another worker's token
    assert not submissions.finish(sessions, first, token_b, score={"index": 0.1}, log="")
    assert row(sessions, first).lease_expires == renewed.lease_expires
    assert submissions.finish(sessions, first, token_a, score={"index": 0.7}, log="scored by a")
    scored = row(sessions, first)
    assert (scored.status, scored.score, scored.log, scored.progress, scored.lease_owner) == (
        "scored", {"index": 0.7}, "scored by a", 1.0, "")
    assert not submissions.finish(sessions, first, token_a, score={"index": 0.9}, log="")  # never scored twice
    assert not submissions.renew(sessions, first, token_a, lease_s=60)
    assert row(sessions, first).score == {"index": 0.7}
    assert submissions.fail(sessions, second, token_b, reason="x" * 3000, log="L")
    failed = row(sessions, second)
    assert (failed.status, len(failed.reason), failed.stage, failed.log) == ("failed", 2000, "failed", "L")
    assert not submissions.fail(sessions, second, token_b, reason="again", log="")


def test_an_expired_lease_passes_to_another_worker_until_the_attempts_run_out(url):
    sessions = open_database(url)
    first, second = queue(sessions, 2)
    old = submissions.claim(sessions, "w1", lease_s=0.3, max_attempts=2)
    assert old[0] == first
    assert submissions.claim(sessions, "w2", lease_s=60, max_attempts=2)[0] == second  # first still leased
    time.sleep(0.4)
    new = submissions.claim(sessions, "w2", lease_s=0.3, max_attempts=2)
    assert new[0] == first and new[1] != old[1] and row(sessions, first).attempts == 2
    assert not submissions.renew(sessions, first, old[1], lease_s=60)
    assert not submissions.finish(sessions, first, old[1], score={"index": 1.0}, log="")
    time.sleep(0.4)  # the second holder dies too: two attempts, no third
    assert submissions.claim(sessions, "w3", lease_s=60, max_attempts=2) is None
    gave_up = row(sessions, first)
    assert gave_up.status == "failed" and "stopped 2 times" in gave_up.reason and gave_up.lease_owner == ""
    assert row(sessions, second).status == "running"  # its lease is alive


def test_limits_per_day_in_all_and_the_phase_window(url):
    sessions = open_database(url)
    user_id, phase_id = new_phase(sessions, daily_limit=2, total_limit=3)
    with sessions.begin() as db:
        ann, phase = db.get(User, user_id), db.get(Phase, phase_id)
        bob = accounts.add_user(db, "bob", "long enough password")
        for index in range(2):
            submissions.enqueue(db, ann, phase, name="x", folder=f"f{index}", architecture="a", public_id=f"p{index}")
        with pytest.raises(LimitReached, match="limit of 2 submissions per day"):
            submissions.enqueue(db, ann, phase, name="x", folder="f9", architecture="a", public_id="p9")
        submissions.check_can_submit(db, bob, phase)  # limits are per participant
        tomorrow = time.time() + DAY_S + 1
        assert submissions.counts(db, ann, phase, now=tomorrow) == (0, 2)
        submissions.check_can_submit(db, ann, phase, now=tomorrow)  # the day's window has moved on
        db.add(Submission(public_id="p3", user_id=ann.id, phase_id=phase.id, name="x", folder="f3",
                          created_at=tomorrow - 1))
        db.flush()
        assert submissions.counts(db, ann, phase, now=tomorrow) == (1, 3)
        with pytest.raises(LimitReached, match="limit of 3 submissions to phase 'final'"):
            submissions.check_can_submit(db, ann, phase, now=tomorrow)
        phase.total_limit, phase.closes_at = 0, time.time() - 1
        with pytest.raises(LimitReached, match="not open now"):
            submissions.check_can_submit(db, bob, phase)
        phase.closes_at, phase.frozen = None, True
        with pytest.raises(LimitReached, match="frozen"):
            submissions.check_can_submit(db, bob, phase)
    with sessions() as db:
        assert db.scalar(select(func.count()).select_from(Submission)) == 3  # the refused one left no row


def test_worker_processes_claim_each_of_40_submissions_exactly_once(url):
    sessions = open_database(url)
    ids = queue(sessions, 40)
    # fresh processes (not forks of this one: each opens its own connections, as on another host), started from a
    # fork server that has imported the queue once
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["tests.portal.queue_support"])
    start, results = context.Barrier(4), context.Queue()
    workers = [context.Process(target=claim_until_empty, args=(url, f"w{index}", start, results))
               for index in range(4)]
    for worker in workers:
        worker.start()
    reports = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
    assert [worker.exitcode for worker in workers] == [0] * 4  # else a traceback above says why
    claimed = [submission_id for _, mine in reports for submission_id in mine]
    assert sorted(claimed) == ids  # every submission claimed, none twice
    assert sum(1 for _, mine in reports if mine) >= 2  # the claims really were concurrent
    by_worker = {submission_id: worker for worker, mine in reports for submission_id in mine}
    with sessions() as db:
        rows = db.scalars(select(Submission).order_by(Submission.id)).all()
    assert [(r.status, r.attempts, r.score["worker"]) for r in rows] == [("scored", 1, by_worker[r.id]) for r in rows]


def test_postgresql_claims_skip_a_row_another_worker_has_locked(tmp_path):
    sessions = open_database(backend_url("postgresql", tmp_path))
    first, second = queue(sessions, 2)
    locker = sessions()
    locker.execute(select(Submission).where(Submission.id == first).with_for_update())  # a worker mid-claim
    answer = []
    claimer = threading.Thread(target=lambda: answer.append(submissions.claim(sessions, "w2", lease_s=60,
                                                                              max_attempts=3)))
    claimer.start()
    claimer.join(timeout=20)
    waited = claimer.is_alive()  # without SKIP LOCKED the claim waits for the lock
    locker.rollback()
    claimer.join()
    locker.close()
    assert not waited and answer[0][0] == second
    assert row(sessions, first).status == "queued"


def test_a_worker_keeps_its_lease_across_a_postgresql_restart(tmp_path, capfd):
    server = shared_server()
    sessions = open_database(server.new_database())
    first, second = queue(sessions, 2)
    submission_id, token = submissions.claim(sessions, "w1", lease_s=60, max_attempts=3)
    beat = Heartbeat(sessions, submission_id, token, lease_s=1.5, cache=tmp_path / "no-cache", expected=1)
    server.stop()
    try:
        with pytest.raises(OperationalError):  # not None: a worker must not take an unreachable queue for empty
            submissions.claim(sessions, "w1", lease_s=60, max_attempts=3)
        assert beat.renew() and not beat.lost  # retried for a third of the lease, then left to the next beat
    finally:
        server.start()
    assert "the database is unreachable" in capfd.readouterr().err
    assert submissions.claim(sessions, "w1", lease_s=60, max_attempts=3)[0] == second  # the same sessions reconnect
    assert row(sessions, first).stage == "claimed"
    assert beat.renew() and row(sessions, first).stage == beat.stage  # the renewal was written
    with sessions.begin() as db:  # another worker takes it over: now the lease is lost
        db.execute(update(Submission).where(Submission.id == first).values(lease_owner="w2:other"))
    assert not beat.renew() and beat.lost


def test_a_worker_waits_for_an_unreachable_database_instead_of_stopping(tmp_path):
    server = shared_server()
    root = PortalRoot.create(tmp_path / "root", database_url=server.new_database())
    lines = []

    def log(line: str) -> None:  # the worker's first line comes after it opened the database, before it claims
        lines.append(line)
        if len(lines) == 1:
            server.stop()
        elif "unreachable" in line:
            server.start()

    try:
        assert run_worker(root.path, once=True, log=log) == 0  # not an exception, not an empty queue while down
        assert len(lines) == 2 and "the database is unreachable while claiming a submission" in lines[1]
        lines.clear()
        with pytest.raises(UserError, match="was unreachable for 1 s .* database_url in portal.yaml"):
            run_worker(root.path, once=True, log=lambda line: lines.append(line) or server.stop(), patience_s=1.2)
        assert [line.split("trying again in ")[-1] for line in lines[1:]] == ["0.5 s", "1.0 s"]  # then it gave up
    finally:
        shared_server()  # started again if a failure left it stopped


def wait_for(check, what: str, timeout_s: float = 180.0):
    """Polls `check()` every 0.1 s until it returns something true; returns that."""
    deadline = time.monotonic() + timeout_s
    while not (found := check()):
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s:.0f} s"
        time.sleep(0.1)
    return found


def test_a_postgresql_portal_rides_out_database_restarts_under_its_server_and_worker(site, tmp_path):
    server = shared_server()
    root, url = tmp_path / "root", server.new_database("portal")
    assert raf(["portal", "init", str(root), "--database-url", url]) == 0
    settings = yaml.safe_load((root / "portal.yaml").read_text())
    (root / "portal.yaml").write_text(yaml.safe_dump({**settings, "lease_seconds": 3.0}))  # a beat every second
    port, server_log = free_port(), tmp_path / "server.log"
    base = f"http://127.0.0.1:{port}"
    with server_log.open("w") as out:  # the server starts while the challenge is published
        web = subprocess.Popen([str(RAF), "portal", "serve", str(root), "--port", str(port)], stdout=out,
                               stderr=subprocess.STDOUT)
    api, worker = httpx.Client(base_url=base, timeout=60), None
    try:
        protocol = [f"--protocol={key}={json.dumps(value)}" for key, value in PG_PROTOCOL.items()]
        assert raf(["portal", "add-challenge", str(root), str(site.build), "--name", "pg-raf", "--quiet",
                    *protocol]) == 0
        manage_user(root, "add", "pat", password=PASSWORD)
        token = manage_user(root, "token", "pat")
        api.headers["Authorization"] = f"Bearer {token}"
        wait_until_answers(f"{base}/api/challenges", web, server_log, timeout_s=120)
        public_id = submit(base, token, "pg-raf", site.encoders["random0"], phase="final", name="across restarts",
                           wait=False, progress=False, log=lambda *_: None)["id"]

        def state() -> dict:
            response = api.get(f"/api/submissions/{public_id}")
            assert response.status_code == 200, response.text
            return response.json()

        server.restart()  # under the idle web server: its pooled connections are dead now
        assert state()["status"] == "queued"  # the very next request reconnects; the server was not restarted
        worker_log = tmp_path / "worker.log"
        with worker_log.open("w") as out:
            worker = subprocess.Popen([str(RAF), "portal", "worker", str(root), "--once", "--poll", "0.2"],
                                      stdout=out, stderr=subprocess.STDOUT)
        wait_for(lambda: state()["stage"] == "embedding and probing", "scoring")
        server.stop()  # under the worker, mid-scoring, and the web server
        try:
            refused = api.get(f"/api/submissions/{public_id}")
            assert refused.status_code == 503 and "database" in refused.json()["error"], refused.text
            assert web.poll() is None  # an error now, not a dead server
            time.sleep(1.5)  # the worker's heartbeat (every second) meets the stopped database
        finally:
            server.start()
        assert worker.wait(timeout=180) == 0, worker_log.read_text()[-3000:]
        assert "the database is unreachable" in worker_log.read_text()  # logged, then retried
        assert state()["status"] == "scored"
        board = api.get("/api/challenges/pg-raf/leaderboard", params={"phase": "final", "all": 1}).json()
        assert [entry["name"] for entry in board["rows"]] == ["across restarts"]
        with open_database(url, migrate=False)() as db:
            recorded = db.scalars(select(Submission)).one()
        assert (recorded.status, recorded.attempts, recorded.lease_owner) == ("scored", 1, "")  # claimed, scored once
        assert math.isfinite(recorded.score["index"])
    finally:
        api.close()
        if worker is not None and worker.poll() is None:
            worker.kill()
        web.terminate()
        web.wait(timeout=30)
