"""The `raf portal` commands as a user runs them: the client against the running server (one run as its own
process, the rest through `main`, the console entry, in this process), and user errors that print one line and
exit with code 2."""
from __future__ import annotations

import subprocess
from types import SimpleNamespace

import pytest

from rafmedia.launch.cli import main
from tests.portal.conftest import RAF


@pytest.fixture
def raf(capsys):
    def run(*args) -> SimpleNamespace:
        code = main(["portal", *map(str, args)])
        captured = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)
    return run


def test_submit_client_uploads_and_refusals_exit_2_with_the_reason(site, tmp_path, raf):
    weights = site.encoders["random1"]
    done = subprocess.run([str(RAF), "portal", "submit", str(weights), "--url", site.url, "--token",
                           site.tokens["bob"], "--challenge", "synth-raf", "--phase", "sanity", "--name",
                           "from the client", "--no-wait"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "submitted: " + site.url + "/submissions/" in done.stdout
    bad_token = raf("submit", weights, "--url", site.url, "--token", "raf_x_y", "--challenge", "synth-raf")
    assert bad_token.returncode == 2 and "refused the submission (401)" in bad_token.stderr
    no_challenge = raf("submit", weights, "--url", site.url, "--token", site.tokens["bob"], "--challenge", "nope")
    assert no_challenge.returncode == 2 and "no challenge 'nope'" in no_challenge.stderr
    lonely = tmp_path / "lonely.safetensors"
    lonely.write_bytes(weights.read_bytes())
    missing_card = raf("submit", lonely, "--url", site.url, "--token", site.tokens["bob"], "--challenge", "synth-raf")
    assert missing_card.returncode == 2 and "lonely.card.json not found" in missing_card.stderr
    unreachable = raf("submit", weights, "--url", "http://127.0.0.1:9", "--token", "t", "--challenge", "synth-raf")
    assert unreachable.returncode == 2 and "could not reach the portal" in unreachable.stderr


def test_commands_on_a_folder_that_is_not_a_portal_or_a_build(site, tmp_path, raf):
    for args in (("worker", tmp_path, "--once"), ("user", tmp_path, "token", "alice"), ("serve", tmp_path)):
        result = raf(*args)
        assert result.returncode == 2 and "is not a portal root" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    not_build = raf("add-challenge", site.root, tmp_path, "--name", "other")
    assert not_build.returncode == 2 and "is not a cohort build" in not_build.stderr
    taken = raf("add-challenge", site.root, site.build, "--name", "synth-raf")
    assert taken.returncode == 2 and "exists already" in taken.stderr
    bad_protocol = raf("add-challenge", site.root, site.build, "--name", "other", "--protocol", "seedz=[0]")
    assert bad_protocol.returncode == 2 and "did you mean 'seeds'" in bad_protocol.stderr
    unknown_user = raf("user", site.root, "token", "nobody")
    assert unknown_user.returncode == 2 and "no user 'nobody'" in unknown_user.stderr
