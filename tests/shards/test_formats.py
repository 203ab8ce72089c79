"""Reading real files: each format is written by an independent library (nibabel, pynrrd, pydicom; SimpleITK
only for MetaImage), ingested, and compared voxel by voxel with the written volume through world coordinates."""
from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from rafmedia.core.errors import UserError
from rafmedia.shards.formats import BadInput, read_volume, source_checksum
from rafmedia.shards.ingest import IngestConfig, ingest
from rafmedia.shards.store import CohortStore, StoreConfig

SHAPE = (7, 9, 5)  # non-cubic
SPACING = (0.7, 0.9, 2.0)  # non-isotropic, along array axes i, j, k
# RAS affine with permuted, flipped axes: i -> A (0.7 mm), j -> I (0.9 mm), k -> L (2 mm): axis codes "AIL".
AFFINE_AIL = np.array([[0.0, 0.0, -2.0, 31.5], [0.7, 0.0, 0.0, -12.25], [0.0, -0.9, 0.0, 8.0], [0, 0, 0, 1]])
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def volume_int16(shape=SHAPE, seed=0) -> np.ndarray:
    """Distinct voxel values, so a wrong permutation or flip cannot go unnoticed."""
    return np.random.default_rng(seed).permutation(np.prod(shape)).reshape(shape).astype(np.int16) - 100


# ---- independent writers -----------------------------------------------------------------------------
def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return affine


def write_nrrd(path: Path, data: np.ndarray) -> np.ndarray:
    """pynrrd, in LPS space with axes i -> P, j -> L, k -> S. Returns the RAS affine of what was written."""
    import nrrd

    directions = np.array([[0.0, SPACING[0], 0.0], [SPACING[1], 0.0, 0.0], [0.0, 0.0, SPACING[2]]])  # rows = axes
    origin = np.array([-4.0, 6.5, -20.0])
    nrrd.write(str(path), data, header={"space": "left-posterior-superior", "space directions": directions,
                                         "space origin": origin})
    affine_lps = np.eye(4)
    affine_lps[:3, :3], affine_lps[:3, 3] = directions.T, origin
    return LPS_TO_RAS @ affine_lps


def write_metaimage(path: Path, data: np.ndarray) -> np.ndarray:
    """SimpleITK writes .mha / .mhd (+ .raw); geometry in LPS: i -> S, j -> R, k -> P."""
    import SimpleITK as sitk

    direction = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])  # columns = axes, LPS
    origin = np.array([12.0, -3.0, 40.0])
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))  # sitk arrays are (k, j, i)
    image.SetSpacing(SPACING)
    image.SetOrigin(origin.tolist())
    image.SetDirection(direction.ravel().tolist())
    sitk.WriteImage(image, str(path))
    affine_lps = np.eye(4)
    affine_lps[:3, :3], affine_lps[:3, 3] = direction * np.array(SPACING)[None, :], origin
    return LPS_TO_RAS @ affine_lps


def write_dicom_series(folder: Path, raw: np.ndarray, *, slope=0.5, intercept=-100.0, series="1",
                       num_slices: int | None = None) -> np.ndarray:
    """pydicom, one CT file per slice (sagittal slices); returns the RAS affine of voxel (i, j, k) = (col, row, slice).

    Voxel values are raw * slope + intercept.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    row_cosine, column_cosine = np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, -1.0])  # LPS: i -> P, j -> I
    normal = np.cross(row_cosine, column_cosine)  # k -> R (-x in LPS)
    column_spacing, row_spacing, slice_spacing = SPACING  # i (columns) 0.7, j (rows) 0.9, k (slices) 2.0
    first = np.array([20.0, -30.0, 50.0])
    study, frame = generate_uid(entropy_srcs=["study"]), generate_uid(entropy_srcs=["frame"])
    series_uid = generate_uid(entropy_srcs=["series", series])
    for k in range(raw.shape[2] if num_slices is None else num_slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["sop", series, str(k)])
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series_uid, frame
        ds.Modality, ds.PatientID, ds.PatientName, ds.SeriesNumber, ds.InstanceNumber = "CT", "p1", "Test^P", series, k + 1
        ds.ImagePositionPatient = [float(v) for v in first + k * slice_spacing * normal]
        ds.ImageOrientationPatient = [*row_cosine.tolist(), *column_cosine.tolist()]
        ds.PixelSpacing = [row_spacing, column_spacing]  # [between rows, between columns]
        ds.SliceThickness = slice_spacing
        ds.Rows, ds.Columns = raw.shape[1], raw.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = np.ascontiguousarray(raw[:, :, k].T.astype(np.int16)).tobytes()  # (rows, cols) = (j, i)
        ds.save_as(str(folder / f"{series}-{k:03d}.dcm"), enforce_file_format=True)
    affine_lps = np.eye(4)
    affine_lps[:3, :3] = np.stack([row_cosine * column_spacing, column_cosine * row_spacing, normal * slice_spacing], 1)
    affine_lps[:3, 3] = first
    return LPS_TO_RAS @ affine_lps


def assert_same_world_content(stored, stored_affine, written, written_affine, atol=0.0):
    """Every stored voxel sits on a written voxel centre (same world position) and holds its value."""
    index = np.indices(stored.shape).reshape(3, -1)
    world = np.asarray(stored_affine) @ np.vstack([index, np.ones(index.shape[1])])
    source = np.linalg.solve(written_affine, world)[:3]
    rounded = np.rint(source)
    assert np.abs(source - rounded).max() < 1e-3, "stored voxel centres fall between written voxel centres"
    rounded = rounded.astype(int)
    assert stored.size == written.size and len({tuple(c) for c in rounded.T}) == stored.size  # a bijection
    assert rounded.min() >= 0 and (rounded.max(axis=1) < np.array(written.shape)).all()
    np.testing.assert_allclose(stored.ravel(), written[tuple(rounded)], atol=atol, rtol=0)


# ---- round trips ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def formats_store(tmp_path_factory):
    """One file per format, listed in a CSV and ingested at native spacing into one store."""
    root = tmp_path_factory.mktemp("formats")
    data = volume_int16()
    written = {
        "nii": (write_nifti(root / "a.nii", data, AFFINE_AIL), data),
        "niigz": (write_nifti(root / "a.nii.gz", data, AFFINE_AIL), data),
        "nrrd": (write_nrrd(root / "a.nrrd", data), data),
        "mha": (write_metaimage(root / "a.mha", data), data),
        "mhd": (write_metaimage(root / "a.mhd", data), data),
        "dicom": (write_dicom_series(root / "dicom", data), data * 0.5 - 100.0),
    }
    write_dicom_series(root / "dicom", data[:, :, :2], series="2")  # a smaller second series in the same folder
    paths = {"nii": "a.nii", "niigz": "a.nii.gz", "nrrd": "a.nrrd", "mha": "a.mha", "mhd": "a.mhd", "dicom": "dicom"}
    (root / "list.csv").write_text("subject_id,image\n" + "".join(f"{k},{v}\n" for k, v in paths.items()))
    config = IngestConfig(workers=1)  # default intensity policy for channel "image": none
    summary = ingest(root / "list.csv", root / "store.zarr", config=config, store_config=StoreConfig(chunk_size=4),
                     progress=False)
    assert summary.count("ingested") == 6, summary.bad
    return CohortStore(root / "store.zarr"), written, root


@pytest.mark.parametrize("name", ["nii", "niigz", "nrrd", "mha", "mhd", "dicom"])
def test_round_trip_voxels_spacing_and_orientation(formats_store, name):
    store, written, _ = formats_store
    written_affine, written_data = written[name]
    attrs = store.subject_attrs(name)
    stored = store.read(name)
    assert stored.dtype == np.float32 and attrs["orientation"] == "RAS"
    assert "".join(nib.aff2axcodes(np.array(attrs["affine"]))) == "RAS"
    assert_same_world_content(stored, attrs["affine"], written_data, written_affine)
    # Spacing follows the axes: the written spacing permuted to the stored axis order, read off the affine.
    expected_spacing = np.sqrt((np.array(attrs["affine"])[:3, :3] ** 2).sum(0))
    np.testing.assert_allclose(attrs["spacing"], expected_spacing, atol=1e-5)
    assert sorted(np.round(attrs["spacing"], 4)) == sorted(SPACING)
    np.testing.assert_allclose(attrs["origin"], np.array(attrs["affine"])[:3, 3])


@pytest.mark.parametrize("name", ["nii", "niigz"])
def test_nifti_matches_nibabel_as_closest_canonical(formats_store, name):
    store, _, root = formats_store
    canonical = nib.as_closest_canonical(nib.load(root / ("a.nii" if name == "nii" else "a.nii.gz")))
    np.testing.assert_array_equal(store.read(name), np.asanyarray(canonical.dataobj).astype(np.float32))
    np.testing.assert_allclose(store.subject_attrs(name)["affine"], canonical.affine, atol=1e-4)


def test_dicom_series_rescaled_largest_series_chosen_and_checksums(formats_store):
    store, _, root = formats_store
    attrs = store.subject_attrs("dicom")
    read_step = attrs["provenance"][0]
    assert read_step["step"] == "read"
    source = read_step["params"]["sources"]["image"]
    assert source["format"] == "dicom" and source["num_files"] == SHAPE[2]
    assert list(source["other_series"].values()) == [2]  # the two-slice series was left out, and said so
    files = sorted((root / "dicom").glob("1-*.dcm"))
    lines = "".join(f"{f.name}\0{hashlib.sha256(f.read_bytes()).hexdigest()}\n" for f in files)
    assert attrs["sources"]["image"]["sha256"] == hashlib.sha256(lines.encode()).hexdigest()
    nii = store.subject_attrs("nii")["sources"]["image"]
    assert nii["sha256"] == hashlib.sha256((root / "a.nii").read_bytes()).hexdigest()
    # The .mhd checksum covers its .raw payload too.
    assert store.subject_attrs("mhd")["sources"]["image"]["sha256"] != hashlib.sha256(
        (root / "a.mhd").read_bytes()).hexdigest()


def test_lps_orientation_is_configurable(tmp_path):
    data = volume_int16()
    affine = write_nifti(tmp_path / "x.nii.gz", data, AFFINE_AIL)
    (tmp_path / "l.csv").write_text("subject_id,image\nx,x.nii.gz\n")
    ingest(tmp_path / "l.csv", tmp_path / "s.zarr", config=IngestConfig(workers=1, orientation="LPS"),
           store_config=StoreConfig(), progress=False)
    store = CohortStore(tmp_path / "s.zarr")
    attrs = store.subject_attrs("x")
    assert attrs["orientation"] == "LPS" == "".join(nib.aff2axcodes(np.array(attrs["affine"])))
    assert_same_world_content(store.read("x"), attrs["affine"], data, affine)
    reference = nib.load(tmp_path / "x.nii.gz").as_reoriented(
        nib.orientations.ornt_transform(nib.orientations.io_orientation(AFFINE_AIL),
                                        nib.orientations.axcodes2ornt("LPS")))
    np.testing.assert_array_equal(store.read("x"), np.asanyarray(reference.dataobj))


# ---- unreadable inputs -------------------------------------------------------------------------------
def test_unreadable_inputs_raise_bad_input_naming_the_problem(tmp_path):
    data = volume_int16()
    write_nifti(tmp_path / "ok.nii.gz", data, np.eye(4))
    raw = (tmp_path / "ok.nii.gz").read_bytes()
    (tmp_path / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "garbage.nrrd").write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 9 9 9\nencoding: raw\n\n")
    write_nifti(tmp_path / "flat.nii", data[:, :, 0], np.eye(4))
    write_nifti(tmp_path / "series.nii", np.stack([data, data], axis=-1), np.eye(4))
    write_nifti(tmp_path / "single.nii", data[..., None], np.eye(4))
    nan = data.astype(np.float32)
    nan[1, 2, 3], nan[0, 0, 0] = np.nan, np.inf
    write_nifti(tmp_path / "nan.nii.gz", nan, np.eye(4))
    (tmp_path / "empty").mkdir()
    expected = {
        "truncated.nii.gz": "truncated.nii.gz: truncated or corrupt",
        "garbage.nrrd": "garbage.nrrd: unreadable or corrupt",
        "flat.nii": "expected a 3D volume, got a 2D image of size (7, 9)",
        "series.nii": "expected a 3D volume, got a 4D image of size (7, 9, 5, 2)",
        "nan.nii.gz": "nan.nii.gz has 2 NaN or Inf voxels (of 315)",
        "missing.nii": "file not found",
        "empty": "no DICOM series found",
    }
    for name, message in expected.items():
        with pytest.raises(BadInput, match=message.replace("(", r"\(").replace(")", r"\)")):
            read_volume(tmp_path / name)
    assert issubclass(BadInput, UserError)
    single = read_volume(tmp_path / "single.nii")  # a 4D file holding one volume is read as 3D
    assert single.array.shape == SHAPE
    np.testing.assert_array_equal(single.array, data)


def test_checksum_of_a_gzip_file_is_of_its_bytes(tmp_path):
    path = tmp_path / "v.nii.gz"
    write_nifti(path, volume_int16(), np.eye(4))
    assert source_checksum([path]) == hashlib.sha256(path.read_bytes()).hexdigest()
    with gzip.open(path, "rb") as handle:  # the same voxels, recompressed: a different file, a different checksum
        (tmp_path / "w.nii.gz").write_bytes(gzip.compress(handle.read(), compresslevel=1))
    assert source_checksum([tmp_path / "w.nii.gz"]) != source_checksum([path])
