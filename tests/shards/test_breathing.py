"""The breathing pair of the synthetic cohort: a smooth, invertible, physiologically shaped field of the requested
size; landmarks that land exactly; an exhale anatomy that is the inhale one warped."""
import numpy as np
import pytest
from scipy import ndimage

from rafmedia.shards.breathing import breathing_field, exhale_positions
from rafmedia.shards.store import StoreConfig
from rafmedia.shards.synth import LABELS, PAIRED_TISSUE_INTENSITY, generate_cohort
from tests.conftest import small_cohort_config

SHAPE = [40, 40, 40]
MAX_VOXELS = 6.0


@pytest.fixture(scope="module")
def breathing_store(tmp_path_factory):
    from rafmedia.shards.synth import SiteProfile

    config = small_cohort_config(num_subjects=4, shape=SHAPE, sites=[SiteProfile(noise_std=0.02)],
                                 paired_channel="exhale", paired_displacement=MAX_VOXELS)
    out = tmp_path_factory.mktemp("breathing") / "b.zarr"
    return generate_cohort(config, store_config=StoreConfig(chunk_size=20), out=out, progress=False), config


def _field(store, subject):
    params = store.subject_attrs(subject)["truth"]["breathing"]
    return breathing_field(np.indices(SHAPE, dtype=np.float64), params), params


def test_field_has_the_requested_size_and_is_smooth_and_invertible(breathing_store):
    store, _ = breathing_store
    for subject in store.subject_ids():
        field_, _ = _field(store, subject)
        length = np.sqrt((field_**2).sum(axis=0))
        recorded = store.subject_attrs(subject)["truth"]["paired_displacement"]
        assert length.max() == pytest.approx(recorded, abs=1e-3)
        assert 0.8 * MAX_VOXELS - 1e-6 <= recorded <= MAX_VOXELS + 1e-6
        # mostly cranio-caudal: the other components stay small
        assert np.abs(field_[0]).max() > 4 * np.abs(field_[2]).max()
        # invertible: the Jacobian determinant of x -> x + u(x) is positive everywhere
        jacobian = np.stack([np.stack(np.gradient(field_[i]), axis=0) for i in range(3)])  # (3, 3, D, H, W)
        jacobian = jacobian + np.eye(3)[:, :, None, None, None]
        determinant = np.linalg.det(np.moveaxis(jacobian, (0, 1), (-2, -1)))
        assert determinant.min() > 0.2, determinant.min()
        # smooth: second differences are a small fraction of the motion (C1, no kinks)
        second = np.abs(np.diff(field_[0], n=2, axis=0)).max()
        assert second < 0.15 * recorded, second


def test_landmarks_land_where_the_field_sends_them(breathing_store):
    store, _ = breathing_store
    for subject in store.subject_ids():
        field_, params = _field(store, subject)
        marks = store.subject_attrs(subject)["truth"]["landmarks"]
        inhale, exhale = np.array(marks["inhale"]), np.array(marks["exhale"])
        assert len(marks["names"]) >= 10 and marks["residual"] < 1e-3
        # an independent check of q + u(q) = p: the dense field interpolated at q (not the analytic one)
        moved = np.stack([ndimage.map_coordinates(field_[axis], exhale.T, order=3) for axis in range(3)], axis=1)
        assert np.linalg.norm(exhale + moved - inhale, axis=1).max() < 0.05
        q, residual = exhale_positions(inhale, params)
        assert residual < 1e-6 and np.allclose(q, exhale, atol=1e-3)


def test_diaphragm_rises_most_and_the_apex_stays(breathing_store):
    store, _ = breathing_store
    for subject in store.subject_ids():
        marks = store.subject_attrs(subject)["truth"]["landmarks"]
        motion = dict(zip(marks["names"], np.array(marks["exhale"]) - np.array(marks["inhale"])))
        dome, apex = motion["liver_dome"], motion["thorax_apex"]
        assert dome[0] < -0.6 * MAX_VOXELS  # cranial (towards index 0), most of the planted amplitude
        assert np.linalg.norm(apex) < 0.1 * np.linalg.norm(dome)
        assert abs(dome[2]) < 0.2 * abs(dome[0])  # little lateral motion
        # the abdomen moves with the diaphragm, a little less further down
        assert motion["kidney_right_centroid"][0] < 0.6 * dome[0]


def test_exhale_anatomy_is_the_inhale_one_warped(breathing_store):
    store, _ = breathing_store
    table = np.zeros(len(LABELS), dtype=np.float32)
    for name, intensity in PAIRED_TISSUE_INTENSITY.items():
        table[LABELS[name]] = intensity
    for subject in store.subject_ids():
        label, exhale_label = store.read_label(subject), store.read(subject, "exhale_label")
        exhale = store.read(subject, "exhale")
        marks = store.subject_attrs(subject)["truth"]["landmarks"]
        where = dict(zip(marks["names"], np.array(marks["exhale"])))
        # the warped liver's centroid is where the inhale liver centroid was sent (local motion is near rigid)
        liver = np.argwhere(exhale_label == LABELS["liver"]).mean(axis=0)
        assert np.linalg.norm(liver - where["liver_centroid"]) < 0.6
        assert (exhale_label == LABELS["liver"]).sum() == pytest.approx((label == LABELS["liver"]).sum(), rel=0.15)
        # the exhale image is the exhale label map in the paired contrast, not the inhale one
        interior = np.zeros(label.shape, dtype=bool)
        for value in range(len(LABELS)):
            interior |= ndimage.binary_erosion(exhale_label == value, iterations=2)
        assert np.corrcoef(table[exhale_label][interior], exhale[interior])[0, 1] > 0.95
        # where breathing changed the tissue, the warped map explains the image and the inhale map does not
        moved = interior & (label != exhale_label)
        assert moved.sum() > 200
        warped = np.abs(table[exhale_label] - exhale)[moved].mean()
        unwarped = np.abs(table[label] - exhale)[moved].mean()
        assert warped < 0.06 and unwarped > 3 * warped, (warped, unwarped)


def test_pair_is_deterministic_and_the_store_records_its_provenance(breathing_store, tmp_path):
    store, config = breathing_store
    again = generate_cohort(config, store_config=StoreConfig(chunk_size=20), out=tmp_path / "c.zarr", progress=False)
    for subject in store.subject_ids():
        for channel in ("image", "exhale", "exhale_label"):
            assert np.array_equal(store.read(subject, channel), again.read(subject, channel))
        assert store.subject_attrs(subject)["truth"] == again.subject_attrs(subject)["truth"]
    assert store.attrs()["provenance"] == {"licence": "CC0-1.0", "sources": [
        {"name": "rafmedia synthetic body cohort", "licence": "CC0-1.0", "subjects": 4}]}
    assert store.attrs()["synth_config"]["paired_model"] == "breathing-v1"
