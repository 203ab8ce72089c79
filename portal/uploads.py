"""Receiving an upload in one request (the web form, `POST .../submissions` with `weights` and `card` files): the
request body is capped while it streams (413 beyond the cap), file parts spool to disk (never more than 1 MB of a
file in memory), and the files land in a fresh folder named by the portal (never by the uploader); a failed or
interrupted upload leaves nothing behind, a full disk is a 507. Resumable uploads in chunks are in `resumable.py`.
"""
from __future__ import annotations

import errno
import shutil
import uuid
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rafmedia.core.errors import UserError

COPY_CHUNK = 1 << 20
FORM_LIMIT = 64 * 1024  # bodies of every route that is not an upload
UPLOAD_ROUTE = "/api/uploads"  # the resumable uploads' routes (resumable.py)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_MESSAGE = ("the portal's upload storage is full; nothing of this request was kept. Retry later (a "
                     "resumable upload continues from its last complete chunk), and tell the organisers if it lasts")


class UploadRefused(UserError):
    """A refused upload request, answered with `status`; `offset`, when known, is where the next chunk must start
    (sent as the Upload-Offset header and in the JSON body)."""

    def __init__(self, message: str, *, status: int = 400, offset: int | None = None):
        super().__init__(message)
        self.status, self.offset = status, offset

    @property
    def headers(self) -> dict[str, str]:
        return {} if self.offset is None else {"Upload-Offset": str(self.offset)}


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: refuses a body larger than the route's cap with 413, from Content-Length at once, or
    while a body without one streams in. Upload routes (`is_upload(path)`, and the chunks of resumable uploads) get
    `upload_limit`, others `FORM_LIMIT`; the chunk route applies its own, smaller, per-chunk cap."""

    def __init__(self, app: ASGIApp, *, upload_limit: int, is_upload):
        self.app, self.upload_limit, self.is_upload = app, upload_limit, is_upload

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        path = scope["path"]
        limit = self.upload_limit if self.is_upload(path) or path.startswith(UPLOAD_ROUTE + "/") else FORM_LIMIT
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return await _too_large(send, limit)
        received = 0
        started = False

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge()
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except BodyTooLarge:
            if not started:
                await _too_large(send, limit)


async def _too_large(send: Send, limit: int) -> None:
    body = (f"request body larger than the limit of {limit // (1024 * 1024) or limit} "
            f"{'MB' if limit >= 1024 * 1024 else 'bytes'}").encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def megabytes(limit: int) -> str:
    return f"{limit / (1 << 20):.3g} MB" if limit >= 1 << 16 else f"{limit} bytes"


def disk_full(error: OSError) -> bool:
    return error.errno in DISK_FULL


async def receive_files(request, folder: Path, files: dict[str, str], *, optional: tuple[str, ...] = ()
                        ) -> dict[str, Any]:
    """Parses a multipart upload: each expected file field `files[field]` is written to `folder/<name>`; returns
    the text fields. Fields in `optional` may be absent. `folder` is created here and removed again when anything
    fails; a full disk is an `UploadRefused` (507)."""
    try:
        folder.mkdir(parents=True)
    except OSError as error:
        if disk_full(error):
            raise UploadRefused(DISK_FULL_MESSAGE, status=507) from None
        raise
    try:
        parser = MultiPartParser(request.headers, request.stream(), max_files=len(files), max_fields=16,
                                 max_part_size=16 * 1024)
        try:
            form = await parser.parse()
        except MultiPartException as error:
            raise UserError(f"the upload is not a valid form: {error.message}") from None
        fields: dict[str, Any] = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile) and not value.filename and key in optional:
                await value.close()  # a form's file input left empty
                continue
            if isinstance(value, UploadFile):
                if key not in files:
                    raise UserError(f"unexpected file field '{key}' (expected: {', '.join(files)})")
                try:
                    await run_in_threadpool(_save, value.file, folder / files[key])
                except OSError as error:
                    if disk_full(error):
                        raise UploadRefused(DISK_FULL_MESSAGE, status=507) from None
                    raise
                await value.close()
            else:
                fields[key] = value
        missing = [key for key in files if key not in optional and not (folder / files[key]).is_file()]
        if missing:
            raise UserError(f"the upload has no {' and no '.join(missing)} file")
        return fields
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _save(source, path: Path) -> None:
    """Copies a spooled upload part to `path` (in a thread: the event loop never waits on the disk)."""
    source.seek(0)
    with open(path, "wb") as out:
        shutil.copyfileobj(source, out, COPY_CHUNK)


def new_folder(parent: Path) -> Path:
    return parent / uuid.uuid4().hex
