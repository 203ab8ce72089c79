"""`raf portal submit`: uploads an encoder to a portal with an API token and waits until it is scored.

The upload streams from disk (httpx multipart), so a large encoder is never read whole into memory.
"""
from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
from tqdm.auto import tqdm

from rafmedia.core.errors import UserError
from rafmedia.engine.export import card_path

FINAL = ("scored", "failed")


def _error(response: httpx.Response) -> str:
    try:
        return response.json().get("error") or response.text
    except ValueError:
        return response.text[:500]


def submit(url: str, token: str, challenge: str, weights: str | Path, *, phase: str = "sanity", name: str = "",
           wait: bool = True, timeout_s: float = 3600.0, poll_s: float = 3.0, progress: bool = True,
           log=print) -> dict[str, Any]:
    """Uploads `weights` and its card; with `wait`, polls until the submission is scored or failed. Returns the
    submission as the API gives it; a refused upload or a failed scoring is a `UserError` with the portal's
    reason."""
    weights = Path(weights)
    card = card_path(weights)
    for path in (weights, card):
        if not path.is_file():
            raise UserError(f"{path} not found (an encoder export is encoder.safetensors + encoder.card.json)")
    base = url.rstrip("/")
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    with httpx.Client(base_url=base, headers=headers, timeout=httpx.Timeout(60.0, read=600.0)) as client:
        with open(weights, "rb") as w, open(card, "rb") as c:
            try:
                response = client.post(f"/api/challenges/{challenge}/submissions",
                                       data={"phase": phase, "name": name or weights.parent.name},
                                       files={"weights": (weights.name, w, "application/octet-stream"),
                                              "card": (card.name, c, "application/json")})
            except httpx.HTTPError as error:
                raise UserError(f"could not reach the portal at {base}: {error}") from None
        if response.status_code != 201:
            raise UserError(f"the portal refused the submission ({response.status_code}): {_error(response)}")
        submission = response.json()
        log(f"submitted: {base}{submission['url']} ({submission['status']})")
        if not wait:
            return submission
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
    if submission["status"] == "failed":
        raise UserError(f"scoring failed: {submission['reason']}")
    score = submission["score"]
    low, high = score.get("index_ci95") or (float("nan"), float("nan"))
    log(f"scored: RAF {score['index']:.3f} [{low:.3f}, {high:.3f}] (P {score['performance']:.3f}, "
        f"R {score['robustness']:.3f}, F {score['fairness']:.3f}); report: {base}{submission['url']}/report")
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

