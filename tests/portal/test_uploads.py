"""Large files through real servers: resumable uploads in chunks (portal/resumable.py) and the client that sends
them (portal/client.py), against the shared site and against a server of this module's own (on a copy of the
site's root) that is killed with kill -9 mid-upload and whose upload folder is put on a tiny tmpfs; and a download
cut off half-way and resumed with a range request."""
from __future__ import annotations

import hashlib
import os
import random
import socket
import sqlite3
import subprocess
import threading
import time

import httpx
import pytest

from rafmedia.core.errors import UserError
from rafmedia.portal.client import submit
from rafmedia.portal.settings import PortalRoot
from tests.portal.uploads_support import OwnServer, Proxy

CHALLENGE = "synth-raf"
KB = 1024


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def announce(client: httpx.Client, data: bytes, **changes) -> httpx.Response:
    return client.post("/api/uploads", json={"filename": "encoder.safetensors", "size": len(data),
                                             "sha256": hashlib.sha256(data).hexdigest(), **changes})


def send(client: httpx.Client, upload: str, offset: int, data: bytes) -> httpx.Response:
    return client.patch(f"/api/uploads/{upload}", content=data, headers={"Upload-Offset": str(offset)})


def wait_for(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def parts(root) -> dict[str, int]:
    """The part files of the root's upload folder and their sizes."""
    return {path.name: path.stat().st_size for path in (root / "uploads").glob("*.part")}


def submissions_of(client: httpx.Client) -> list[dict]:
    response = client.get("/api/me/submissions")
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def own(site, tmp_path_factory):
    """A server of this module on a copy of the site's root: chunks of at most 512 KB, files of at most 3 MB."""
    server = OwnServer.copy_of(site.root, tmp_path_factory.mktemp("own"),
                               {"upload_chunk_mb": 0.5, "max_upload_mb": 3.0})
    server.start()
    yield server
    server.stop()


def test_chunked_upload_round_trip_through_the_client(site, tmp_path):
    who = site.new_participant("uma")
    weights = site.encoders["random2"]
    logs: list[str] = []
    submission = submit(site.url, site.tokens[who], CHALLENGE, weights, phase="sanity", name="in chunks", wait=False,
                        progress=False, chunk_mb=96 / KB, state_file=tmp_path / "state.json", log=logs.append)
    assert submission["status"] == "queued" and submission["name"] == "in chunks"
    stored = site.root / "submissions" / submission["id"] / "encoder.safetensors"
    assert stored.read_bytes() == weights.read_bytes()
    assert f"{submission['id']}.part" not in parts(site.root)  # the upload's file became the submission's
    with site.client(who) as client:
        assert client.get(f"/api/uploads/{submission['id']}").status_code == 404
        again = client.post(f"/api/challenges/{CHALLENGE}/submissions", data={"phase": "sanity", "upload":
                                                                                submission["id"]},
                            files={"card": ("encoder.card.json", weights.with_name("encoder.card.json").read_bytes())})
        assert again.status_code == 201 and again.json()["id"] == submission["id"]  # a retry, not a second one
        assert [s["id"] for s in submissions_of(client)] == [submission["id"]]
    assert (tmp_path / "state.json").read_text().strip() == "{}"  # nothing left to resume


def test_protocol_refusals_offsets_checksums_owners_and_sizes(site):
    who = site.new_participant("olga")
    data = payload(300 * KB, seed=1)
    with site.client(who) as client, site.client(site.new_participant("upload-stranger")) as other, site.client() as anonymous:
        created = announce(client, data)
        assert created.status_code == 201, created.text
        upload = created.json()["id"]
        assert created.json()["offset"] == 0 and created.headers["location"] == f"/api/uploads/{upload}"
        wrong = send(client, upload, 100, data[100:200])
        assert wrong.status_code == 409 and wrong.json()["offset"] == 0 and wrong.headers["upload-offset"] == "0"
        assert send(client, upload, 0, data[:100 * KB]).json()["offset"] == 100 * KB
        repeated = send(client, upload, 0, data[:100 * KB])
        assert repeated.status_code == 409 and repeated.json()["offset"] == 100 * KB
        assert client.head(f"/api/uploads/{upload}").headers["upload-offset"] == str(100 * KB)
        for method in ("GET", "HEAD", "DELETE"):
            assert other.request(method, f"/api/uploads/{upload}").status_code == 404
        assert send(other, upload, 100 * KB, data[100 * KB:]).status_code == 404
        stolen = other.post(f"/api/challenges/{CHALLENGE}/submissions", data={"phase": "sanity", "upload": upload},
                            files={"card": ("c.json", b"{}")})
        assert stolen.status_code == 404
        assert anonymous.get(f"/api/uploads/{upload}").status_code == 401
        incomplete = client.post(f"/api/challenges/{CHALLENGE}/submissions", data={"phase": "sanity", "upload": upload},
                                 files={"card": ("c.json", b"{}")})
        assert incomplete.status_code == 409 and "102400 of 307200 bytes" in incomplete.json()["error"]
        beyond = send(client, upload, 100 * KB, data[100 * KB:] + b"x")
        assert beyond.status_code == 413 and "204800 bytes the upload still needs" in beyond.json()["error"]
        assert parts(site.root)[f"{upload}.part"] == 100 * KB  # nothing of the refused chunk stayed
        damaged = send(client, upload, 100 * KB, data[100 * KB:-1] + b"!")
        assert damaged.status_code == 422 and "SHA-256 differs" in damaged.json()["error"]
        assert client.get(f"/api/uploads/{upload}").status_code == 404 and f"{upload}.part" not in parts(site.root)
        huge = announce(client, data, size=PortalRoot(site.root).max_upload_bytes + 1)
        assert huge.status_code == 413 and "max_upload_mb" in huge.json()["error"]
        assert announce(client, data, sha256="abc").status_code == 400
        fine = announce(client, data).json()["id"]
        done = send(client, fine, 0, data)
        assert done.status_code == 200 and done.json()["complete"] and done.json()["offset"] == len(data)
        assert client.delete(f"/api/uploads/{fine}").status_code == 204 and f"{fine}.part" not in parts(site.root)


def test_the_servers_caps_and_the_expiry_of_stale_uploads(own):
    """own: upload_chunk_mb 0.5, max_upload_mb 3, uploads_per_user 4 (the default), upload_expiry_hours 24."""
    who = own.participant("cleo")
    data = payload(700 * KB, seed=4)
    with own.client(who) as client:
        assert announce(client, data, size=3 * 1024 * KB + 1).status_code == 413
        held = [announce(client, data).json()["id"] for _ in range(4)]
        too_many = announce(client, data)
        assert too_many.status_code == 429 and "uploads_per_user" in too_many.json()["error"]
        big = send(client, held[0], 0, data[:600 * KB])
        assert big.status_code == 413 and "at most 0.5 MB (upload_chunk_mb)" in big.json()["error"]
        assert parts(own.root)[f"{held[0]}.part"] == 0
        with sqlite3.connect(own.root / "portal.db") as db:  # the first one saw no chunk for 25 hours
            db.execute("UPDATE uploads SET updated_at = ? WHERE public_id = ?", (time.time() - 25 * 3600, held[0]))
        os.utime(own.root / "uploads" / ".swept", (0, 0))  # the last sweep was long ago: the next start sweeps
        assert announce(client, data).status_code == 201
        assert client.get(f"/api/uploads/{held[0]}").status_code == 404 and f"{held[0]}.part" not in parts(own.root)
        for upload in held[1:]:
            assert client.delete(f"/api/uploads/{upload}").status_code == 204


def test_a_chunk_cut_off_mid_way_is_discarded_and_the_same_command_resumes(site, tmp_path):
    who = site.new_participant("nils")
    data = payload(200 * KB, seed=2)
    with site.client(who) as client:
        upload = announce(client, data).json()["id"]
        host, port = site.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as raw:  # half of a chunk, then the link drops
            raw.sendall(f"PATCH /api/uploads/{upload} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer "
                        f"{site.tokens[who]}\r\nUpload-Offset: 0\r\nContent-Length: {len(data)}\r\n\r\n".encode()
                        + data[:150 * KB])
            assert wait_for(lambda: parts(site.root)[f"{upload}.part"] >= 128 * KB)  # its first piece is on disk
        assert wait_for(lambda: parts(site.root)[f"{upload}.part"] == 0)  # and was cut off again
        assert client.get(f"/api/uploads/{upload}").json()["offset"] == 0
        client.delete(f"/api/uploads/{upload}")
    weights = site.encoders["random0"]
    proxy = Proxy(int(port), cut_after=400 * KB)  # the link drops in the middle of the second chunk
    logs: list[str] = []
    options = {"phase": "sanity", "wait": False, "progress": False, "chunk_mb": 256 / KB,
               "state_file": tmp_path / "state.json", "log": logs.append}
    try:
        with pytest.raises(UserError, match="run the same command again to resume"):  # a client that gives up at once
            submit(proxy.url, site.tokens[who], CHALLENGE, weights, retry_for_s=0, **options)
        submission = submit(proxy.url, site.tokens[who], CHALLENGE, weights, **options)  # the command run again
    finally:
        proxy.close()
    assert proxy.cuts == 1
    assert f"upload: continuing upload {submission['id']} of encoder.safetensors at byte {256 * KB} of " \
           f"{weights.stat().st_size}" in logs, logs
    stored = site.root / "submissions" / submission["id"] / "encoder.safetensors"
    assert stored.read_bytes() == weights.read_bytes()


def test_kill_9_of_the_server_mid_upload_then_the_client_resumes_and_submits_once(site, own, tmp_path):
    who = own.participant("kai")
    weights = site.encoders["random1"]
    proxy = Proxy(own.port, rate=256 * KB)  # slow enough to kill the server while a chunk is arriving
    outcome: dict = {}
    logs: list[str] = []

    def client() -> None:
        try:
            outcome["submission"] = submit(proxy.url, own.tokens[who], CHALLENGE, weights, phase="sanity",
                                           wait=False, progress=False, chunk_mb=0.5, retry_for_s=120,
                                           state_file=tmp_path / "state.json", log=logs.append)
        except BaseException as error:  # noqa: BLE001 - asserted below
            outcome["error"] = error

    thread = threading.Thread(target=client)
    thread.start()
    try:
        seen = None
        deadline = time.monotonic() + 60
        while seen is None and time.monotonic() < deadline:  # a chunk half on disk, not yet counted
            for upload, received in own.received(who):
                on_disk = parts(own.root).get(f"{upload}.part", 0)
                if received > 0 and on_disk - received >= 128 * KB:
                    seen = (upload, received, on_disk)
            time.sleep(0.01)
        assert seen is not None, "the upload never had a chunk half-written"
        own.kill()
        upload, received, on_disk = seen
        assert parts(own.root)[f"{upload}.part"] > received  # the killed server left a partial chunk behind
        own.start()
        thread.join(timeout=120)
        assert not thread.is_alive(), "the client did not finish within 120 s"
    finally:
        proxy.close()
    assert "error" not in outcome, outcome.get("error")
    submission = outcome["submission"]
    assert submission["id"] == upload and any("retrying" in line for line in logs), logs
    assert (own.root / "submissions" / upload / "encoder.safetensors").read_bytes() == weights.read_bytes()
    with own.client(who) as client:
        assert [s["id"] for s in submissions_of(client)] == [upload]  # accepted exactly once
    assert own.received(who) == [] and f"{upload}.part" not in parts(own.root)


def test_a_full_upload_disk_answers_507_keeps_nothing_partial_and_recovers(site, own, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting the tmpfs that fills up needs root")
    who = own.participant("fay")
    uploads = own.root / "uploads"
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(uploads)], check=True)
    try:
        free = os.statvfs(uploads).f_bavail * os.statvfs(uploads).f_frsize
        (uploads / "filler").write_bytes(b"\0" * (free - 300 * KB))
        data = payload(600 * KB, seed=3)
        with own.client(who) as client:
            upload = announce(client, data).json()["id"]
            assert send(client, upload, 0, data[:200 * KB]).status_code == 200
            full = send(client, upload, 200 * KB, data[200 * KB:400 * KB])
            assert full.status_code == 507 and "upload storage is full" in full.json()["error"], full.text
            assert full.json()["offset"] == 200 * KB and parts(own.root)[f"{upload}.part"] == 200 * KB
            assert client.get(f"/api/challenges/{CHALLENGE}").status_code == 200  # the server keeps serving
            weights = site.encoders["random0"]
            with open(weights, "rb") as w:
                whole = client.post(f"/api/challenges/{CHALLENGE}/submissions", data={"phase": "sanity"},
                                    files={"weights": ("encoder.safetensors", w), "card": ("c.json", b"{}")})
            assert whole.status_code == 507 and "upload storage is full" in whole.json()["error"]
            left = {path.name for path in uploads.iterdir() if not path.name.startswith(".")}
            assert left == {"filler", f"{upload}.part"}  # the one-request upload left no folder behind
            with pytest.raises(UserError, match=r"refused the submission \(507\): the portal's upload storage is full"):
                submit(own.url, own.tokens[who], CHALLENGE, weights, phase="sanity", wait=False, progress=False,
                       state_file=tmp_path / "state.json", log=lambda message: None)
            (uploads / "filler").unlink()  # space again: the same upload continues, no restart, nothing to clean
            done = send(client, upload, 200 * KB, data[200 * KB:400 * KB])
            assert done.status_code == 200 and done.json()["offset"] == 400 * KB
            assert send(client, upload, 400 * KB, data[400 * KB:]).json()["complete"]
            assert (uploads / f"{upload}.part").read_bytes() == data
    finally:
        subprocess.run(["umount", str(uploads)], check=True)


def test_a_download_cut_off_mid_way_resumes_with_a_range_request_to_the_exact_file(site):
    with site.client() as client:
        files = client.get(f"/api/challenges/{CHALLENGE}").json()["downloads"]
        shard = max((f for f in files if f["name"].endswith(".tar")), key=lambda f: f["bytes"])
        received = b""
        with client.stream("GET", shard["url"]) as response:  # the link drops after a third of the file
            for piece in response.iter_bytes(chunk_size=16 * KB):
                received += piece
                if len(received) >= shard["bytes"] // 3:
                    break
        assert 0 < len(received) < shard["bytes"]
        rest = client.get(shard["url"], headers={"Range": f"bytes={len(received)}-"})
        assert rest.status_code == 206
        assert rest.headers["content-range"] == f"bytes {len(received)}-{shard['bytes'] - 1}/{shard['bytes']}"
    assert hashlib.sha256(received + rest.content).hexdigest() == shard["sha256"]
