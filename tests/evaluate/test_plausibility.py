import itertools

import numpy as np
import pytest
import torch
from scipy import ndimage

import rafmedia.engine.tasks.shape  # noqa: F401  (registers shape_prior_dae)
from rafmedia.core.errors import UserError
from rafmedia.engine.encoders import create_encoder
from rafmedia.engine.tasks import create_task
from rafmedia.evaluate.plausibility import (error_threshold, plausibility_by_group, shape_prior_error, topology,
                                            topology_norms, topology_plausible, topology_violations)
from rafmedia.shards.synth import LABELS
from tests.engine.helpers import train_briefly

STRUCTURES = {name: value for name, value in LABELS.items() if value > 0}


def _flood_components(mask: np.ndarray, neighbours: list[tuple[int, int, int]]) -> list[set]:
    """Connected components by breadth-first flood fill, an independent reference for scipy.ndimage.label."""
    unseen, components = set(zip(*np.nonzero(mask))), []
    while unseen:
        frontier = [unseen.pop()]
        component = set(frontier)
        while frontier:
            d, h, w = frontier.pop()
            for dd, dh, dw in neighbours:
                voxel = (d + dd, h + dh, w + dw)
                if voxel in unseen:
                    unseen.remove(voxel)
                    component.add(voxel)
                    frontier.append(voxel)
        components.append(component)
    return components


NEIGHBOURS_26 = [o for o in itertools.product((-1, 0, 1), repeat=3) if o != (0, 0, 0)]
NEIGHBOURS_6 = [o for o in NEIGHBOURS_26 if sum(map(abs, o)) == 1]


def _reference_counts(mask: np.ndarray) -> dict[str, int]:
    shape = mask.shape
    holes = [c for c in _flood_components(~mask, NEIGHBOURS_6)
             if not any(v in (0, n - 1) for voxel in c for v, n in zip(voxel, shape))]
    return {"components": len(_flood_components(mask, NEIGHBOURS_26)), "holes": len(holes)}


def _hollow_cube(size: int = 12) -> np.ndarray:
    mask = np.zeros((size, size, size), bool)
    mask[2:-2, 2:-2, 2:-2] = True
    mask[4:-4, 4:-4, 4:-4] = False  # one closed cavity
    return mask


def test_hand_built_masks_have_the_known_components_and_holes():
    assert topology(_hollow_cube(), {"x": 1}) == {"x": {"components": 1, "holes": 1}}
    two_cavities = np.zeros((10, 16, 10), bool)
    two_cavities[1:9, 1:15, 1:9] = True
    two_cavities[3:6, 3:6, 3:6] = two_cavities[3:6, 9:12, 3:6] = False
    assert topology(two_cavities, {"x": 1}) == {"x": {"components": 1, "holes": 2}}

    blobs = np.zeros((12, 12, 12), np.uint8)
    blobs[1:4, 1:4, 1:4] = 3
    blobs[7:10, 7:10, 7:10] = 3
    blobs[5, 5, 5] = 2  # heart: one voxel
    blobs[6, 6, 6] = 2  # touching it by a corner only: one 26-connected component
    out = topology(blobs, STRUCTURES)
    assert out["liver"] == {"components": 2, "holes": 0}
    assert out["heart"] == {"components": 1, "holes": 0}
    assert out["kidney"] == {"components": 0, "holes": 0}  # absent
    assert ndimage.label(blobs == 2)[1] == 2  # scipy's default (6-connectivity) would split it

    opened = np.zeros((12, 12, 12), bool)
    opened[2:10, 2:10, 2:10] = True
    opened[3:9, 3:9, 3:9] = False  # one cavity behind a one-voxel wall
    opened[2, 2, 2] = False  # the wall's corner: the cavity meets the outside at a corner point only, still closed
    assert topology(opened, {"x": 1})["x"] == {"components": 1, "holes": 1}
    opened[2, 5, 5] = False  # a gap in a face: the cavity opens to the outside
    assert topology(opened, {"x": 1})["x"] == {"components": 1, "holes": 0}
    ring = np.zeros((9, 9, 5), bool)
    ring[1:8, 1:8, 1:4] = True
    ring[3:6, 3:6, :] = False  # a tunnel, not a cavity: no hole in this sense
    assert topology(ring, {"x": 1})["x"] == {"components": 1, "holes": 0}


def test_counts_match_independent_flood_fill_and_fill_holes_on_random_masks():
    rng = np.random.default_rng(0)
    for trial in range(6):
        mask = ndimage.gaussian_filter(rng.standard_normal((10, 11, 9)), sigma=1.0) > 0.1 + 0.05 * trial
        expected = _reference_counts(mask)
        assert topology(mask, {"x": 1})["x"] == expected
        filled_in = ndimage.binary_fill_holes(mask) & ~mask  # scipy's own hole filling (6-connected background)
        assert ndimage.label(filled_in, structure=ndimage.generate_binary_structure(3, 1))[1] == expected["holes"]


def test_topology_norms_bands_and_violations():
    def map_with(num_blobs: int, cavity: bool = False) -> np.ndarray:
        out = np.zeros((12, 30, 12), np.uint8)
        for i in range(num_blobs):
            out[2:9, 2 + 9 * i:9 + 9 * i, 2:9] = 2
        if cavity:
            out[4:7, 4:7, 4:7] = 0
        return out

    references = [map_with(1), map_with(1), map_with(2), map_with(1)]
    norms = topology_norms(references, {"heart": 2})
    assert norms == {"heart": {"label": 2, "components": [1, 2], "holes": [0, 0]}}
    # quantiles of (1, 1, 1, 2): q0.5 = 1, q0.9 = 1.7 -> ceil 2; q0.25 = 1
    assert topology_norms(references, {"heart": 2}, quantiles=(0.25, 0.5))["heart"]["components"] == [1, 1]
    assert topology_norms(references, {"heart": 2}, quantiles=(0.0, 0.9))["heart"]["components"] == [1, 2]

    assert topology_violations(map_with(2), norms) == []
    assert topology_violations(map_with(3), norms) == ["heart: 3 components, reference range 1..2"]
    assert topology_violations(map_with(1, cavity=True), norms) == ["heart: 1 holes, reference range 0..0"]
    assert topology_plausible([map_with(1), map_with(3), map_with(0)], norms).tolist() == [True, False, False]
    with pytest.raises(UserError, match="quantiles"):
        topology_norms(references, {"heart": 2}, quantiles=(0.9, 0.1))


def test_ground_truth_of_held_out_subjects_fits_the_norms_and_stray_blobs_do_not(small_cohort):
    store, _ = small_cohort
    ids = store.subject_ids()
    maps = [np.asarray(store.read_label(s)) for s in ids]
    norms = topology_norms(maps[:24], STRUCTURES)
    assert norms["body"]["components"] == [1, 1] and norms["heart"]["components"] == [1, 1]
    assert topology_plausible(maps[24:], norms).mean() >= 0.9  # unseen subjects of the same anatomy
    strays = []
    for label_map in maps[24:]:
        stray = label_map.copy()
        stray[1:3, 1:3, 1:3] = LABELS["heart"]  # a second heart in the corner, outside the body
        strays.append(stray)
    assert not topology_plausible(strays, norms).any()


# ---------------------------------------------------------------------------------------------- shape prior
def _corrupt(masks_NDHW: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Body masks with 5^3 blocks deleted inside the body and 4^3 stray blobs added anywhere."""
    out = masks_NDHW.copy()
    for mask in out:
        inside = np.argwhere(mask[2:-2, 2:-2, 2:-2] > 0) + 2
        for d, h, w in inside[rng.choice(len(inside), size=4, replace=False)]:
            mask[d - 2:d + 3, h - 2:h + 3, w - 2:w + 3] = 0
        for d, h, w in rng.integers(0, mask.shape[0] - 4, size=(4, 3)):
            mask[d:d + 4, h:h + 4, w:w + 4] = 1
    return out


def test_shape_prior_gives_corrupted_masks_a_larger_error_than_clean_ones(small_cohort):
    store, _ = small_cohort
    ids = store.subject_ids()
    body_NDHW = np.stack([np.asarray(store.read_label(s)) > 0 for s in ids]).astype(np.int64)  # two classes
    train, held_out = body_NDHW[:28], body_NDHW[28:]
    torch.manual_seed(0)
    encoder = create_encoder("cnn3d_small", width=8, num_stages=1, in_channels=2)
    prior = create_task("shape_prior_dae", encoder=encoder, num_classes=2, crop_size=16, decoder_width=8)
    train_briefly(prior, torch.from_numpy(train[:, None]).float(), batch_size=8, steps=40, lr=5e-3)

    reference = shape_prior_error(prior, train, batch_size=5)
    np.testing.assert_allclose(reference, prior.reconstruction_error(torch.from_numpy(train)).double().numpy())
    threshold = error_threshold(reference, quantile=0.95)
    assert threshold == pytest.approx(np.quantile(reference, 0.95))
    clean = shape_prior_error(prior, held_out)
    corrupted = shape_prior_error(prior, _corrupt(held_out, np.random.default_rng(0)))
    print(f"shape prior error: clean {clean.mean():.3f}, corrupted {corrupted.mean():.3f}, threshold {threshold:.3f}")
    assert ((0 <= clean) & (clean <= 1)).all()
    assert (corrupted > clean).all() and corrupted.mean() > clean.mean() + 0.03
    assert (corrupted > threshold).mean() > (clean > threshold).mean()
    with pytest.raises(UserError, match="masks > 0"):
        shape_prior_error(prior, np.full((1, 32, 32, 32), 3))


def test_error_threshold_rejects_undefined_errors():
    with pytest.raises(UserError, match="1 not finite"):
        error_threshold(np.array([0.1, np.nan]))
    assert error_threshold(np.array([0.0, 1.0]), quantile=0.25) == 0.25


def test_plausibility_by_group_shares():
    plausible = np.array([True, False, True, True, False])
    groups = np.array(["F", "F", "M", "M", "M"])
    assert plausibility_by_group(plausible, groups) == {"F": {"share": 0.5, "n": 2}, "M": {"share": 2 / 3, "n": 3}}
    with pytest.raises(UserError, match="one length"):
        plausibility_by_group(plausible, groups[:4])
    with pytest.raises(UserError, match="booleans"):
        plausibility_by_group(plausible.astype(int), groups)
