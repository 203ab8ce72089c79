"""Helpers of tests/portal/test_uploads.py: a TCP proxy that slows or cuts connections, and a second portal server
of its own (on a copy of the shared site's root) that those tests may kill and restart."""
from __future__ import annotations

import shutil
import socket
import sqlite3
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from rafmedia.engine.distributed import free_port
from rafmedia.portal.service import manage_user
from tests.portal.conftest import PASSWORD, start_server


class Proxy:
    """A TCP proxy on 127.0.0.1 in front of `port`. `rate`: bytes per second passed upstream (client to server;
    None: no limit). `cut_after`: the first connection that has sent this many bytes upstream is closed both ways
    at that byte (once), as a dropped link would."""

    def __init__(self, port: int, *, rate: float | None = None, cut_after: int | None = None):
        self.target, self.rate, self.cut_after = port, rate, cut_after
        self.cuts = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._connect, args=(downstream,), daemon=True).start()

    def _connect(self, downstream: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target))
        except OSError:  # the server is down: the client sees its connection closed
            downstream.close()
            return
        threading.Thread(target=self._pump, args=(upstream, downstream, False), daemon=True).start()
        self._pump(downstream, upstream, True)

    def _pump(self, source: socket.socket, sink: socket.socket, upstream: bool) -> None:
        sent = 0
        try:
            while data := source.recv(16384):
                if upstream and self.cut_after is not None and not self.cuts and sent + len(data) > self.cut_after:
                    self.cuts += 1
                    sink.sendall(data[:self.cut_after - sent])
                    return
                sink.sendall(data)
                sent += len(data)
                if upstream and self.rate:
                    time.sleep(len(data) / self.rate)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                end.close()

    def close(self) -> None:
        self.listener.close()


@dataclass
class OwnServer:
    """A portal server on a copy of the site's root (public and private splits, database), started and killed by
    the tests that need to; `settings` are written into the copy's portal.yaml."""

    root: Path
    port: int
    logs: Path
    server: subprocess.Popen | None = None
    tokens: dict[str, str] = field(default_factory=dict)
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def copy_of(cls, site_root: Path, folder: Path, settings: dict) -> OwnServer:
        root = folder / "root"
        shutil.copytree(site_root, root, ignore=shutil.ignore_patterns("portal.db*", "submissions", "uploads"))
        for name in ("submissions", "uploads"):
            (root / name).mkdir()
        source, target = sqlite3.connect(site_root / "portal.db"), sqlite3.connect(root / "portal.db")
        source.backup(target)
        source.close()
        target.close()
        config = yaml.safe_load((root / "portal.yaml").read_text())
        (root / "portal.yaml").write_text(yaml.safe_dump({**config, **settings}))
        return cls(root=root, port=free_port(), logs=folder)

    def start(self) -> None:
        self.starts += 1
        self.server = start_server(self.root, self.port, self.logs / f"server-{self.starts}.log")

    def kill(self) -> None:
        """kill -9, and wait until it is gone."""
        self.server.kill()
        self.server.wait(timeout=30)

    def stop(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.terminate()
            self.server.wait(timeout=30)

    def participant(self, name: str) -> str:
        manage_user(self.root, "add", name, password=PASSWORD)
        self.tokens[name] = manage_user(self.root, "token", name)
        return name

    def client(self, who: str, url: str | None = None) -> httpx.Client:
        return httpx.Client(base_url=url or self.url, headers={"Authorization": f"Bearer {self.tokens[who]}"},
                            timeout=60)

    def received(self, who: str) -> list[tuple[str, int]]:
        """(upload id, bytes received) of every upload of `who`, read from the database file directly."""
        with sqlite3.connect(self.root / "portal.db") as db:
            return db.execute("SELECT public_id, received FROM uploads JOIN users ON users.id = uploads.user_id "
                              "WHERE users.name = ?", (who,)).fetchall()
