"""Resumable uploads in chunks (`/api/uploads`, tus-like; docs/portal.md "Resumable uploads"), so that a large
encoder sent over a flaky link, or to a server that restarts, continues where it stopped.

`create_upload` records an `Upload` row and an empty `ROOT/uploads/<id>.part`; `receive_chunk` appends one chunk
at the offset the row says, under an exclusive lock on the file: written in pieces of at most `WRITE_BUFFER`,
fsync'ed, and only then `received` is moved on, so the row never counts a byte the disk does not hold. A chunk
that fails half-way (the connection drops, the disk fills, the chunk is too large) is cut off the file again;
bytes left beyond `received` by a killed server are cut off by the next chunk. The last chunk is checked against the announced SHA-256 before
it counts, so `received == size` means complete and verified. `take_upload` hands a finished upload to a
submission (a hard link into its staging folder) in the submission's own database transaction: an upload becomes
at most one submission, and a refused submission leaves the upload to be used again.
Only the owner may see or touch an upload (anyone else gets 404). Uploads without a new chunk for
`upload_expiry_hours` are removed at server start and, at most every `SWEEP_EVERY_S`, when an upload is created
(and at most every `FULL_DISK_SWEEP_S` when a chunk finds the disk full): sweeps run when space is wanted.
"""
from __future__ import annotations

import fcntl
import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from rafmedia.core.errors import UserError
from rafmedia.core.files import sha256_file
from rafmedia.portal.db import Submission, Upload
from rafmedia.portal.settings import PortalRoot
from rafmedia.portal.uploads import DISK_FULL_MESSAGE, UPLOAD_ROUTE, UploadRefused, disk_full, megabytes

SUGGESTED_CHUNK = 8 << 20  # what the client sends per PATCH
WRITE_BUFFER = 128 << 10  # a chunk reaches the disk in pieces of this size: the most of it held in memory
SWEEP_EVERY_S = 600.0
FULL_DISK_SWEEP_S = 60.0  # a chunk refused for a full disk sweeps too, at most this often
ORPHAN_AGE_S = 600.0  # a .part file without its row (a create that failed, a killed server) older than this goes
UPLOAD_ID = re.compile(r"^[0-9a-f]{24}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")


def part_path(root: PortalRoot, public_id: str) -> Path:
    return root.uploads / f"{public_id}.part"


def chunk_limit(root: PortalRoot) -> int:
    return int(root.settings.upload_chunk_mb * (1 << 20))


def upload_json(root: PortalRoot, upload: Upload) -> dict[str, Any]:
    return {"id": upload.public_id, "filename": upload.filename, "size": upload.size, "offset": upload.received,
            "sha256": upload.sha256, "complete": upload.received == upload.size,
            "expires_at": upload.updated_at + root.settings.upload_expiry_hours * 3600,
            "chunk_max": chunk_limit(root), "chunk_suggested": min(SUGGESTED_CHUNK, chunk_limit(root)),
            "url": f"{UPLOAD_ROUTE}/{upload.public_id}"}


def owned(db: Session, user_id: int, public_id: str) -> Upload:
    """The upload, for its owner; 404 for anyone else and for an unknown or expired id."""
    upload = db.scalar(select(Upload).where(Upload.public_id == public_id)) if UPLOAD_ID.match(public_id) else None
    if upload is None or upload.user_id != user_id:
        raise UploadRefused(f"no upload '{public_id[:40]}' of yours: it finished as a submission, was cancelled, "
                            "expired, or the id is wrong; start a new upload (POST /api/uploads)", status=404)
    return upload


def check_announcement(root: PortalRoot, announced: dict[str, Any]) -> tuple[str, int, str]:
    """(file name, size, sha256) of a `POST /api/uploads` body, each checked."""
    filename = Path(str(announced.get("filename", "") or "encoder.safetensors")).name[:128]
    size, sha256 = announced.get("size"), str(announced.get("sha256", "")).lower()
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise UploadRefused(f"size must be the file's length in bytes (a whole number, 1 or more), got {size!r}")
    if size > root.max_upload_bytes:
        raise UploadRefused(f"the file ({size} bytes) is larger than this portal's limit of "
                            f"{megabytes(root.max_upload_bytes)} (max_upload_mb)", status=413)
    if not SHA256.match(sha256):
        raise UploadRefused("sha256 must be the file's SHA-256 as 64 hex digits (`sha256sum FILE`)")
    return filename, size, sha256


def create_upload(sessions: sessionmaker, root: PortalRoot, user_id: int, announced: dict[str, Any]
                  ) -> dict[str, Any]:
    """Starts an upload of `announced` = {filename, size, sha256}: a row and an empty part file."""
    filename, size, sha256 = check_announcement(root, announced)
    sweep(sessions, root, every_s=SWEEP_EVERY_S)
    public_id = secrets.token_hex(12)
    with sessions.begin() as db:
        held = db.scalar(select(func.count()).select_from(Upload).where(Upload.user_id == user_id)) or 0
        if held >= root.settings.uploads_per_user:
            raise UploadRefused(f"you have {held} uploads in progress or not yet submitted, the most this portal "
                                "keeps per participant (uploads_per_user): submit or finish one, cancel one (DELETE "
                                f"/api/uploads/ID) or wait until it expires ({root.settings.upload_expiry_hours:g} h "
                                "after its last chunk)", status=429)
        try:
            with open(part_path(root, public_id), "xb"):
                pass
        except OSError as error:
            if disk_full(error):
                raise UploadRefused(DISK_FULL_MESSAGE, status=507) from None
            raise
        now = time.time()
        upload = Upload(public_id=public_id, user_id=user_id, filename=filename, size=size, received=0,
                        sha256=sha256, created_at=now, updated_at=now)
        db.add(upload)
        try:
            db.flush()
        except BaseException:
            part_path(root, public_id).unlink(missing_ok=True)
            raise
        return upload_json(root, upload)


def find_upload(sessions: sessionmaker, user_id: int, public_id: str) -> Upload:
    """The caller's upload as its row stands now (detached from the session); 404 for anyone else's."""
    with sessions() as db:
        return owned(db, user_id, public_id)


def upload_state(sessions: sessionmaker, root: PortalRoot, user_id: int, public_id: str) -> dict[str, Any]:
    return upload_json(root, find_upload(sessions, user_id, public_id))


def cancel_upload(sessions: sessionmaker, root: PortalRoot, user_id: int, public_id: str) -> None:
    with sessions.begin() as db:
        db.delete(owned(db, user_id, public_id))
    part_path(root, public_id).unlink(missing_ok=True)


def parse_offset(value: str | None) -> int:
    if value is None or not value.strip().isdigit():
        raise UploadRefused(f"a chunk needs the header Upload-Offset: the byte position it starts at (a whole "
                            f"number), got {value!r}; HEAD /api/uploads/ID gives the current one")
    return int(value)


def _move_on(sessions: sessionmaker, upload: Upload, start: int, end: int) -> bool:
    """Sets `received` from `start` to `end`, only if no other request moved it meanwhile."""
    with sessions.begin() as db:
        return db.execute(update(Upload).where(Upload.id == upload.id, Upload.received == start)
                          .values(received=end, updated_at=time.time())).rowcount == 1


def _forget(sessions: sessionmaker, root: PortalRoot, upload: Upload) -> None:
    with sessions.begin() as db:
        db.execute(delete(Upload).where(Upload.id == upload.id))
    part_path(root, upload.public_id).unlink(missing_ok=True)


def wrong_offset(offset: int, current: int, size: int) -> UploadRefused:
    state = "it is complete" if current == size else f"resend from byte {current}"
    return UploadRefused(f"this chunk starts at byte {offset}, but the upload holds {current} of {size} bytes: "
                         f"{state}", status=409, offset=current)


async def receive_chunk(request: Request, sessions: sessionmaker, root: PortalRoot, user_id: int,
                        public_id: str) -> dict[str, Any]:
    """Appends the request body to the upload at header Upload-Offset (see the module docstring); returns the
    upload's state. Refusals: 404 not the caller's, 409 wrong offset or another chunk in flight, 413 chunk too
    large, 422 the finished file's SHA-256 differs (the upload is removed), 507 the disk is full."""
    offset = parse_offset(request.headers.get("upload-offset"))
    upload = await run_in_threadpool(find_upload, sessions, user_id, public_id)
    if offset != upload.received or upload.received == upload.size:
        raise wrong_offset(offset, upload.received, upload.size)
    limit = min(chunk_limit(root), upload.size - offset)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise UploadRefused(chunk_too_large(limit, chunk_limit(root), upload.size - offset), status=413,
                            offset=offset)
    try:
        descriptor = os.open(part_path(root, public_id), os.O_RDWR)
    except FileNotFoundError:
        await run_in_threadpool(_forget, sessions, root, upload)
        raise UploadRefused("this upload's data is gone from the portal (removed by an operator); start a new "
                            "upload", status=404) from None
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UploadRefused("another chunk of this upload is being received; retry in a moment from the offset "
                                "HEAD /api/uploads/ID gives", status=409, offset=offset) from None
        upload = await run_in_threadpool(find_upload, sessions, user_id, public_id)  # it may have moved meanwhile
        on_disk = os.fstat(descriptor).st_size
        if on_disk < upload.received:  # the file lost bytes the row counts (not by this code): trust the file
            await run_in_threadpool(_move_on, sessions, upload, upload.received, on_disk)
            raise wrong_offset(offset, on_disk, upload.size)
        if offset != upload.received:
            raise wrong_offset(offset, upload.received, upload.size)
        if on_disk > offset:  # the rest of a chunk that a killed server did not finish
            os.ftruncate(descriptor, offset)
        try:
            end = await _append(request, descriptor, offset, limit, chunk_limit(root), upload.size)
        except UploadRefused as refusal:
            if refusal.status == 507:  # expired uploads may be what fills the disk: the client's retry may fit
                await run_in_threadpool(sweep, sessions, root, every_s=FULL_DISK_SWEEP_S)
            raise
        if end == upload.size and await run_in_threadpool(sha256_file, part_path(root, public_id)) != upload.sha256:
            await run_in_threadpool(_forget, sessions, root, upload)
            raise UploadRefused(f"the uploaded file's SHA-256 differs from the announced {upload.sha256}: the file "
                                "changed while it was sent or was damaged on the way. The upload was removed: "
                                "start a new one", status=422)
        if end > offset and not await run_in_threadpool(_move_on, sessions, upload, offset, end):
            os.ftruncate(descriptor, offset)
            raise UploadRefused("the upload moved on while this chunk was written; ask HEAD /api/uploads/ID for "
                                "the offset", status=409)
        upload.received, upload.updated_at = end, time.time()
        return upload_json(root, upload)
    finally:
        os.close(descriptor)  # and with it the lock


def chunk_too_large(limit: int, chunk_max: int, remaining: int) -> str:
    return (f"the chunk is larger than {megabytes(limit)}: a chunk may carry at most {megabytes(chunk_max)} "
            f"(upload_chunk_mb) and no more than the {remaining} bytes the upload still needs")


async def _append(request: Request, descriptor: int, offset: int, limit: int, chunk_max: int, size: int) -> int:
    """Writes the body at `offset` in pieces of `WRITE_BUFFER` and fsyncs; returns the end. On any failure the
    file is cut back to `offset` (nothing of a failed chunk stays) and the error raised."""
    position, buffer = offset, bytearray()
    try:
        async for piece in request.stream():
            buffer += piece
            if position + len(buffer) - offset > limit:
                raise UploadRefused(chunk_too_large(limit, chunk_max, size - offset), status=413, offset=offset)
            if len(buffer) >= WRITE_BUFFER:
                position += await run_in_threadpool(_write, descriptor, bytes(buffer), position)
                buffer.clear()
        if buffer:
            position += await run_in_threadpool(_write, descriptor, bytes(buffer), position)
        await run_in_threadpool(os.fsync, descriptor)
        return position
    except ClientDisconnect:
        os.ftruncate(descriptor, offset)
        raise UploadRefused(f"the connection closed before the chunk ended; it was discarded: resend from {offset}",
                            offset=offset) from None
    except OSError as error:
        os.ftruncate(descriptor, offset)
        if disk_full(error):
            raise UploadRefused(DISK_FULL_MESSAGE, status=507, offset=offset) from None
        raise
    except BaseException:
        os.ftruncate(descriptor, offset)
        raise


def _write(descriptor: int, data: bytes, position: int) -> int:
    view, done = memoryview(data), 0
    while done < len(data):
        done += os.pwrite(descriptor, view[done:], position + done)
    return done


def take_upload(db: Session, root: PortalRoot, user_id: int, public_id: str, target: Path) -> None:
    """Hands a complete upload of `user_id` to a submission being made in `db`'s transaction: its file is linked
    to `target` and its row deleted, so that it becomes at most one submission; if the transaction fails, the row
    and file stay and the upload can be submitted again. `discard_taken` removes the file after the commit."""
    upload = owned(db, user_id, public_id)
    if upload.received != upload.size:
        raise UploadRefused(f"upload {public_id} is not complete: {upload.received} of {upload.size} bytes received; "
                            "send the rest first", status=409, offset=upload.received)
    try:
        os.link(part_path(root, public_id), target)
    except OSError:  # a file system without hard links
        shutil.copyfile(part_path(root, public_id), target)
    db.delete(upload)
    db.flush()


def weights_from(db: Session, root: PortalRoot, user_id: int, upload: str, target: Path) -> None:
    """Makes sure a submission has its weights at `target`: sent in the request itself (the `weights` file), or
    the finished resumable upload `upload` of `user_id` (`take_upload`) - one or the other."""
    if not upload:
        if not target.is_file():
            raise UserError("the upload has no weights file: send it as the 'weights' field, or send upload=ID, the "
                            "id of a finished resumable upload (POST /api/uploads)")
        return
    if target.exists():
        raise UserError("send the weights either as the 'weights' file or as upload=ID of a finished upload, not both")
    take_upload(db, root, user_id, upload, target)


def headers(state: dict[str, Any]) -> dict[str, str]:
    """The tus-like headers of an upload's state: Upload-Offset and Upload-Length; never cached."""
    return {"Upload-Offset": str(state["offset"]), "Upload-Length": str(state["size"]), "Cache-Control": "no-store"}


def discard_taken(root: PortalRoot, public_id: str) -> None:
    if UPLOAD_ID.match(public_id):
        part_path(root, public_id).unlink(missing_ok=True)


def submission_from(db: Session, user_id: int, public_id: str) -> Submission | None:
    """The submission an upload already became (a submission made from upload X has the id X): a client whose
    answer was lost can send the same request again and gets that submission instead of a second one."""
    if not UPLOAD_ID.match(public_id):
        return None
    return db.scalar(select(Submission).where(Submission.public_id == public_id, Submission.user_id == user_id))


def sweep(sessions: sessionmaker, root: PortalRoot, *, every_s: float = 0.0) -> int:
    """Removes uploads without a new chunk for `upload_expiry_hours` (row and file), and part files without a row
    older than `ORPHAN_AGE_S`. Skipped when the last sweep (of any server process on this root: the time is the
    mtime of `ROOT/uploads/.swept`) is less than `every_s` old. Returns how many files were removed."""
    now, marker = time.time(), root.uploads / ".swept"
    try:
        if every_s and now - marker.stat().st_mtime < every_s:
            return 0
        marker.touch()
    except OSError:  # no marker yet, or no room for one: sweep anyway
        pass
    with sessions.begin() as db:
        expired = set(db.scalars(select(Upload.public_id).where(
            Upload.updated_at < now - root.settings.upload_expiry_hours * 3600)))
        if expired:
            db.execute(delete(Upload).where(Upload.public_id.in_(expired)))
        known = set(db.scalars(select(Upload.public_id)))
    removed = 0
    for path in root.uploads.glob("*.part"):
        stem = path.name[:-len(".part")]
        try:
            orphan = stem not in known and path.stat().st_mtime < now - ORPHAN_AGE_S
        except FileNotFoundError:
            continue
        if stem in expired or orphan:
            path.unlink(missing_ok=True)
            removed += 1
    return removed
