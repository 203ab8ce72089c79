"""The portal's database: SQLAlchemy 2 models and the Alembic migrations that create and upgrade them.

Times are UNIX seconds (floats), the same on SQLite and PostgreSQL. Nothing here knows about HTTP: the web app, the
worker and the commands all go through these models. `open_database(root)` upgrades the schema to the newest
migration (portal/migrations/versions) before returning a session factory, so a portal made by an older rafmedia
is migrated in place; `tests/portal/test_database.py` checks that the migrations and the models agree.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import BigInteger, Boolean, Float, ForeignKey, Integer, String, Text, UniqueConstraint, create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

ROLES = ("participant", "organiser", "admin")
STATUSES = ("queued", "running", "scored", "failed")
MIGRATIONS = Path(__file__).with_name("migrations")


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(256))
    role: Mapped[str] = mapped_column(String(16), default="participant")
    team: Mapped[str] = mapped_column(String(64), default="")
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)

    def can_organise(self) -> bool:
        return self.role in ("organiser", "admin")


class ApiToken(Base):
    """A client token: `raf_<prefix>_<secret>`; only the secret's SHA-256 is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    label: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    user: Mapped[User] = relationship()


class WebSession(Base):
    """A signed-in browser: the cookie holds a random token whose SHA-256 is the key here."""

    __tablename__ = "web_sessions"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[float] = mapped_column(Float)
    user: Mapped[User] = relationship()


class Challenge(Base):
    __tablename__ = "challenges"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    slug: Mapped[str] = mapped_column(String(64), unique=True)
    title: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    licence: Mapped[str] = mapped_column(String(200), default="")
    public_test_labels: Mapped[bool] = mapped_column(Boolean, default=True)
    protocol_json: Mapped[str] = mapped_column(Text, default="{}")  # evaluate.* settings of every phase
    input_json: Mapped[str] = mapped_column(Text, default="{}")  # channels and shape of a volume (the dummy pass)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    phases: Mapped[list["Phase"]] = relationship(back_populates="challenge", order_by="Phase.id")

    @property
    def protocol(self) -> dict[str, Any]:
        return json.loads(self.protocol_json)

    @property
    def input(self) -> dict[str, Any]:
        return json.loads(self.input_json)


class Phase(Base):
    """A phase scores on one split: a sanity phase on the public test split with logs shown, a final phase on the
    hidden split with logs hidden."""

    __tablename__ = "phases"
    __table_args__ = (UniqueConstraint("challenge_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    challenge_id: Mapped[int] = mapped_column(ForeignKey("challenges.id"), index=True)
    name: Mapped[str] = mapped_column(String(32))
    split: Mapped[str] = mapped_column(String(32))
    description: Mapped[str] = mapped_column(Text, default="")
    opens_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    closes_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    daily_limit: Mapped[int] = mapped_column(Integer, default=5)
    total_limit: Mapped[int] = mapped_column(Integer, default=0)  # 0: no limit
    show_logs: Mapped[bool] = mapped_column(Boolean, default=False)
    frozen: Mapped[bool] = mapped_column(Boolean, default=False)
    protocol_version: Mapped[int] = mapped_column(Integer, default=1)
    team_daily_limit: Mapped[int] = mapped_column(Integer, default=0)  # per team and day; 0: no team limit
    ladder: Mapped[bool] = mapped_column(Boolean, default=False)  # release a score only when it beats one's best
    ladder_step: Mapped[float] = mapped_column(Float, default=0.0)  # the Ladder's margin; 0: from the interval
    private_leaderboard: Mapped[bool] = mapped_column(Boolean, default=False)  # scores hidden until revealed
    revealed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    challenge: Mapped[Challenge] = relationship(back_populates="phases")

    def is_open(self, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        return (not self.frozen and (self.opens_at is None or now >= self.opens_at)
                and (self.closes_at is None or now < self.closes_at))


class Download(Base):
    """A file of a public split that may be served: the only files any route reads from disk for a download."""

    __tablename__ = "downloads"
    __table_args__ = (UniqueConstraint("challenge_id", "split", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    challenge_id: Mapped[int] = mapped_column(ForeignKey("challenges.id"), index=True)
    split: Mapped[str] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(String(128))
    relative_path: Mapped[str] = mapped_column(String(400))  # under ROOT/public
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))


class Upload(Base):
    """A resumable upload in progress: its bytes are appended in chunks to ROOT/uploads/<public_id>.part."""

    __tablename__ = "uploads"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    filename: Mapped[str] = mapped_column(String(128))
    size: Mapped[int] = mapped_column(BigInteger)  # announced at creation
    received: Mapped[int] = mapped_column(BigInteger, default=0)
    sha256: Mapped[str] = mapped_column(String(64), default="")  # announced; checked when complete
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    updated_at: Mapped[float] = mapped_column(Float, default=time.time)
    user: Mapped[User] = relationship()


class Submission(Base):
    """An uploaded encoder and its way through the queue (`STATUSES`)."""

    __tablename__ = "submissions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    public_id: Mapped[str] = mapped_column(String(32), unique=True)  # in URLs; random, never guessable
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    phase_id: Mapped[int] = mapped_column(ForeignKey("phases.id"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    architecture: Mapped[str] = mapped_column(String(64), default="")  # or the factory of uploaded code
    runs_code: Mapped[bool] = mapped_column(Boolean, default=False)  # carries its own code: embeds in the sandbox
    folder: Mapped[str] = mapped_column(String(64))  # under ROOT/submissions
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    stage: Mapped[str] = mapped_column(String(64), default="")
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    lease_owner: Mapped[str] = mapped_column(String(64), default="")
    lease_expires: Mapped[float] = mapped_column(Float, default=0.0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    protocol_version: Mapped[int] = mapped_column(Integer, default=0)  # the phase protocol its score is for
    score_json: Mapped[str] = mapped_column(Text, default="")  # leaderboard numbers and bootstrap draws
    released_json: Mapped[str] = mapped_column(Text, default="")  # what participants see (rounded, Ladder)
    external_job: Mapped[str] = mapped_column(String(64), default="")  # the SLURM job scoring it, if any
    log: Mapped[str] = mapped_column(Text, default="")
    user: Mapped[User] = relationship()
    phase: Mapped[Phase] = relationship()

    @property
    def score(self) -> dict[str, Any]:
        return json.loads(self.score_json) if self.score_json else {}


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def make_engine(url: str) -> Engine:
    """An engine; SQLite gets a busy timeout and WAL so that the server and several workers share the file."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection, _record):
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def upgrade(engine: Engine) -> None:
    """Applies every migration the database has not had yet (`alembic upgrade head`)."""
    config = alembic_config(str(engine.url.render_as_string(hide_password=False)))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def open_database(url: str, *, migrate: bool = True) -> sessionmaker:
    """A session factory on `url`, its schema upgraded to the newest migration first."""
    engine = make_engine(url)
    if migrate:
        upgrade(engine)
    return sessionmaker(engine, expire_on_commit=False)
