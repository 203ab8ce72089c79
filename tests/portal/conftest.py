"""One real portal for the portal tests: a small synthetic cohort built into train / public test / hidden test,
published as a challenge, users of every role, encoders to upload, and a uvicorn server on 127.0.0.1 started as
its own process (`raf portal serve`). Workers are started by the tests that need them."""
from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch

from rafmedia.core.errors import UserError
from rafmedia.engine.distributed import free_port
from rafmedia.engine.encoders import create_encoder
from rafmedia.engine.export import export_encoder
from rafmedia.launch.portal_commands import demo_spec
from rafmedia.portal.client import wait_until_answers
from rafmedia.portal.service import init_portal, manage_user, publish_challenge
from rafmedia.shards.cohort import build_cohort
from rafmedia.shards.cohort_spec import spec_from_dict

RAF = Path(sys.executable).parent / "raf"
PASSWORD = "correct horse battery"
FAST_PROTOCOL = {"seeds": [0, 1], "bootstrap_resamples": 100, "permutations": 50, "min_group_size": 3,
                 "alterations": ["gaussian_noise"], "severities": [1, 3, 5], "few_shot": [1.0]}
ROLES = {"org": "organiser", "admin": "admin", "alice": "participant", "bob": "participant", "mallory": "participant"}


@dataclass
class Site:
    root: Path
    build: Path
    url: str
    tokens: dict[str, str]
    encoders: dict[str, Path]
    server: subprocess.Popen
    extra: dict = field(default_factory=dict)

    def client(self, who: str | None = None, **kwargs) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"} if who else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120, **kwargs)

    def browser_login(self, who: str) -> httpx.Client:
        """A cookie-session client signed in through the form; `client.csrf` is its CSRF token."""
        client = httpx.Client(base_url=self.url, timeout=120)
        form = client.get("/login")
        token = re.search(r'name="login_token" value="([^"]+)"', form.text).group(1)
        response = client.post("/login", data={"login_token": token, "name": who, "password": PASSWORD})
        assert response.status_code == 303, response.text
        page = client.get("/me")
        client.csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
        return client

    def new_participant(self, name: str) -> str:
        """A fresh participant (own submission limits) with an API token; returns the name."""
        manage_user(self.root, "add", name, password=PASSWORD)
        self.tokens[name] = manage_user(self.root, "token", name)
        return name

    def upload(self, who: str, encoder: str, *, phase: str = "final", name: str = "", client=None):
        weights = self.encoders[encoder]
        client = client or self.client(who)
        with open(weights, "rb") as w, open(weights.with_name("encoder.card.json"), "rb") as c:
            return client.post("/api/challenges/synth-raf/submissions", data={"phase": phase, "name": name},
                               files={"weights": ("encoder.safetensors", w), "card": ("encoder.card.json", c)})


def export_random(folder: Path, seed: int, width: int = 8) -> Path:
    torch.manual_seed(seed)
    encoder = create_encoder("cnn3d_small", width=width)
    return export_encoder(encoder, folder / "encoder.safetensors", architecture="cnn3d_small",
                          options={"width": width}, card={"name": f"random seed {seed}"})


def run_worker(root: Path, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(RAF), "portal", "worker", str(root), "--once", *extra], capture_output=True,
                          text=True, timeout=timeout)


def start_server(root: Path, port: int, log: Path) -> subprocess.Popen:
    server = subprocess.Popen([str(RAF), "portal", "serve", str(root), "--port", str(port)],
                              stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        wait_until_answers(f"http://127.0.0.1:{port}/api/challenges", server, log, timeout_s=90)
    except UserError:
        server.kill()
        raise RuntimeError(f"portal server did not start: {log.read_text()}") from None
    return server


@pytest.fixture(scope="session")
def site(tmp_path_factory) -> Site:
    base = tmp_path_factory.mktemp("portal")
    subprocess.run([str(RAF), "synth", "--out", str(base / "synth"), "--config", "tiny", "--quiet",
                    "cohort.num_subjects=120", "cohort.shape=[24,24,24]"], check=True, capture_output=True,
                   timeout=600)
    build = build_cohort(spec_from_dict(demo_spec(base / "synth" / "cohort.zarr")), out=base / "build",
                         progress=False)
    root = base / "root"
    init_portal(root)
    publish_challenge(root, build, slug="synth-raf", title="Synthetic <b>body</b> challenge",
                      description="Score encoders <script>alert('x')</script> on a hidden split",
                      licence="CC BY 4.0", protocol=FAST_PROTOCOL, progress=False, shard_size_mb=0.2)
    tokens = {}
    for name, role in ROLES.items():
        manage_user(root, "add", name, role=role, password=PASSWORD)
        tokens[name] = manage_user(root, "token", name)
    encoders = {f"random{seed}": export_random(base / f"enc{seed}", seed) for seed in (0, 1, 2)}
    port = free_port()
    server = start_server(root, port, base / "server.log")
    yield Site(root=root, build=build, url=f"http://127.0.0.1:{port}", tokens=tokens, encoders=encoders,
               server=server)
    server.terminate()
    server.wait(timeout=30)
