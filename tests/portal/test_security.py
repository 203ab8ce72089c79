"""The portal attacked through its running server (uvicorn on 127.0.0.1): the hidden split, path traversal, roles
and other participants' objects, CSRF, escaping, upload caps and refusals. Status codes and bodies are checked."""
from __future__ import annotations

import json
import re
import struct

import httpx
import pytest

from rafmedia.shards.store import CohortStore
from tests.portal.conftest import PASSWORD, run_worker

HIDDEN = "private/synth-raf/hidden_test/cohort.zarr"


def hidden_secrets(site) -> list[str]:
    """Strings that must never leave the server: hidden subject ids and the private folder's names."""
    store = CohortStore(site.root / HIDDEN)
    return [*store.subject_ids(), "hidden_test/cohort.zarr", str(site.root), "secret.key"]


@pytest.fixture(scope="module")
def scored(site):
    """alice's and bob's submissions to the final phase, scored by a real worker."""
    ids = {}
    for who, encoder in (("alice", "random0"), ("bob", "random1")):
        response = site.upload(who, encoder, name=f"{who} <script>alert(1)</script>")
        assert response.status_code == 201, response.text
        ids[who] = response.json()["id"]
    done = run_worker(site.root)
    assert done.returncode == 0, done.stderr[-3000:]
    return ids


TRAVERSALS = ["../portal.db", "..%2Fportal.db", "%2e%2e%2fportal.db", "..%252Fportal.db", "....//portal.db",
              "%2e%2e/%2e%2e/secret.key", "..\\..\\secret.key", "/etc/passwd", "%2Fetc%2Fpasswd",
              "cohort.zarr", "manifest.csv%00.tar", "shard-000000.tar/../../../private"]


@pytest.mark.parametrize("name", TRAVERSALS)
def test_download_route_reaches_nothing_but_published_files(site, name):
    with site.client() as client:
        for split in ("train", "hidden_test", "..", "%2e%2e", "datasheet", "private"):
            response = client.get(f"/challenges/synth-raf/downloads/{split}/{name}")
            assert response.status_code == 404, (split, name, response.status_code)
            assert b"case-" not in response.content and b"zarr.json" not in response.content


def test_a_symlink_planted_in_public_is_not_followed(site):
    """Even a link inside ROOT/public pointing at the hidden split is refused: downloads are database rows,
    and a row whose file is a link is served as 404."""
    from rafmedia.portal.db import Download, open_database
    from rafmedia.portal.settings import PortalRoot

    root = PortalRoot(site.root)
    link = root.public / "synth-raf" / "train" / "evil.tar"
    link.symlink_to(root.private / "synth-raf" / "hidden_test" / "cohort.zarr" / "manifest.csv")
    sessions = open_database(root.database_url)
    with sessions.begin() as db:
        db.add(Download(challenge_id=1, split="train", name="evil.tar", relative_path="synth-raf/train/evil.tar",
                        bytes=1, sha256="0" * 64))
    try:
        with site.client() as client:
            assert client.get("/challenges/synth-raf/downloads/train/evil.tar").status_code == 404
    finally:
        link.unlink()
        with sessions.begin() as db:
            db.query(Download).filter(Download.name == "evil.tar").delete()


def test_public_downloads_resume_with_range_requests_and_match_their_checksums(site):
    with site.client() as client:
        files = client.get("/api/challenges/synth-raf").json()["downloads"]
        assert {f["split"] for f in files} == {"train", "public_test"}
        shard = next(f for f in files if f["name"].endswith(".tar"))
        whole = client.get(shard["url"])
        assert whole.status_code == 200 and len(whole.content) == shard["bytes"]
        import hashlib
        assert hashlib.sha256(whole.content).hexdigest() == shard["sha256"]
        half = shard["bytes"] // 2
        tail = client.get(shard["url"], headers={"Range": f"bytes={half}-"})
        assert tail.status_code == 206
        assert tail.headers["content-range"] == f"bytes {half}-{shard['bytes'] - 1}/{shard['bytes']}"
        assert whole.content[:half] + tail.content == whole.content
        sums = client.get(next(f["url"] for f in files if f["name"] == "SHA256SUMS" and f["split"] == "train"))
        assert f"{shard['sha256']}  {shard['name']}" in sums.text


def test_public_test_manifest_names_no_hidden_subject(site):
    with site.client() as client:
        files = client.get("/api/challenges/synth-raf").json()["downloads"]
        for f in files:
            if f["name"] in ("manifest.csv", "index.json"):
                body = client.get(f["url"]).text
                assert not any(secret in body for secret in hidden_secrets(site))


def test_no_page_or_api_answer_reveals_the_hidden_split(site, scored):
    secrets = hidden_secrets(site)
    with site.client("alice") as client:
        pages = ["/", "/challenges/synth-raf", "/challenges/synth-raf/leaderboard?phase=final&all=1",
                 "/challenges/synth-raf/leaderboard.csv?phase=final&all=1", "/api/challenges/synth-raf",
                 "/api/challenges/synth-raf/leaderboard?phase=final&all=1", f"/submissions/{scored['alice']}",
                 f"/api/submissions/{scored['alice']}", "/api/me/submissions",
                 "/challenges/synth-raf/datasheets/hidden_test"]
        for page in pages:
            response = client.get(page)
            assert response.status_code == 200, (page, response.status_code)
            leaked = [secret for secret in secrets if secret in response.text]
            assert not leaked, (page, leaked[:3])
        # the evaluator's report holds exact numbers: participants do not get it on a hidden-label phase
        assert client.get(f"/submissions/{scored['alice']}/report").status_code == 403
        api = client.get(f"/api/submissions/{scored['alice']}").json()
        assert "draws" not in json.dumps(api) and "log" not in api  # the final phase shows no log
    with site.client("org") as client:
        report = client.get(f"/submissions/{scored['alice']}/report")
        assert report.status_code == 200
        assert "RAF" in report.text and "projection" not in report.text.lower()
        assert not [secret for secret in secrets if secret in report.text]


def test_report_json_on_disk_holds_aggregates_only(site, scored):
    from rafmedia.portal.db import Submission, open_database
    from rafmedia.portal.settings import PortalRoot

    root = PortalRoot(site.root)
    with open_database(root.database_url)() as db:
        folder = root.submissions / db.query(Submission).filter_by(public_id=scored["alice"]).one().folder
    report = json.loads((folder / "report.json").read_text())
    num_hidden = len(CohortStore(site.root / HIDDEN).subject_ids())

    def lists(value):
        if isinstance(value, dict):
            for item in value.values():
                yield from lists(item)
        elif isinstance(value, list):
            yield value
            for item in value:
                yield from lists(item)

    per_subject = {num_hidden, num_hidden // 2, num_hidden - num_hidden // 2}  # every subject, a probe's test/train
    assert not [len(v) for v in lists(report) if len(v) in per_subject]  # histograms (20 bins) are aggregates
    assert "subjects" not in report["cohort"]


# ---- roles ------------------------------------------------------------------------------------
def test_every_route_against_every_role_and_another_participants_objects(site, scored):
    """(route, method, who) -> expected status; bob's submission is 'another participant's object' for alice and
    mallory. Anonymous callers of participant routes get 401, participants on organiser routes 403."""
    bob = scored["bob"]
    cases = [
        ("GET", f"/api/submissions/{bob}", {None: 404, "alice": 404, "mallory": 404, "bob": 200, "org": 200, "admin": 200}),
        ("GET", f"/submissions/{bob}", {None: 404, "alice": 404, "bob": 200, "org": 200}),
        ("GET", f"/submissions/{bob}/report", {None: 404, "alice": 404, "bob": 403, "admin": 200}),
        ("GET", "/api/submissions/000000000000000000000000", {"alice": 404, "org": 404}),
        ("GET", "/api/me/submissions", {None: 401, "alice": 200}),
        ("POST", "/api/challenges/synth-raf/phases/sanity", {None: 401, "alice": 403, "bob": 403, "org": 200, "admin": 200}),
        ("POST", "/api/challenges/synth-raf/phases/final/rescore", {None: 401, "alice": 403}),
        ("POST", "/api/challenges/synth-raf/submissions", {None: 401}),
        ("GET", "/api/challenges/synth-raf/leaderboard?phase=final", {None: 200, "alice": 200}),
        ("GET", "/api/admin/users", {None: 401, "alice": 403, "org": 403, "admin": 200}),
        ("GET", "/admin/users", {None: 401, "alice": 403, "org": 403, "admin": 200}),
        ("POST", "/api/admin/users/bob", {None: 401, "alice": 403, "org": 403, "admin": 200}),
        ("POST", "/api/challenges/synth-raf/protocol", {None: 401, "alice": 403, "bob": 403, "org": 400}),
        ("POST", "/api/challenges/synth-raf/phases", {None: 401, "alice": 403, "org": 400}),
        ("GET", "/challenges/synth-raf/leaderboard?phase=nope", {None: 404}),
        ("GET", "/", {None: 200, "alice": 200}),
        ("GET", "/challenges/synth-raf", {None: 200, "alice": 200, "org": 200}),
        ("GET", "/challenges/synth-raf/datasheets/train", {None: 200}),
        ("GET", "/challenges/synth-raf/datasheets/../../portal.yaml", {None: 404}),
        ("GET", "/challenges/synth-raf/leaderboard.csv?phase=final", {None: 200}),
        ("GET", "/me", {None: 303, "alice": 200}),
        ("GET", "/login", {None: 200}),
        # the form routes: anonymous 401, a participant on an organiser's or admin's form 403
        ("POST", "/logout", {None: 401}),
        ("POST", "/me/tokens", {None: 401}),
        ("POST", "/me/password", {None: 401, "alice": 403}),  # the current password is wrong
        ("POST", "/challenges/synth-raf/submit", {None: 401}),
        ("POST", "/challenges/synth-raf/phases", {None: 401, "alice": 403}),
        ("POST", "/challenges/synth-raf/phases/final", {None: 401, "alice": 403}),
        ("POST", "/challenges/synth-raf/phases/final/rescore", {None: 401, "bob": 403}),
        ("POST", "/challenges/synth-raf/protocol", {None: 401, "alice": 403}),
        ("POST", "/admin/users/bob", {None: 401, "alice": 403, "org": 403}),
        ("GET", "/challenges/nope", {None: 404}),
    ]
    for method, path, expected in cases:
        for who, status in expected.items():
            with site.client(who) as client:
                body = ({"daily_limit": 10} if "phases/" in path else {"role": "participant"} if "admin" in path
                        else {"not_a_setting": 1})
                response = (client.request(method, path, json=body) if method == "POST"
                            else client.get(path, follow_redirects=False))
                assert response.status_code == status, (method, path, who, response.status_code, response.text[:200])
    # another participant's submission: nothing of it in the 404 body
    with site.client("alice") as client:
        assert "bob" not in client.get(f"/api/submissions/{bob}").text


def test_a_revoked_token_and_a_disabled_user_are_refused(site):
    from rafmedia.portal.service import manage_user

    token = manage_user(site.root, "token", "mallory")
    assert httpx.get(f"{site.url}/api/me/submissions", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    manage_user(site.root, "revoke", "mallory")
    assert httpx.get(f"{site.url}/api/me/submissions", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    assert httpx.get(f"{site.url}/api/me/submissions",
                     headers={"Authorization": "Bearer raf_nothere_guess"}).status_code == 401


def test_sessions_need_the_csrf_token_and_cookies_are_httponly_samesite(site):
    client = httpx.Client(base_url=site.url, timeout=60)
    form = client.get("/login")
    login_token = re.search(r'name="login_token" value="([^"]+)"', form.text).group(1)
    assert client.post("/login", data={"login_token": "forged", "name": "org", "password": PASSWORD}).status_code == 403
    wrong = client.post("/login", data={"login_token": login_token, "name": "org", "password": "wrong password"})
    assert wrong.status_code == 401
    signed = site.browser_login("org")
    cookie = next(h for h in signed.cookies.jar)
    assert cookie.name == "raf_session" and cookie.has_nonstandard_attr("HttpOnly")
    raw = httpx.Client(base_url=site.url).get("/login").headers.get("set-cookie", "")
    assert "HttpOnly" in raw and "SameSite=lax" in raw.replace("Lax", "lax")
    # a forged cross-site form post (the session cookie but no CSRF token) changes nothing
    before = signed.get("/api/challenges/synth-raf").json()["phases"][0]["daily_limit"]
    forged = signed.post("/challenges/synth-raf/phases/sanity", data={"daily_limit": "999"})
    assert forged.status_code == 403
    assert signed.get("/api/challenges/synth-raf").json()["phases"][0]["daily_limit"] == before
    ok = signed.post("/challenges/synth-raf/phases/sanity", data={"daily_limit": "7", "show_logs": "on",
                                                                  "csrf_token": signed.csrf})
    assert ok.status_code == 303
    assert signed.get("/api/challenges/synth-raf").json()["phases"][0]["daily_limit"] == 7
    headers = signed.get("/challenges/synth-raf").headers
    assert "script-src 'self'" in headers["content-security-policy"] and headers["x-frame-options"] == "DENY"


def test_user_text_is_escaped_on_every_page(site, scored):
    with site.client("alice") as client:
        for page in ["/challenges/synth-raf", "/", f"/submissions/{scored['alice']}",
                     "/challenges/synth-raf/leaderboard?phase=final&all=1"]:
            text = client.get(page).text
            assert "<script>alert" not in text, page
        board = client.get("/challenges/synth-raf/leaderboard?phase=final&all=1").text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in board
        assert "&lt;b&gt;body&lt;/b&gt;" in client.get("/challenges/synth-raf").text
        csv = client.get("/challenges/synth-raf/leaderboard.csv?phase=final&all=1").text
        assert "alice <script>alert(1)</script>" in csv  # CSV is data, served as text/csv


# ---- uploads ----------------------------------------------------------------------------------
def test_uploads_beyond_the_cap_get_413_and_leave_nothing(site, tmp_path):
    from rafmedia.portal.settings import PortalRoot

    root = PortalRoot(site.root)
    before = set(root.uploads.iterdir()), set(root.submissions.iterdir())
    big = tmp_path / "big.safetensors"
    with open(big, "wb") as handle:
        handle.truncate(root.max_upload_bytes + 1024)
    with site.client("alice") as client, open(big, "rb") as w:
        response = client.post("/api/challenges/synth-raf/submissions", data={"phase": "sanity"},
                               files={"weights": ("e.safetensors", w), "card": ("c.json", b"{}")})
    assert response.status_code == 413

    def chunks():  # no Content-Length: the cap applies while the body streams
        yield b"--x\r\nContent-Disposition: form-data; name=\"weights\"; filename=\"a\"\r\n\r\n"
        for _ in range(root.max_upload_bytes // (1 << 20) + 2):
            yield b"\0" * (1 << 20)
    with site.client("alice") as client:
        streamed = client.post("/api/challenges/synth-raf/submissions", content=chunks(),
                               headers={"content-type": "multipart/form-data; boundary=x"})
    assert streamed.status_code == 413
    assert (set(root.uploads.iterdir()), set(root.submissions.iterdir())) == before


@pytest.mark.parametrize("kind", ["pickle", "zip", "garbage", "bad-header", "truncated", "unknown-arch",
                                  "wrong-shapes", "bad-option"])
def test_invalid_encoders_are_refused_with_a_reason(site, tmp_path, kind):
    import pickle
    import zipfile

    weights = site.encoders["random0"]
    raw = weights.read_bytes()
    card = json.loads(weights.with_name("encoder.card.json").read_text())
    expected = {"pickle": "pickle", "zip": "zip archive", "garbage": "not safetensors",
                "bad-header": "not JSON", "truncated": "damaged", "unknown-arch": "not one the portal knows",
                "wrong-shapes": "do not fit", "bad-option": "not an option"}[kind]
    if kind == "pickle":
        raw = pickle.dumps({"weight": [1.0, 2.0]})
    elif kind == "zip":
        path = tmp_path / "model.pt"
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("archive/data.pkl", pickle.dumps({}))
        raw = path.read_bytes()
    elif kind == "garbage":
        raw = b"\xff" * 64
    elif kind == "bad-header":
        raw = struct.pack("<Q", 10) + b"not json!!" + b"\0" * 8
    elif kind == "truncated":
        raw = raw[:-100]
    elif kind == "unknown-arch":
        card["architecture"] = "cnn3d_smal"
    elif kind == "wrong-shapes":
        card["options"] = {"width": 16}
    elif kind == "bad-option":
        card["options"] = {"width": 8, "exec": "import os"}
    with site.client("alice") as client:
        response = client.post("/api/challenges/synth-raf/submissions", data={"phase": "sanity"},
                               files={"weights": ("encoder.safetensors", raw),
                                      "card": ("encoder.card.json", json.dumps(card).encode())})
    assert response.status_code == 422, response.text
    assert expected in response.json()["error"], response.json()["error"]
    if kind == "unknown-arch":
        assert "did you mean 'cnn3d_small'" in response.json()["error"]


def test_daily_limits_are_enforced(site):
    site.new_participant("carol")
    with site.client("admin") as admin:
        assert admin.post("/api/challenges/synth-raf/phases/sanity", json={"daily_limit": 1}).status_code == 200
    first = site.upload("carol", "random2", phase="sanity")
    second = site.upload("carol", "random2", phase="sanity")
    assert first.status_code == 201 and second.status_code == 429
    assert "limit of 1 submissions per day" in second.json()["error"]
    with site.client("admin") as admin:
        assert admin.post("/api/challenges/synth-raf/phases/sanity", json={"frozen": True}).status_code == 200
    assert "frozen" in site.upload("alice", "random2", phase="sanity").json()["error"]
    with site.client("admin") as admin:
        admin.post("/api/challenges/synth-raf/phases/sanity", json={"frozen": False, "daily_limit": 10})
