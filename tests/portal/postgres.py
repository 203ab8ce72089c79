"""A real PostgreSQL server for the portal tests: find (or, as root, apt-install) Debian's `postgresql`, then run a
private server under a temporary folder: `initdb` + `pg_ctl` as the `postgres` user, listening on a free TCP port
of 127.0.0.1 with trust authentication, stopped by its postmaster's PID when the test process ends.

`shared_server()` starts one server per process (every test module gets the same one); `server.new_database()`
makes an empty database for one test and returns its SQLAlchemy URL; `server.stop()` / `start()` / `restart()`
take it down and up again for the fault tests. Nothing here skips a test: a missing server raises, and the caller
decides.
"""
from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from rafmedia.engine.distributed import free_port
from tests.portal.apt import ensure_installed

USER = "postgres"  # initdb refuses to run as root; the Debian package makes this user
# a test server: no fsync (a killed server still keeps what the OS has, which is all a test restart needs)
SETTINGS = ("-c fsync=off -c full_page_writes=off -c listen_addresses=127.0.0.1 -c max_connections=100 "
            "-c shared_buffers=16MB")


def _find_bin() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin holding initdb and pg_ctl, else None."""
    found = [Path(path).parent for path in glob.glob("/usr/lib/postgresql/*/bin/initdb")
             if os.access(Path(path).with_name("pg_ctl"), os.X_OK)]
    return max(found, key=lambda path: int(path.parent.name), default=None)


def ensure_postgres() -> Path:
    """The folder of initdb and pg_ctl, after `apt-get install postgresql` when it is missing and we are root (not
    root: RuntimeError saying what to install)."""
    return ensure_installed(["postgresql"], _find_bin)


STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, exited but not yet reaped by its parent, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


class PostgresServer:
    """One private server: its data folder, log and socket under `folder` (owned by `postgres`), TCP on `port`."""

    def __init__(self, bin_dir: Path, folder: Path, port: int):
        self.bin_dir, self.folder, self.port = bin_dir, folder, port
        self.data, self.log = folder / "data", folder / "server.log"
        self.pid: int | None = None
        self.databases = 0

    def _as_postgres(self, tool: str, *args: str, timeout: float = 120) -> None:
        command = [str(self.bin_dir / tool), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", USER, "--", *command]
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout)
        if done.returncode:
            log = self.log.read_text()[-3000:] if self.log.is_file() else ""
            raise RuntimeError(f"`{' '.join(command)}` failed ({done.returncode}): {done.stderr.strip()}\n{log}")

    def initdb(self) -> None:
        self._as_postgres("initdb", "-D", str(self.data), "-U", USER, "-A", "trust", "-E", "UTF8", "--no-sync",
                          "--no-instructions")

    def start(self) -> None:
        """Starts the server and waits until it accepts connections; records the postmaster's PID."""
        self._as_postgres("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                          "-o", f"-p {self.port} -k {self.folder} {SETTINGS}", "start")
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])

    def stop(self, mode: str = "fast") -> None:
        """Stops the server by its postmaster's PID (`fast`: SIGINT, sessions are ended as by a restart of the
        service; `immediate`: SIGQUIT, as a crash) and waits until it has exited; SIGKILL after 60 s."""
        if self.pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, STOP_SIGNALS[mode])
            deadline = time.monotonic() + 60
            while _alive(self.pid):
                if time.monotonic() > deadline:
                    os.kill(self.pid, signal.SIGKILL)
                    deadline = float("inf")
                time.sleep(0.05)
        self.pid = None

    def restart(self, *, down_s: float = 0.0) -> None:
        """Stops the server, leaves it down `down_s` seconds, starts it again (same port, same data)."""
        self.stop()
        time.sleep(down_s)
        self.start()

    def url(self, database: str = USER) -> str:
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/{database}"

    def new_database(self, prefix: str = "test") -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        import psycopg  # the portal's PostgreSQL driver, a dependency of the portal only

        self.databases += 1
        name = f"{prefix}_{self.databases}"
        with psycopg.connect(host="127.0.0.1", port=self.port, user=USER, dbname=USER, autocommit=True) as db:
            db.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def close(self) -> None:
        """Stops the server and removes its folder."""
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


def start_server() -> PostgresServer:
    """A new server in a fresh temporary folder owned by `postgres` (initdb + start: about 2 s)."""
    bin_dir = ensure_postgres()
    folder = Path(tempfile.mkdtemp(prefix="rafmedia-pg-"))
    if os.geteuid() == 0:
        account = pwd.getpwnam(USER)
        os.chown(folder, account.pw_uid, account.pw_gid)
    server = PostgresServer(bin_dir, folder, free_port())
    try:
        server.initdb()
        server.start()
    except BaseException:
        server.close()
        raise
    return server


_shared: PostgresServer | None = None


def shared_server() -> PostgresServer:
    """The test process's one server, started on first use and stopped (by PID) when the process exits."""
    global _shared
    if _shared is None:
        _shared = start_server()
        atexit.register(_shared.close)
    if _shared.pid is None:  # a fault test left it stopped
        _shared.start()
    return _shared


def backend_url(backend: str, folder: Path) -> str:
    """A fresh empty database for one test: `sqlite` (a file in `folder`) or `postgresql` (a new database on the
    shared server)."""
    if backend == "sqlite":
        return f"sqlite:///{Path(folder) / 'portal.db'}"
    if backend == "postgresql":
        return shared_server().new_database()
    raise ValueError(f"unknown database backend '{backend}'; use sqlite or postgresql")
