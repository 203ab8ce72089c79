"""The evaluator prepares each cohort as the encoder's card says: resampling checked against scipy, reorientation
against nibabel and against the same files ingested in the card's orientation, and refusals that name the fix.

Real stores: the same NIfTI files (2 mm, RAS) ingested five ways (1.5 mm, native, a CT window, LPS, no "image"
channel); the card of an encoder is written from one store with `card_sections`, as `raf pretrain` writes it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from nibabel import orientations
from scipy import ndimage

from rafmedia.core.errors import UserError
from rafmedia.engine.card import card_sections
from rafmedia.engine.encoders import create_encoder
from rafmedia.engine.export import export_encoder
from rafmedia.evaluate.embed import embed_subjects
from rafmedia.evaluate.encoder_entries import build_entries
from rafmedia.evaluate.preparation import NO_PREPROCESSING, Preparation, PreparedEncoder, axis_transform
from rafmedia.launch.cli import main
from rafmedia.shards.ingest import IngestConfig, ingest
from rafmedia.shards.store import CohortStore, StoreConfig
from rafmedia.shards.volumes import StoreVolumes, normalize_intensity
from tests.shards.test_formats import write_nifti

SHAPE = (14, 16, 12)
NUM_SUBJECTS = 6


def smooth_volume(index: int) -> np.ndarray:
    """A smooth volume in Hounsfield-like units, different per subject."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij"))
    phase = 0.3 * index
    return (300 * np.sin(2 * grid[0] + phase) + 200 * np.cos(3 * grid[1]) + 100 * grid[2] ** 2).astype(np.float32)


def ingest_store(listing, out, **config) -> CohortStore:
    summary = ingest(listing, out, config=IngestConfig(workers=1, **config), store_config=StoreConfig(chunk_size=16),
                     progress=False)
    assert summary.count("bad") == 0, summary.bad
    return CohortStore(summary.store)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("preparation")
    lines, t1_lines = ["subject_id,image,site,disease,licence"], ["subject_id,image:t1,site"]
    for index in range(NUM_SUBJECTS):
        write_nifti(root / f"s{index}.nii.gz", smooth_volume(index), np.diag([2.0, 2.0, 2.0, 1.0]))
        lines.append(f"s{index},s{index}.nii.gz,site-{'ab'[index % 2]},{index % 2},CC-BY-4.0")
        t1_lines.append(f"s{index},s{index}.nii.gz,site-a")
    (root / "listing.csv").write_text("\n".join(lines) + "\n")
    (root / "t1.csv").write_text("\n".join(t1_lines[:3]) + "\n")
    zscore = {"default": {"name": "mr_zscore"}}
    return {
        "fine": ingest_store(root / "listing.csv", root / "fine", spacing=1.5, intensity=zscore),
        "native": ingest_store(root / "listing.csv", root / "native", intensity=zscore),
        "window": ingest_store(root / "listing.csv", root / "window",
                               intensity={"default": {"name": "ct_window", "low": -500, "high": 500}}),
        "lps": ingest_store(root / "listing.csv", root / "lps", orientation="LPS", intensity=zscore),
        "t1": ingest_store(root / "t1.csv", root / "t1", intensity=zscore),
    }


def export_for(store: CohortStore, folder, *, name: str = "enc", card: dict | None = None) -> str:
    """A small encoder exported with the card `raf pretrain` would write after training on `store`."""
    torch.manual_seed(0)
    encoder = create_encoder("cnn3d_small", width=4).eval()
    folder.mkdir(parents=True, exist_ok=True)
    if card is None:
        card = card_sections(store=store, channels=["image"], kind="image", input_size=[16, 16, 16],
                             licence="apache-2.0", config={})
    return str(export_encoder(encoder, folder / "encoder.safetensors", architecture="cnn3d_small",
                              options={"width": 4}, card={"name": name, **card}))


# ---- the operations, against independent references -------------------------------------------------------------------
def test_resampling_matches_scipy_zoom_and_a_linear_ramp_exactly():
    rng = np.random.default_rng(0)
    volume = ndimage.gaussian_filter(rng.normal(size=(10, 12, 9)), 1.5).astype(np.float32)
    zoom = (2.0 / 1.5, 1.0 / 1.5, 3.0 / 1.5)
    resampled = Preparation(zoom=zoom).geometry(torch.from_numpy(volume)[None, None])[0, 0].numpy()
    assert resampled.shape == (13, 8, 18)
    expected = ndimage.zoom(volume.astype(np.float64), zoom, order=1)  # grid_mode=False: corner voxels kept
    assert expected.shape == resampled.shape
    np.testing.assert_allclose(resampled, expected, atol=1e-5)
    # a linear ramp is reproduced exactly: output voxel o sits at input coordinate o * (n - 1) / (m - 1)
    i, j, k = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in (10, 12, 9)], indexing="ij")
    ramp = Preparation(zoom=zoom).geometry(torch.from_numpy(3 * i + 2 * j - k)[None, None])[0, 0].numpy()
    coordinates = [np.arange(m) * (n - 1) / (m - 1) for n, m in zip((10, 12, 9), ramp.shape)]
    oi, oj, ok = np.meshgrid(*coordinates, indexing="ij")
    np.testing.assert_allclose(ramp, 3 * oi + 2 * oj - ok, atol=1e-4)


@pytest.mark.parametrize("cohort_codes", ["LPS", "ASL", "IRP"])
def test_reorientation_matches_nibabel_and_dense_outputs_come_back(cohort_codes):
    volume = np.random.default_rng(1).normal(size=(5, 6, 7)).astype(np.float32)
    permutation, flips = axis_transform(cohort_codes, "RAS")
    preparation = Preparation(permutation=permutation, flips=flips)
    reoriented = preparation.geometry(torch.from_numpy(volume)[None, None])[0, 0].numpy()
    transform = orientations.ornt_transform(orientations.axcodes2ornt(cohort_codes), orientations.axcodes2ornt("RAS"))
    np.testing.assert_array_equal(reoriented, orientations.apply_orientation(volume, transform))
    restored = preparation.restore(torch.from_numpy(reoriented)[None, None])[0, 0].numpy()
    np.testing.assert_array_equal(restored, volume)
    with pytest.raises(ValueError, match="same three axes"):
        axis_transform("RAA", "RAS")


# ---- real stores -----------------------------------------------------------------------------------------------------
def test_a_store_at_another_spacing_is_resampled_on_the_fly(stores, tmp_path):
    weights = export_for(stores["fine"], tmp_path / "fine")
    same, other = (build_entries([weights], options={}, seeds=[0, 1], random_baseline=False,
                                 cohort=stores[name].path)[0] for name in ("fine", "native"))
    assert other.replicates[0].model is other.replicates[1].model  # one checkpoint, one (prepared) module
    assert not isinstance(same.replicates[0].model, PreparedEncoder)  # nothing to prepare: the encoder itself
    assert "spacing 1.5 mm (matches)" in same.info["preparation"]["note"]
    note = other.info["preparation"]["note"]
    assert "cohort spacing 2 mm -> resampled to 1.5 mm on the fly" in note
    assert "intensity: mr_zscore" in note and "(matches)" in note
    assert other.info["licence"] == "apache-2.0" and other.digest != same.digest  # other inputs, other cache key
    model = other.replicates[0].model
    got = embed_subjects(model, StoreVolumes(stores["native"].path, ["s0", "s1"], num_workers=0), [0, 1])
    encoder = model.encoder
    for row, subject in enumerate(["s0", "s1"]):  # reference: z-score, then scipy's linear zoom, then the encoder
        raw = stores["native"].read(subject)
        zscored = normalize_intensity(torch.from_numpy(raw)[None, None])[0, 0].double().numpy()
        zoomed = ndimage.zoom(zscored, [2.0 / 1.5] * 3, order=1).astype(np.float32)
        with torch.no_grad():
            expected = encoder(torch.from_numpy(zoomed)[None, None]).double().numpy()[0]
        np.testing.assert_allclose(got[row], expected, atol=1e-4)
    # physical check: the 2 mm store resampled on the fly is the 1.5 mm ingest (MONAI Spacing) of the same files
    on_the_fly = model.preparation.geometry(torch.from_numpy(stores["native"].read("s2"))[None, None])[0, 0].numpy()
    ingested = stores["fine"].read("s2")
    common = tuple(slice(0, min(a, b) - 1) for a, b in zip(on_the_fly.shape, ingested.shape))
    assert abs(on_the_fly.shape[0] - ingested.shape[0]) <= 1
    assert np.corrcoef(on_the_fly[common].ravel(), ingested[common].ravel())[0, 1] > 0.95


def test_another_orientation_is_reoriented_to_the_same_arrays(stores, tmp_path):
    weights = export_for(stores["native"], tmp_path / "native")
    entry = build_entries([weights], options={}, seeds=[0], random_baseline=False, cohort=stores["lps"].path)[0]
    assert "orientation LPS -> reoriented to RAS on the fly" in entry.info["preparation"]["note"]
    model = entry.replicates[0].model
    lps = torch.from_numpy(stores["lps"].read("s3"))[None, None]
    np.testing.assert_allclose(model.preparation.geometry(lps)[0, 0].numpy(), stores["native"].read("s3"), atol=1e-5)
    features = model.forward_features(lps)  # dense outputs are back on the cohort's (LPS) axes
    with torch.no_grad():
        reference = model.encoder.forward_features(lps.flip([2, 3]))
    torch.testing.assert_close(features, reference.flip([2, 3]))


def test_another_intensity_policy_is_refused_naming_the_fix(stores, tmp_path, capsys):
    weights = export_for(stores["native"], tmp_path / "native", name="zscored encoder")
    with pytest.raises(UserError) as refused:
        build_entries([weights], options={}, seeds=[0], random_baseline=False, cohort=stores["window"].path)
    message = str(refused.value)
    for part in ("zscored encoder", str(stores["window"].path), "ct_window", "mr_zscore",
                 "re-ingest the cohort with ingest.intensity.image="):
        assert part in message
    code = main(["evaluate", "--cohort", str(stores["window"].path), "--encoder", weights, "--out",
                 str(tmp_path / "eval"), "--quiet", "evaluate.primary_target=disease", "evaluate.group_by=[site]"])
    err = capsys.readouterr().err
    assert code == 2 and "intensity policy differs for channel 'image'" in err and "Traceback" not in err


def test_a_missing_channel_is_refused(stores, tmp_path):
    weights = export_for(stores["native"], tmp_path / "native")
    with pytest.raises(UserError, match=r"needs channel 'image', which cohort .*t1 does not have \(its channels: t1\)"):
        build_entries([weights], options={}, seeds=[0], random_baseline=False, cohort=stores["t1"].path)
    # a study that embeds every channel alike (weak labels) prepares the cohort's channel instead
    entry = build_entries([weights], options={}, seeds=[0], random_baseline=False, cohort=stores["t1"].path,
                          channel=None)[0]
    assert "intensity: mr_zscore" in entry.info["preparation"]["note"]


def test_a_card_without_preprocessing_uses_the_cohort_as_stored(stores, tmp_path):
    weights = export_for(stores["native"], tmp_path / "old", card={})  # an export from before the record
    entry, baseline = build_entries([weights], options={}, seeds=[0], random_baseline=True,
                                    cohort=stores["fine"].path)
    assert entry.info["preparation"]["note"] == NO_PREPROCESSING and entry.info["licence"] == "unknown"
    assert not isinstance(entry.replicates[0].model, PreparedEncoder)
    assert baseline.info["preparation"]["note"] == NO_PREPROCESSING
