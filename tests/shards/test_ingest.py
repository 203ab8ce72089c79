"""`raf shards ingest` on real files: listings, preprocessing against MONAI/scipy/hand-computed references,
bad input reported (not fatal), atomic and resumable writes under SIGKILL, array tasks and worker processes
that give the same store as one process."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from rafmedia.core.errors import UserError
from rafmedia.launch.cli import main
from rafmedia.shards.formats import BadInput
from rafmedia.shards.ingest import REPORT_JSON, IngestConfig, consolidate, ingest, resolve_task
from rafmedia.shards.listing import list_inputs
from rafmedia.shards.preprocess import SubjectVolumes, create_intensity_policy, crop_foreground, policy_entry
from rafmedia.shards.store import CohortStore, StoreConfig
from tests.shards.test_formats import write_dicom_series, write_nifti

SHAPE = (30, 34, 22)
ORIENTATIONS = [  # RAS affines (before the origin): identity axes, L-flipped, and permuted + flipped
    np.diag([1.0, 1.25, 2.0]),
    np.diag([-1.0, 1.25, 2.0]),
    np.array([[0.0, 0.0, -2.0], [1.0, 0.0, 0.0], [0.0, -1.25, 0.0]]),
]
TARGET = "ingest.spacing=[1.5,1.5,1.5]"


def subject_volumes(index: int, shape=SHAPE):
    """Two smooth channels with noise and a 3-class label, different for every subject."""
    rng = np.random.default_rng([7, index])
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    center = rng.uniform(-0.2, 0.2, size=3)[:, None, None, None]
    radius = np.sqrt(((grid - center) ** 2 / np.array([0.5, 0.4, 0.6])[:, None, None, None] ** 2).sum(0))
    label = (radius < 1).astype(np.uint8) + (radius < 0.5)
    t1 = (200 * label + 50 * grid[0] + rng.normal(0, 10, shape)).astype(np.float32)
    t2 = (100 * (label == 1) + 80 * grid[1] + rng.normal(0, 10, shape) + 300).astype(np.float32)
    return t1, t2, label


def affine_for(index: int) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = ORIENTATIONS[index % len(ORIENTATIONS)]
    affine[:3, 3] = [10.0 * index - 20, -15.0, 30.5]
    return affine


def write_cohort(root: Path, num_subjects: int) -> Path:
    """NIfTI files of `num_subjects` two-channel subjects with labels, and a CSV listing with metadata."""
    root.mkdir(parents=True, exist_ok=True)
    lines = ["subject_id,image:t1,image:t2,label,site,sex,age"]
    for index in range(num_subjects):
        t1, t2, label = subject_volumes(index)
        for name, array in (("t1", t1), ("t2", t2), ("seg", label)):
            write_nifti(root / f"s{index:02d}_{name}.nii.gz", array, affine_for(index))
        lines.append(f"s{index:02d},s{index:02d}_t1.nii.gz,s{index:02d}_t2.nii.gz,s{index:02d}_seg.nii.gz,"
                     f"site-{'ab'[index % 2]},{'FM'[index % 3 == 0]},{40 + index}")
    listing = root / "subjects.csv"
    listing.write_text("\n".join(lines) + "\n")
    return listing


def snapshot(path: Path):
    """Everything that must be identical between two ingests of one input: subjects, attrs, arrays, manifest."""
    store = CohortStore(path)
    subjects = {}
    for subject_id in store.subject_ids():
        attrs = store.subject_attrs(subject_id)
        names = attrs["channels"] + (["label"] if attrs["has_label"] else [])
        subjects[subject_id] = (attrs, {name: store.read(subject_id, name) for name in names})
    return subjects, (path / "manifest.csv").read_text()


def assert_same_store(first: Path, second: Path) -> None:
    (subjects_a, manifest_a), (subjects_b, manifest_b) = snapshot(first), snapshot(second)
    assert list(subjects_a) == list(subjects_b)
    for subject_id, (attrs, arrays) in subjects_a.items():
        assert attrs == subjects_b[subject_id][0], subject_id
        for name, array in arrays.items():
            other = subjects_b[subject_id][1][name]
            assert array.dtype == other.dtype and np.array_equal(array, other), (subject_id, name)
    assert manifest_a == manifest_b


def visible(subjects: Path) -> list[str]:
    """Subject folders under subjects/ (the group's own zarr.json aside), finished or not."""
    return sorted(p.name for p in subjects.iterdir() if p.is_dir()) if subjects.is_dir() else []


def run_raf(*args: str) -> int:
    return main([*map(str, args)])


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Ten subjects in a CSV listing, ingested once in one process (the reference for the other runs)."""
    root = tmp_path_factory.mktemp("ingest")
    listing = write_cohort(root / "files", 10)
    assert run_raf("shards", "ingest", "--input", listing, "--out", root / "reference", "--workers", "1",
                   "--quiet", TARGET) == 0
    return listing, root / "reference" / "cohort.zarr"


# ---- listings ------------------------------------------------------------------------------------------
def test_multichannel_csv_listing_keeps_channels_label_metadata_and_provenance(cohort):
    _, reference = cohort
    store = CohortStore(reference)
    assert store.subject_ids() == [f"s{i:02d}" for i in range(10)]
    attrs = store.subject_attrs("s02")  # the permuted orientation
    assert attrs["channels"] == ["t1", "t2"] and attrs["has_label"]
    assert attrs["metadata"] == {"site": "site-a", "sex": "F", "age": 42}
    assert attrs["spacing"] == [1.5, 1.5, 1.5] and attrs["orientation"] == "RAS"
    assert [step["step"] for step in attrs["provenance"]] == ["read", "reorient", "resample", "intensity", "cast"]
    assert "".join(nib.aff2axcodes(affine_for(2))) == "AIL"
    assert attrs["provenance"][1]["params"] == {"from": "AIL", "to": "RAS"}
    assert attrs["provenance"][2]["before"]["spacing"] == [2.0, 1.0, 1.25]  # after reorientation to RAS
    label = store.read_label("s02")
    assert label.dtype == np.uint8 and set(np.unique(label)) == {0, 1, 2}
    # MR policy (default for t1/t2): percentile clip then z-score, so the stored channel has mean 0, std 1.
    for channel in ("t1", "t2"):
        values = store.read("s02", channel).astype(np.float64)
        assert abs(values.mean()) < 1e-4 and abs(values.std() - 1) < 1e-4
    # The label is still on the image: its world centroid moved by less than a voxel through resampling.
    _, _, source_label = subject_volumes(2)
    for value in (1, 2):
        source = affine_for(2) @ np.append(np.argwhere(source_label == value).mean(0), 1)
        stored = np.array(attrs["affine"]) @ np.append(np.argwhere(label == value).mean(0), 1)
        assert np.abs(source - stored).max() < 1.0  # half the coarsest source voxel (2 mm)
    rows = store.read_manifest()
    assert [row["subject_id"] for row in rows] == store.subject_ids()
    assert rows[2]["age"] == 42 and rows[2]["site"] == "site-a" and 0 < rows[2]["label_foreground"] < 1
    assert {"t1_mean", "t2_noise", "spacing_2", "flags"} <= set(rows[0])


def test_bids_layout_with_sessions_and_participants_metadata(tmp_path):
    root = tmp_path / "bids"
    (root / "participants.tsv").parent.mkdir(parents=True)
    (root / "participants.tsv").write_text("participant_id\tsex\tage\nsub-01\tF\t31\nsub-02\tM\tn/a\n")
    t1, t2, label = subject_volumes(0, shape=(12, 14, 10))
    for unit in ("sub-01/ses-01", "sub-01/ses-02", "sub-02/ses-01"):
        stem = unit.replace("/", "_")
        anat = root / unit / "anat"
        anat.mkdir(parents=True)
        write_nifti(anat / f"{stem}_T1w.nii.gz", t1, np.eye(4))
        write_nifti(anat / f"{stem}_FLAIR.nii.gz", t2, np.eye(4))
        write_nifti(anat / f"{stem}_dseg.nii.gz", label, np.eye(4))
        (anat / f"{stem}_T1w.json").write_text("{}")
    listing = list_inputs(root)
    assert listing.kind == "bids layout"
    assert [s.subject_id for s in listing.subjects] == ["sub-01_ses-01", "sub-01_ses-02", "sub-02_ses-01"]
    assert len(listing.ignored) == 3 and listing.ignored[0].endswith("_T1w.json")
    assert run_raf("shards", "ingest", "--input", root, "--out", tmp_path / "out", "--workers", "1", "--quiet") == 0
    store = CohortStore(tmp_path / "out" / "cohort.zarr")
    attrs = store.subject_attrs("sub-01_ses-02")
    assert attrs["channels"] == ["FLAIR", "T1w"] and attrs["has_label"]
    assert attrs["metadata"] == {"participant_id": "sub-01", "sex": "F", "age": 31, "session": "ses-02"}
    assert store.subject_attrs("sub-02_ses-01")["metadata"]["age"] is None  # BIDS "n/a"
    intensity = attrs["provenance"][3]["params"]
    assert intensity["T1w"]["config_key"] == "t1w" and intensity["T1w"]["name"] == "mr_zscore"
    np.testing.assert_array_equal(store.read_label("sub-01_ses-01"), label)


def test_plain_folder_pairs_labels_dicom_folders_and_reports_orphans(tmp_path):
    t1, _, label = subject_volumes(1, shape=(8, 9, 6))
    write_nifti(tmp_path / "a.nii.gz", t1, np.eye(4))
    write_nifti(tmp_path / "a_seg.nii.gz", label, np.eye(4))
    write_nifti(tmp_path / "b.nii", t1, np.eye(4))
    write_nifti(tmp_path / "x_label.nii", label, np.eye(4))
    write_dicom_series(tmp_path / "c", (t1 * 10).astype(np.int16))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "docs").mkdir()
    listing = list_inputs(tmp_path)
    assert listing.kind == "folder"
    sources = {s.subject_id: s for s in listing.subjects}
    assert list(sources) == ["a", "b", "c", "x"]
    assert sources["a"].label.name == "a_seg.nii.gz" and sources["b"].label is None
    assert sources["c"].images["image"].is_dir()
    assert sources["x"].problem == "label file x_label.nii has no image named x.<ext>"
    assert listing.ignored == ["docs/", "notes.txt"]


# ---- preprocessing ---------------------------------------------------------------------------------------
def test_resampling_matches_a_scipy_reference_and_the_label_stays_aligned(tmp_path):
    shape, spacing = (24, 14, 10), (1.0, 2.0, 3.0)
    t1, _, label = subject_volumes(3, shape=shape)
    image = ndimage.gaussian_filter(t1, 1.0)  # smooth, so linear interpolation is well defined
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [5.0, -7.0, 11.0]
    write_nifti(tmp_path / "v.nii.gz", image, affine)
    write_nifti(tmp_path / "v_label.nii.gz", label, affine)
    assert run_raf("shards", "ingest", "--input", tmp_path, "--out", tmp_path / "out", "--workers", "1", "--quiet",
                   "ingest.spacing=[1.5,1.5,1.5]") == 0
    store = CohortStore(tmp_path / "out" / "cohort.zarr")
    attrs = store.subject_attrs("v")
    stored_affine = np.array(attrs["affine"])
    np.testing.assert_allclose(stored_affine[:3, :3], np.eye(3) * 1.5, atol=1e-6)
    np.testing.assert_allclose(stored_affine[:3, 3], affine[:3, 3], atol=1e-6)  # first voxel centre kept
    stored, stored_label = store.read("v"), store.read_label("v")
    assert stored.shape == stored_label.shape
    # scipy reference: sample the source at the source-voxel coordinates of every stored voxel centre.
    index = np.indices(stored.shape).reshape(3, -1)
    source = (np.linalg.solve(affine, stored_affine) @ np.vstack([index, np.ones(index.shape[1])]))[:3]
    expected = ndimage.map_coordinates(image.astype(np.float64), source, order=1, mode="nearest")
    np.testing.assert_allclose(stored.ravel(), expected, atol=1e-3, rtol=0)
    nearest = ndimage.map_coordinates(label, source, order=0, mode="nearest")
    assert stored_label.dtype == np.uint8 and set(np.unique(stored_label)) == {0, 1, 2}
    assert np.mean(stored_label.ravel() == nearest) > 0.98  # ties at exact half-voxels may round either way
    # Aligned: each class's world centroid moves by less than the nearest-neighbour tie bias (half a source voxel).
    for value in (1, 2):
        before = affine @ np.append(np.argwhere(label == value).mean(0), 1)
        after = stored_affine @ np.append(np.argwhere(stored_label == value).mean(0), 1)
        assert (np.abs(before - after)[:3] < np.array(spacing) / 2).all()


def test_intensity_policies_against_hand_computed_values():
    hounsfield = np.array([-2000, -1000, -160, 0, 40, 240, 500, 1000, 3000], dtype=np.float32)
    ct, _ = create_intensity_policy("ct_window", low=-1000, high=1000)(hounsfield, metadata={}, channel="ct")
    np.testing.assert_allclose(ct, [0, 0, 0.42, 0.5, 0.52, 0.62, 0.75, 1, 1], atol=1e-6)
    soft, _ = create_intensity_policy("ct_window", low=-160, high=240)(hounsfield, metadata={}, channel="ct")
    np.testing.assert_allclose(soft, [0, 0, 0, 0.4, 0.5, 1, 1, 1, 1], atol=1e-6)

    mr = np.random.default_rng(0).lognormal(3, 1, size=(20, 20, 20)).astype(np.float32)
    z, measured = create_intensity_policy("mr_zscore", lower=1, upper=99)(mr, metadata={}, channel="t1")
    low, high = np.percentile(mr.astype(np.float64), [1, 99])
    clipped = np.clip(mr.astype(np.float64), low, high)
    np.testing.assert_allclose(z, (clipped - clipped.mean()) / clipped.std(), atol=1e-5)
    assert abs(z.mean()) < 1e-5 and abs(z.std() - 1) < 1e-5
    assert measured["clip"] == pytest.approx([low, high], rel=1e-6)

    activity = np.full((2, 2, 2), 5000.0, dtype=np.float32)  # Bq/mL
    suv, measured = create_intensity_policy("pet_suv", dose_unit="MBq")(
        activity, metadata={"weight": 70, "injected_dose": 350}, channel="pet")
    np.testing.assert_allclose(suv, 5000 * 70_000 / 350e6)  # = 1.0
    assert measured["factor"] == pytest.approx(70_000 / 350e6)
    with pytest.raises(BadInput, match="pet_suv for channel 'pet' needs a positive number in metadata column 'weight'"):
        create_intensity_policy("pet_suv")(activity, metadata={"weight": None, "injected_dose": 1e8}, channel="pet")
    same, _ = create_intensity_policy("pet_passthrough")(activity, metadata={}, channel="pet")
    assert same is activity
    with pytest.raises(UserError, match="unknown intensity policy 'ct_windw'; did you mean 'ct_window'"):
        create_intensity_policy("ct_windw")
    with pytest.raises(UserError, match="has no option 'hi'"):
        create_intensity_policy("ct_window", hi=3)
    table = {"default": {"name": "none"}, "ct": {"name": "ct_window"}, "t1w": {"name": "mr_zscore"}}
    assert policy_entry("acq-inhale_ct", table)[0] == "ct" and policy_entry("T1w", table)[0] == "t1w"
    assert policy_entry("pet", table)[0] == "default"


def test_foreground_crop_box_is_recorded_and_shifts_the_origin():
    image = np.zeros((12, 14, 10), dtype=np.float32)
    image[3:6, 4:9, 2:4] = 5.0
    label = (image > 0).astype(np.int64)
    affine = np.array([[-1.0, 0, 0, 20], [0, 2.0, 0, -5], [0, 0, 3.0, 1], [0, 0, 0, 1]])
    subject = SubjectVolumes(channels={"ct": image, "pet": image * 2}, label=label, affine=affine)
    subject = crop_foreground(subject, threshold=1.0, margin=1)
    assert subject.shape == (5, 7, 4) and subject.label.shape == (5, 7, 4)
    assert subject.provenance[-1]["params"]["box"] == [[2, 7], [3, 10], [1, 5]]
    np.testing.assert_allclose(subject.affine[:3, 3], (affine @ [2, 3, 1, 1])[:3])  # world position of voxel (2,3,1)
    np.testing.assert_array_equal(subject.channels["pet"], image[2:7, 3:10, 1:5] * 2)
    with pytest.raises(BadInput, match="no voxel of channel 'ct' is above the foreground crop threshold 9"):
        crop_foreground(SubjectVolumes({"ct": image}, None, affine), threshold=9.0, margin=0)


# ---- bad input ---------------------------------------------------------------------------------------------
def test_bad_subjects_are_reported_good_ones_ingested_exit_1_then_0_with_skip_bad(tmp_path, capsys):
    t1, _, label = subject_volumes(4, shape=(10, 12, 8))
    files = tmp_path / "files"
    files.mkdir()
    for name in ("good1", "good2", "dup"):
        write_nifti(files / f"{name}.nii.gz", t1, np.eye(4))
    write_nifti(files / "label.nii.gz", label, np.eye(4))
    raw = (files / "good1.nii.gz").read_bytes()
    (files / "corrupt.nii.gz").write_bytes(raw[: len(raw) * 2 // 3])
    nan = t1.copy()
    nan[2, 3, 4] = np.nan
    write_nifti(files / "nan.nii.gz", nan, np.eye(4))
    write_nifti(files / "flat.nii.gz", t1[:, :, 0], np.eye(4))
    write_nifti(files / "series.nii.gz", np.stack([t1, t1], -1), np.eye(4))
    write_nifti(files / "small_label.nii.gz", label[:, :, :5], np.eye(4))
    write_nifti(files / "coarse_label.nii.gz", label, np.diag([1.0, 1.0, 2.0, 1.0]))
    rows = [("good1", "good1.nii.gz", "label.nii.gz", "site-a"), ("good2", "good2.nii.gz", "", "site-b"),
            ("corrupt", "corrupt.nii.gz", "", "site-a"), ("nan", "nan.nii.gz", "", "site-a"),
            ("flat", "flat.nii.gz", "", "site-a"), ("series", "series.nii.gz", "", "site-a"),
            ("shape", "good1.nii.gz", "small_label.nii.gz", "site-a"),
            ("spacing", "good1.nii.gz", "coarse_label.nii.gz", "site-a"),
            ("dup", "dup.nii.gz", "", "site-a"), ("dup", "good2.nii.gz", "", "site-b"),
            ("nosite", "good2.nii.gz", "", ""), ("missing", "nothere.nii.gz", "", "site-a")]
    (files / "list.csv").write_text("subject_id,image,label,site\n" + "".join(",".join(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert run_raf("shards", "ingest", "--input", files / "list.csv", "--out", out, "--require", "site",
                   "--workers", "1", "--quiet") == 1
    captured = capsys.readouterr()
    error_lines = [line for line in captured.err.splitlines() if line.startswith("raf: error")]
    assert error_lines == [(f"raf: error: 10 of 12 subjects were bad and not ingested (reasons in "
                            f"{out / 'cohort.zarr' / 'ingest_report.md'}); fix them and re-run (finished subjects "
                            "are skipped), or pass --skip-bad to accept")]
    assert "Traceback" not in captured.err and "ingested 2, skipped 0 (already in the store), bad 10" in captured.out
    store = CohortStore(out / "cohort.zarr")
    assert store.subject_ids() == ["good1", "good2"]
    assert [row["subject_id"] for row in store.read_manifest()] == ["good1", "good2"]
    report = json.loads((store.path / REPORT_JSON).read_text())
    reasons = [(entry["subject_id"], entry["where"], entry["reason"]) for entry in report["bad"]]
    expected = [
        ("corrupt", "row 4", "corrupt.nii.gz: truncated or corrupt"),
        ("nan", "row 5", "nan.nii.gz has 1 NaN or Inf voxels (of 960)"),
        ("flat", "row 6", "flat.nii.gz: expected a 3D volume, got a 2D image of size (10, 12)"),
        ("series", "row 7", "series.nii.gz: expected a 3D volume, got a 4D image of size (10, 12, 8, 2)"),
        ("shape", "row 8", "label (small_label.nii.gz) does not match image 'image' (good1.nii.gz): shape (10, 12, 5) vs (10, 12, 8)"),
        ("spacing", "row 9", "label (coarse_label.nii.gz) does not match image 'image' (good1.nii.gz): spacing [1.0, 1.0, 2.0] vs [1.0, 1.0, 1.0] mm"),
        ("dup", "row 10", "duplicate subject id: 'dup' appears 2 times (row 10, row 11)"),
        ("dup", "row 11", "duplicate subject id: 'dup' appears 2 times (row 10, row 11)"),
        ("nosite", "row 12", "missing value for required metadata column(s) site"),
        ("missing", "row 13", "file not found: "),
    ]
    assert [r[:2] for r in reasons] == [e[:2] for e in expected]
    for (_, _, reason), (_, _, start) in zip(reasons, expected):
        assert reason.startswith(start), (reason, start)
    markdown = (store.path / "ingest_report.md").read_text()
    assert "## Bad subjects (10)" in markdown and "| nan | row 5 | nan.nii.gz has 1 NaN or Inf voxels" in markdown
    # The same command with --skip-bad: finished subjects are skipped, the bad ones listed again, exit 0.
    assert run_raf("shards", "ingest", "--input", files / "list.csv", "--out", out, "--require", "site",
                   "--workers", "1", "--quiet", "--skip-bad") == 0
    assert "ingested 0, skipped 2 (already in the store), bad 10" in capsys.readouterr().out


def test_channels_on_different_grids_are_bad_with_the_difference(tmp_path):
    t1, t2, _ = subject_volumes(5, shape=(10, 12, 8))
    shifted = np.eye(4)
    shifted[:3, 3] = [0, 0, 4.0]
    write_nifti(tmp_path / "t1.nii.gz", t1, np.eye(4))
    write_nifti(tmp_path / "t2.nii.gz", t2, np.eye(4))
    write_nifti(tmp_path / "t2_moved.nii.gz", t2, shifted)
    write_nifti(tmp_path / "t2_fine.nii.gz", t2, np.diag([0.5, 1, 1, 1]))
    write_nifti(tmp_path / "t2_crop.nii.gz", t2[1:], np.eye(4))
    (tmp_path / "l.tsv").write_text("subject_id\timage:t1\timage:t2\nok\tt1.nii.gz\tt2.nii.gz\n"
                                    "moved\tt1.nii.gz\tt2_moved.nii.gz\nfine\tt1.nii.gz\tt2_fine.nii.gz\n"
                                    "crop\tt1.nii.gz\tt2_crop.nii.gz\n")
    summary = ingest(tmp_path / "l.tsv", tmp_path / "s.zarr", config=IngestConfig(workers=1),
                     store_config=StoreConfig(), progress=False)
    reasons = {o["subject_id"]: o["reason"] for o in summary.bad}
    prefix = "channel 't2' (t2_{}.nii.gz) is not on the grid of channel 't1' (t1.nii.gz): "
    assert reasons == {
        "moved": prefix.format("moved") + "origin [0.0, 0.0, 4.0] vs [0.0, 0.0, 0.0] mm (RAS); resample it onto one grid first",
        "fine": prefix.format("fine") + "spacing [0.5, 1.0, 1.0] vs [1.0, 1.0, 1.0] mm; resample it onto one grid first",
        "crop": prefix.format("crop") + "shape (9, 12, 8) vs (10, 12, 8); resample it onto one grid first"}
    assert CohortStore(tmp_path / "s.zarr").subject_ids() == ["ok"]


def test_usage_errors_exit_2_naming_the_problem(tmp_path, capsys):
    listing = tmp_path / "l.csv"
    write_nifti(tmp_path / "a.nii", np.ones((4, 4, 4), np.float32), np.eye(4))
    listing.write_text("subject_id,image,site,age\na,a.nii,x,3\n")
    assert run_raf("shards", "ingest", "--input", listing, "--out", tmp_path / "o", "--require", "site,sex") == 2
    assert capsys.readouterr().err.strip() == (f"raf: error: --require: column 'sex' is not in {listing} (detected: "
                                               "csv listing; its metadata columns: site, age)")
    assert run_raf("shards", "ingest", "--input", listing, "--out", tmp_path / "o", "ingest.orientation=RAX") == 2
    assert "ingest.orientation must be three axis codes" in capsys.readouterr().err
    assert run_raf("shards", "ingest", "--input", listing, "--out", tmp_path / "o",
                   "ingest.intensity.ct={name: ct_windo}") == 2
    assert "ingest.intensity.ct: unknown intensity policy 'ct_windo'; did you mean 'ct_window'" in capsys.readouterr().err
    assert run_raf("shards", "ingest", "--input", listing, "--out", tmp_path / "o", "--quiet") == 0
    capsys.readouterr()
    assert run_raf("shards", "ingest", "--input", listing, "--out", tmp_path / "o", "ingest.spacing=2") == 2
    assert "was ingested with different preprocessing (changed: spacing); pass --overwrite" in capsys.readouterr().err
    assert run_raf("shards", "consolidate", tmp_path / "nowhere") == 2


def test_resolve_task_from_flags_and_slurm_environment():
    assert resolve_task(None, None, {}) == (0, 1)
    assert resolve_task(2, 4, {}) == (2, 4)
    assert resolve_task(None, None, {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "4",
                                     "SLURM_ARRAY_TASK_MIN": "3"}) == (2, 4)
    with pytest.raises(UserError, match="give both --task-index and --num-tasks"):
        resolve_task(1, None, {})
    with pytest.raises(UserError, match="SLURM_ARRAY_TASK_COUNT is not"):
        resolve_task(None, None, {"SLURM_ARRAY_TASK_ID": "1"})
    with pytest.raises(UserError, match=r"--task-index must be in \[0, 1\]"):
        resolve_task(2, 2, {})


def test_help_of_both_commands(capsys):
    for command in ("ingest", "consolidate"):
        with pytest.raises(SystemExit) as exit_info:
            main(["shards", command, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert f"usage: raf shards {command}" in text and "examples:" in text


# ---- same store, whichever way it is run ----------------------------------------------------------------------
def test_two_worker_processes_give_the_same_store_as_one(cohort, tmp_path):
    listing, reference = cohort
    assert run_raf("shards", "ingest", "--input", listing, "--out", tmp_path, "--workers", "2", "--quiet", TARGET) == 0
    assert_same_store(reference, tmp_path / "cohort.zarr")


def test_array_tasks_then_consolidate_equal_a_single_process_ingest(cohort, tmp_path, capsys):
    listing, reference = cohort
    for task in (1, 0):
        assert run_raf("shards", "ingest", "--input", listing, "--out", tmp_path, "--workers", "1", "--quiet",
                       "--task-index", task, "--num-tasks", 2, TARGET) == 0
        if task == 1:  # consolidating before every task finished names the missing one
            assert not (tmp_path / "cohort.zarr" / "manifest.csv").exists()
            with pytest.raises(UserError, match=r"task\(s\) 0 of 2 have not finished"):
                consolidate(tmp_path / "cohort.zarr")
    assert "raf shards consolidate" in capsys.readouterr().out
    assert run_raf("shards", "consolidate", tmp_path) == 0
    assert "consolidated 2 task report(s): ingested 10, skipped 0" in capsys.readouterr().out
    assert_same_store(reference, tmp_path / "cohort.zarr")


def test_killed_ingest_leaves_only_whole_subjects_and_resumes_to_the_same_store(cohort, tmp_path):
    listing, reference = cohort
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "rafmedia.launch.cli", "shards", "ingest", "--input", str(listing),
               "--out", str(out), "--workers", "1", "--quiet", TARGET]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    subjects = out / "cohort.zarr" / "subjects"
    try:
        while process.poll() is None and len(visible(subjects)) < 2:
            time.sleep(0.002)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    store = CohortStore(out / "cohort.zarr")
    finished = store.subject_ids()
    assert 2 <= len(finished) < 10, "the run was not interrupted mid-way"
    assert visible(subjects) == finished  # nothing partial under subjects/
    for subject_id in finished:  # every visible subject is whole: every array reads in full, attrs are complete
        attrs = store.subject_attrs(subject_id)
        assert attrs["provenance"][-1]["step"] == "cast"
        assert all(store.read(subject_id, name).shape == tuple(attrs["shape"]) for name in attrs["channels"])
        assert store.read_label(subject_id).shape == tuple(attrs["shape"])
    assert run_raf("shards", "ingest", "--input", listing, "--out", out, "--workers", "1", "--quiet", TARGET) == 0
    report = json.loads((store.path / REPORT_JSON).read_text())
    assert report["counts"]["skipped"] == len(finished) and report["counts"]["ingested"] == 10 - len(finished)
    assert not any((store.path / ".staging").glob("*"))
    assert_same_store(reference, store.path)
