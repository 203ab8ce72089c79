"""Patch samplers and the grid aggregator: statistics against scipy, windows against MONAI, reads against the store."""
import warnings

import numpy as np
import pytest
import torch
from scipy import stats

from rafmedia.core.errors import UserError
from rafmedia.shards.sampling import (ArraySubject, GridAggregator, create_sampler, grid_origins, list_samplers,
                                      region_at)
from rafmedia.shards.sources import StoreSubject
from rafmedia.shards.store import CohortStore, StoreConfig


def _plans(sampler, reader, count, seed=0):
    plans = sampler.plan(reader, np.random.default_rng(seed))
    return [next(plans) for _ in range(count)]


def _subject(shape=(20, 24, 28), label=None, seed=0):
    image = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    return ArraySubject("s", {"image": image}, label)


def test_registry_lists_the_samplers_and_answers_unknown_names():
    assert list_samplers() == ["grid", "label_balanced", "paired", "uniform"]
    with pytest.raises(UserError, match="did you mean 'uniform'"):
        create_sampler("unifrom", patch_size=8)
    with pytest.raises(UserError, match="has no option 'overlp'; did you mean 'overlap'"):
        create_sampler("grid", patch_size=8, overlp=0.5)
    with pytest.raises(UserError, match="foreground_probability must be in"):
        create_sampler("label_balanced", patch_size=8, foreground_probability=1.5)


def test_uniform_origins_are_uniform_over_every_valid_position_chi_square():
    reader = _subject()
    sampler = create_sampler("uniform", patch_size=8)
    origins = np.array([plan["origin"] for plan in _plans(sampler, reader, 6000)])
    for axis, size in enumerate(reader.shape):
        values = size - 8 + 1  # valid origins 0 .. size - 8
        counts = np.bincount(origins[:, axis], minlength=values)
        assert len(counts) == values  # nothing outside the volume
        assert stats.chisquare(counts).pvalue > 1e-3
    # axes are drawn independently: a contingency test over (d, h) finds no association
    table = np.histogram2d(origins[:, 0], origins[:, 1], bins=[13, 17], range=[[0, 13], [0, 17]])[0]
    assert stats.chi2_contingency(table).pvalue > 1e-3
    patch = sampler.extract(reader, {"origin": (3, 5, 7)})
    assert patch["image"].shape == (1, 8, 8, 8) and patch["image"].dtype == np.float32
    assert np.array_equal(patch["image"][0], reader.read("image", region_at((3, 5, 7), (8, 8, 8))))


def test_label_balanced_hits_the_requested_foreground_rate_on_a_real_store(small_cohort):
    store, _ = small_cohort
    sampler = create_sampler("label_balanced", patch_size=12, foreground_probability=0.3)
    foreground = draws = 0
    for index, subject_id in enumerate(store.subject_ids()[:8]):
        reader = StoreSubject(store, subject_id, ["image"])
        label = store.read_label(subject_id)  # the independent reference: the label the store holds, via zarr
        for plan in _plans(sampler, reader, 250, seed=index):
            centre = plan["center"]
            foreground += int(label[centre] > 0)
            draws += 1
            assert all(o <= c < o + 12 for o, c in zip(plan["origin"], centre))  # the centre is in the patch
            assert all(0 <= o <= 32 - 12 for o in plan["origin"])
    assert stats.binomtest(foreground, draws, 0.3).pvalue > 1e-3
    assert abs(foreground / draws - 0.3) < 0.04


def test_class_weights_are_respected_chi_square_including_rare_classes():
    label = np.zeros((40, 40, 40), np.uint8)
    label[:12, :12, :] = 1  # 9% of the volume
    label[20:24, 20:26, 20:30] = 2  # 0.4%: listed, not rejection-sampled
    label[30:32, 30:32, 30:33] = 3  # 12 voxels
    reader = _subject((40, 40, 40), label)
    weights = [1.0, 1.0, 2.0, 4.0]
    sampler = create_sampler("label_balanced", patch_size=10, class_weights=weights)
    plans = _plans(sampler, reader, 4000)
    classes = np.array([label[plan["center"]] for plan in plans])
    assert np.array_equal(classes, [plan["center_class"] for plan in plans])
    counts = np.bincount(classes, minlength=4)
    assert stats.chisquare(counts, np.asarray(weights) / sum(weights) * len(plans)).pvalue > 1e-3
    # centres are uniform within a class: the 12 voxels of class 3 are all drawn, about equally
    rare = np.bincount([np.ravel_multi_index(p["center"], label.shape) for p, c in zip(plans, classes) if c == 3])
    assert np.count_nonzero(rare) == 12 and stats.chisquare(rare[rare > 0]).pvalue > 1e-3


def test_a_class_absent_from_a_subject_is_left_out_with_a_warning():
    label = np.zeros((16, 16, 16), np.uint8)
    label[4:8, 4:8, 4:8] = 1
    reader = _subject((16, 16, 16), label)
    sampler = create_sampler("label_balanced", patch_size=6, class_weights={1: 1.0, 3: 5.0})
    with pytest.warns(UserWarning, match=r"subject 's' has no voxel of classes \[\[3\]\]"):
        plans = _plans(sampler, reader, 50)
    assert {plan["center_class"] for plan in plans} == {1}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second subject lacking class 3 is counted, not warned again
        _plans(sampler, reader, 1)
    assert sampler.missing_classes == {"[[3]]": 2}
    with pytest.raises(UserError, match="has no label map"):
        _plans(sampler, _subject((16, 16, 16)), 1)


@pytest.mark.parametrize("shape", [(32, 32, 32), (37, 30, 41), (16, 20, 16)])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.7])
def test_grid_windows_are_monai_dense_patch_slices(shape, overlap):
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    patch = (16, 12, 16)
    interval = _get_scan_interval(shape, patch, 3, [overlap] * 3)
    expected = [tuple(s.start for s in window) for window in dense_patch_slices(shape, patch, interval)]
    assert grid_origins(shape, patch, overlap) == expected


def test_grid_and_aggregator_reconstruct_the_volume_exactly():
    volume = np.random.default_rng(2).normal(size=(2, 37, 30, 41)).astype(np.float32)
    reader = ArraySubject("s", {"a": volume[0], "b": volume[1]})
    sampler = create_sampler("grid", patch_size=16, overlap=0.5)
    aggregator = GridAggregator(reader.shape, 16)
    patches = list(sampler(reader, np.random.default_rng(0)))
    assert len(patches) == patches[0]["grid_size"] == 4 * 3 * 5  # step 8: starts 0..21 (+16), 0..14, 0..25
    for patch in patches:
        aggregator.add(torch.from_numpy(patch["image"]), patch["origin"])
    assert torch.equal(aggregator.result(), torch.from_numpy(volume))  # bit for bit
    gaussian = GridAggregator(reader.shape, 16, mode="gaussian")
    gaussian.add(torch.stack([torch.from_numpy(p["image"]) for p in patches]), np.stack([p["origin"] for p in patches]))
    assert torch.allclose(gaussian.result(), torch.from_numpy(volume), atol=1e-6)
    partial = GridAggregator(reader.shape, 16)
    partial.add(torch.from_numpy(patches[0]["image"]), patches[0]["origin"])
    with pytest.raises(ValueError, match="covered by no window"):
        partial.result()


@pytest.mark.parametrize("mode", ["constant", "gaussian"])
@pytest.mark.parametrize("overlap", [0.25, 0.5])
def test_grid_inference_matches_monai_sliding_window_inference(small_cohort, mode, overlap):
    from monai.inferers import sliding_window_inference

    store, _ = small_cohort
    subject_id = store.subject_ids()[0]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv3d(4, 2, 3, padding=1))
    sampler = create_sampler("grid", patch_size=(12, 14, 12), overlap=overlap)
    aggregator = GridAggregator((32, 32, 32), (12, 14, 12), mode=mode)
    patches = list(sampler(StoreSubject(store, subject_id, ["image"]), np.random.default_rng(0)))
    with torch.no_grad():
        for start in range(0, len(patches), 5):
            batch = patches[start:start + 5]
            aggregator.add(model(torch.stack([torch.from_numpy(p["image"]) for p in batch])),
                           np.stack([p["origin"] for p in batch]))
        volume = torch.from_numpy(store.read(subject_id))[None, None]
        expected = sliding_window_inference(volume, (12, 14, 12), 5, model, overlap=overlap, mode=mode)
    assert expected.shape == (1, 2, 32, 32, 32)
    assert torch.allclose(aggregator.result(), torch.as_tensor(expected[0]).float(), atol=1e-5)


@pytest.fixture(scope="module")
def two_channel_store(tmp_path_factory):
    store = CohortStore.create(tmp_path_factory.mktemp("paired") / "s.zarr", config=StoreConfig(chunk_size=8), name="p")
    rng = np.random.default_rng(4)
    t1 = rng.normal(size=(24, 20, 28)).astype(np.float32)
    store.write_subject("sub-1", channels={"t1": t1, "t2": np.sqrt(np.abs(t1)) + 3}, attrs={},
                        label=(t1 > 1).astype(np.uint8))
    return store


def test_paired_channels_read_the_same_voxel_box_of_each_channel(two_channel_store):
    store = two_channel_store
    reader = StoreSubject(store, "sub-1", ["t1"])
    sampler = create_sampler("paired", patch_size=(8, 6, 10), channels=["t1", "t2"])
    for patch in (sampler.extract(reader, plan) for plan in _plans(sampler, reader, 20)):
        assert np.array_equal(patch["origin_a"], patch["origin_b"])
        region = region_at(patch["origin_a"], (8, 6, 10))
        assert np.array_equal(patch["view_a"][0], store.read("sub-1", "t1", region))
        assert np.array_equal(patch["view_b"][0], store.read("sub-1", "t2", region))
        assert np.array_equal(patch["label_a"][0], store.read_label("sub-1", region))


def test_two_crops_are_at_most_max_shift_apart_and_reach_it(two_channel_store):
    store = two_channel_store
    reader = StoreSubject(store, "sub-1", ["t1", "t2"])
    sampler = create_sampler("paired", patch_size=8, max_shift=3)
    plans = _plans(sampler, reader, 3000)
    shifts = np.array([np.subtract(p["origin_b"], p["origin_a"]) for p in plans])
    assert np.abs(shifts).max() == 3  # the requested bound, and it is reached
    assert set(np.unique(shifts)) == set(range(-3, 4))
    assert all(0 <= o <= s - 8 for p in plans for o, s in zip(p["origin_b"], reader.shape))
    patch = sampler.extract(reader, plans[0])
    assert patch["view_a"].shape == patch["view_b"].shape == (2, 8, 8, 8)  # both channels in each view
    assert np.array_equal(patch["view_b"][1], store.read("sub-1", "t2", region_at(plans[0]["origin_b"], (8, 8, 8))))


def test_a_patch_larger_than_the_subject_names_the_subject():
    with pytest.raises(UserError, match=r"subject 's' has shape \(20, 24, 28\), smaller than .* patch_size \(24, 24, 24\)"):
        _plans(create_sampler("uniform", patch_size=24), _subject(), 1)
