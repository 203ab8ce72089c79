"""The synthetic cohort: planted biases are physically there, counts are exact, output is deterministic."""
import json

import numpy as np
import pytest
from scipy import ndimage

from rafmedia.core.errors import UserError
from rafmedia.shards.store import CohortStore, StoreConfig
from rafmedia.shards.synth import CohortConfig, assign_subjects, generate_cohort, severity_from_enlargement
from tests.conftest import NOISE, small_cohort_config


def test_measured_noise_per_site_matches_the_planted_level(small_cohort):
    store, _ = small_cohort
    by_site = {}
    for row in store.read_manifest():
        label = store.read_label(row["subject_id"])
        # Air far from the body: the clean signal there is exactly 0, so what remains is the noise.
        far_air = ~ndimage.binary_dilation(label > 0, iterations=4)
        by_site.setdefault(row["site"], []).append(store.read(row["subject_id"])[far_air])
    for site, chunks in by_site.items():
        measured = np.concatenate(chunks).std()
        assert abs(measured / NOISE[site] - 1) < 0.10, (site, measured, NOISE[site])


def test_planted_sex_imbalance_appears_exactly_in_the_manifest(small_cohort):
    store, config = small_cohort
    rows = store.read_manifest()
    females = sum(row["sex"] == "F" for row in rows)
    assert females == round(config.num_subjects * config.sex_ratio / (1 + config.sex_ratio)) == 12
    assert len(rows) - females == 24
    planted = json.loads((store.path / "planted.json").read_text())
    assert planted["sex_counts"] == {"F": 12, "M": 24}
    assert planted["noisy_sites"] == ["site-c"]


def test_disease_prevalence_per_site_is_exact(small_cohort):
    store, config = small_cohort
    rows = store.read_manifest()
    for site in config.sites:
        members = [row for row in rows if row["site"] == site.name]
        assert len(members) == 12
        assert sum(row["disease"] for row in members) == round(site.disease_prevalence * 12)


def test_disease_is_an_enlarged_heart_with_ordinal_severity(small_cohort):
    store, _ = small_cohort
    rows = store.read_manifest()
    heart = {row["subject_id"]: store.subject_attrs(row["subject_id"])["truth"]["heart_voxels"] for row in rows}
    sick = [heart[r["subject_id"]] for r in rows if r["disease"]]
    healthy = [heart[r["subject_id"]] for r in rows if not r["disease"]]
    assert np.median(sick) > 1.5 * np.median(healthy)
    assert all((row["severity"] > 0) == bool(row["disease"]) for row in rows)
    assert [severity_from_enlargement(r, True) for r in (1.20, 1.30, 1.40)] == [1, 2, 3]


def test_labels_hold_every_structure_and_images_are_float32(small_cohort):
    store, _ = small_cohort
    subject = store.subject_ids()[0]
    assert store.read(subject).dtype == np.float32
    assert {1, 2, 3, 4} <= set(np.unique(store.read_label(subject)).tolist())


def test_same_seed_same_cohort_whatever_the_number_of_workers(tmp_path):
    config = small_cohort_config(num_subjects=6, shape=[24, 24, 24])
    one = generate_cohort(config, store_config=StoreConfig(chunk_size=16), out=tmp_path / "a.zarr", progress=False)
    config.workers = 2
    two = generate_cohort(config, store_config=StoreConfig(chunk_size=16), out=tmp_path / "b.zarr", progress=False)
    assert (tmp_path / "a.zarr" / "manifest.csv").read_text() == (tmp_path / "b.zarr" / "manifest.csv").read_text()
    for subject in one.subject_ids():
        assert np.array_equal(one.read(subject), two.read(subject))
        assert np.array_equal(one.read_label(subject), two.read_label(subject))
    config.seed = 4
    other = generate_cohort(config, store_config=StoreConfig(chunk_size=16), out=tmp_path / "c.zarr", progress=False)
    assert not np.array_equal(one.read(one.subject_ids()[0]), other.read(other.subject_ids()[0]))


def test_rerun_resumes_and_keeps_finished_subjects(tmp_path):
    config = small_cohort_config(num_subjects=4, shape=[24, 24, 24])
    store = generate_cohort(config, store_config=StoreConfig(), out=tmp_path / "c.zarr", progress=False)
    first = store.subject_ids()[0]
    stamp = (store.path / "subjects" / first / "zarr.json").stat().st_mtime_ns
    generate_cohort(config, store_config=StoreConfig(), out=tmp_path / "c.zarr", progress=False)
    assert (store.path / "subjects" / first / "zarr.json").stat().st_mtime_ns == stamp
    assert len(CohortStore(tmp_path / "c.zarr").read_manifest()) == 4


def test_assignment_plants_the_sex_ratio_exactly():
    subjects = assign_subjects(CohortConfig(num_subjects=30, sex_ratio=2.0))
    assert sum(s["sex"] == "F" for s in subjects) == 20


def test_bad_cohort_config_is_a_user_error():
    with pytest.raises(UserError, match="sex_ratio"):
        CohortConfig(sex_ratio=0).validate()
    with pytest.raises(UserError, match="disease_prevalence"):
        small_cohort_config(sites=[small_cohort_config().sites[0].__class__(disease_prevalence=1.5)]).validate()


def test_resuming_with_a_different_config_is_refused(tmp_path):
    config = small_cohort_config(num_subjects=4, shape=[24, 24, 24])
    generate_cohort(config, store_config=StoreConfig(), out=tmp_path / "c.zarr", progress=False)
    config.workers = 2  # the number of workers does not change the cohort: resuming is fine
    generate_cohort(config, store_config=StoreConfig(), out=tmp_path / "c.zarr", progress=False)
    config.num_subjects = 6
    with pytest.raises(UserError, match="different cohort config \\(changed: num_subjects\\)"):
        generate_cohort(config, store_config=StoreConfig(), out=tmp_path / "c.zarr", progress=False)
    store = generate_cohort(config, store_config=StoreConfig(), out=tmp_path / "c.zarr", progress=False, overwrite=True)
    assert len(store.subject_ids()) == 6


# ---- the optional paired acquisition -------------------------------------------------------------
def _array_digest(store) -> str:
    import hashlib

    digest = hashlib.sha256()
    for subject in store.subject_ids():
        digest.update(np.ascontiguousarray(store.read(subject)).tobytes())
        digest.update(np.ascontiguousarray(store.read_label(subject)).tobytes())
    return digest.hexdigest()[:16]


def test_default_cohort_is_unchanged_by_the_paired_channel_option(tmp_path):
    config = small_cohort_config(num_subjects=3, shape=[16, 20, 24])
    store = generate_cohort(config, store_config=StoreConfig(chunk_size=16), out=tmp_path / "a.zarr", progress=False)
    assert config.paired_channel is None
    assert "paired_channel" not in store.attrs()["synth_config"]  # stores made before keep resuming
    assert store.subject_attrs(store.subject_ids()[0])["channels"] == ["image"]
    # the paired channel draws from its own generator: "image" and the label map stay the same
    paired = generate_cohort(small_cohort_config(num_subjects=3, shape=[16, 20, 24], paired_channel="exhale",
                                                 paired_displacement=2.0),
                             store_config=StoreConfig(chunk_size=16), out=tmp_path / "b.zarr", progress=False)
    assert _array_digest(paired) == _array_digest(store)
    with pytest.raises(UserError, match="changed: paired_channel, paired_displacement, paired_model"):
        generate_cohort(small_cohort_config(num_subjects=3, shape=[16, 20, 24], paired_channel="exhale",
                                            paired_displacement=2.0),
                        store_config=StoreConfig(chunk_size=16), out=tmp_path / "a.zarr", progress=False)
    with pytest.raises(UserError, match="paired_channel"):
        small_cohort_config(paired_channel="image").validate()
    with pytest.raises(UserError, match="paired_displacement"):
        small_cohort_config(paired_channel="exhale", paired_displacement=9.0).validate()


def _paired_cohort(tmp_path, name: str, displacement: float):
    from rafmedia.shards.synth import SiteProfile

    config = small_cohort_config(num_subjects=4, shape=[40, 40, 40], sites=[SiteProfile(noise_std=0.05)],
                                 paired_channel="exhale", paired_displacement=displacement)
    return generate_cohort(config, store_config=StoreConfig(chunk_size=20), out=tmp_path / name, progress=False)


def _paired_foreground(volume: np.ndarray) -> np.ndarray:
    from rafmedia.shards.synth import PAIRED_TISSUE_INTENSITY

    # half the darkest tissue of the paired contrast (kidney), on a lightly smoothed copy (noise 0.05 -> ~0.01)
    smooth = ndimage.gaussian_filter(volume, 1.0)
    return ndimage.binary_fill_holes(smooth > 0.5 * min(PAIRED_TISSUE_INTENSITY.values()))


def test_paired_channel_is_the_same_anatomy_in_another_contrast_with_independent_noise(tmp_path):
    from rafmedia.shards.synth import LABELS, PAIRED_TISSUE_INTENSITY

    store = _paired_cohort(tmp_path, "p.zarr", displacement=2.0)
    paired_table = np.zeros(len(LABELS), dtype=np.float32)
    for name, intensity in PAIRED_TISSUE_INTENSITY.items():
        paired_table[LABELS[name]] = intensity
    row = store.read_manifest()[0]
    assert float(row["exhale_mean"]) == pytest.approx(store.read(row["subject_id"], "exhale").mean(), abs=1e-5)
    for subject in store.subject_ids():
        image, paired, label = store.read(subject), store.read(subject, "exhale"), store.read_label(subject)
        assert paired.dtype == np.float32 and paired.shape == image.shape
        # Same anatomy: mapping the label map through the paired contrast predicts the paired channel, inside
        # each structure away from its border (the deformation moves borders by up to 2 voxels).
        interior = np.zeros(label.shape, dtype=bool)
        for value in range(len(LABELS)):
            interior |= ndimage.binary_erosion(label == value, iterations=3)
        undone = np.corrcoef(paired_table[label][interior], paired[interior])[0, 1]
        raw = np.corrcoef(image[interior], paired[interior])[0, 1]
        assert undone > 0.93, (subject, undone)
        assert raw < undone - 0.05, (subject, raw, undone)  # another contrast, not a copy of "image"
        assert np.abs(image - paired)[label > 0].mean() > 0.1
        # Independent noise of the site's level, measured in air far from the body (signal exactly 0 there).
        far_air = ~ndimage.binary_dilation(label > 0, iterations=7)
        assert far_air.sum() > 20_000
        assert abs(paired[far_air].std() / 0.05 - 1) < 0.05, paired[far_air].std()
        assert abs(np.corrcoef(image[far_air], paired[far_air])[0, 1]) < 0.03


def test_paired_channel_deformation_is_present_and_bounded(tmp_path):
    store = _paired_cohort(tmp_path, "p.zarr", displacement=2.0)
    # Without the deformation every draw is the same (the displacement's draws come first and their number does
    # not depend on its size), so the two cohorts' paired channels differ by the deformation alone.
    still = _paired_cohort(tmp_path, "s.zarr", displacement=0.0)
    for subject in store.subject_ids():
        recorded = store.subject_attrs(subject)["truth"]["paired_displacement"]
        assert 1.0 <= recorded <= 2.0  # max_voxels * U(0.5, 1)
        assert still.subject_attrs(subject)["truth"]["paired_displacement"] == 0.0
        moved = _paired_foreground(store.read(subject, "exhale"))
        fixed = _paired_foreground(still.read(subject, "exhale"))
        # present: the body moved by a voxel or more somewhere
        assert (moved != fixed).sum() > 100, (moved != fixed).sum()
        # bounded: each body lies within 2 voxels (+1 for the interpolated border) of the other
        for a, b in ((moved, fixed), (fixed, moved)):
            assert not (a & ~ndimage.binary_dilation(b, iterations=3)).any()
