"""Benchmark portal: page throughput and latency under 50 concurrent clients against the same bytes served as static
files, side by side in one run, and the time from an upload to the leaderboard on the quickstart-sized cohort.

Set-up: `raf portal demo --out WORK --subjects N --exit-when-scored --quiet` (a synthetic cohort, the challenge
`synth-raf`, users alice and bob, two encoders submitted through the HTTP API and scored by a real worker), or, with
--reuse, a WORK that already holds WORK/portal/portal.yaml. Then `raf portal serve WORK/portal` runs in its own
process on a free port.

Part 1, load. For each page (the challenge page, the leaderboard page and the leaderboard JSON of the final phase),
C concurrent clients (asyncio tasks in this process, default 50) each send one request after the other over
keep-alive connections for a warm-up (not recorded, default 1 s), then for a fixed duration (default 10 s); every
request's latency is recorded. Two client set-ups, in turn (--pool): "shared", one httpx.AsyncClient whose pool
allows C keep-alive connections; and "per-client", one httpx.AsyncClient of one connection per client (the same C
connections). httpcore's pool scans its connections and waiting requests on every event, so one shared pool of 50
costs this process 4-13 ms of CPU per request (about 2 ms per-client, measured on the 2-core box): with the shared
pool both servers are held to the client's rate and the ratio says little; the per-client figures are the ones
that measure the servers. Reported: requests/s, p50 / p95 / p99 latency, errors (non-200 answers and failed
requests), and the CPU time the server process and the load generator used per request and in cores busy over the
recorded window (/proc and time.process_time). The peer: the bodies of the same pages, fetched once and written into
a folder, served by a minimal Starlette app (`StaticFiles`) under the same uvicorn (same HTTP and event-loop
implementations, log level warning) in its own process, under the same load. Portal and static runs alternate page
by page.
The load generator runs in this process: on a machine with few cores it competes with the server for CPU (on the
2-core box the static peer and the per-client load generator together fill both cores).

Part 2, upload to leaderboard (not in --quick; --skip-upload skips it): a second demo at the quickstart's size
(`configs/default.yaml`: 200 subjects at 64^3, lesion radius 3-6 voxels, 2 synthesis workers, on top of the demo's
tiny pretraining config), then a server and one worker (`raf portal worker ROOT`, its default 2 s queue poll), a new
API token for alice (`raf portal user ROOT token alice`), and one more upload of the pretrained encoder with
`rafmedia.portal.client.submit(..., phase="final", wait=True, poll_s=0.5)` while this process polls the leaderboard
JSON (`all=1`) and the submission every 0.5 s. Reported: the seconds from the POST to its answer (queued), to
"scored" as the client sees it, and to the entry on the leaderboard, with the submission's stages as they appeared.
That demo goes to WORK/quickstart-size and is reused when it is there already; the upload is then made by a new
participant (alice may have used the final phase's daily limit of 2).

Run:  python benchmarks/portal.py                          # full: 160-subject demo, 10 s per page, the upload part
      python benchmarks/portal.py --work runs/bench-portal --reuse   # keep / reuse the demo portal
      python benchmarks/portal.py --quick                  # 96-subject demo, 3 s per page, no upload part
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from rafmedia.portal.client import submit, wait_until_answers

CHALLENGE = "synth-raf"
PAGES = {  # name: (portal path, file name of the static copy)
    "challenge page": (f"/challenges/{CHALLENGE}", "challenge.html"),
    "leaderboard page": (f"/challenges/{CHALLENGE}/leaderboard?phase=final", "leaderboard.html"),
    "leaderboard JSON": (f"/api/challenges/{CHALLENGE}/leaderboard?phase=final", "leaderboard.json"),
}
# The quickstart's cohort (configs/default.yaml), on top of the demo's tiny config.
QUICKSTART_SUBJECTS = 200
QUICKSTART_OVERRIDES = ["cohort.shape=[64,64,64]", "cohort.lesion_radius=[3.0,6.0]", "cohort.workers=2"]
RAF = [sys.executable, "-m", "rafmedia.launch.cli", "portal"]
STATIC_SERVER = """
import sys, uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles
app = Starlette(routes=[Mount("/", app=StaticFiles(directory=sys.argv[1]))])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# ---- processes ---------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(command: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:  # unbuffered: the log shows when the process is ready
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_for_line(log: Path, text: str, process: subprocess.Popen, timeout_s: float = 120.0) -> float:
    """Seconds until `text` appears in the process's log."""
    began = time.perf_counter()
    while time.perf_counter() - began < timeout_s:
        if text in log.read_text():
            return time.perf_counter() - began
        if process.poll() is not None:
            raise RuntimeError(f"the process stopped at start-up; see {log}:\n{log.read_text()[-2000:]}")
        time.sleep(0.2)
    raise RuntimeError(f"'{text}' did not appear in {log} within {timeout_s:.0f} s")


def stop(process: subprocess.Popen | None, *, interrupt: bool = False) -> None:
    """Ends a process this benchmark started, by its PID: SIGINT first where it cleans up after itself (the demo
    stops its own server and worker), else SIGTERM; SIGKILL if it is still there after 30 s."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGINT if interrupt else signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (Linux /proc), or None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime (fields 14 and 15 of stat)
    except (OSError, IndexError, ValueError):
        return None


def run_demo(out: Path, subjects: int, overrides: list[str] = ()) -> float:
    """`raf portal demo --out OUT --subjects N --exit-when-scored --quiet [overrides]`; returns its seconds."""
    out.parent.mkdir(parents=True, exist_ok=True)
    command = [*RAF, "demo", "--out", str(out), "--subjects", str(subjects), "--exit-when-scored", "--quiet",
               *overrides]
    print(f"  $ {shlex.join(command[2:])}", flush=True)
    began = time.perf_counter()
    demo = subprocess.Popen(command)
    try:
        if demo.wait() != 0:
            raise RuntimeError(f"the demo failed (exit {demo.returncode}); see {out}/server.log, {out}/worker.log")
    finally:
        stop(demo, interrupt=True)
    return time.perf_counter() - began


def prepare(out: Path, subjects: int, reuse: bool, overrides: list[str] = ()) -> Path:
    """A portal root with scored entries: OUT/portal, made by the demo unless --reuse finds one."""
    root = out / "portal"
    if (root / "portal.yaml").is_file():
        if not reuse:
            raise SystemExit(f"{root} exists already: pass --reuse to benchmark it, or another --work")
        print(f"  reusing {root}", flush=True)
        return root
    seconds = run_demo(out, subjects, overrides)
    print(f"  demo done in {seconds:.0f} s", flush=True)
    return root


# ---- load --------------------------------------------------------------------------------------------------------
async def hammer(url: str, *, pid: int, clients: int, duration_s: float, warmup_s: float,
                 pool: str) -> dict[str, Any]:
    """`clients` tasks send GET `url` back to back over keep-alive connections: `warmup_s` unrecorded, then
    `duration_s` recorded (a request counts when it started inside the window). pool "shared": one
    httpx.AsyncClient whose pool allows `clients` connections; "per-client": one AsyncClient of one connection per
    task (the same connections; httpcore's pool scans every connection and waiting request on each event, so a
    shared pool of 50 costs the client ~10x more CPU per request). The CPU times of the server (`pid`) and of this
    process are taken over the recorded window only."""
    latencies: list[float] = []
    errors: dict[str, int] = {}

    async def client_loop(session: httpx.AsyncClient, until: float, record: bool) -> None:
        while True:
            began = time.perf_counter()
            if began >= until:
                return
            try:
                response = await session.get(url)
                await response.aread()
                status = str(response.status_code)
            except httpx.HTTPError as error:
                status = type(error).__name__
            if record:
                latencies.append(time.perf_counter() - began)
                if status != "200":
                    errors[status] = errors.get(status, 0) + 1

    size = clients if pool == "shared" else 1
    limits = httpx.Limits(max_connections=size, max_keepalive_connections=size, keepalive_expiry=60)
    pools = [httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(60.0))
             for _ in range(1 if pool == "shared" else clients)]
    sessions = [pools[i % len(pools)] for i in range(clients)]
    try:
        if warmup_s > 0:
            until = time.perf_counter() + warmup_s
            await asyncio.gather(*(client_loop(session, until, False) for session in sessions))
        server_before, began, cpu = cpu_seconds(pid), time.perf_counter(), time.process_time()
        await asyncio.gather(*(client_loop(session, began + duration_s, True) for session in sessions))
        elapsed, client_cpu, server_after = time.perf_counter() - began, time.process_time() - cpu, cpu_seconds(pid)
    finally:
        for session in pools:
            await session.aclose()
    ms = np.asarray(latencies) * 1e3
    server_cpu = None if server_before is None or server_after is None else server_after - server_before
    return {"requests": len(latencies), "seconds": elapsed, "rps": len(latencies) / elapsed,
            "p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)),
            "p99": float(np.percentile(ms, 99)), "errors": sum(errors.values()), "error_kinds": errors,
            "client_cpu_ms": 1e3 * client_cpu / max(1, len(latencies)), "client_cores": client_cpu / elapsed,
            "server_cpu_ms": None if server_cpu is None else 1e3 * server_cpu / max(1, len(latencies)),
            "server_cores": None if server_cpu is None else server_cpu / elapsed}


def measure(url: str, pid: int, **load) -> dict[str, Any]:
    return asyncio.run(hammer(url, pid=pid, **load))


def static_copies(portal_url: str, folder: Path) -> dict[str, int]:
    """Fetches each page once and writes its body into `folder`; returns the bytes per page."""
    sizes = {}
    with httpx.Client(base_url=portal_url, timeout=60) as client:
        for name, (path, file_name) in PAGES.items():
            response = client.get(path)
            response.raise_for_status()
            (folder / file_name).write_bytes(response.content)
            sizes[name] = len(response.content)
        rows = client.get(PAGES["leaderboard JSON"][0]).json()["rows"]
    if not rows:
        raise RuntimeError("the leaderboard has no scored entry: the demo's submissions were not scored")
    print(f"  leaderboard (final, best per participant): {len(rows)} rows: "
          + ", ".join(f"{r['participant']} RAF {r['index']:.3f}" for r in rows), flush=True)
    return sizes


def load_part(root: Path, work: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Portal and static copies under the same load, page by page; prints and returns the rows."""
    processes: list[subprocess.Popen] = []
    static_dir = Path(tempfile.mkdtemp(prefix="static-", dir=work))
    try:
        port = free_port()
        portal_url = f"http://127.0.0.1:{port}"
        server = start([*RAF, "serve", str(root), "--port", str(port)], work / "bench-server.log")
        processes.append(server)
        up = wait_until_answers(portal_url + "/api/challenges", server, work / "bench-server.log")
        print(f"  portal server (pid {server.pid}) answered /api/challenges after {up:.1f} s", flush=True)
        sizes = static_copies(portal_url, static_dir)
        static_port = free_port()
        static_url = f"http://127.0.0.1:{static_port}"
        static = start([sys.executable, "-c", STATIC_SERVER, str(static_dir), str(static_port)],
                       work / "bench-static.log")
        processes.append(static)
        wait_until_answers(f"{static_url}/{PAGES['leaderboard JSON'][1]}", static, work / "bench-static.log")
        print(f"  static server (pid {static.pid}) up; {args.clients} clients, {args.warmup:g} s warm-up, "
              f"{args.duration:g} s per run", flush=True)
        load = {"clients": args.clients, "duration_s": args.duration, "warmup_s": args.warmup}
        rows = []
        for name, (path, file_name) in PAGES.items():
            for pool in pools(args):
                ours = measure(portal_url + path, server.pid, pool=pool, **load)
                peer = measure(f"{static_url}/{file_name}", static.pid, pool=pool, **load)
                rows.append({"page": name, "pool": pool, "bytes": sizes[name], "portal": ours, "static": peer})
                print(f"  {name}, {pool} pool: portal {ours['rps']:.0f} req/s (p95 {ours['p95']:.0f} ms, "
                      f"{ours['errors']} errors), static {peer['rps']:.0f} req/s (p95 {peer['p95']:.0f} ms, "
                      f"{peer['errors']} errors)", flush=True)
        return rows
    finally:
        for process in processes:
            stop(process)
        shutil.rmtree(static_dir, ignore_errors=True)


def pools(args: argparse.Namespace) -> list[str]:
    return ["shared", "per-client"] if args.pool == "both" else [args.pool]


POOL_LABELS = {"shared": "one httpx.AsyncClient, one keep-alive pool of {n} connections",
               "per-client": "one httpx.AsyncClient of one keep-alive connection per client ({n} connections)"}


def print_load_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    for pool in pools(args):
        print(f"\n{args.clients} concurrent clients ({POOL_LABELS[pool].format(n=args.clients)}), {args.duration:g} s "
              f"per page after a {args.warmup:g} s warm-up")
        print("| page | portal req/s | static req/s | ratio (portal/static) | portal p95 ms | static p95 ms |")
        print("|---|---|---|---|---|---|")
        for row in (r for r in rows if r["pool"] == pool):
            ours, peer = row["portal"], row["static"]
            print(f"| {row['page']} | {ours['rps']:.0f} | {peer['rps']:.0f} | {ours['rps'] / peer['rps']:.2f} | "
                  f"{ours['p95']:.0f} | {peer['p95']:.0f} |")
    print("\nEvery run (errors = non-200 answers + failed requests; CPU = user + system CPU time of the server process "
          "and of this load-generating process over the recorded window, per request and in cores busy)")
    print("| page | bytes | client pool | server | requests | req/s | p50 ms | p95 ms | p99 ms | errors | "
          "server CPU ms/req | server cores busy | client CPU ms/req | client cores busy |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        for side in ("portal", "static"):
            r = row[side]
            cpu = "- | -" if r["server_cpu_ms"] is None else f"{r['server_cpu_ms']:.2f} | {r['server_cores']:.2f}"
            kinds = f" ({', '.join(f'{k}: {v}' for k, v in r['error_kinds'].items())})" if r["errors"] else ""
            print(f"| {row['page']} | {row['bytes']} | {row['pool']} | {side} | {r['requests']} | {r['rps']:.0f} | "
                  f"{r['p50']:.1f} | {r['p95']:.1f} | {r['p99']:.1f} | {r['errors']}{kinds} | {cpu} | "
                  f"{r['client_cpu_ms']:.2f} | {r['client_cores']:.2f} |")
    cores = os.cpu_count()
    print(f"\nNote: the load generator runs in this process on the same {cores}-core machine as the servers"
          + (", so it competes with the server for CPU: " if (cores or 0) <= 4 else "; ")
          + "a request costs the server the 'server CPU' above and this process the 'client CPU'; where their sum "
          "reaches the cores' time, req/s measures the machine, not the server alone. Each server is one Python "
          "process: its Python work holds the GIL, so 'server cores busy' near 1.0 means the server is saturated "
          "whatever the core count.")


# ---- upload to leaderboard ---------------------------------------------------------------------------------------
def new_token(root: Path, user: str) -> str:
    """`raf portal user ROOT token USER`: the token it prints."""
    output = subprocess.run([*RAF, "user", str(root), "token", user], check=True, capture_output=True,
                            text=True).stdout
    return next(line.strip() for line in output.splitlines() if line.strip().startswith("raf_"))


def upload_part(work: Path, args: argparse.Namespace) -> dict[str, Any]:

    out = work / "quickstart-size"
    print(f"\nupload to leaderboard: a demo at the quickstart's size ({QUICKSTART_SUBJECTS} subjects, "
          f"{' '.join(QUICKSTART_OVERRIDES)})", flush=True)
    reused = (out / "portal" / "portal.yaml").is_file()
    demo_s = None if reused else run_demo(out, QUICKSTART_SUBJECTS, QUICKSTART_OVERRIDES)
    if demo_s is not None:
        print(f"  demo done in {demo_s:.0f} s", flush=True)
    root = out / "portal"
    weights = out / "pretrain" / "encoder.safetensors"
    user = "alice"
    if reused:  # alice may have used the final phase's daily limit (2) on an earlier run: a fresh participant
        user = f"bench{int(time.time())}"
        subprocess.run([*RAF, "user", str(root), "add", user], check=True, capture_output=True,
                       env={**os.environ, "RAF_PORTAL_PASSWORD": "benchmark-password"})
    token = new_token(root, user)
    processes: list[subprocess.Popen] = []
    try:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start([*RAF, "serve", str(root), "--port", str(port)], out / "bench-server.log")
        processes.append(server)
        wait_until_answers(url + "/api/challenges", server, out / "bench-server.log")
        worker_log = out / "bench-worker.log"
        worker = start([*RAF, "worker", str(root)], worker_log)
        processes.append(worker)
        # the worker's start-up (imports) is not part of an upload: wait for its first line, then one queue poll
        ready = wait_for_line(worker_log, "scoring submissions of", worker)
        print(f"  server and worker (pid {worker.pid}, ready after {ready:.1f} s) up", flush=True)
        time.sleep(2.5)
        name = f"benchmark upload {int(time.time())}"
        events: dict[str, Any] = {}

        def log(message: str) -> None:  # submit() logs "submitted: URL (status)" when the POST answered
            if message.startswith("submitted:"):
                events.setdefault("queued", time.perf_counter())
                events["id"] = message.split("/submissions/")[1].split()[0]

        def upload() -> None:
            try:
                events["submission"] = submit(url, token, CHALLENGE, weights, phase="final", name=name, wait=True,
                                              poll_s=0.5, progress=False, log=log)
                events["scored"] = time.perf_counter()
            except BaseException as error:  # noqa: BLE001 - reported by the main thread
                events["error"] = error

        stages: list[tuple[float, str]] = []
        headers = {"Authorization": f"Bearer {token}"}
        thread = threading.Thread(target=upload, daemon=True)
        began, wall = time.perf_counter(), time.time()
        thread.start()
        with httpx.Client(base_url=url, timeout=30) as client:
            while time.perf_counter() - began < args.upload_timeout:
                if "error" in events:
                    raise RuntimeError(f"the upload failed: {events['error']}")
                board = client.get(f"/api/challenges/{CHALLENGE}/leaderboard", params={"phase": "final", "all": 1})
                if any(row["name"] == name for row in board.json()["rows"]):
                    events["board"] = time.perf_counter()
                    break
                if "id" in events:
                    state = client.get(f"/api/submissions/{events['id']}", headers=headers).json()
                    label = state["status"] + (f" / {state['stage']}" if state.get("stage") else "")
                    if not stages or stages[-1][1] != label:
                        stages.append((time.perf_counter() - began, label))
                time.sleep(0.5)
            else:
                raise RuntimeError(f"the upload was not on the leaderboard after {args.upload_timeout:.0f} s")
        thread.join(timeout=60)
        if "error" in events:
            raise RuntimeError(f"the upload failed: {events['error']}")
        submission = events["submission"]
        done = [line for line in worker_log.read_text().splitlines() if " done in " in line]
        result = {"demo_s": demo_s, "user": user, "bytes": weights.stat().st_size,
                  "queued_s": events["queued"] - began, "scored_s": events["scored"] - began,
                  "board_s": events["board"] - began,
                  "server_scored_s": (submission["finished_at"] - wall) if submission.get("finished_at") else None,
                  "index": submission["score"]["index"], "stages": stages,
                  "worker_s": float(done[-1].rsplit(" done in ", 1)[1].split()[0]) if done else None}
        return result
    finally:
        for process in processes:
            stop(process)


def print_upload(result: dict[str, Any]) -> None:
    print(f"\nupload -> leaderboard, quickstart-sized cohort ({QUICKSTART_SUBJECTS} subjects at 64^3; the demo's "
          f"DEMO_PROTOCOL: seeds [0,1,2], 200 bootstrap resamples, 200 permutations; one worker, 2 s queue poll; "
          f"client and leaderboard polled every 0.5 s); {result['bytes']} bytes of weights uploaded as "
          f"{result['user']}" + (f"; the demo took {result['demo_s']:.0f} s" if result["demo_s"] else ""))
    print("| step | seconds after the POST began |\n|---|---|")
    print(f"| POST answered (queued) | {result['queued_s']:.2f} |")
    if result["worker_s"] is not None:
        print(f"| (the worker's own time for it: claim to score recorded) | {result['worker_s']:.1f} |")
    if result["server_scored_s"] is not None:
        print(f"| worker marked it scored (server's finished_at) | {result['server_scored_s']:.1f} |")
    print(f"| upload -> scored (client, submit(wait=True, poll_s=0.5) returned) | {result['scored_s']:.1f} |")
    print(f"| upload -> on the leaderboard JSON (all=1, polled every 0.5 s) | {result['board_s']:.1f} |")
    print(f"RAF index of the entry: {result['index']:.3f}; states seen: "
          + ", ".join(f"{label} at {t:.1f} s" for t, label in result["stages"])
          + " (the stage is written by the worker's heartbeat, every lease/3 = 20 s by default)")


# ---- main --------------------------------------------------------------------------------------------------------
def print_machine(started: datetime.datetime, command: str) -> None:
    """The machine, date, duration and command of a benchmark run: what RESULTS.md records with a figure."""
    print(f"\nmachine: {os.cpu_count()} cores (os.cpu_count()), {platform.platform()}; date {started:%Y-%m-%d %H:%M}; "
          f"took {(datetime.datetime.now() - started).total_seconds():.0f} s; load average at the end "
          f"{os.getloadavg()[0]:.2f}\ncommand: {command}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="96-subject demo, 3 s per page, no upload part")
    parser.add_argument("--work", help="folder of the demo portal(s) (default: a temporary folder, removed)")
    parser.add_argument("--reuse", action="store_true", help="reuse WORK when it holds WORK/portal/portal.yaml")
    parser.add_argument("--subjects", type=int, help="subjects of the demo cohort (default 160; quick 96)")
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients (default 50)")
    parser.add_argument("--duration", type=float, help="recorded seconds per page and server (default 10; quick 3)")
    parser.add_argument("--pool", choices=["shared", "per-client", "both"], default="both",
                        help="the clients' connection pools: one shared pool of C connections, one pool of one "
                        "connection per client, or both in turn (default)")
    parser.add_argument("--warmup", type=float, default=1.0, help="unrecorded seconds before each run (default 1)")
    parser.add_argument("--skip-upload", action="store_true", help="skip the upload-to-leaderboard part")
    parser.add_argument("--upload-timeout", type=float, default=1800, help="give up on the upload after S seconds")
    args = parser.parse_args(argv)
    args.subjects = args.subjects or (96 if args.quick else 160)
    args.duration = args.duration or (3.0 if args.quick else 10.0)
    command = shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["benchmarks/portal.py", *argv])
    started = datetime.datetime.now()
    if threading.current_thread() is threading.main_thread():  # SIGTERM too runs the finally blocks that stop servers
        signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(128 + number))
    print(f"machine: {os.cpu_count()} cores, {platform.platform()}, {platform.machine()}, Python "
          f"{platform.python_version()}, httpx {httpx.__version__}; load average {os.getloadavg()[0]:.2f}")
    temporary = args.work is None
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-portal-")).resolve()
    result: dict[str, Any] = {}
    try:
        print(f"set-up: demo portal in {work}", flush=True)
        root = prepare(work, args.subjects, args.reuse)
        print("load:", flush=True)
        result["load"] = load_part(root, work, args)
        print_load_table(result["load"], args)
        if not (args.quick or args.skip_upload):
            result["upload"] = upload_part(work, args)
            print_upload(result["upload"])
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
    print_machine(started, command)
    return result


if __name__ == "__main__":
    main()
