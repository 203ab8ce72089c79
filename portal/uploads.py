"""Receiving an upload: the request body is capped while it streams (413 beyond the cap), file parts spool to
disk (never more than 1 MB of a file in memory), and the files land in a fresh folder named by the portal (never
by the uploader); a failed or interrupted upload leaves nothing behind.
"""
from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rafmedia.core.errors import UserError

COPY_CHUNK = 1 << 20
FORM_LIMIT = 64 * 1024  # bodies of every route that is not an upload


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: refuses a body larger than the route's cap with 413, from Content-Length at once, or
    while a body without one streams in. Upload routes (`upload_paths`) get `upload_limit`, others `FORM_LIMIT`."""

    def __init__(self, app: ASGIApp, *, upload_limit: int, is_upload):
        self.app, self.upload_limit, self.is_upload = app, upload_limit, is_upload

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        limit = self.upload_limit if self.is_upload(scope["path"]) else FORM_LIMIT
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


async def receive_files(request, folder: Path, files: dict[str, str]) -> dict[str, Any]:
    """Parses a multipart upload: each expected file field `files[field]` is written to `folder/<name>`; returns
    the text fields. `folder` is created here and removed again when anything fails."""
    folder.mkdir(parents=True)
    try:
        parser = MultiPartParser(request.headers, request.stream(), max_files=len(files), max_fields=16,
                                 max_part_size=16 * 1024)
        try:
            form = await parser.parse()
        except MultiPartException as error:
            raise UserError(f"the upload is not a valid form: {error.message}") from None
        fields: dict[str, Any] = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key not in files:
                    raise UserError(f"unexpected file field '{key}' (expected: {', '.join(files)})")
                with open(folder / files[key], "wb") as out:
                    while chunk := await value.read(COPY_CHUNK):
                        out.write(chunk)
                await value.close()
            else:
                fields[key] = value
        missing = [key for key in files if not (folder / files[key]).is_file()]
        if missing:
            raise UserError(f"the upload has no {' and no '.join(missing)} file")
        return fields
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def new_folder(parent: Path) -> Path:
    return parent / uuid.uuid4().hex
