"""The queue with real processes: a worker killed with kill -9 mid-scoring is detected by its expired lease and the
submission is finished by another worker from the first one's embedding cache, scored exactly once; a worker that
lost its lease cannot overwrite the score; re-scoring after a protocol change queues every scored submission."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import yaml

from rafmedia.portal import accounts, submissions
from rafmedia.portal.db import Challenge, Phase, Submission, open_database
from rafmedia.portal.settings import PortalRoot
from tests.portal.conftest import RAF, run_worker

LEASE_S = 3.0


def batches(cache: Path) -> list[list]:
    """The keys of every finished batch of an embedding cache (one list of [subject, alteration, ...] per batch)."""
    found = []
    for meta in cache.glob("*/*/*/zarr.json"):
        if ".staging" not in meta.parts:
            found.append(json.loads(meta.read_text()).get("attributes", {}).get("keys", []))
    return found


def test_a_worker_killed_mid_scoring_is_resumed_by_another_and_scored_once(site):
    root = PortalRoot(site.root)
    settings = yaml.safe_load((site.root / "portal.yaml").read_text())
    (site.root / "portal.yaml").write_text(yaml.safe_dump({**settings, "lease_seconds": LEASE_S}))
    response = site.upload(site.new_participant("dave"), "random1", name="resume me")
    assert response.status_code == 201, response.text
    public_id = response.json()["id"]
    sessions = open_database(root.database_url)
    with sessions() as db:
        submission = db.query(Submission).filter_by(public_id=public_id).one()
        cache = root.submissions / submission.folder / "work" / "embeddings.zarr"
    first = subprocess.Popen([str(RAF), "portal", "worker", str(site.root), "--poll", "0.2"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not batches(cache):  # the clean embeddings are written: the worker is mid-scoring
            assert time.monotonic() < deadline and first.poll() is None, "the first worker never embedded"
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
    with sessions() as db:
        killed = db.query(Submission).filter_by(public_id=public_id).one()
        assert killed.status == "running" and killed.attempts == 1 and killed.lease_owner
    written_by_first = batches(cache)
    time.sleep(LEASE_S + 0.5)  # the lease of the dead worker expires
    second = run_worker(site.root)
    assert second.returncode == 0, second.stderr[-3000:]
    with sessions() as db:
        done = db.query(Submission).filter_by(public_id=public_id).one()
        assert done.status == "scored" and done.attempts == 2, (done.status, done.reason)
    clean = [keys for keys in batches(cache) if keys and keys[0][1] == "clean"]
    assert len(clean) == 1 and clean[0] in written_by_first  # the second worker re-embedded nothing clean
    with site.client("org") as client:
        rows = client.get("/api/challenges/synth-raf/leaderboard", params={"phase": "final", "all": 1}).json()["rows"]
    assert [row["name"] for row in rows].count("resume me") == 1


def one_queued_submission(tmp_path: Path):
    """A database (no files) holding one challenge, one phase and one queued submission; its session factory."""
    sessions = open_database(f"sqlite:///{tmp_path / 'q.db'}")
    with sessions.begin() as db:
        user = accounts.add_user(db, "ann", "long enough password")
        challenge = Challenge(slug="c1", title="c1")
        db.add(challenge)
        db.flush()
        phase = Phase(challenge_id=challenge.id, name="final", split="hidden_test")
        db.add(phase)
        db.flush()
        submissions.enqueue(db, user, phase, name="x", folder="f", architecture="cnn3d_small", public_id="p1")
    return sessions


def test_a_worker_that_lost_its_lease_cannot_record_a_score(tmp_path):
    sessions = one_queued_submission(tmp_path)
    first = submissions.claim(sessions, "w1", lease_s=0.2, max_attempts=3)
    assert first is not None and submissions.claim(sessions, "w2", lease_s=0.2, max_attempts=3) is None
    time.sleep(0.3)
    second = submissions.claim(sessions, "w2", lease_s=60, max_attempts=3)
    assert second is not None and second[0] == first[0] and second[1] != first[1]
    assert not submissions.renew(sessions, first[0], first[1], lease_s=60)
    assert not submissions.finish(sessions, first[0], first[1], score={"index": 1.0}, log="")
    assert submissions.finish(sessions, second[0], second[1], score={"index": 0.5}, log="")
    with sessions() as db:
        row = db.get(Submission, first[0])
        assert row.status == "scored" and row.score["index"] == 0.5 and row.attempts == 2
        assert submissions.rescore_phase(db, row.phase) == 1
        db.commit()
        assert db.get(Submission, first[0]).status == "queued"


def test_a_submission_whose_workers_keep_dying_fails_with_a_reason(tmp_path):
    sessions = one_queued_submission(tmp_path)
    for _ in range(2):
        assert submissions.claim(sessions, "w", lease_s=0.05, max_attempts=2) is not None
        time.sleep(0.1)
    assert submissions.claim(sessions, "w", lease_s=0.05, max_attempts=2) is None
    with sessions() as db:
        row = db.query(Submission).one()
        assert row.status == "failed" and "stopped 2 times" in row.reason


def test_a_protocol_change_rescores_every_submission_from_the_cached_embeddings(site):
    root = PortalRoot(site.root)
    with open_database(root.database_url).begin() as db:  # other modules' unscored uploads are not this test's
        db.query(Submission).filter(Submission.status == "queued").delete()  # subject: scoring them costs minutes
    with site.client("org") as client:  # organisers see the final phase's private board
        before = client.get("/api/challenges/synth-raf/leaderboard", params={"phase": "final", "all": 1}).json()
    assert before["rows"], "no scored submission to re-score"
    caches = list(root.submissions.glob("*/work/embeddings.zarr"))
    clean_before = sum(1 for cache in caches for keys in batches(cache) if keys and keys[0][1] == "clean")
    with site.client("org") as org:
        changed = org.post("/api/challenges/synth-raf/protocol", json={"bootstrap_resamples": 120})
        assert changed.status_code == 200, changed.text
        assert changed.json()["queued"] >= len(before["rows"])
        refused = org.post("/api/challenges/synth-raf/protocol", json={"seeds": "zero"})
        assert refused.status_code == 400 and "seeds" in refused.json()["error"]
    with site.client("org") as client:
        assert client.get("/api/challenges/synth-raf/leaderboard", params={"phase": "final"}).json()["rows"] == []
    done = run_worker(site.root)
    assert done.returncode == 0, done.stderr[-3000:]
    with site.client("org") as client:
        after = client.get("/api/challenges/synth-raf/leaderboard", params={"phase": "final", "all": 1}).json()
    assert after["protocol_version"] == before["protocol_version"] + 1
    assert sorted(r["name"] for r in after["rows"]) == sorted(r["name"] for r in before["rows"])
    clean_after = sum(1 for cache in caches for keys in batches(cache) if keys and keys[0][1] == "clean")
    assert clean_after == clean_before  # re-scoring embedded nothing clean again
