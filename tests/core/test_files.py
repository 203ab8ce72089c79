"""Atomic files and folders: a killed write leaves the old file or folder whole, never a mix."""
import os
import stat

import pytest

from rafmedia.core.files import atomic_write, atomic_write_text, publish_folder, read_json, write_json


def test_atomic_write_replaces_whole_files_with_normal_permissions(tmp_path):
    target = atomic_write_text(tmp_path / "a.txt", "first")
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask

    def failing(tmp):
        tmp.write_text("partial")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(target, failing)
    assert target.read_text() == "second"  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]  # no temp file left behind


def test_publish_folder_replaces_a_folder_whole_and_leaves_nothing_aside(tmp_path):
    final = tmp_path / "out"
    for version in ("old", "new"):
        staging = tmp_path / f".staging-{version}"
        (staging / "sub").mkdir(parents=True)
        (staging / "sub" / "value.txt").write_text(version)
        if version == "old":
            (staging / "only-old.txt").write_text("x")
        publish_folder(staging, final)
        assert not staging.exists()
    assert (final / "sub" / "value.txt").read_text() == "new"
    assert not (final / "only-old.txt").exists()  # not a mix of the old and the new folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old one was deleted, not left aside


def test_json_round_trip_writes_non_finite_numbers_as_null(tmp_path):
    path = write_json(tmp_path / "a.json", {"x": float("nan"), "y": [1.5, float("inf")], "z": {"w": 2}})
    assert read_json(path) == {"x": None, "y": [1.5, None], "z": {"w": 2}}
