"""A portal's root folder and its settings (`portal.yaml`), written by `raf portal init`.

Layout of ROOT (only `public/` is ever served, and only the files recorded in the database's downloads table)::

    portal.yaml        settings (below); edit and restart `serve` / `worker`
    secret.key         random key of the session and CSRF tokens (mode 0600)
    portal.db          the SQLite database, unless `database_url` names another
    public/<challenge>/<split>/   webdataset shards, index.json, manifest.csv, SHA256SUMS; datasheets/
    private/<challenge>/<split>/  cohort stores the workers score on (the hidden split lives here)
    submissions/<id>/  an uploaded encoder, its scoring work folder and its aggregate-only report
    uploads/           uploads being received; emptied of leftovers at start-up
"""
from __future__ import annotations

import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from rafmedia.core.config import Schema
from rafmedia.core.errors import UserError
from rafmedia.core.files import atomic_write_text

SETTINGS_FILE = "portal.yaml"
SECRET_FILE = "secret.key"


@dataclass
class PortalSettings:
    """`portal.yaml`."""

    title: str = "rafmedia benchmark portal"
    database_url: str = ""  # any SQLAlchemy URL; empty: sqlite:///ROOT/portal.db
    max_upload_mb: float = 200.0  # larger request bodies get 413 while they stream in
    lease_seconds: float = 60.0  # a worker that has not renewed its claim for this long is presumed dead
    max_attempts: int = 3  # a submission whose worker died this often is failed, not retried again
    session_hours: float = 12.0
    secure_cookies: bool = False  # True behind HTTPS: cookies get the Secure flag
    # uploaded code runs in a bubblewrap sandbox under these limits (docs/portal-security.md)
    sandbox_wall_seconds: float = 900.0  # time the scorer waits on the code in all (building it, every batch)
    sandbox_cpu_seconds: float = 1800.0
    sandbox_memory_mb: float = 4096.0
    sandbox_processes: int = 256  # processes and threads together
    sandbox_output_mb: float = 256.0  # every file it writes, its log included
    max_code_kb: float = 1024.0  # the uploaded source: one .py file or a .tar.gz package
    # resumable uploads (POST/PATCH /api/uploads, docs/portal.md "Resumable uploads"); max_upload_mb caps the file
    upload_chunk_mb: float = 64.0  # the largest chunk one PATCH may carry (the client sends 8 MB)
    upload_expiry_hours: float = 24.0  # an upload without a new chunk for this long is removed
    uploads_per_user: int = 4  # unfinished uploads one participant may hold at once


class PortalRoot:
    """The folders and settings of one portal (see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()
        if not (self.path / SETTINGS_FILE).is_file():
            raise UserError(f"{self.path} is not a portal root (no {SETTINGS_FILE}); create one with "
                            f"`raf portal init {path}`")
        raw = yaml.safe_load((self.path / SETTINGS_FILE).read_text(encoding="utf-8")) or {}
        self.settings: PortalSettings = Schema(PortalSettings, key_label="portal.yaml key").build(raw)

    @classmethod
    def create(cls, path: str | Path, *, database_url: str = "") -> "PortalRoot":
        """Makes the folders, settings and secret key of a new portal (an existing root is left as it is)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for folder in ("public", "private", "submissions", "uploads"):
            (path / folder).mkdir(exist_ok=True)
        os.chmod(path / "private", 0o700)
        if not (path / SETTINGS_FILE).is_file():
            settings = PortalSettings(database_url=database_url)
            atomic_write_text(path / SETTINGS_FILE, "# rafmedia portal settings (docs/portal.md)\n"
                              + yaml.safe_dump(asdict(settings), sort_keys=False))
        if not (path / SECRET_FILE).is_file():
            descriptor = os.open(path / SECRET_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as handle:
                handle.write(secrets.token_hex(32))
        return cls(path)

    @property
    def database_url(self) -> str:
        return self.settings.database_url or f"sqlite:///{self.path / 'portal.db'}"

    @property
    def secret(self) -> str:
        return (self.path / SECRET_FILE).read_text(encoding="utf-8").strip()

    @property
    def public(self) -> Path:
        return self.path / "public"

    @property
    def private(self) -> Path:
        return self.path / "private"

    @property
    def submissions(self) -> Path:
        return self.path / "submissions"

    @property
    def uploads(self) -> Path:
        return self.path / "uploads"

    @property
    def max_upload_bytes(self) -> int:
        return int(self.settings.max_upload_mb * 1024 * 1024)
