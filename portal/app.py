"""The portal's web application (FastAPI on uvicorn): server-rendered pages that work without JavaScript, and a
JSON API under /api for the same actions. `create_app(root)` builds it; `raf portal serve` runs it.

Who may do what (tests/portal/test_security.py tries every route as every role):
- anyone: the challenge list and pages, datasheets, public downloads, leaderboards (HTML, JSON, CSV);
- a participant (signed in, or with an API token): submit, follow and read the reports of their own submissions,
  make and revoke their tokens; another participant's submission answers 404, as if it did not exist;
- an organiser or admin: every submission's status and report, phase settings, freezing, re-scoring.

What is never reachable: downloads are looked up in the database's downloads table (files the portal published
under ROOT/public), never built from the URL, so no path, encoding or symlink reaches ROOT/private (the hidden
split), the database, the secret or another submission; reports are the worker's redacted, aggregate-only ones.
Forms carry a per-session CSRF token; cookies are HttpOnly and SameSite=Lax; every page sends a strict CSP.
"""
from __future__ import annotations

import dataclasses
import hmac
import json
import math
import re
import secrets
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import selectinload
from starlette.concurrency import run_in_threadpool
from starlette.staticfiles import StaticFiles

from rafmedia.core.errors import UserError
from rafmedia.core.files import write_json
from rafmedia.evaluate.raf import RAF_FORMULA
from rafmedia.portal import accounts, leaderboard, resumable, submissions
from rafmedia.portal.challenges import evaluate_config
from rafmedia.portal.db import ROLES, Challenge, Download, Phase, Submission, User, WebSession, open_database
from rafmedia.portal.scoring import REPORT_HTML, submission_folder
from rafmedia.portal.settings import PortalRoot
from rafmedia.portal.uploads import UPLOAD_ROUTE, BodyLimit, UploadRefused, new_folder, receive_files
from rafmedia.portal.validation import InvalidSubmission, check_card, check_code, check_encoder

HERE = Path(__file__).parent
SESSION_COOKIE = "raf_session"
LOGIN_COOKIE = "raf_login"  # double-submit token of the sign-in form (before there is a session)
PUBLIC_SPLITS = ("train", "public_test")
UPLOAD_FILES = {"weights": "encoder.safetensors", "card": "encoder.card.json", "code": "code.upload"}
OPTIONAL_FILES = ("code",)  # the participant's own code: a .py file or a .tar.gz package (runs in the sandbox)
CSP = ("default-src 'none'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self'; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


def when(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def number(value: Any, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def interval(ci: Any, digits: int = 3) -> str:
    if not ci or any(v is None or math.isnan(v) for v in ci):
        return ""
    return f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def is_upload_path(path: str) -> bool:
    return path.endswith(("/submit", "/submissions")) and not path.startswith("/api/me")


class Portal:
    """Everything a request needs: the root, the database and the templates."""

    def __init__(self, root: PortalRoot):
        self.root = root
        self.sessions = open_database(root.database_url)
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        self.templates.env.filters.update(when=when, number=number, interval=interval)
        self.templates.env.globals.update(title=root.settings.title, formula=RAF_FORMULA, score_view=score_view,
                                          report_visible=report_visible)

    # ---- who is asking -------------------------------------------------------------------------
    def identify(self, db, request: Request) -> tuple[User | None, WebSession | None]:
        """(user, browser session) of the request; looked up once per request and database session."""
        known = getattr(request.state, "identity", None)
        if known is not None and known[0] is db:
            return known[1]
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            user = accounts.token_user(db, header[7:].strip())
            if user is None:
                raise HTTPException(401, "the API token is unknown, revoked or its user disabled")
            identity = (user, None)
        else:
            session = accounts.session_of(db, request.cookies.get(SESSION_COOKIE, ""))
            identity = (session.user, session) if session else (None, None)
        request.state.identity = (db, identity)
        return identity

    def require_user(self, db, request: Request, *, fields: dict[str, Any] | None = None) -> User:
        """The signed-in user of a state-changing request: a token, or a session plus its CSRF token."""
        user, session = self.identify(db, request)
        if user is None:
            raise HTTPException(401, "sign in first (or pass an API token: Authorization: Bearer raf_...)")
        if session is not None:
            sent = (fields or {}).get("csrf_token") or request.headers.get("x-csrf-token", "")
            if not hmac.compare_digest(str(sent), session.csrf_token):
                raise HTTPException(403, "the form's CSRF token is missing or stale: reload the page and retry")
        return user

    def page(self, request: Request, name: str, db, status: int = 200, **context) -> HTMLResponse:
        user, session = self.identify(db, request)
        return self.templates.TemplateResponse(request, name, {"user": user,
                                                               "csrf": session.csrf_token if session else "",
                                                               **context}, status_code=status)


    # ---- actions: each shared by a page's form and an API route ------------------------------------
    def accept_submission(self, request: Request, slug: str, staging: Path, fields: dict[str, Any]) -> dict[str, Any]:
        with self.sessions.begin() as db:
            user = self.require_user(db, request, fields=fields)
            challenge = challenge_or_404(db, slug)
            phase = phase_or_404(challenge, str(fields.get("phase", "sanity")))
            upload = str(fields.get("upload", "")).strip()  # a finished resumable upload instead of `weights`
            earlier = resumable.submission_from(db, user.id, upload)
            if earlier is not None:  # the same request again, its answer lost: the submission it made, not another
                return submission_json(earlier, with_log=False)
            resumable.weights_from(db, self.root, user.id, upload, staging / UPLOAD_FILES["weights"])
            submissions.check_can_submit(db, user, phase)
            channels, shape = len(challenge.input["channels"]), challenge.input["shape"]
            runs_code = accept_code(staging, check_card(staging / UPLOAD_FILES["card"]),
                                    max_bytes=int(self.root.settings.max_code_kb * 1024))
            card = check_encoder(staging / UPLOAD_FILES["weights"], staging / UPLOAD_FILES["card"],
                                 channels=channels, shape=shape)
            architecture = card.get("architecture") or card["factory"]
            name = " ".join(str(fields.get("name", "")).split())[:100] or f"{architecture} encoder"
            public_id = upload or secrets.token_hex(12)  # an upload's id was checked by weights_from
            folder = self.root.submissions / public_id
            write_json(staging / UPLOAD_FILES["card"], {**card, "name": name})
            staging.rename(folder)
            try:
                submission = submissions.enqueue(db, user, phase, name=name, folder=public_id,
                                                 architecture=architecture, public_id=public_id, runs_code=runs_code)
                db.flush()
                return submission_json(submission, with_log=False)
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise

    def update_phase(self, request: Request, slug: str, name: str, form: dict[str, Any], changes: dict[str, Any]):
        with self.sessions.begin() as db:
            user = self.require_user(db, request, fields=form)
            require_organiser(user)
            phase = phase_or_404(challenge_or_404(db, slug), name)
            apply_phase_changes(phase, changes)
            return {"phase": phase.name, **phase_json(phase)}

    def reveal(self, request: Request, slug: str, name: str, form: dict[str, Any]) -> dict[str, Any]:
        """Reveals a private leaderboard and closes its phase (closes_at = revealed_at = now, or the earlier close)."""
        with self.sessions.begin() as db:
            require_organiser(self.require_user(db, request, fields=form))
            phase = phase_or_404(challenge_or_404(db, slug), name)
            if not phase.private_leaderboard:
                raise UserError(f"phase '{name}' has no private leaderboard to reveal (its scores are shown already); "
                                "to close it, set closes_at")
            if phase.revealed_at is None:
                phase.revealed_at = time.time()
                phase.closes_at = min(phase.closes_at or phase.revealed_at, phase.revealed_at)
            return {"phase": phase.name, **phase_json(phase)}

    def rescore(self, request: Request, slug: str, name: str, form: dict[str, Any]) -> int:
        with self.sessions.begin() as db:
            user = self.require_user(db, request, fields=form)
            require_organiser(user)
            return submissions.rescore_phase(db, phase_or_404(challenge_or_404(db, slug), name))

    def add_phase(self, request: Request, slug: str, form: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
        with self.sessions.begin() as db:
            require_organiser(self.require_user(db, request, fields=form))
            challenge = challenge_or_404(db, slug)
            name, split = str(settings.pop("name", "")), str(settings.pop("split", ""))
            if not PHASE_NAME.match(name):
                raise UserError(f"phase name '{name[:40]}' must be 2-32 lower-case letters, digits or '-'")
            if split not in ("public_test", "hidden_test"):
                raise UserError(f"split must be public_test or hidden_test, got '{split[:40]}'")
            if any(phase.name == name for phase in challenge.phases):
                raise UserError(f"challenge '{slug}' has a phase '{name}' already")
            phase = Phase(challenge_id=challenge.id, name=name, split=split,
                          description=str(settings.pop("description", ""))[:1000])
            apply_phase_changes(phase, settings)
            db.add(phase)
            return {"phase": name, "split": split}

    def change_protocol(self, request: Request, slug: str, form: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
        with self.sessions.begin() as db:
            require_organiser(self.require_user(db, request, fields=form))
            challenge = challenge_or_404(db, slug)
            protocol = {**challenge.protocol, **changes}
            evaluate_config(protocol)  # unknown keys and bad values are refused here
            if {"cohort", "encoders"} & set(changes):
                raise UserError("the protocol cannot set cohort or encoders: the portal does")
            challenge.protocol_json = json.dumps(protocol)
            queued = sum(submissions.rescore_phase(db, phase) for phase in challenge.phases)
            return {"protocol": protocol, "queued": queued}

    def change_user(self, request: Request, name: str, form: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
        with self.sessions.begin() as db:
            require_admin(self.require_user(db, request, fields=form))
            user = db.scalar(select(User).where(User.name == name))
            if user is None:
                raise HTTPException(404, f"no user '{name}'")
            if changes.get("role") is not None:
                if changes["role"] not in ROLES:
                    raise UserError(f"role must be one of {', '.join(ROLES)}")
                user.role = changes["role"]
            if changes.get("disabled") is not None:
                accounts.set_disabled(db, user, bool(changes["disabled"]))
            return user_json(user)

    def change_password(self, request: Request, form: dict[str, Any]) -> None:
        with self.sessions.begin() as db:
            user = self.require_user(db, request, fields=form)
            if accounts.authenticate(db, user.name, str(form.get("current", ""))) is None:
                raise HTTPException(403, "the current password is wrong")
            accounts.set_password(user, str(form.get("new", "")))


def accept_code(staging: Path, card: dict[str, Any], *, max_bytes: int) -> bool:
    """Unpacks the uploaded code of a card naming a `factory` into staging/code; True when there is code."""
    upload = staging / UPLOAD_FILES["code"]
    if "factory" not in card:
        if upload.exists():
            raise InvalidSubmission(f"code was uploaded, but the card names architecture '{card['architecture']}' "
                                    "of the portal's registry; name your code's factory instead ('factory': "
                                    "'module:function') or leave the code out")
        return False
    if not upload.exists():
        raise InvalidSubmission(f"the card names factory '{card['factory']}' but no code was uploaded (the 'code' "
                                "file: one .py file or a .tar.gz package)")
    check_code(upload, staging / "code", factory=card["factory"], max_bytes=max_bytes)
    upload.unlink()
    return True


def challenge_or_404(db, slug: str) -> Challenge:
    challenge = db.scalar(select(Challenge).where(Challenge.slug == slug))
    if challenge is None:
        raise HTTPException(404, f"no challenge '{slug}'")
    return challenge


def phase_or_404(challenge: Challenge, name: str) -> Phase:
    for phase in challenge.phases:
        if phase.name == name:
            return phase
    raise HTTPException(404, f"challenge '{challenge.slug}' has no phase '{name}'")


def visible_submission(db, user: User | None, public_id: str) -> Submission:
    """The submission, for its owner or an organiser; 404 for anyone else (its existence is not confirmed)."""
    submission = db.scalar(select(Submission).where(Submission.public_id == public_id))
    if submission is None or user is None or (submission.user_id != user.id and not user.can_organise()):
        raise HTTPException(404, "no such submission")
    return submission


def require_organiser(user: User) -> None:
    if not user.can_organise():
        raise HTTPException(403, "only organisers may do this")


def board_kind(phase: Phase, viewer: User | None) -> str:
    """What `viewer` sees of a phase's scores: "exact" (organisers), "hidden" (anyone else, on a private phase
    before its reveal) or "rounded" (anyone else: the released numbers; docs/portal.md)."""
    if viewer is not None and viewer.can_organise():
        return "exact"
    return "hidden" if phase.private_leaderboard and phase.revealed_at is None else "rounded"


def score_view(submission: Submission, viewer: User | None) -> tuple[str, dict[str, Any], str]:
    """(kind, numbers, note) of a submission as `viewer` may see it (`leaderboard.visible_score`, draws left out);
    ("none", {}, "") until it is scored."""
    if submission.status != "scored":
        return "none", {}, ""
    phase = submission.phase
    kind, numbers, note = leaderboard.visible_score(
        submission.score, json.loads(submission.released_json) if submission.released_json else None,
        exact=board_kind(phase, viewer) == "exact", private=phase.private_leaderboard,
        revealed=phase.revealed_at is not None)
    return kind, {k: v for k, v in numbers.items() if k != "draws"}, note


def report_visible(submission: Submission, viewer: User | None) -> bool:
    """Whether `viewer` may read the evaluator's report, whose numbers are exact: organisers always; participants
    only where no hidden label can be read out of it (a phase on the public test split published with its labels)
    or once the phase's private leaderboard is revealed (the phase closed then)."""
    phase = submission.phase
    return (board_kind(phase, viewer) == "exact" or phase.revealed_at is not None
            or (phase.split == "public_test" and phase.challenge.public_test_labels))


def board_rows(db, phase: Phase, *, best_only: bool = True, sort: str = "index",
               viewer: User | None = None) -> list[dict[str, Any]]:
    """The phase's leaderboard as `viewer` may see it (`board_kind`): organisers rank every entry by its exact score
    and see what participants are shown of it (`shown`); anyone else ranks the released numbers (an entry the
    Ladder withheld is left out), or gets the scored entries without any number before a private phase's reveal."""
    kind = board_kind(phase, viewer)
    entries, shown = [], {}
    for s in db.scalars(select(Submission).options(selectinload(Submission.user))
                        .where(Submission.phase_id == phase.id, Submission.status == "scored",
                               Submission.protocol_version == phase.protocol_version)):
        seen, numbers, _ = leaderboard.visible_score(
            s.score, json.loads(s.released_json) if s.released_json else None, exact=False,
            private=phase.private_leaderboard, revealed=phase.revealed_at is not None)
        shown[s.public_id] = seen
        if kind == "hidden" or kind == "exact" or seen == "rounded":
            entries.append({"participant": s.user.name, "name": s.name, "submission": s.public_id,
                            "created_at": s.created_at, "score": s.score if kind == "exact" else numbers})
    if kind == "hidden":
        return leaderboard.hidden_rows(entries)
    rows = leaderboard.leaderboard(entries, best_only=best_only)
    if kind == "exact":
        for row in rows:
            row["shown"] = shown[row["submission"]]
    if sort in leaderboard.COMPONENTS and sort != "index":
        rows.sort(key=lambda row: -(row[sort] if row[sort] is not None and not math.isnan(row[sort]) else -1e9))
    return rows


def public_row(row: dict[str, Any]) -> dict[str, Any]:
    """A leaderboard row as the JSON API gives it (no internal ids)."""
    return {k: v for k, v in row.items() if k != "submission"}


def submission_json(submission: Submission, *, with_log: bool, viewer: User | None = None) -> dict[str, Any]:
    """A submission for the API; its score as `viewer` may see it (`score_view`; without a viewer, as its owner
    does), `score_shown` saying which ("exact", "rounded", "withheld", "hidden" or "none") and `score_note` why."""
    kind, score, note = score_view(submission, viewer)
    out = {"id": submission.public_id, "name": submission.name, "challenge": submission.phase.challenge.slug,
           "phase": submission.phase.name, "status": submission.status, "stage": submission.stage,
           "progress": round(submission.progress, 3), "reason": submission.reason,
           "created_at": submission.created_at, "finished_at": submission.finished_at, "score": score,
           "score_shown": kind, "score_note": note, "url": f"/submissions/{submission.public_id}"}
    if with_log and submission.phase.show_logs:
        out["log"] = submission.log
    return out


def create_app(root: str | Path) -> FastAPI:
    portal = Portal(PortalRoot(root))
    for leftover in portal.root.uploads.iterdir():  # uploads a killed server was receiving
        if leftover.stat().st_mtime < time.time() - 3600:
            shutil.rmtree(leftover, ignore_errors=True)
    resumable.sweep(portal.sessions, portal.root)  # expired resumable uploads
    app = FastAPI(title=portal.root.settings.title, docs_url="/api/docs", redoc_url=None,
                  openapi_url="/api/openapi.json")
    app.add_middleware(BodyLimit, upload_limit=portal.root.max_upload_bytes, is_upload=is_upload_path)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    app.state.portal = portal

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "same-origin"
        return response

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        return error_response(request, error.status_code, str(error.detail))

    @app.exception_handler(OperationalError)
    async def database_unreachable(request: Request, error: OperationalError):
        response = error_response(request, 503, "the portal's database cannot be reached just now (it may be "
                                  "restarting); nothing was recorded, try again in a few seconds")
        response.headers["Retry-After"] = "5"
        return response

    @app.exception_handler(UserError)
    async def user_error(request: Request, error: UserError):
        status = 429 if isinstance(error, submissions.LimitReached) else 422 if isinstance(error, InvalidSubmission) else 400
        return error_response(request, status, str(error))

    @app.exception_handler(UploadRefused)
    async def upload_refused(request: Request, error: UploadRefused):  # 404 409 413 422 429 507, with the offset
        if request.url.path.startswith("/api/"):
            offset = {} if error.offset is None else {"offset": error.offset}
            return JSONResponse({"error": str(error), **offset}, status_code=error.status, headers=error.headers)
        return error_response(request, error.status, str(error))

    def error_response(request: Request, status: int, message: str) -> Response:
        if request.url.path.startswith("/api/") or "application/json" in request.headers.get("accept", ""):
            return JSONResponse({"error": message}, status_code=status)
        with portal.sessions() as db:
            return portal.page(request, "error.html", db, status=status, status_code=status, message=message)

    # ---- pages ---------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse)
    def index(request: Request):
        with portal.sessions() as db:
            challenges = list(db.scalars(select(Challenge).order_by(Challenge.id)))
            return portal.page(request, "index.html", db, challenges=challenges)

    @app.get("/challenges/{slug}", response_class=HTMLResponse)
    def challenge_page(request: Request, slug: str):
        with portal.sessions() as db:
            challenge = challenge_or_404(db, slug)
            downloads = db.scalars(select(Download).where(Download.challenge_id == challenge.id,
                                                          Download.split.in_(PUBLIC_SPLITS)).order_by(Download.id))
            by_split: dict[str, list[Download]] = {}
            for download in downloads:
                by_split.setdefault(download.split, []).append(download)
            user, _ = portal.identify(db, request)
            limits = {phase.name: submissions.counts(db, user, phase) for phase in challenge.phases} if user else {}
            protocol = evaluate_config(challenge.protocol)
            return portal.page(request, "challenge.html", db, challenge=challenge, downloads=by_split,
                               limits=limits, protocol=protocol, now=time.time())

    @app.get("/challenges/{slug}/datasheets/{role}", response_class=HTMLResponse)
    def datasheet(slug: str, role: str):
        with portal.sessions() as db:
            challenge = challenge_or_404(db, slug)
            record = db.scalar(select(Download).where(Download.challenge_id == challenge.id,
                                                      Download.split == "datasheet", Download.name == f"{role}.html"))
            if record is None:
                raise HTTPException(404, f"no datasheet '{role}'")
            return FileResponse(published(portal.root, record), media_type="text/html; charset=utf-8",
                                headers={"Content-Security-Policy": "default-src 'none'; img-src data:; "
                                                                    "style-src 'unsafe-inline'"})

    @app.get("/challenges/{slug}/downloads/{split}/{name}")
    def download(slug: str, split: str, name: str):
        with portal.sessions() as db:
            challenge = challenge_or_404(db, slug)
            record = db.scalar(select(Download).where(Download.challenge_id == challenge.id, Download.split == split,
                                                      Download.name == name))
            if record is None or split not in PUBLIC_SPLITS:
                raise HTTPException(404, "no such file")
            return FileResponse(published(portal.root, record), filename=record.name,
                                media_type="application/octet-stream",
                                headers={"ETag": f'"{record.sha256}"', "X-Checksum-SHA256": record.sha256})

    @app.get("/challenges/{slug}/leaderboard", response_class=HTMLResponse)
    def leaderboard_page(request: Request, slug: str, phase: str = "final", sort: str = "index", all: int = 0):
        with portal.sessions() as db:
            challenge = challenge_or_404(db, slug)
            chosen = phase_or_404(challenge, phase)
            viewer, _ = portal.identify(db, request)
            rows = board_rows(db, chosen, best_only=not all, sort=sort, viewer=viewer)
            return portal.page(request, "leaderboard.html", db, challenge=challenge, phase=chosen, rows=rows,
                               sort=sort, all=all, columns=leaderboard.COMPONENTS, labels=leaderboard.LABELS,
                               scores=board_kind(chosen, viewer), hidden_note=leaderboard.HIDDEN_NOTE)

    @app.get("/challenges/{slug}/leaderboard.csv")
    def leaderboard_csv(request: Request, slug: str, phase: str = "final", all: int = 0):
        with portal.sessions() as db:
            chosen = phase_or_404(challenge_or_404(db, slug), phase)
            viewer, _ = portal.identify(db, request)
            return PlainTextResponse(leaderboard.to_csv(board_rows(db, chosen, best_only=not all, viewer=viewer)),
                                     media_type="text/csv; charset=utf-8",
                                     headers={"Content-Disposition": f'attachment; filename="{slug}-{phase}.csv"'})

    @app.get("/login", response_class=HTMLResponse)
    def login_form(request: Request):
        nonce = secrets.token_urlsafe(24)
        with portal.sessions() as db:
            response = portal.page(request, "login.html", db, login_token=nonce)
        response.set_cookie(LOGIN_COOKIE, nonce, httponly=True, samesite="lax", max_age=3600,
                            secure=portal.root.settings.secure_cookies)
        return response

    @app.post("/login")
    async def login(request: Request):
        form = await request.form()
        if not hmac.compare_digest(str(form.get("login_token", "")), request.cookies.get(LOGIN_COOKIE, "-")):
            raise HTTPException(403, "the sign-in form expired: reload it and try again")
        return await run_in_threadpool(sign_in, str(form.get("name", "")), str(form.get("password", "")))

    def sign_in(name: str, password: str) -> Response:
        with portal.sessions.begin() as db:
            user = accounts.authenticate(db, name, password)
            if user is None:
                raise HTTPException(401, "wrong user name or password, or the account is disabled")
            token, _ = accounts.start_session(db, user, hours=portal.root.settings.session_hours)
        response = RedirectResponse("/me", status_code=303)
        response.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="lax", secure=portal.root.settings.secure_cookies,
                            max_age=int(portal.root.settings.session_hours * 3600))
        response.delete_cookie(LOGIN_COOKIE)
        return response

    @app.post("/logout")
    async def logout(request: Request):
        form = dict(await request.form())
        with portal.sessions.begin() as db:
            portal.require_user(db, request, fields=form)
            accounts.end_session(db, request.cookies.get(SESSION_COOKIE, ""))
        response = RedirectResponse("/", status_code=303)
        response.delete_cookie(SESSION_COOKIE)
        return response

    @app.get("/me", response_class=HTMLResponse)
    def me(request: Request):
        with portal.sessions() as db:
            user, _ = portal.identify(db, request)
            if user is None:
                return RedirectResponse("/login", status_code=303)
            mine = list(db.scalars(select(Submission).where(Submission.user_id == user.id)
                                   .order_by(Submission.id.desc())))
            return portal.page(request, "me.html", db, submissions=mine, new_token=None)

    @app.post("/me/tokens", response_class=HTMLResponse)
    async def make_token(request: Request):
        form = dict(await request.form())
        with portal.sessions.begin() as db:
            user = portal.require_user(db, request, fields=form)
            if form.get("action") == "revoke":
                accounts.revoke_tokens(db, user)
                token = None
            else:
                token = accounts.new_token(db, user, label=str(form.get("label", "web")))
            mine = list(db.scalars(select(Submission).where(Submission.user_id == user.id)
                                   .order_by(Submission.id.desc())))
            response = portal.page(request, "me.html", db, submissions=mine, new_token=token)
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.post("/challenges/{slug}/submit")
    async def submit_form(request: Request, slug: str):
        submission = await receive_submission(request, slug)
        return RedirectResponse(f"/submissions/{submission['id']}", status_code=303)

    @app.get("/submissions/{public_id}", response_class=HTMLResponse)
    def submission_page(request: Request, public_id: str):
        with portal.sessions() as db:
            user, _ = portal.identify(db, request)
            submission = visible_submission(db, user, public_id)
            return portal.page(request, "submission.html", db, submission=submission,
                               has_report=(submission_folder(portal.root, submission) / REPORT_HTML).is_file())

    @app.get("/submissions/{public_id}/report", response_class=HTMLResponse)
    def submission_report(request: Request, public_id: str):
        with portal.sessions() as db:
            user, _ = portal.identify(db, request)
            submission = visible_submission(db, user, public_id)
            report = submission_folder(portal.root, submission) / REPORT_HTML
            if submission.status != "scored" or not report.is_file():
                raise HTTPException(404, "this submission has no report yet")
            if not report_visible(submission, user):
                raise HTTPException(403, f"the report's numbers are exact: on phase '{submission.phase.name}' it is "
                                         "shown once the organisers reveal the leaderboard (docs/portal.md)")
            return FileResponse(report, media_type="text/html; charset=utf-8",
                                headers={"Content-Security-Policy": "default-src 'none'; img-src data:; "
                                                                    "style-src 'unsafe-inline'"})

    @app.post("/challenges/{slug}/phases/{name}")
    async def phase_settings(request: Request, slug: str, name: str):
        form = dict(await request.form())
        changes = {key: form[key] for key in ("daily_limit", "total_limit", "team_daily_limit", "ladder_step",
                                              "closes_at", "opens_at") if key in form}
        changes.update({key: key in form for key in ("frozen", "show_logs", "ladder", "private_leaderboard")})
        await run_in_threadpool(portal.update_phase, request, slug, name, form, changes)
        return RedirectResponse(f"/challenges/{slug}#phases", status_code=303)

    @app.post("/challenges/{slug}/phases/{name}/rescore")
    async def rescore_form(request: Request, slug: str, name: str):
        form = dict(await request.form())
        await run_in_threadpool(portal.rescore, request, slug, name, form)
        return RedirectResponse(f"/challenges/{slug}/leaderboard?phase={name}", status_code=303)

    @app.post("/challenges/{slug}/phases/{name}/reveal")
    async def reveal_form(request: Request, slug: str, name: str):
        form = dict(await request.form())
        await run_in_threadpool(portal.reveal, request, slug, name, form)
        return RedirectResponse(f"/challenges/{slug}/leaderboard?phase={name}", status_code=303)

    # ---- JSON API ------------------------------------------------------------------------------
    @app.get("/api/challenges")
    def api_challenges():
        with portal.sessions() as db:
            return [{"name": c.slug, "title": c.title, "url": f"/challenges/{c.slug}",
                     "phases": [p.name for p in c.phases]} for c in db.scalars(select(Challenge).order_by(Challenge.id))]

    @app.get("/api/challenges/{slug}")
    def api_challenge(slug: str):
        with portal.sessions() as db:
            challenge = challenge_or_404(db, slug)
            files = db.scalars(select(Download).where(Download.challenge_id == challenge.id,
                                                      Download.split.in_(PUBLIC_SPLITS)).order_by(Download.id))
            return {"name": challenge.slug, "title": challenge.title, "description": challenge.description,
                    "licence": challenge.licence, "public_test_labels": challenge.public_test_labels,
                    "input": challenge.input, "protocol": {**dataclasses.asdict(evaluate_config(challenge.protocol)), "cohort": "", "encoders": []},
                    "raf_formula": RAF_FORMULA,
                    "phases": [{"name": p.name, "split": p.split, "open": p.is_open(), **phase_json(p)}
                               for p in challenge.phases],
                    "downloads": [{"split": f.split, "name": f.name, "bytes": f.bytes, "sha256": f.sha256,
                                   "url": f"/challenges/{slug}/downloads/{f.split}/{f.name}"} for f in files]}

    @app.get("/api/challenges/{slug}/leaderboard")
    def api_leaderboard(request: Request, slug: str, phase: str = "final", all: int = 0, sort: str = "index"):
        with portal.sessions() as db:
            chosen = phase_or_404(challenge_or_404(db, slug), phase)
            viewer, _ = portal.identify(db, request)
            rows = board_rows(db, chosen, best_only=not all, sort=sort, viewer=viewer)
            return {"challenge": slug, "phase": phase, "protocol_version": chosen.protocol_version,
                    "scores": board_kind(chosen, viewer), "revealed_at": chosen.revealed_at,
                    "rows": [public_row(row) for row in rows]}

    @app.post("/api/challenges/{slug}/submissions", status_code=201)
    async def api_submit(request: Request, slug: str):
        return await receive_submission(request, slug)

    @app.get("/api/submissions/{public_id}")
    def api_submission(request: Request, public_id: str):
        with portal.sessions() as db:
            user, _ = portal.identify(db, request)
            return submission_json(visible_submission(db, user, public_id), with_log=True, viewer=user)

    @app.get("/api/me/submissions")
    def api_my_submissions(request: Request):
        with portal.sessions() as db:
            user, _ = portal.identify(db, request)
            if user is None:
                raise HTTPException(401, "sign in first (or pass an API token)")
            return [submission_json(s, with_log=False, viewer=user) for s in
                    db.scalars(select(Submission).where(Submission.user_id == user.id).order_by(Submission.id))]

    @app.post("/api/challenges/{slug}/phases/{name}")
    async def api_phase(request: Request, slug: str, name: str):
        changes = await json_object(request)
        return await run_in_threadpool(portal.update_phase, request, slug, name, {}, changes)

    @app.post("/api/challenges/{slug}/phases/{name}/rescore")
    async def api_rescore(request: Request, slug: str, name: str):
        return {"queued": await run_in_threadpool(portal.rescore, request, slug, name, {})}

    @app.post("/api/challenges/{slug}/phases/{name}/reveal")
    async def api_reveal(request: Request, slug: str, name: str):
        return await run_in_threadpool(portal.reveal, request, slug, name, {})

    @app.post("/api/challenges/{slug}/phases", status_code=201)
    async def api_add_phase(request: Request, slug: str):
        settings = await json_object(request)
        return await run_in_threadpool(portal.add_phase, request, slug, {}, settings)

    @app.post("/challenges/{slug}/phases")
    async def add_phase_form(request: Request, slug: str):
        form = dict(await request.form())
        settings = {k: v for k, v in form.items() if k != "csrf_token" and v != ""}
        settings["show_logs"] = "show_logs" in form
        await run_in_threadpool(portal.add_phase, request, slug, form, settings)
        return RedirectResponse(f"/challenges/{slug}#phases", status_code=303)

    @app.post("/api/challenges/{slug}/protocol")
    async def api_protocol(request: Request, slug: str):
        changes = await json_object(request)
        return await run_in_threadpool(portal.change_protocol, request, slug, {}, changes)

    @app.post("/challenges/{slug}/protocol")
    async def protocol_form(request: Request, slug: str):
        form = dict(await request.form())
        try:
            changes = yaml.safe_load(str(form.get("protocol", ""))) or {}
        except yaml.YAMLError as error:
            raise UserError(f"the protocol is not YAML: {error}") from None
        if not isinstance(changes, dict):
            raise UserError("the protocol must be evaluate keys and values, e.g. 'seeds: [0, 1, 2]'")
        await run_in_threadpool(portal.change_protocol, request, slug, form, changes)
        return RedirectResponse(f"/challenges/{slug}#protocol", status_code=303)

    @app.get("/api/admin/users")
    def api_users(request: Request):
        with portal.sessions() as db:
            require_admin(portal.identify(db, request)[0])
            return [user_json(u) for u in db.scalars(select(User).order_by(User.id))]

    @app.get("/admin/users", response_class=HTMLResponse)
    def users_page(request: Request):
        with portal.sessions() as db:
            require_admin(portal.identify(db, request)[0])
            return portal.page(request, "users.html", db, users=list(db.scalars(select(User).order_by(User.id))))

    @app.post("/api/admin/users/{name}")
    async def api_user(request: Request, name: str):
        changes = await json_object(request)
        return await run_in_threadpool(portal.change_user, request, name, {}, changes)

    @app.post("/admin/users/{name}")
    async def user_form(request: Request, name: str):
        form = dict(await request.form())
        changes = {"role": form.get("role"), "disabled": "disabled" in form}
        await run_in_threadpool(portal.change_user, request, name, form, changes)
        return RedirectResponse("/admin/users", status_code=303)

    @app.post("/me/password")
    async def password_form(request: Request):
        form = dict(await request.form())
        await run_in_threadpool(portal.change_password, request, form)
        return RedirectResponse("/me", status_code=303)

    # ---- resumable uploads (portal/resumable.py; docs/portal.md "Resumable uploads") -----------------
    def uploader(request: Request) -> int:
        with portal.sessions() as db:
            return portal.require_user(db, request).id

    @app.post(UPLOAD_ROUTE, status_code=201)
    async def api_new_upload(request: Request):
        announced = await json_object(request)
        user_id = await run_in_threadpool(uploader, request)
        state = await run_in_threadpool(resumable.create_upload, portal.sessions, portal.root, user_id, announced)
        return JSONResponse(state, status_code=201, headers={**resumable.headers(state), "Location": state["url"]})

    @app.patch(UPLOAD_ROUTE + "/{upload_id}")
    async def api_upload_chunk(request: Request, upload_id: str):
        user_id = await run_in_threadpool(uploader, request)
        state = await resumable.receive_chunk(request, portal.sessions, portal.root, user_id, upload_id)
        return JSONResponse(state, headers=resumable.headers(state))

    @app.api_route(UPLOAD_ROUTE + "/{upload_id}", methods=["GET", "HEAD"])
    async def api_upload(request: Request, upload_id: str):
        user_id = await run_in_threadpool(uploader, request)
        state = await run_in_threadpool(resumable.upload_state, portal.sessions, portal.root, user_id, upload_id)
        return JSONResponse(state, headers=resumable.headers(state))

    @app.delete(UPLOAD_ROUTE + "/{upload_id}", status_code=204)
    async def api_cancel_upload(request: Request, upload_id: str):
        user_id = await run_in_threadpool(uploader, request)
        await run_in_threadpool(resumable.cancel_upload, portal.sessions, portal.root, user_id, upload_id)
        return Response(status_code=204)

    # ---- receiving a submission ---------------------------------------------------------------
    async def receive_submission(request: Request, slug: str) -> dict[str, Any]:
        with portal.sessions() as db:  # before reading the body: who, where, and whether they may
            if portal.identify(db, request)[0] is None:
                raise HTTPException(401, "sign in first (or pass an API token: Authorization: Bearer raf_...)")
            challenge_or_404(db, slug)
        staging = new_folder(portal.root.uploads)
        fields = await receive_files(request, staging, UPLOAD_FILES, optional=(*OPTIONAL_FILES, "weights"))
        try:
            submission = await run_in_threadpool(portal.accept_submission, request, slug, staging, fields)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        resumable.discard_taken(portal.root, str(fields.get("upload", "")))  # its file is the submission's now
        return submission

    return app


async def json_object(request: Request) -> dict[str, Any]:
    try:
        value = json.loads(await request.body() or b"{}")
    except json.JSONDecodeError:
        raise HTTPException(400, "the body must be a JSON object") from None
    if not isinstance(value, dict):
        raise HTTPException(400, "the body must be a JSON object")
    return value


def require_admin(user: User | None) -> None:
    if user is None:
        raise HTTPException(401, "sign in first (or pass an API token)")
    if user.role != "admin":
        raise HTTPException(403, "only admins may do this")


def user_json(user: User) -> dict[str, Any]:
    return {"name": user.name, "role": user.role, "team": user.team, "disabled": user.disabled}


PHASE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{1,31}$")
PHASE_FIELDS = {"daily_limit": int, "total_limit": int, "team_daily_limit": int, "frozen": bool, "show_logs": bool,
                "ladder": bool, "ladder_step": float, "private_leaderboard": bool, "opens_at": "time",
                "closes_at": "time"}


def phase_json(phase: Phase) -> dict[str, Any]:
    """A phase's settings (PHASE_FIELDS) and when its private leaderboard was revealed."""
    return {**{key: getattr(phase, key) for key in PHASE_FIELDS}, "revealed_at": phase.revealed_at}


def apply_phase_changes(phase: Phase, changes: dict[str, Any]) -> None:
    """Sets phase settings from strings (a form) or JSON values; times are UNIX seconds or ISO dates. A revealed
    phase cannot open again: its leaderboard shows every entry's score, which new submissions could exploit."""
    for key, value in changes.items():
        if key not in PHASE_FIELDS:
            raise UserError(f"'{key}' is not a phase setting (settings: {', '.join(PHASE_FIELDS)})")
        kind = PHASE_FIELDS[key]
        if kind is bool:
            value = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "on", "yes")
        elif kind == "time":
            value = parse_time(value, key)
        elif kind is float:
            try:
                value = float(value or 0)
            except (TypeError, ValueError):
                raise UserError(f"{key} must be a number, got {str(value)[:40]!r}") from None
            if not 0 <= value < math.inf:
                raise UserError(f"{key} must be 0 (derived from the score's interval) or a positive number")
        else:
            try:
                value = int(value)
            except (TypeError, ValueError):
                raise UserError(f"{key} must be a whole number, got {str(value)[:40]!r}") from None
            if value < 0:
                raise UserError(f"{key} must be 0 (no limit) or more")
        setattr(phase, key, value)
    if phase.revealed_at is not None and (phase.closes_at is None or phase.closes_at > phase.revealed_at):
        raise UserError(f"phase '{phase.name}' was revealed and closed at {when(phase.revealed_at)}; it cannot open "
                        "again (add a new phase instead)")


def parse_time(value: Any, key: str) -> float | None:
    if value in (None, ""):
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        raise UserError(f"{key} must be a date such as 2027-01-31T23:59 (UTC), got {str(value)[:40]!r}") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def published(root: PortalRoot, record: Download) -> Path:
    """The file of a downloads row, which must be a regular file inside ROOT/public (no link, no escape)."""
    path = (root.public / record.relative_path)
    resolved = path.resolve()
    if path.is_symlink() or not resolved.is_file() or root.public.resolve() not in resolved.parents:
        raise HTTPException(404, "no such file")
    return resolved
