"""A sandbox for participants' own code: bubblewrap namespaces, a read-only filesystem, cgroup and rlimit limits.

A submission that carries Python source (`runs_code`) is never imported by the portal. The worker starts
`sandbox_runner.py` inside bubblewrap (`bwrap`) with:

- new user, PID, IPC, UTS, network and cgroup namespaces: no network at all (not even 127.0.0.1), no other
  process visible, an unprivileged uid with every capability dropped, an empty environment;
- a filesystem of read-only mounts only: /usr, the Python environment (interpreter and site-packages), the
  submission (code, weights, card) at /raf-submission and the scorer's input batches at /raf-inputs; the one writable
  folder is /raf-work (the submission's scratch folder). Nothing else of the machine exists in it: no portal root,
  database, secret key, other submission, home folder or /tmp of the host;
- limits: wall time (the scorer kills it), CPU seconds, file size (`prlimit`); memory and processes (threads
  count) by a cgroup when the machine offers one (cgroup v1 memory + pids hierarchies, detected at start-up),
  else by address-space rlimit, and code submissions are refused when processes cannot be limited; the scratch
  folder's total size is watched while it runs.

The scorer applies the alterations and intensity normalisation outside, writes each batch to /raf-inputs, and reads
back (B, D) float32 embeddings, checking shape, dtype and finiteness itself (`SandboxedEncoder`): the code inside
only embeds. `failure_reason` turns how the sandbox ended into the participant's reason: on phases that hide
logs it is chosen from fixed sentences only, so code cannot spell out hidden data in an error message.
"""
from __future__ import annotations

import errno as errnos
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rafmedia.core.errors import UserError

RUNNER = Path(__file__).with_name("sandbox_runner.py")
CGROUP_V1 = Path("/sys/fs/cgroup")
MAX_EMBED_DIM = 65536
POLL_S = 0.02
SUBMISSION_FILES = ("encoder.safetensors", "encoder.card.json", "code")
SANDBOX_UID = 65534  # nobody, inside the sandbox's user namespace


class SandboxFailure(UserError):
    """The submission's code broke a rule or a limit, or failed; the message is the participant's reason."""


@dataclass
class SandboxLimits:
    wall_s: float = 900.0  # time the scorer waits on the code in all (its building and every batch)
    cpu_s: float = 1800.0
    memory_mb: float = 4096.0
    processes: int = 256
    output_mb: float = 256.0

    @classmethod
    def from_settings(cls, settings) -> SandboxLimits:
        return cls(wall_s=settings.sandbox_wall_seconds, cpu_s=settings.sandbox_cpu_seconds,
                   memory_mb=settings.sandbox_memory_mb, processes=settings.sandbox_processes,
                   output_mb=settings.sandbox_output_mb)


@dataclass
class SandboxSupport:
    """What this machine offers; `problem` is why code submissions cannot run here ("" when they can)."""

    bwrap: str = ""
    version: str = ""
    cgroups: list[str] = field(default_factory=list)  # the cgroup v1 controllers we can use: memory, pids
    problem: str = ""

    def describe(self) -> str:
        if self.problem:
            return f"sandbox: unavailable ({self.problem}); submissions with code will fail with that reason"
        memory = "cgroup (memory)" if "memory" in self.cgroups else "rlimit (address space)"
        return (f"sandbox: {self.version} ({self.bwrap}); limits: wall time (scorer), CPU and file size (rlimit), "
                f"memory by {memory}, processes by cgroup (pids); no network, read-only filesystem")


def detect() -> SandboxSupport:
    """Finds bubblewrap and the cgroup controllers this process may create groups in."""
    support = SandboxSupport(bwrap=shutil.which("bwrap") or "")
    if not support.bwrap:
        support.problem = "bubblewrap is not installed; as root: apt-get install bubblewrap"
        return support
    version = subprocess.run([support.bwrap, "--version"], check=False, capture_output=True, text=True)
    support.version = version.stdout.strip()
    for controller in ("memory", "pids"):
        probe = CGROUP_V1 / controller / f"rafmedia-probe-{uuid.uuid4().hex[:8]}"
        try:
            probe.mkdir()
            probe.rmdir()
            support.cgroups.append(controller)
        except OSError:
            pass
    if "pids" not in support.cgroups:
        support.problem = ("no writable cgroup v1 'pids' hierarchy under /sys/fs/cgroup, so the number of processes "
                           "cannot be limited (run the worker as root on a machine with cgroup v1 pids)")
    return support


class Cgroups:
    """One cgroup per controller for one sandbox run: limits, what happened, and killing everything in it."""

    def __init__(self, controllers: list[str], limits: SandboxLimits):
        name = f"rafmedia-sandbox-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.paths = {controller: CGROUP_V1 / controller / name for controller in controllers}
        for path in self.paths.values():
            path.mkdir()
        if "memory" in self.paths:
            memory = self.paths["memory"]
            (memory / "memory.limit_in_bytes").write_text(str(int(limits.memory_mb * 2**20)))
            if (memory / "memory.memsw.limit_in_bytes").exists():  # no escape into swap
                (memory / "memory.memsw.limit_in_bytes").write_text(str(int(limits.memory_mb * 2**20)))
        (self.paths["pids"] / "pids.max").write_text(str(limits.processes))

    @property
    def procs_files(self) -> list[str]:
        return [str(path / "cgroup.procs") for path in self.paths.values()]

    def stats(self) -> dict[str, int]:
        """oom_kills (memory limit hit), pid_refusals (process limit hit), memory_peak bytes."""
        out = {"oom_kills": 0, "pid_refusals": 0, "memory_peak": 0}
        events = self.paths["pids"] / "pids.events"
        if events.exists():
            out["pid_refusals"] = int(dict(line.split() for line in events.read_text().splitlines()).get("max", 0))
        if "memory" in self.paths:
            memory = self.paths["memory"]
            control = dict(line.split() for line in (memory / "memory.oom_control").read_text().splitlines())
            out["oom_kills"] = int(control.get("oom_kill", (memory / "memory.failcnt").read_text()))
            out["memory_peak"] = int((memory / "memory.max_usage_in_bytes").read_text())
        return out

    def kill_all(self) -> None:
        """SIGKILLs every process left in the groups (the sandbox and whatever it forked)."""
        for _ in range(100):
            pids = [int(pid) for path in self.paths.values() if (path / "cgroup.procs").exists()
                    for pid in (path / "cgroup.procs").read_text().split()]
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)

    @classmethod
    def sweep(cls) -> None:
        """Removes the groups of workers that died (killed with -9) without removing their own."""
        for path in CGROUP_V1.glob("*/rafmedia-sandbox-*"):
            pid = int(path.name.split("-")[2])
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                stale = cls.__new__(cls)
                stale.paths = {path.parent.name: path}
                stale.remove()
            except PermissionError:
                pass

    def remove(self) -> None:
        self.kill_all()
        for path in self.paths.values():
            for _ in range(50):
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:  # processes still exiting
                    time.sleep(0.05)


def environment_mounts() -> list[str]:
    """Read-only binds of the Python environment outside /usr (a venv, a pyenv interpreter), de-duplicated."""
    paths = {Path(sys.prefix), Path(sys.base_prefix), Path(sysconfig.get_paths()["purelib"]).resolve(),
             Path(sys.executable).resolve().parent.parent}
    paths = sorted({path.resolve() for path in paths if not str(path.resolve()).startswith("/usr/")})
    kept = [path for path in paths if not any(other != path and path.is_relative_to(other) for other in paths)]
    return [arg for path in kept for arg in ("--ro-bind", str(path), str(path))]


def system_mounts() -> list[str]:
    """/usr read-only, and the merged-/usr links (/bin -> usr/bin ...) or binds of those folders."""
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib64", "lib32"):
        path = Path("/") / name
        if path.is_symlink():
            args += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            args += ["--ro-bind", str(path), str(path)]
    for name in ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/localtime"):
        args += ["--ro-bind-try", name, name]
    return args


def submission_mounts(submission: Path) -> list[str]:
    """The weights, the card and the code of a submission, read-only; not its work folder (scores, caches)."""
    args = []
    for name in SUBMISSION_FILES:
        if (submission / name).exists():
            args += ["--ro-bind", str(submission / name), f"/raf-submission/{name}"]
    return args


def bwrap_command(support: SandboxSupport, *, submission: Path, inputs: Path, work: Path, threads: int) -> list[str]:
    env = {"HOME": "/raf-work", "TMPDIR": "/raf-work", "PATH": "/usr/bin:/bin", "MPLCONFIGDIR": "/raf-work/.config",
           "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONDONTWRITEBYTECODE": "1"}
    return [support.bwrap, "--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-net", "--unshare-uts",
            "--unshare-cgroup-try", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--die-with-parent",
            "--new-session", "--clearenv", *system_mounts(), *environment_mounts(), "--proc", "/proc",
            "--dev", "/dev", *submission_mounts(submission), "--ro-bind", str(inputs), "/raf-inputs",
            "--bind", str(work), "/raf-work", "--ro-bind", str(RUNNER), "/raf-runner.py", "--remount-ro", "/",
            *[arg for key, value in env.items() for arg in ("--setenv", key, value)], "--chdir", "/raf-work",
            "--", sys.executable, "-s", "/raf-runner.py"]


def folder_bytes(path: Path, limit_files: int = 10_000) -> int:
    total = 0
    for count, (folder, _dirs, files) in enumerate(os.walk(path)):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass
        if count > limit_files:
            break
    return total


class Sandbox:
    """One run of a submission's code: `start` builds the encoder inside, `embed` hands it batches.

    Args:
        submission: folder with code/, encoder.safetensors and card.json (mounted read-only).
        scratch: a folder of the worker's that this run may fill: inputs/ and work/ are made in it.
        limits: the sandbox limits; support: `detect()`'s result; show_details: reasons may quote the code's
            own error messages (phases that show logs).
    """

    def __init__(self, submission: Path, scratch: Path, limits: SandboxLimits, support: SandboxSupport, *,
                 show_details: bool):
        self.submission, self.limits, self.support, self.show_details = submission, limits, support, show_details
        self.inputs, self.work = scratch / "inputs", scratch / "work"
        self.log_path = scratch / "sandbox.log"
        self.process: subprocess.Popen | None = None
        self.cgroups: Cgroups | None = None
        self.waited = 0.0  # seconds the scorer waited on the code: what the wall-time limit bounds
        self.embed_dim = 0
        self.calls = 0
        self.stats: dict[str, int] = {}

    def start(self, dummy_NCDHW: np.ndarray) -> int:
        """Starts the code, which builds its encoder and embeds `dummy_NCDHW`; returns its embedding size."""
        if self.support.problem:
            raise SandboxFailure(f"this portal's worker cannot run submitted code: {self.support.problem}")
        for folder in (self.inputs, self.work):
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        os.chmod(self.work, 0o777)  # the sandbox's uid owns nothing outside; it writes here only
        np.save(self.inputs / "dummy.npy", np.ascontiguousarray(dummy_NCDHW, dtype=np.float32))
        Cgroups.sweep()
        self.cgroups = Cgroups(self.support.cgroups, self.limits)
        limits = [f"--cpu={int(self.limits.cpu_s)}:{int(self.limits.cpu_s) + 5}",
                  f"--fsize={int(self.limits.output_mb * 2**20)}", "--nofile=1024", "--core=0"]
        if "memory" not in self.support.cgroups:
            limits.append(f"--as={int((self.limits.memory_mb + 2048) * 2**20)}")  # torch reserves address space
        join = 'for group in $RAF_CGROUPS; do echo $$ > "$group"; done; exec "$@"'
        command = ["/bin/sh", "-c", join, "sh", shutil.which("prlimit") or "prlimit", *limits, "--",
                   *bwrap_command(self.support, submission=self.submission, inputs=self.inputs, work=self.work,
                                  threads=max(1, torch.get_num_threads()))]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                                            env={"RAF_CGROUPS": " ".join(self.cgroups.procs_files),
                                                 "PATH": "/usr/bin:/bin"}, start_new_session=True)
        ready = self.wait_for(self.work / "ready.json", "building the encoder")
        out = self.read_embeddings(self.work / "dummy.npy", batch=len(dummy_NCDHW), expected_dim=None)
        self.embed_dim = out.shape[1]
        ready.unlink()
        return self.embed_dim

    def embed(self, x_NCDHW: np.ndarray) -> np.ndarray:
        """The code's (B, D) embeddings of one batch, checked here."""
        self.calls += 1
        name = f"batch{self.calls:06d}"
        np.save(self.inputs / f"{name}.npy", np.ascontiguousarray(x_NCDHW, dtype=np.float32))
        try:
            self.process.stdin.write(f"{name}\n".encode())
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # it died: wait_for says why
        path = self.wait_for(self.work / f"{name}.npy", f"embedding batch {self.calls}")
        out = self.read_embeddings(path, batch=len(x_NCDHW), expected_dim=self.embed_dim)
        path.unlink()
        (self.inputs / f"{name}.npy").unlink()
        return out

    def wait_for(self, path: Path, doing: str) -> Path:
        """Waits for the code to write `path`; on death, a limit or a broken rule raises `SandboxFailure`."""
        began = last_size_check = time.monotonic()
        deadline = began + self.limits.wall_s - self.waited
        while True:
            if path.exists():
                self.waited += time.monotonic() - began
                return path
            if self.process.poll() is not None:
                self.fail(doing, ended="exited")
            now = time.monotonic()
            if now > deadline:
                self.fail(doing, ended="wall")
            if now - last_size_check > 0.5:
                last_size_check = now
                if folder_bytes(self.work) > self.limits.output_mb * 2**20:
                    self.fail(doing, ended="output")
            time.sleep(POLL_S)

    def read_embeddings(self, path: Path, *, batch: int, expected_dim: int | None) -> np.ndarray:
        """The (batch, D) float32 finite array at `path`, or `SandboxFailure` (never unpickles)."""
        try:
            out = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError):
            self.stop()
            raise SandboxFailure("the code wrote an embeddings file that is not a NumPy array") from None
        expected = f"({batch}, {expected_dim or 'D'})"
        problem = ""
        if out.dtype != np.float32:
            problem = f"of dtype {out.dtype} (expected float32)" if self.show_details else "of the wrong dtype"
        elif out.ndim != 2 or out.shape[0] != batch or (expected_dim is not None and out.shape[1] != expected_dim):
            problem = f"of the wrong shape{f' {out.shape}' if self.show_details else ''} (expected {expected})"
        elif not 1 <= out.shape[1] <= MAX_EMBED_DIM:
            problem = f"with {out.shape[1]} dimensions (allowed: 1 to {MAX_EMBED_DIM})"
        elif not np.isfinite(out).all():
            problem = "with values that are not finite (NaN or infinity)"
        if problem:
            self.stop()
            raise SandboxFailure(f"the encoder returned embeddings {problem}")
        return out

    def fail(self, doing: str, *, ended: str) -> None:
        self.stop()
        if ended == "exited" and self.log_path.stat().st_size >= self.limits.output_mb * 2**20:
            ended = "output"  # its log reached the file-size limit
        raise SandboxFailure(failure_reason(
            doing, ended=ended, returncode=self.process.returncode, stats=self.stats,
            error=read_error(self.work / "error.json"), limits=self.limits, show_details=self.show_details))

    def stop(self) -> None:
        """Ends the run: everything in it killed, its cgroups removed; the statistics kept in `stats`."""
        self.stats = self.cgroups.stats() if self.cgroups else {}
        if self.process is not None and self.process.poll() is None:
            try:
                self.process.stdin.close()
            except OSError:
                pass
            try:
                self.process.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
        if self.cgroups is not None:
            self.cgroups.remove()
            self.cgroups = None
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def log(self, limit: int = 200_000) -> str:
        if not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as handle:
            handle.seek(max(0, self.log_path.stat().st_size - limit))
            return handle.read().decode("utf-8", "replace")

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        shutil.rmtree(self.inputs, ignore_errors=True)
        shutil.rmtree(self.work, ignore_errors=True)


def read_error(path: Path) -> dict[str, Any]:
    """The code's own error report (small, untrusted: only its fields of expected types are used)."""
    try:
        if path.stat().st_size > 65536:
            return {}
        raw = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except (OSError, ValueError):
        return {}
    if not isinstance(raw, dict):
        return {}
    return {"type": str(raw.get("type", ""))[:100], "message": str(raw.get("message", ""))[:1000],
            "errno": raw.get("errno") if isinstance(raw.get("errno"), int) else None,
            "builtin": raw.get("builtin") is True}


DENIED = {  # errno of an OSError the code raised -> what the sandbox refused it
    errnos.ENETUNREACH: "tried to use the network, which the sandbox does not have",
    errnos.ENETDOWN: "tried to use the network, which the sandbox does not have",
    errnos.EAFNOSUPPORT: "tried to use the network, which the sandbox does not have",
    errnos.ECONNREFUSED: "tried to use the network, which the sandbox does not have",
    errnos.EROFS: "tried to write outside its scratch folder (the filesystem is read-only)",
    errnos.EACCES: "tried to open or write a file the sandbox does not allow",
    errnos.EPERM: "tried an operation the sandbox does not allow",
    errnos.ENOENT: ("tried to open a file that does not exist in the sandbox (it holds only the installed packages, "
                    "the submission and its scratch folder)"),
    errnos.EFBIG: "wrote more than the output limit",
    errnos.EAGAIN: "tried to start more processes than the process limit",
}


def failure_reason(doing: str, *, ended: str, returncode: int | None, stats: dict[str, int],
                   error: dict[str, Any], limits: SandboxLimits, show_details: bool) -> str:
    """The participant's reason for a sandbox run that ended while `doing`.

    The limits the worker saw (wall time, output size, memory cgroup OOM kills, refused forks, CPU signals) take
    precedence over anything the code wrote; then the code's own error, by its kind. With `show_details` False
    (phases hiding logs) no text written by the code is included."""
    prefix = f"the submitted code (while {doing})"
    killed_by = -returncode if returncode is not None and returncode < 0 else (
        returncode - 128 if returncode is not None and returncode > 128 else 0)  # bwrap's init reports 128 + signal
    if ended == "wall":
        return f"{prefix} ran past the wall-time limit of {limits.wall_s:g} s and was stopped"
    if ended == "output":
        return f"{prefix} wrote more than the output limit of {limits.output_mb:g} MB and was stopped"
    if stats.get("oom_kills"):
        return f"{prefix} exceeded the memory limit of {limits.memory_mb:g} MB and was killed"
    if killed_by == signal.SIGXCPU:
        return f"{prefix} exceeded the CPU-time limit of {limits.cpu_s:g} s"
    if killed_by == signal.SIGKILL and not error:
        return f"{prefix} was killed (SIGKILL), most likely by the memory limit of {limits.memory_mb:g} MB"
    if killed_by == signal.SIGXFSZ or error.get("errno") == errnos.EFBIG:
        return f"{prefix} wrote more than the output limit of {limits.output_mb:g} MB"
    limit_note = (f"; it reached the process limit of {limits.processes} processes and threads"
                  if stats.get("pid_refusals") else "")
    if not error:
        return f"{prefix} exited with status {returncode} without reporting an error{limit_note}"
    kind = error["type"] if error["builtin"] else "an exception of its own class"
    if error["type"] == "ModuleNotFoundError":
        what = "imported a module that is not installed in the portal's environment (nothing is pip-installed)"
    elif error["type"] == "MemoryError":
        what = f"ran out of memory (limit {limits.memory_mb:g} MB)"
    elif error["errno"] in DENIED and error["builtin"]:
        what = DENIED[error["errno"]]
        if error["errno"] == errnos.EFBIG:
            what += f" of {limits.output_mb:g} MB"
        elif error["errno"] == errnos.EAGAIN:
            what += f" ({limits.processes})"
    elif error["type"] == "KeyError" and error["builtin"]:
        what = "raised KeyError (note: the sandbox's environment is empty; no variable of the worker is visible)"
    else:
        what = f"raised {kind}"
    detail = f": {error['type']}: {error['message']}" if show_details else f" ({kind})"
    return f"{prefix} {what}{limit_note}{detail}"


class SandboxedEncoder(torch.nn.Module):
    """Stands for the participant's encoder in the evaluator: each forward pass is one `Sandbox.embed` call."""

    def __init__(self, sandbox: Sandbox):
        super().__init__()
        self.sandbox = sandbox
        self.embed_dim = sandbox.embed_dim

    def forward(self, x_BCDHW: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.sandbox.embed(x_BCDHW.detach().float().cpu().numpy()))
