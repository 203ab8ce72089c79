import math
import warnings

import numpy as np
import pytest
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice
from scipy import ndimage

from rafmedia.core.errors import UserError
from rafmedia.engine.encoders import create_encoder
from rafmedia.evaluate.segmentation_head import SegmentationHead, fit_segmentation_head, predict_masks
from rafmedia.evaluate.segmentation_metrics import aggregate_structures, segmentation_metrics
from rafmedia.shards.synth import LABELS as SYNTH_LABELS
from rafmedia.shards.volumes import load_volumes

LABELS = {"organ": 1, "tumour": 2}


def _blobs(rng: np.random.Generator, shape=(20, 24, 18)) -> np.ndarray:
    """A label map with two structures, each a few smooth random blobs."""
    out = np.zeros(shape, dtype=np.uint8)
    for value, level in ((1, 0.9), (2, 1.3)):
        field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=2.0)
        out[field / field.std() > level] = value
    return out


def _border(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask)  # voxels next to the outside (6-neighbourhood), as MONAI's edges


def _directed(from_mask: np.ndarray, to_mask: np.ndarray, spacing) -> np.ndarray:
    """Distances (mm) from each border voxel of `from_mask` to the nearest border voxel of `to_mask` (scipy)."""
    distance_to = ndimage.distance_transform_edt(~_border(to_mask), sampling=spacing)
    return distance_to[_border(from_mask)]


def _scipy_hd95(a: np.ndarray, b: np.ndarray, spacing) -> float:
    return max(np.percentile(_directed(a, b, spacing), 95), np.percentile(_directed(b, a, spacing), 95))


def _scipy_nsd(a: np.ndarray, b: np.ndarray, spacing, tolerance: float) -> float:
    ab, ba = _directed(a, b, spacing), _directed(b, a, spacing)
    return ((ab <= tolerance).sum() + (ba <= tolerance).sum()) / (len(ab) + len(ba))


def test_dice_matches_a_hand_computed_case():
    ref = np.array([[[1, 1, 1, 0], [2, 2, 0, 0]]])
    pred = np.array([[[1, 1, 0, 0], [2, 1, 2, 0]]])
    out = segmentation_metrics(pred, ref, labels=LABELS)
    # organ: |P & R| = 2, |P| = 3, |R| = 3 -> 4/6; tumour: |P & R| = 1, |P| = 2, |R| = 2 -> 2/4
    assert out["organ"]["dice"] == pytest.approx(4 / 6)
    assert out["tumour"]["dice"] == pytest.approx(2 / 4)
    assert not any(out[name][flag] for name in LABELS for flag in ("pred_empty", "ref_empty"))


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")  # raised inside MONAI
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.5, 0.8, 1.2)])
def test_parity_with_monai_and_scipy_on_random_blobs(spacing):
    rng = np.random.default_rng(0)
    for _ in range(3):
        ref, pred = _blobs(rng), _blobs(rng)
        out = segmentation_metrics(pred, ref, labels=LABELS, spacing=spacing, nsd_tolerance_mm=2.0)
        for name, value in LABELS.items():
            p, r = pred == value, ref == value
            assert p.any() and r.any()
            p_t, r_t = (torch.from_numpy(m[None, None].astype(np.float32)) for m in (p, r))
            monai = {"dice": compute_dice(p_t, r_t, include_background=True),
                     "hd95": compute_hausdorff_distance(p_t, r_t, include_background=True, percentile=95,
                                                        spacing=list(spacing)),
                     "nsd": compute_surface_dice(p_t, r_t, [2.0], include_background=True, spacing=list(spacing))}
            for metric, expected in monai.items():
                assert out[name][metric] == pytest.approx(float(expected), abs=1e-6), (name, metric)
            assert out[name]["dice"] == pytest.approx(2 * (p & r).sum() / (p.sum() + r.sum()), abs=1e-6)
            assert out[name]["hd95"] == pytest.approx(_scipy_hd95(p, r, spacing), abs=1e-4)
            assert out[name]["nsd"] == pytest.approx(_scipy_nsd(p, r, spacing, 2.0), abs=1e-6)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (3.0, 0.5, 0.7)])
@pytest.mark.parametrize("k", [1, 4])
def test_hd95_of_two_plates_offset_by_k_voxels_is_k_times_the_spacing(k, spacing):
    # Every voxel of a one-voxel-thick plate is on its border, and its nearest voxel on the other plate lies
    # straight across the gap: every distance, so the 95th percentile, is k voxels along D.
    ref, pred = np.zeros((12, 10, 10), np.uint8), np.zeros((12, 10, 10), np.uint8)
    ref[3, 2:8, 2:8] = 1
    pred[3 + k, 2:8, 2:8] = 1
    out = segmentation_metrics(pred, ref, labels={"plate": 1}, spacing=spacing, nsd_tolerance_mm=k * spacing[0])
    assert out["plate"]["hd95"] == pytest.approx(k * spacing[0], abs=1e-5)
    assert out["plate"]["dice"] == 0.0
    assert out["plate"]["nsd"] == pytest.approx(1.0)  # every border voxel within tau = the offset
    tight = segmentation_metrics(pred, ref, labels={"plate": 1}, spacing=spacing, nsd_tolerance_mm=k * spacing[0] - 0.1)
    assert tight["plate"]["nsd"] == 0.0


@pytest.mark.parametrize("axis", [0, 2])
@pytest.mark.parametrize("k", [2, 5, 8])
def test_hd95_of_two_cubes_offset_by_k_voxels_is_k_and_matches_scipy(k, axis):
    # Each border voxel of one cube, moved by k, is a border voxel of the other (no distance exceeds k voxels),
    # and the far face (36 of the 152 border voxels, over 5%) has nothing of the other cube nearer than k.
    ref, pred = np.zeros((24, 24, 24), np.uint8), np.zeros((24, 24, 24), np.uint8)
    ref[4:10, 5:11, 5:11] = 1
    pred[tuple(slice(start + k * (i == axis), start + 6 + k * (i == axis)) for i, start in enumerate((4, 5, 5)))] = 1
    for spacing in ((1.0, 1.0, 1.0), (2.0, 1.0, 0.5)):
        out = segmentation_metrics(pred, ref, labels={"cube": 1}, spacing=spacing)
        assert out["cube"]["hd95"] == pytest.approx(k * spacing[axis], abs=1e-5)
        assert out["cube"]["hd95"] == pytest.approx(_scipy_hd95(pred == 1, ref == 1, spacing), abs=1e-5)
        assert out["cube"]["dice"] == pytest.approx(2 * max(6 - k, 0) * 36 / (2 * 216))


def test_empty_masks_give_the_worst_or_perfect_values_never_nan():
    shape, spacing = (10, 12, 8), (2.0, 1.0, 3.0)
    diagonal = math.sqrt(20**2 + 12**2 + 24**2)
    ref, pred = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    ref[2:5, 2:5, 2:5] = 1  # organ: in the reference only
    pred[6:8, 6:8, 1:3] = 2  # tumour: in the prediction only; "other" (3): in neither
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # MONAI's empty-mask warnings must not be reached
        out = segmentation_metrics(pred, ref, labels={**LABELS, "other": 3}, spacing=spacing)
    assert out["organ"] == {"dice": 0.0, "hd95": pytest.approx(diagonal), "nsd": 0.0, "pred_empty": True,
                            "ref_empty": False}
    assert out["tumour"] == {"dice": 0.0, "hd95": pytest.approx(diagonal), "nsd": 0.0, "pred_empty": False,
                             "ref_empty": True}
    assert out["other"] == {"dice": 1.0, "hd95": 0.0, "nsd": 1.0, "pred_empty": True, "ref_empty": True}
    # the worst HD95 is larger than any achievable one: two opposite corner voxels
    corners_ref, corners_pred = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    corners_ref[0, 0, 0], corners_pred[-1, -1, -1] = 1, 1
    far = segmentation_metrics(corners_pred, corners_ref, labels={"dot": 1}, spacing=spacing)["dot"]["hd95"]
    assert far == pytest.approx(math.sqrt(18**2 + 11**2 + 21**2)) and far < diagonal


def test_aggregate_structures_means_medians_and_empty_counts():
    def row(dice, hd95, nsd, pred_empty=False, ref_empty=False):
        return {"dice": dice, "hd95": hd95, "nsd": nsd, "pred_empty": pred_empty, "ref_empty": ref_empty}

    cases = [{"organ": row(0.8, 2.0, 0.9), "tumour": row(0.0, 50.0, 0.0, pred_empty=True)},
             {"organ": row(0.6, 4.0, 0.7), "tumour": row(1.0, 0.0, 1.0, pred_empty=True, ref_empty=True)},
             {"organ": row(0.7, 9.0, 0.5), "tumour": row(0.4, 6.0, 0.3)}]
    out = aggregate_structures(cases)
    organ, tumour = out["per_structure"]["organ"], out["per_structure"]["tumour"]
    assert organ["dice"] == {"mean": pytest.approx(0.7), "median": pytest.approx(0.7)}
    assert organ["hd95"]["median"] == 4.0 and organ["num_pred_empty"] == 0 and organ["num_cases"] == 3
    assert tumour["dice"]["mean"] == pytest.approx(1.4 / 3) and tumour["hd95"]["median"] == 6.0
    assert (tumour["num_pred_empty"], tumour["num_ref_empty"], tumour["num_both_empty"]) == (1, 1, 1)
    over = out["over_structures"]
    assert over["dice"]["mean"] == pytest.approx((0.8 + 0.6 + 0.7 + 0.0 + 1.0 + 0.4) / 6)
    assert over["dice"]["median"] == pytest.approx((0.6 + 0.7) / 2)
    assert over["num_pairs"] == 6 and over["num_pred_empty"] == 1

    kept = aggregate_structures(cases, include_ref_empty=False)
    tumour = kept["per_structure"]["tumour"]
    assert tumour["dice"]["mean"] == pytest.approx(0.2) and tumour["num_cases"] == 2 and tumour["num_excluded"] == 1
    assert kept["over_structures"]["num_pairs"] == 5 and kept["over_structures"]["num_excluded"] == 1

    all_absent = aggregate_structures([{"x": row(1.0, 0.0, 1.0, True, True)}], include_ref_empty=False)
    assert math.isnan(all_absent["per_structure"]["x"]["dice"]["mean"])
    assert all_absent["per_structure"]["x"]["num_cases"] == 0


def test_user_errors_name_the_bad_value():
    with pytest.raises(UserError, match=r"\(4, 4, 4\).*\(4, 4, 5\)"):
        segmentation_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), labels=LABELS)
    with pytest.raises(UserError, match="spacing"):
        segmentation_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), labels=LABELS, spacing=(1, 0, 1))
    with pytest.raises(UserError, match="spacing"):
        segmentation_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), labels=LABELS, spacing=(1, 1))
    with pytest.raises(UserError, match="labels"):
        segmentation_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), labels={})
    with pytest.raises(UserError, match="case 1"):
        aggregate_structures([{"a": {}}, {"b": {}}])


# ------------------------------------------------------------------ the segmentation head (evaluate/segmentation_head.py)
NUM_CLASSES = 6


def _cohort(store):
    ids = store.subject_ids()
    volumes = load_volumes(store, ids, progress=False)
    labels = load_volumes(store, ids, channel="label", normalize=False, progress=False)[:, 0].round().to(torch.uint8)
    return volumes, labels


def _encoder():
    torch.manual_seed(0)
    return create_encoder("cnn3d_small", width=8, num_stages=1)  # features at 1/4 of the input size


def _body_dice(pred_NDHW, ref_NDHW) -> np.ndarray:
    return np.array([segmentation_metrics(p, r, labels={"body": SYNTH_LABELS["body"]})["body"]["dice"]
                     for p, r in zip(pred_NDHW, ref_NDHW)])


def test_head_on_frozen_features_beats_trivial_baselines_on_held_out_subjects(small_cohort):
    store, _ = small_cohort
    volumes, labels = _cohort(store)
    encoder = _encoder()
    before = {key: value.clone() for key, value in encoder.state_dict().items()}
    head = fit_segmentation_head(encoder, volumes[:24], labels[:24], num_classes=NUM_CLASSES, steps=80, lr=3e-2,
                                 seed=0, batch_size=4)
    assert all(torch.equal(before[key], value) for key, value in encoder.state_dict().items())  # frozen
    assert encoder.training  # the mode it had is restored

    pred = predict_masks(encoder, head, volumes[24:], batch_size=5)
    ref = labels[24:].numpy()
    assert pred.shape == ref.shape and pred.dtype == np.uint8 and pred.max() < NUM_CLASSES
    learned = _body_dice(pred, ref)
    all_body = _body_dice(np.full_like(ref, SYNTH_LABELS["body"]), ref)  # the best constant map for body Dice
    majority = np.bincount(labels[:24].numpy().ravel()).argmax()  # background: body Dice 0
    assert majority == SYNTH_LABELS["background"]
    print(f"held-out body Dice: head {learned.mean():.3f}, all-body {all_body.mean():.3f}, majority 0")
    assert learned.mean() > 0.5 and learned.mean() > all_body.mean() + 0.2
    assert (learned > all_body).all()
    voxel_accuracy = (pred == ref).mean()
    assert voxel_accuracy > (ref == majority).mean()  # better than predicting the majority class everywhere


def test_fit_is_deterministic_for_a_seed_and_leaves_the_global_generator_alone(small_cohort):
    store, _ = small_cohort
    volumes, labels = _cohort(store)
    volumes, labels = volumes[:8], labels[:8]
    encoder = _encoder()

    def fit(seed):
        return fit_segmentation_head(encoder, volumes, labels, num_classes=NUM_CLASSES, steps=15, lr=1e-2,
                                     seed=seed, batch_size=4)

    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    first = fit(seed=7)
    assert torch.equal(torch.rand(3), expected_draw)  # the fit drew nothing from the global stream
    second, other = fit(seed=7), fit(seed=8)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), other.state_dict().values()))
    np.testing.assert_array_equal(predict_masks(encoder, first, volumes), predict_masks(encoder, second, volumes))


def test_head_standardises_features_and_upsamples_to_the_input_size():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(3, 5, 4, 4, 4, generator=generator) * 7 + 3
    head = SegmentationHead(5, 4, hidden_channels=0)
    head.set_feature_statistics(features)
    np.testing.assert_allclose(head.feature_mean.flatten(), features.mean(dim=(0, 2, 3, 4)), rtol=1e-5)
    logits = head(features, (16, 12, 8))
    assert logits.shape == (3, 4, 16, 12, 8)
    # a linear head commutes with linear interpolation: the upsampled logits equal the conv of upsampled features
    upsampled = torch.nn.functional.interpolate(features, size=(16, 12, 8), mode="trilinear", align_corners=False)
    direct = head.classify((upsampled - head.feature_mean) / head.feature_std)
    torch.testing.assert_close(logits, direct, atol=1e-5, rtol=1e-5)


def test_head_bad_labels_are_user_errors():
    encoder = _encoder()
    volumes = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with pytest.raises(UserError, match="num_classes=7"):
        fit_segmentation_head(encoder, volumes, torch.full((2, 16, 16, 16), 6), num_classes=6, steps=1)
    with pytest.raises(UserError, match=r"\(2, 16, 16, 16\)"):
        fit_segmentation_head(encoder, volumes, torch.zeros(2, 16, 16, 8), num_classes=6, steps=1)
    with pytest.raises(UserError, match="channel axis"):
        fit_segmentation_head(encoder, volumes[:, 0], torch.zeros(2, 16, 16, 16), num_classes=6, steps=1)
