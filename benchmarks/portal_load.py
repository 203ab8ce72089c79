"""Benchmark portal under load: 200 simulated participants browsing, downloading and submitting for a fixed time,
with a worker scoring meanwhile; then every accepted submission is followed until it is scored or failed.

Set-up: the demo portal of benchmarks/portal.py (its `prepare`: `raf portal demo --out WORK --subjects N
--exit-when-scored --quiet`, or --reuse of a WORK that holds WORK/portal/portal.yaml), P new participants with an API
token each (added in one database session; fresh names every run, so every participant has its daily limits
untouched), then `raf portal serve WORK/portal` and one `raf portal worker WORK/portal` (2 s queue poll), each in
its own process, on 127.0.0.1.

Load: P asyncio tasks in this process, each with its own httpx.AsyncClient of one keep-alive connection (one shared
pool costs the load generator ~10x more CPU per request, see benchmarks/portal.py). Each participant repeats
until the time is up: think for a seeded random 0.5-3 s, then one action drawn with seeded weights:
- browse (60%): one page: the portal's front page, the challenge page, the leaderboard page or JSON of the final
  phase, the challenge JSON, or its own submissions (JSON, with its token);
- download (32%): a random shard of the public splits in two range requests (the first half, then the rest, as a
  resumed download does); the joined bytes must have the SHA-256 the portal publishes, else it counts as an error;
- submit (8%, once per participant, at most --max-submissions in all, to the sanity phase whose daily limit is 10):
  the demo's pretrained or random-init encoder as a resumable upload (POST /api/uploads, PATCH chunks of 256 KB,
  then POST .../submissions with upload=ID and the card).
One more client sends a large file (--large-mb, random bytes) as a resumable upload in 8 MB chunks, once alone
before the load and once during it, and cancels it when done (it is not an encoder), to show whether the server
holds a file in memory. The server's and
the worker's resident memory (RSS, psutil) are sampled every 0.5 s from the start of the load to the end of the
drain.
Reported: requests/s, p50 / p95 / p99 latency per kind of request and in all, errors (non-2xx answers, failed
requests, checksum mismatches; must be 0), the accepted submissions and how each ended after the worker drained
the queue (scored, failed with its reason, or still open at --drain-timeout), how many scoring attempts each
took (from the database: 1 each means none was scored twice), and the RSS figures.

Run:  python benchmarks/portal_load.py                  # 160-subject demo, 200 participants, 60 s
      python benchmarks/portal_load.py --quick          # 96-subject demo, 200 participants, 15 s
      python benchmarks/portal_load.py --work runs/bench-portal --reuse   # keep / reuse the demo portal
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import hashlib
import importlib.util
import os
import platform
import random
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from sqlalchemy import select

try:
    import psutil
except ImportError:  # optional: /proc/PID/status is read instead
    psutil = None

from rafmedia.portal import accounts
from rafmedia.portal.client import wait_until_answers
from rafmedia.portal.db import Submission, User, open_database
from rafmedia.portal.settings import PortalRoot

_spec = importlib.util.spec_from_file_location("portal_benchmark", Path(__file__).with_name("portal.py"))
portal_benchmark = importlib.util.module_from_spec(_spec)  # benchmarks/portal.py: the demo set-up and processes
_spec.loader.exec_module(portal_benchmark)
CHALLENGE, RAF = portal_benchmark.CHALLENGE, portal_benchmark.RAF
free_port, prepare, start, stop = (portal_benchmark.free_port, portal_benchmark.prepare, portal_benchmark.start,
                                   portal_benchmark.stop)
cpu_seconds = portal_benchmark.cpu_seconds

PAGES = ["/", f"/challenges/{CHALLENGE}", f"/challenges/{CHALLENGE}/leaderboard?phase=final",
         f"/api/challenges/{CHALLENGE}/leaderboard?phase=final", f"/api/challenges/{CHALLENGE}", "/api/me/submissions"]
ACTIONS = {"browse": 0.60, "download": 0.32, "submit": 0.08}
CHUNK = 256 << 10
LARGE_CHUNK = 8 << 20
PASSWORD = "load-benchmark-password"


class Recorder:
    """Every request's kind, start time, latency and outcome; error kinds by name."""

    def __init__(self):
        self.rows: list[tuple[str, float, float, bool]] = []
        self.errors: Counter = Counter()

    async def call(self, session: httpx.AsyncClient, kind: str, method: str, url: str, *, expect=(200,),
                   **kwargs) -> httpx.Response | None:
        began = time.perf_counter()
        try:
            response = await session.request(method, url, **kwargs)
            ok = response.status_code in expect
            if not ok:
                self.errors[f"{kind}: {response.status_code} {response.text[:120]}"] += 1
        except httpx.HTTPError as error:
            response, ok = None, False
            self.errors[f"{kind}: {type(error).__name__}"] += 1
        self.rows.append((kind, began, time.perf_counter() - began, ok))
        return response if ok else None


def add_participants(root: Path, count: int, stamp: str) -> dict[str, str]:
    """`count` new participants with an API token each, in one database session: {name: token}. The first is
    added by `accounts.add_user`; the others share its argon2 password hash (they sign in with tokens only, and
    hashing 200 passwords would take minutes on a loaded 2-core box)."""
    sessions = open_database(PortalRoot(root).database_url)
    tokens = {}
    with sessions.begin() as db:
        first = accounts.add_user(db, f"load{stamp}-000", PASSWORD)
        users = [first] + [User(name=f"load{stamp}-{number:03d}", password_hash=first.password_hash,
                                role="participant") for number in range(1, count)]
        db.add_all(users[1:])
        db.flush()
        for user in users:
            tokens[user.name] = accounts.new_token(db, user, label="load benchmark")
    return tokens


async def upload(recorder: Recorder, session: httpx.AsyncClient, data: bytes, *, chunk: int, kind: str,
                 sha256: str = "") -> str | None:
    """A resumable upload of `data` (create, then chunks); returns its id, None when a request failed."""
    created = await recorder.call(session, f"{kind}: create", "POST", "/api/uploads", expect=(201,),
                                  json={"filename": "encoder.safetensors", "size": len(data),
                                        "sha256": sha256 or hashlib.sha256(data).hexdigest()})
    if created is None:
        return None
    upload_id, offset = created.json()["id"], 0
    while offset < len(data):
        piece = data[offset:offset + chunk]
        sent = await recorder.call(session, f"{kind}: chunk", "PATCH", f"/api/uploads/{upload_id}", content=piece,
                                   headers={"Upload-Offset": str(offset)})
        if sent is None:
            return None
        offset = sent.json()["offset"]
    return upload_id


class Participant:
    def __init__(self, name: str, token: str, url: str, rng: random.Random):
        self.name, self.rng = name, rng
        self.session = httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"},
                                         limits=httpx.Limits(max_connections=1, max_keepalive_connections=1,
                                                             keepalive_expiry=60), timeout=httpx.Timeout(120.0))
        self.submitted = False


async def run_participant(me: Participant, shared: dict[str, Any], recorder: Recorder, until: float) -> None:
    while True:
        await asyncio.sleep(me.rng.uniform(0.5, 3.0))
        if time.perf_counter() >= until:
            return
        action = me.rng.choices(list(ACTIONS), weights=list(ACTIONS.values()))[0]
        if action == "submit" and (me.submitted or shared["submissions_left"] <= 0):
            action = "browse"
        if action == "browse":
            await recorder.call(me.session, "browse", "GET", me.rng.choice(PAGES))
        elif action == "download":
            await download(me, shared["downloads"], recorder)
        else:
            me.submitted, shared["submissions_left"] = True, shared["submissions_left"] - 1
            weights, card = me.rng.choice(shared["encoders"])
            upload_id = await upload(recorder, me.session, weights, chunk=CHUNK, kind="upload")
            if upload_id is not None:
                made = await recorder.call(me.session, "submission", "POST", f"/api/challenges/{CHALLENGE}/submissions",
                                           expect=(201,), data={"phase": "sanity", "name": f"load {me.name}",
                                                                "upload": upload_id},
                                           files={"card": ("encoder.card.json", card)})
                if made is not None:
                    shared["accepted"].append((me, made.json()["id"]))


async def download(me: Participant, files: list[dict[str, Any]], recorder: Recorder) -> None:
    """A shard in two range requests; the joined bytes are checked against the published SHA-256."""
    shard = me.rng.choice(files)
    half = shard["bytes"] // 2
    first = await recorder.call(me.session, "download (range)", "GET", shard["url"], expect=(206,),
                                headers={"Range": f"bytes=0-{half - 1}"})
    rest = await recorder.call(me.session, "download (range)", "GET", shard["url"], expect=(206,),
                               headers={"Range": f"bytes={half}-"})
    if first is not None and rest is not None and \
            hashlib.sha256(first.content + rest.content).hexdigest() != shard["sha256"]:
        recorder.errors["download: SHA-256 of the joined ranges differs from the published one"] += 1


async def large_upload(url: str, token: str, data: tuple[bytes, str], recorder: Recorder,
                       result: dict[str, Any]) -> None:
    """`data` = (bytes, their SHA-256) as a resumable upload in 8 MB chunks, then cancelled."""
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"},
                                 timeout=httpx.Timeout(600.0)) as session:
        began = time.perf_counter()
        upload_id = await upload(recorder, session, data[0], chunk=LARGE_CHUNK, kind="large upload", sha256=data[1])
        result["seconds"] = time.perf_counter() - began
        result["complete"] = upload_id is not None
        if upload_id is not None:
            await recorder.call(session, "large upload: cancel", "DELETE", f"/api/uploads/{upload_id}", expect=(204,))


def rss_bytes(pid: int) -> int:
    """Resident memory of a process: psutil where installed, else /proc/PID/status (Linux)."""
    if psutil is not None:
        return psutil.Process(pid).memory_info().rss
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) * 1024


class MemorySampler(threading.Thread):
    """RSS of some processes every `every_s` seconds, in a thread (the event loop may be busy)."""

    def __init__(self, pids: dict[str, int], every_s: float = 0.5):
        super().__init__(daemon=True)
        self.pids, self.every_s, self.stopped = pids, every_s, threading.Event()
        self.samples: dict[str, list[tuple[float, int]]] = {name: [] for name in pids}
        self.missed: dict[str, str] = {}

    def run(self) -> None:
        while not self.stopped.is_set():
            for name, pid in self.pids.items():
                try:
                    self.samples[name].append((time.perf_counter(), rss_bytes(pid)))
                except Exception as error:  # noqa: BLE001 - a process that ended: no sample, said once
                    self.missed[name] = repr(error)
            self.stopped.wait(self.every_s)


async def load(url: str, tokens: dict[str, str], shared: dict[str, Any], args, recorder: Recorder,
               large: dict[str, Any]) -> float:
    participants = [Participant(name, token, url, random.Random(f"{args.seed}:{name}"))
                    for name, token in tokens.items() if name != "large"]
    began = time.perf_counter()
    until = began + args.duration
    tasks = [run_participant(me, shared, recorder, until) for me in participants]
    if args.large_mb > 0:
        tasks.append(large_upload(url, tokens["large"], shared["large"], recorder, large))
    try:
        await asyncio.gather(*tasks)
    finally:
        for me in participants:
            await me.session.aclose()
    return time.perf_counter() - began


def drain(url: str, accepted: list[tuple[Participant, str]], tokens: dict[str, str], timeout_s: float
          ) -> dict[str, dict[str, Any]]:
    """Polls every accepted submission (with its owner's token) until it is scored or failed, or the time is up."""
    final: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=url, timeout=60) as client:
        while len(final) < len(accepted) and time.monotonic() < deadline:
            for me, submission in accepted:
                if submission in final:
                    continue
                state = client.get(f"/api/submissions/{submission}",
                                   headers={"Authorization": f"Bearer {tokens[me.name]}"}).json()
                if state["status"] in ("scored", "failed"):
                    final[submission] = state
            time.sleep(2.0)
    return final


def percentiles(latencies: list[float]) -> tuple[float, float, float]:
    ms = np.asarray(latencies) * 1e3
    return tuple(float(np.percentile(ms, q)) for q in (50, 95, 99))


def report(recorder: Recorder, elapsed: float, args, accepted, final, attempts, memory: MemorySampler, large,
           marks: dict[str, float]) -> dict[str, Any]:
    kinds = sorted({row[0] for row in recorder.rows})
    print(f"\n{len(recorder.rows)} requests in {elapsed:.1f} s ({args.participants} participants, {args.duration:g} s "
          f"of load, think time 0.5-3 s)")
    print("| kind | requests | req/s | p50 ms | p95 ms | p99 ms | errors |\n|---|---|---|---|---|---|---|")
    for kind in [*kinds, "all"]:
        rows = [row for row in recorder.rows if kind in ("all", row[0])]
        p50, p95, p99 = percentiles([row[2] for row in rows])
        print(f"| {kind} | {len(rows)} | {len(rows) / elapsed:.1f} | {p50:.0f} | {p95:.0f} | {p99:.0f} | "
              f"{sum(not row[3] for row in rows)} |")
    print("CPU over the load, in cores busy: " + ", ".join(f"{name} {cores:.2f}"
                                                          for name, cores in marks["cores"].items()))
    errors = sum(recorder.errors.values())
    print(f"errors: {errors}" + "".join(f"\n  {count} x {kind}" for kind, count in recorder.errors.most_common()))
    outcomes = Counter(state["status"] for state in final.values())
    reasons = Counter(state["reason"] for state in final.values() if state["status"] == "failed")
    open_ = len(accepted) - len(final)
    print(f"\naccepted submissions: {len(accepted)}; after the drain: {outcomes.get('scored', 0)} scored, "
          f"{outcomes.get('failed', 0)} failed, {open_} not finished within {args.drain_timeout:g} s (drain took "
          f"{marks['drained'] - marks['load_end']:.0f} s)")
    for reason, count in reasons.most_common():
        print(f"  failed x{count}: {reason}")
    print(f"scoring attempts per submission (database): {dict(sorted(Counter(attempts.values()).items()))}")
    for when, result in large.items():
        size = args.large_mb
        print(f"large upload {when}: {size:g} MB of random bytes in 8 MB chunks: "
              + (f"complete and checked in {result['seconds']:.1f} s ({size / result['seconds']:.0f} MB/s)"
                 if result.get("complete") else "FAILED"))
    print("\nresident memory (RSS, MB; sampled every 0.5 s)")
    print("| process | before the large upload | max during it (alone) | max during the load | at the end of the load "
          "| max during the drain | at the end |\n|---|---|---|---|---|---|---|")
    figures = {}
    for name, samples in memory.samples.items():
        alone = [rss / 2**20 for t, rss in samples if t <= marks["load_start"]]
        during = [rss / 2**20 for t, rss in samples if marks["load_start"] < t <= marks["load_end"]]
        after = [rss / 2**20 for t, rss in samples if t > marks["load_end"]] or [float("nan")]
        figures[name] = (alone[0], max(alone), max(during), during[-1], max(after), samples[-1][1] / 2**20)
        print(f"| {name} | " + " | ".join(f"{value:.0f}" for value in figures[name]) + " |")
    for name, error in memory.missed.items():
        print(f"  (some RSS samples of the {name} are missing: {error})")
    return {"requests": len(recorder.rows), "rps": len(recorder.rows) / elapsed, "errors": errors,
            "accepted": len(accepted), "outcomes": dict(outcomes), "open": open_, "rss_mb": figures}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="96-subject demo, 15 s of load, 10 submissions, 64 MB")
    parser.add_argument("--work", help="folder of the demo portal (default: a temporary folder, removed)")
    parser.add_argument("--reuse", action="store_true", help="reuse WORK when it holds WORK/portal/portal.yaml")
    parser.add_argument("--subjects", type=int, help="subjects of the demo cohort (default 160; quick 96)")
    parser.add_argument("--participants", type=int, default=200, help="simulated participants (default 200)")
    parser.add_argument("--duration", type=float, help="seconds of load (default 60; quick 15)")
    parser.add_argument("--max-submissions", type=int, help="accepted submissions at most (default 20; quick 10)")
    parser.add_argument("--large-mb", type=float, help="the large upload's size (default 150; quick 64; 0: none)")
    parser.add_argument("--drain-timeout", type=float, default=1200, help="seconds to wait for the scores")
    parser.add_argument("--seed", type=int, default=0, help="seed of the participants' choices")
    args = parser.parse_args(argv)
    args.subjects = args.subjects or (96 if args.quick else 160)
    args.duration = args.duration or (15.0 if args.quick else 60.0)
    args.max_submissions = args.max_submissions if args.max_submissions is not None else (10 if args.quick else 20)
    args.large_mb = args.large_mb if args.large_mb is not None else (64.0 if args.quick else 150.0)
    command = shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["benchmarks/portal_load.py",
                                                                                       *argv])
    started = datetime.datetime.now()
    if threading.current_thread() is threading.main_thread():  # SIGTERM too runs the finally blocks
        signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(128 + number))
    print(f"machine: {os.cpu_count()} cores, {platform.platform()}, Python {platform.python_version()}, httpx "
          f"{httpx.__version__}; load average {os.getloadavg()[0]:.2f}", flush=True)
    temporary = args.work is None
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-portal-load-")).resolve()
    processes = []
    try:
        print(f"set-up: demo portal in {work}", flush=True)
        root = prepare(work, args.subjects, args.reuse)
        stamp = datetime.datetime.now().strftime("%H%M%S")
        began = time.perf_counter()
        tokens = add_participants(root, args.participants + 1, stamp)
        tokens["large"] = tokens.pop(f"load{stamp}-{args.participants:03d}")
        print(f"  {args.participants} participants (+1 for the large upload) added in "
              f"{time.perf_counter() - began:.1f} s", flush=True)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start([*RAF, "serve", str(root), "--port", str(port)], work / "load-server.log")
        processes.append(server)
        wait_until_answers(url + "/api/challenges", server, work / "load-server.log")
        worker_log = work / "load-worker.log"
        worker = start([*RAF, "worker", str(root)], worker_log)
        processes.append(worker)
        portal_benchmark.wait_for_line(worker_log, "scoring submissions of", worker)
        with httpx.Client(base_url=url, timeout=60) as client:
            files = [f for f in client.get(f"/api/challenges/{CHALLENGE}").json()["downloads"]
                     if f["name"].endswith(".tar")]
        encoders = [((work / kind / "encoder.safetensors").read_bytes(),
                     (work / kind / "encoder.card.json").read_bytes()) for kind in ("pretrain", "random")]
        print(f"  server pid {server.pid}, worker pid {worker.pid}; {len(files)} shards to download; encoders of "
              f"{', '.join(str(len(weights)) for weights, _ in encoders)} bytes", flush=True)
        shared = {"downloads": files, "encoders": encoders, "submissions_left": args.max_submissions, "accepted": []}
        if args.large_mb > 0:  # made before any timing: random bytes, seeded
            data = np.random.default_rng(args.seed).integers(0, 256, int(args.large_mb * (1 << 20)), np.uint8).tobytes()
            shared["large"] = (data, hashlib.sha256(data).hexdigest())
        recorder, alone_recorder, large = Recorder(), Recorder(), {}
        memory = MemorySampler({"server": server.pid, "worker": worker.pid})
        memory.start()
        marks = {"alone_start": time.perf_counter()}
        if args.large_mb > 0:
            print(f"large upload alone: {args.large_mb:g} MB", flush=True)
            asyncio.run(large_upload(url, tokens["large"], shared["large"], alone_recorder,
                                     large.setdefault("alone, before the load", {})))
            recorder.errors.update(alone_recorder.errors)
            time.sleep(1.0)  # one more RSS sample after it
        marks["load_start"] = time.perf_counter()
        print(f"load: {args.participants} participants for {args.duration:g} s", flush=True)
        cpu_before = {"server": cpu_seconds(server.pid), "worker": cpu_seconds(worker.pid),
                      "load generator (this process)": time.process_time()}
        elapsed = asyncio.run(load(url, tokens, shared, args, recorder, large.setdefault("during the load", {})))
        marks["load_end"] = time.perf_counter()
        cpu = {"server": cpu_seconds(server.pid), "worker": cpu_seconds(worker.pid),
               "load generator (this process)": time.process_time()}
        marks["cores"] = {name: (cpu[name] - cpu_before[name]) / elapsed for name in cpu
                          if cpu[name] is not None and cpu_before[name] is not None}
        print(f"  done; draining the queue ({len(shared['accepted'])} accepted submissions)", flush=True)
        final = drain(url, shared["accepted"], tokens, args.drain_timeout)
        marks["drained"] = time.perf_counter()
        memory.stopped.set()
        memory.join()
        sessions = open_database(PortalRoot(root).database_url, migrate=False)
        with sessions() as db:
            ids = [submission for _, submission in shared["accepted"]]
            attempts = dict(db.execute(select(Submission.public_id, Submission.attempts)
                                       .where(Submission.public_id.in_(ids))).all())
        result = report(recorder, elapsed, args, shared["accepted"], final, attempts, memory, large, marks)
    finally:
        for process in processes:
            stop(process)
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
    portal_benchmark.print_machine(started, command)
    return result


if __name__ == "__main__":
    main()
