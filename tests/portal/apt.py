"""Debian packages the portal tests need (chromium, postgresql, bubblewrap), installed with apt when missing and
the tests run as root, as on CI's fresh machines. A file lock under /tmp keeps parallel pytest processes from
running apt at the same time: the second one finds what the first installed."""
from __future__ import annotations

import fcntl
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

Found = TypeVar("Found")
LOCK = Path("/tmp/rafmedia-apt.lock")


def ensure_installed(packages: list[str], find: Callable[[], Found | None]) -> Found:
    """`find()`'s answer, after `apt-get install packages` when it is None and we are root.

    Not root and missing: RuntimeError saying what to install; apt's output goes to /tmp/rafmedia-apt-<first>.log."""
    found = find()
    if found is not None:
        return found
    with LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            found = find()  # another process may have installed them while we waited for the lock
            if found is None:
                if os.geteuid() != 0:
                    raise RuntimeError(f"{' and '.join(packages)} not found; as root run: "
                                       f"apt-get install -y {' '.join(packages)}")
                log_path = Path(f"/tmp/rafmedia-apt-{packages[0]}.log")
                env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
                with log_path.open("w") as log:
                    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *packages]):
                        if subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                          timeout=900).returncode:
                            raise RuntimeError(f"`{' '.join(command)}` failed; see {log_path}")
                found = find()
                if found is None:
                    raise RuntimeError(f"apt installed {' '.join(packages)} but it is still missing; see {log_path}")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return found
