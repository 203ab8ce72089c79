"""Submissions that carry their own code, scored by a real worker in the bubblewrap sandbox: an honest one scores;
each hostile one (network, writes and reads outside its scratch folder, secrets, fork bomb, memory bomb, endless
loop, endless printing, bad embeddings, a missing module, sleeping) ends `failed` with a reason naming the limit or
the denied access, changes nothing outside its scratch folder, and the same worker goes on to score the next
honest submission."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rafmedia.portal.sandbox import detect
from tests.portal.apt import ensure_installed
from tests.portal.conftest import run_worker

HONEST = '''
import torch


class TinyEncoder(torch.nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, width, 3, stride=2)
        self.embed_dim = width

    def forward(self, x):
        {forward}
        return torch.relu(self.conv(x)).mean(dim=(2, 3, 4))


def build(width=4, **paths):
    {factory}
    return TinyEncoder(width)
'''
LIMITS = {"sandbox_wall_seconds": 30.0, "sandbox_cpu_seconds": 6.0, "sandbox_memory_mb": 1200.0,
          "sandbox_processes": 64, "sandbox_output_mb": 4.0}
SECRET = "raf-sandbox-test-secret-6d1f"
# name -> (code in the factory, code in forward, words the reason must hold)
HOSTILE = {
    "network": ("import socket; socket.create_connection(('127.0.0.1', paths['port']), timeout=5)", "",
                "network"),
    "write_outside": ("open(paths['venv'] + '/raf-was-here', 'w').write('x')", "",
                      "write outside its scratch folder"),
    "read_database": ("open(paths['database'], 'rb').read()", "", "does not exist in the sandbox"),
    "read_other_submission": ("open(paths['other'], 'rb').read()", "", "does not exist in the sandbox"),
    "read_secret_key": ("open(paths['secret'], 'rb').read()", "", "does not exist in the sandbox"),
    "environment_secret": ("import os; os.environ['RAF_SANDBOX_TEST_SECRET']", "", "environment is empty"),
    "fork_bomb": ("import os\n    while True: os.fork()", "", "process limit of 64"),
    "memory_bomb": ("hoard = []\n    while True: hoard.append(bytearray(64 << 20))", "", "memory limit of 1200 MB"),
    "endless_loop": ("", "while True: pass", "CPU-time limit of 6 s"),
    "prints_gigabytes": ("while True: print('x' * 1_000_000)", "", "output limit of 4 MB"),
    "wrong_shape": ("", "return torch.zeros(2 * len(x), self.embed_dim)", "wrong shape"),
    "nan_embeddings": ("", "return torch.full((len(x), self.embed_dim), float('nan'))", "not finite"),
    "missing_module": ("import tensorflow_that_is_not_installed", "", "not installed"),
    "sleeps": ("import time; time.sleep(3600)", "", "wall-time limit of 30 s"),
}


def write_submission(folder: Path, *, factory: str = "", forward: str = "", paths: dict | None = None,
                     package: bool = False) -> Path:
    """Code, weights and card of a tiny encoder whose factory/forward run the given lines first."""
    folder.mkdir(parents=True)
    source = HONEST.format(factory=factory or "pass", forward=forward or "pass")
    namespace: dict = {}
    exec(compile(HONEST.format(factory="pass", forward="pass"), "honest", "exec"), namespace)  # noqa: S102
    torch.manual_seed(0)
    save_file(namespace["TinyEncoder"](4).state_dict(), folder / "encoder.safetensors")
    if package:  # a package: tiny_pkg/__init__.py + tiny_pkg/model.py, as a .tar.gz
        code = folder / "code.tar.gz"
        with tarfile.open(code, "w:gz") as archive:
            for name, text in (("tiny_pkg/__init__.py", ""), ("tiny_pkg/model.py", source)):
                info = tarfile.TarInfo(name)
                info.size = len(text.encode())
                archive.addfile(info, io.BytesIO(text.encode()))
        factory_name = "tiny_pkg.model:build"
    else:
        code = folder / "tiny_encoder.py"
        code.write_text(textwrap.dedent(source))
        factory_name = "tiny_encoder:build"
    card = {"format": "rafmedia.encoder/1", "factory": factory_name, "options": {"width": 4, **(paths or {})}}
    (folder / "encoder.card.json").write_text(json.dumps(card))
    return code


def upload(site, who: str, folder: Path, code: Path, *, phase: str = "sanity", name: str = ""):
    with site.client(who) as client, open(folder / "encoder.safetensors", "rb") as w, \
            open(folder / "encoder.card.json", "rb") as c, open(code, "rb") as s:
        return client.post("/api/challenges/synth-raf/submissions", data={"phase": phase, "name": name},
                           files={"weights": ("encoder.safetensors", w), "card": ("encoder.card.json", c),
                                  "code": (code.name, s)})


def fingerprint(root: Path, skip: set[Path]) -> dict[str, str]:
    """Every file under `root` outside `skip` folders and the live database, by SHA-256."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not any(path.is_relative_to(folder) for folder in skip) \
                and not path.name.startswith("portal.db"):
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module", autouse=True)
def bubblewrap():
    return ensure_installed(["bubblewrap"], lambda: shutil.which("bwrap"))


@pytest.fixture(scope="module")
def sandbox_limits(site):
    """Small sandbox limits in the test portal's settings (workers read them at start), restored afterwards."""
    settings = site.root / "portal.yaml"
    before = settings.read_text()
    settings.write_text(before + "".join(f"{key}: {value}\n" for key, value in LIMITS.items()))
    yield LIMITS
    settings.write_text(before)


def test_the_machine_offers_the_sandbox():
    support = detect()
    assert support.problem == "", support.problem  # CI must run the hostile cases, never skip them
    assert {"memory", "pids"} <= set(support.cgroups)


def test_hostile_code_fails_with_a_named_reason_and_the_worker_scores_the_next_one(site, sandbox_limits, tmp_path,
                                                                                    monkeypatch):
    monkeypatch.setenv("RAF_SANDBOX_TEST_SECRET", SECRET)
    other = next((site.root / "submissions").glob("*/encoder.safetensors"), site.root / "secret.key")
    paths = {"port": int(site.url.rsplit(":", 1)[1]), "venv": str(Path(sys.prefix)),
             "database": str(site.root / "portal.db"), "other": str(other), "secret": str(site.root / "secret.key")}
    participants = [site.new_participant(f"sandboxer{i}") for i in range(2)]
    ids = {}
    for index, (case, (factory, forward, _)) in enumerate(HOSTILE.items()):
        code = write_submission(tmp_path / case, factory=factory, forward=forward, paths=paths)
        response = upload(site, participants[index % 2], tmp_path / case, code, name=case)
        assert response.status_code == 201, response.text
        ids[case] = response.json()["id"]
    honest = write_submission(tmp_path / "honest", package=True)
    response = upload(site, "alice", tmp_path / "honest", honest, name="honest package")
    assert response.status_code == 201, response.text
    ids["honest"] = response.json()["id"]
    skip = {site.root / "submissions" / folder.name for folder in (site.root / "submissions").iterdir()}
    before = fingerprint(site.root, skip)

    worker = run_worker(site.root)  # one worker process takes every queued submission in turn
    assert worker.returncode == 0, worker.stderr
    assert "sandbox: bubblewrap" in worker.stdout

    with site.client("org") as client:
        states = {case: client.get(f"/api/submissions/{ids[case]}").json() for case in ids}
    wrong = {case: (states[case]["status"], states[case]["reason"]) for case, (_, _, words) in HOSTILE.items()
             if states[case]["status"] != "failed" or words not in states[case]["reason"]}
    assert wrong == {}
    assert SECRET not in json.dumps(states)
    assert states["honest"]["status"] == "scored", states["honest"]
    assert 0.0 <= states["honest"]["score"]["index"] <= 1.0
    assert fingerprint(site.root, skip) == before  # nothing outside the scratch folders changed
    assert not (Path(sys.prefix) / "raf-was-here").exists()
    # every scratch folder (its inputs are hidden volumes) removed after its run
    assert not list((site.root / "submissions").glob("*/work/sandbox/inputs/*.npy"))
    assert not [path for path in Path("/sys/fs/cgroup/pids").glob("rafmedia-sandbox-*")]
    assert subprocess.run(["pgrep", "-f", "raf-runner.py"], capture_output=True).returncode == 1  # nothing left


def test_hidden_phase_reasons_never_quote_the_code(site, sandbox_limits, tmp_path):
    """On a phase that hides logs the reason is a fixed sentence: code cannot spell hidden data into it."""
    who = site.new_participant("quiet-sandboxer")
    code = write_submission(tmp_path / "leaky", factory="raise ValueError('LEAKED-label-0101')")
    response = upload(site, who, tmp_path / "leaky", code, phase="final")
    assert response.status_code == 201, response.text
    assert run_worker(site.root).returncode == 0
    with site.client("org") as client:
        state = client.get(f"/api/submissions/{response.json()['id']}").json()
    assert state["status"] == "failed"
    assert "raised ValueError" in state["reason"] and "LEAKED" not in json.dumps(state)


@pytest.mark.parametrize("files, card, words", [
    ({"tiny_encoder.py": None}, {"factory": "tiny_encoder:build; rm -rf /"}, "not 'module:function'"),
    ({"tiny_encoder.py": None}, {"factory": "pkg.tiny_encoder:build"}, "is in a package"),
    ({"pkg.tar.gz": "pkg/other.py"}, {"factory": "pkg.model:build"}, "not in the uploaded code"),
    ({}, {"factory": "tiny_encoder:build"}, "no code was uploaded"),
    ({"tiny_encoder.py": None}, {"architecture": "cnn3d_small"}, "names architecture"),
    ({"evil.tar.gz": "../escape.py"}, {"factory": "escape:build"}, "not allowed"),
    ({"evil.tar.gz": "/abs.py"}, {"factory": "abs:build"}, "not allowed"),
    ({"big.py": "x" * 2_000_000}, {"factory": "big:build"}, "limit is 1024 KB"),
])
def test_malformed_code_uploads_are_refused_before_queueing(site, tmp_path, files, card, words):
    folder = tmp_path / "bad"
    write_submission(folder)
    card = {"format": "rafmedia.encoder/1", **card}
    (folder / "encoder.card.json").write_text(json.dumps(card))
    uploads = {}
    for name, content in files.items():
        path = folder / name
        if name.endswith(".tar.gz"):
            with tarfile.open(path, "w:gz") as archive:
                info = tarfile.TarInfo(content)
                info.size = 3
                archive.addfile(info, io.BytesIO(b"x=1"))
        else:
            path.write_text(content if content is not None else (folder / "tiny_encoder.py").read_text())
        uploads["code"] = (name, open(path, "rb"))
    with site.client("bob") as client, open(folder / "encoder.safetensors", "rb") as w, \
            open(folder / "encoder.card.json", "rb") as c:
        response = client.post("/api/challenges/synth-raf/submissions", data={"phase": "sanity"},
                               files={"weights": ("encoder.safetensors", w), "card": ("encoder.card.json", c),
                                      **uploads})
    assert response.status_code == 422, response.text
    assert words in response.json()["error"], response.json()
    assert not (tmp_path.parent / "escape.py").exists()
    shutil.rmtree(folder)


def test_raf_portal_submit_sends_the_code(site, tmp_path):
    from rafmedia.launch.cli import main

    who = site.new_participant("code-client")
    code = write_submission(tmp_path / "client", package=True)
    weights = tmp_path / "client" / "encoder.safetensors"
    assert main(["portal", "submit", str(weights), "--code", str(code), "--url", site.url, "--token",
                 site.tokens[who], "--challenge", "synth-raf", "--no-wait", "--quiet", "--name", "own code"]) == 0
    with site.client(who) as client:
        mine = client.get("/api/me/submissions").json()
    assert [(s["name"], s["status"]) for s in mine] == [("own code", "queued")]
