"""`raf portal submit`: uploads an encoder to a portal with an API token and waits until it is scored.

By default the weights go as a resumable upload in chunks (`upload_file`, the protocol of portal/resumable.py):
8 MB at a time, read from disk one chunk at a time, so a large encoder is never held in memory; a dropped
connection, a server restart or a 5xx answer is retried with back-off from the offset the server holds, and the
upload's id is remembered in `~/.cache/rafmedia/portal-uploads.json` so that running the same command again after
an interruption continues the same upload. The card then goes with `upload=<id>` in the submission request, which
the server answers with the same submission when it is sent twice. `single_request=True` sends everything in one
multipart request instead (the web form's way).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from tqdm.auto import tqdm

from rafmedia.core.errors import UserError
from rafmedia.core.files import atomic_write_text, sha256_file
from rafmedia.engine.export import card_path

FINAL = ("scored", "failed")
CHUNK_MB = 8.0
RETRY_STATUSES = (500, 502, 503, 504)  # the server or a proxy in front of it is restarting: try again
MAX_BACKOFF_S = 5.0  # as tus clients do: a restarted server is found again within seconds


def _error(response: httpx.Response) -> str:
    try:
        return response.json().get("error") or response.text
    except ValueError:
        return response.text[:500]


def default_state_file() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rafmedia" / "portal-uploads.json"


class UploadMemory:
    """The ids of unfinished uploads, per portal, token and file content, in a small JSON file (atomic writes)."""

    def __init__(self, path: Path | None):
        self.path = path

    def _read(self) -> dict[str, str]:
        try:
            return json.loads(self.path.read_text(encoding="utf-8")) if self.path else {}
        except (OSError, ValueError):
            return {}

    def get(self, key: str) -> str:
        return self._read().get(key, "")

    def set(self, key: str, upload_id: str) -> None:
        self._write({**self._read(), key: upload_id})

    def forget(self, upload_id: str) -> None:
        known = self._read()
        if upload_id in known.values():
            self._write({key: value for key, value in known.items() if value != upload_id})

    def _write(self, known: dict[str, str]) -> None:
        if self.path is None:
            return
        try:
            atomic_write_text(self.path, json.dumps(known, indent=1))
        except OSError:  # remembering is a convenience: an unwritable cache only loses the resume-after-restart
            pass


class Backoff:
    """Waits 0.5, 1, 2, 4 ... (at most `MAX_BACKOFF_S`) seconds between retries; a `UserError` once nothing has
    progressed for `give_up_s`."""

    def __init__(self, give_up_s: float, log: Callable[[str], Any], sleep: Callable[[float], Any] = time.sleep):
        self.give_up_s, self.log, self.sleep = give_up_s, log, sleep
        self.progressed()

    def progressed(self) -> None:
        self.since, self.delay = time.monotonic(), 0.5

    def wait(self, why: str) -> None:
        if time.monotonic() - self.since > self.give_up_s:
            raise UserError(f"no progress for {self.give_up_s:.0f} s ({why}); run the same command again to resume "
                            "the upload where it stopped")
        self.log(f"{why}; retrying in {self.delay:g} s")
        self.sleep(self.delay)
        self.delay = min(2 * self.delay, MAX_BACKOFF_S)


def _call(client: httpx.Client, backoff: Backoff, method: str, url: str, **kwargs) -> httpx.Response:
    """A request retried with back-off while the portal cannot be reached or answers 5xx."""
    while True:
        try:
            response = client.request(method, url, **kwargs)
        except httpx.TransportError as error:
            backoff.wait(f"the portal did not answer ({type(error).__name__})")
            continue
        if response.status_code not in RETRY_STATUSES:
            return response
        backoff.wait(f"the portal answered {response.status_code}")


def refused(response: httpx.Response) -> UserError:
    return UserError(f"the portal refused the submission ({response.status_code}): {_error(response)}")


def upload_file(client: httpx.Client, path: str | Path, *, chunk_mb: float = CHUNK_MB, progress: bool = True,
                retry_for_s: float = 600.0, state_file: Path | None = None, log=print,
                sleep: Callable[[float], Any] = time.sleep) -> str:
    """Uploads `path` in chunks through `client` (base URL and token set) and returns the finished upload's id.
    Continues an upload of the same file remembered in `state_file` (None: `default_state_file()`); retries
    with back-off while nothing progressed for `retry_for_s`; refusals are `UserError`s with the portal's reason."""
    path = Path(path)
    size, sha256 = path.stat().st_size, sha256_file(path)
    memory = UploadMemory(state_file or default_state_file())
    token = client.headers.get("authorization", "")
    key = hashlib.sha256(f"{client.base_url}|{token}".encode()).hexdigest()[:16] + f":{sha256}:{size}"
    backoff = Backoff(retry_for_s, log=lambda message: log(f"upload: {message}"), sleep=sleep)
    state = None
    if remembered := memory.get(key):
        response = _call(client, backoff, "GET", f"/api/uploads/{remembered}")
        state = response.json() if response.status_code == 200 else None
        if state is not None:
            log(f"upload: continuing upload {remembered} of {path.name} at byte {state['offset']} of {size}")
    if state is None:
        response = _call(client, backoff, "POST", "/api/uploads",
                         json={"filename": path.name, "size": size, "sha256": sha256})
        if response.status_code != 201:
            raise refused(response)
        state = response.json()
        memory.set(key, state["id"])
    chunk = max(1, min(int(chunk_mb * (1 << 20)), state["chunk_max"]))
    offset, where = state["offset"], f"/api/uploads/{state['id']}"
    with open(path, "rb") as source, tqdm(total=size, initial=offset, unit="B", unit_scale=True, desc="upload",
                                          disable=not progress) as bar:
        while offset < size:
            source.seek(offset)
            data = source.read(min(chunk, size - offset))
            response = _call(client, backoff, "PATCH", where, content=data,
                             headers={"Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream"})
            if response.status_code == 200:
                offset = response.json()["offset"]
                backoff.progressed()
            elif response.status_code == 409:  # the server holds another offset, or the chunk is still arriving
                held = int(response.headers.get("upload-offset", offset))
                if held == offset:  # a chunk sent before the connection dropped is still being received
                    backoff.wait(f"the portal is still receiving a chunk at byte {offset}")
                offset = held
            else:
                if response.status_code in (404, 422):  # gone or damaged: a new run starts over
                    memory.forget(state["id"])
                raise refused(response)
            bar.n = offset
            bar.refresh()
    return state["id"]


def submit(url: str, token: str, challenge: str, weights: str | Path, *, phase: str = "sanity", name: str = "",
           wait: bool = True, timeout_s: float = 3600.0, poll_s: float = 3.0, progress: bool = True,
           single_request: bool = False, chunk_mb: float = CHUNK_MB, retry_for_s: float = 600.0,
           state_file: Path | None = None, code: str | Path | None = None, log=print) -> dict[str, Any]:
    """Uploads `weights` (in chunks, resumable; or in one request with `single_request`) and its card, and `code`
    (a .py file or a .tar.gz package) when the card names the participant's own factory; with `wait`, polls until
    the submission is scored or failed. Returns the submission as the API gives it; a refused upload or a failed
    scoring is a `UserError` with the portal's reason."""
    weights = Path(weights)
    card = card_path(weights)
    if chunk_mb <= 0:
        raise UserError(f"the chunk size must be more than 0 MB (--chunk-mb), got {chunk_mb:g}")
    for path in (weights, card, *([Path(code)] if code else [])):
        if not path.is_file():
            raise UserError(f"{path} not found (an encoder export is encoder.safetensors + encoder.card.json, "
                            "plus the code file given with --code)")
    extra = {"code": (Path(code).name, Path(code).read_bytes(), "application/octet-stream")} if code else {}
    base = url.rstrip("/")
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    fields = {"phase": phase, "name": name or weights.parent.name}
    with httpx.Client(base_url=base, headers=headers, timeout=httpx.Timeout(60.0, read=600.0)) as client:
        if single_request:
            response = _post_whole(client, challenge, fields, weights, card, base, extra)
        else:
            check_phase(client, challenge, phase, base)
            upload_id = upload_file(client, weights, chunk_mb=chunk_mb, progress=progress, retry_for_s=retry_for_s,
                                    state_file=state_file, log=log)
            backoff = Backoff(retry_for_s, log=lambda message: log(f"submit: {message}"))
            response = _call(client, backoff, "POST", f"/api/challenges/{challenge}/submissions",
                             data={**fields, "upload": upload_id},
                             files={"card": (card.name, card.read_bytes(), "application/json"), **extra})
        if response.status_code != 201:
            raise refused(response)
        submission = response.json()
        if not single_request:
            UploadMemory(state_file or default_state_file()).forget(upload_id)
        log(f"submitted: {base}{submission['url']} ({submission['status']})")
        if not wait:
            return submission
        submission = _wait_for_score(client, submission, base, timeout_s=timeout_s, poll_s=poll_s, progress=progress)
    if submission["status"] == "failed":
        raise UserError(f"scoring failed: {submission['reason']}")
    log(f"scored: {describe_score(submission)}; report: {base}{submission['url']}/report")
    return submission


def describe_score(submission: dict[str, Any]) -> str:
    """The score as the portal shows it to its owner: RAF with its interval and P, R, F (rounded where the phase
    releases rounded numbers), or why no number is shown (a private leaderboard, the Ladder)."""
    score = submission.get("score") or {}
    if not isinstance(score.get("index"), (int, float)):
        return submission.get("score_note") or "no score is shown for this phase yet"
    ci = score.get("index_ci95") or []
    interval = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if len(ci) == 2 and all(isinstance(v, (int, float)) for v in ci) else ""
    parts = ", ".join(f"{label} {score[key]:.3f}" for key, label in (("performance", "P"), ("robustness", "R"),
                                                                     ("fairness", "F"))
                      if isinstance(score.get(key), (int, float)))
    return f"RAF {score['index']:.3f}{interval}" + (f" ({parts})" if parts else "")


def check_phase(client: httpx.Client, challenge: str, phase: str, base: str) -> None:
    """Refuses before any byte is uploaded when the portal cannot be reached, or has no such challenge or phase."""
    try:
        response = client.get(f"/api/challenges/{challenge}")
    except httpx.HTTPError as error:
        raise UserError(f"could not reach the portal at {base}: {error}") from None
    if response.status_code != 200:
        raise refused(response)
    phases = [p["name"] for p in response.json().get("phases", [])]
    if phase not in phases:
        raise UserError(f"challenge '{challenge}' has no phase '{phase}' (its phases: {', '.join(phases)})")


def _post_whole(client: httpx.Client, challenge: str, fields: dict[str, str], weights: Path, card: Path,
                base: str, extra: dict[str, Any]) -> httpx.Response:
    """The weights and card (and the `extra` files) in one multipart request (streamed from disk); no retry."""
    with open(weights, "rb") as w, open(card, "rb") as c:
        try:
            return client.post(f"/api/challenges/{challenge}/submissions", data=fields,
                               files={"weights": (weights.name, w, "application/octet-stream"),
                                      "card": (card.name, c, "application/json"), **extra})
        except httpx.HTTPError as error:
            raise UserError(f"could not reach the portal at {base}: {error}") from None


def _wait_for_score(client: httpx.Client, submission: dict[str, Any], base: str, *, timeout_s: float, poll_s: float,
                    progress: bool) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    with tqdm(total=100, desc="scoring", unit="%", disable=not progress) as bar:
        while submission["status"] not in FINAL:
            if time.monotonic() > deadline:
                raise UserError(f"not scored after {timeout_s:.0f} s; follow it at {base}{submission['url']}")
            time.sleep(poll_s)
            response = client.get(f"/api/submissions/{submission['id']}")
            if response.status_code != 200:
                raise UserError(f"the portal answered {response.status_code}: {_error(response)}")
            submission = response.json()
            bar.n = int(100 * submission["progress"])
            bar.set_postfix_str(submission["stage"] or submission["status"])
            bar.refresh()
    return submission


def wait_until_answers(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 60.0) -> float:
    """Seconds until `url` answers 200 (a server `process` just started); a `UserError` naming its `log` when the
    process stops first or the time runs out."""
    began = time.perf_counter()
    while time.perf_counter() - began < timeout_s:
        if process.poll() is not None:
            raise UserError(f"the server behind {url} stopped at start-up; see {log}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return time.perf_counter() - began
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise UserError(f"{url} did not answer within {timeout_s:.0f} s; see {log}")
