"""A plain (non-editable) `pip install .` puts the code under the rafmedia namespace with its YAML configs."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_plain_install_has_the_namespace_and_package_data(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT)], check=True, capture_output=True, text=True)
    installed = target / "rafmedia"
    assert {p.name for p in installed.iterdir()} >= {"core", "engine", "launch", "shards", "evaluate", "configs"}
    assert not (target / "engine").exists() and not (target / "evaluate").exists()  # no bare top-level modules
    assert (installed / "configs" / "default.yaml").is_file()
    assert (installed / "shards" / "alterations" / "intensity.py").is_file()
    code = ("import rafmedia.engine, rafmedia.launch.config as c; "
            "print(rafmedia.engine.__file__); print(c.load_config('tiny').cohort.num_subjects)")
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    first, second = result.stdout.split()
    assert first.startswith(str(target)) and second == "48"
