import itertools
import pickle

import numpy as np
import pytest
import torch

from rafmedia.engine.encoders import create_encoder
from rafmedia.engine.tasks import create_task, list_tasks
from rafmedia.engine.tasks.taleb import (NEIGHBOUR_OFFSETS, JigsawViews, RelativePatchViews, hamming_permutation_set,
                                         minimum_hamming_distance)
from tests.engine.helpers import losses_of, train_briefly

SIDE = 32


def coordinate_volumes(batch: int) -> torch.Tensor:
    """Voxel value = sample * SIDE^3 + d * SIDE^2 + h * SIDE + w: a crop's first voxel names its corner exactly."""
    return torch.arange(batch * SIDE**3, dtype=torch.float64).reshape(batch, 1, SIDE, SIDE, SIDE)


def corner_of(patch_CDHW: torch.Tensor) -> tuple[int, int, int]:
    value = int(patch_CDHW[0, 0, 0, 0]) % SIDE**3
    return value // SIDE**2, (value // SIDE) % SIDE, value % SIDE


QUIET = dict(intensity_scale=0.0, intensity_shift=0.0, noise_std=0.0)


def test_the_26_neighbour_offsets_are_all_distinct_non_zero_unit_moves():
    assert len(NEIGHBOUR_OFFSETS) == 26 and len(set(NEIGHBOUR_OFFSETS)) == 26
    assert all(max(abs(x) for x in offset) == 1 for offset in NEIGHBOUR_OFFSETS)


def test_relative_patch_label_equals_the_true_relative_position():
    views = RelativePatchViews(patch_size=8, gap=2, jitter=1, **QUIET)
    out = views(coordinate_volumes(64), torch.Generator().manual_seed(0))
    stride = 8 + 2
    seen = set()
    for centre, neighbour, label in zip(out["centre"], out["neighbour"], out["position"].tolist()):
        c, n = np.array(corner_of(centre)), np.array(corner_of(neighbour))
        # Recover the grid offset independently: the displacement divided by the grid stride, rounded.
        offset = tuple(int(x) for x in np.rint((n - c) / stride))
        assert offset == NEIGHBOUR_OFFSETS[label]
        assert np.abs(n - c - stride * np.array(offset)).max() <= 1  # only the jitter remains
        assert c.min() >= 0 and n.min() >= 0 and (n + 8).max() <= SIDE and (c + 8).max() <= SIDE
        seen.add(label)
    assert len(seen) > 15  # many positions drawn, not one
    # The returned coordinates agree with the pixels, and the draw is reproducible from the seed.
    assert [corner_of(p) for p in out["neighbour"]] == [tuple(s) for s in out["neighbour_starts"].tolist()]
    again = views(coordinate_volumes(64), torch.Generator().manual_seed(0))
    assert torch.equal(again["neighbour"], out["neighbour"])


def test_relative_patch_views_refuse_a_too_small_volume_and_are_picklable():
    views = RelativePatchViews(patch_size=12)
    with pytest.raises(ValueError, match="side >= 42"):
        views(torch.zeros(1, 1, 32, 32, 32), torch.Generator().manual_seed(0))
    assert pickle.loads(pickle.dumps(views)) == views


def test_permutation_set_has_the_claimed_minimum_hamming_distance():
    permutations = hamming_permutation_set(8, 100, seed=0)
    assert permutations.shape == (100, 8)
    assert len({tuple(p) for p in permutations}) == 100
    assert all(sorted(p) == list(range(8)) for p in permutations.tolist())
    hand = min(sum(a != b for a, b in zip(p, q)) for p, q in itertools.combinations(permutations.tolist(), 2))
    assert minimum_hamming_distance(permutations) == hand
    assert hand >= 5  # farthest-point greedy: far above the 2 of a random set of 100
    assert np.array_equal(hamming_permutation_set(8, 100, seed=0), permutations)  # fixed seed, fixed set


@pytest.mark.parametrize("num_cells,size", [(3, 2), (4, 4), (4, 3)])
def test_greedy_permutation_set_reaches_the_brute_force_optimum_on_small_sets(num_cells, size):
    everything = list(itertools.permutations(range(num_cells)))
    # Hamming distance is invariant under composing with a permutation, so an optimal set containing any
    # given permutation exists: enumerate the sets containing the identity.
    best = max(minimum_hamming_distance(np.array([everything[0]] + [everything[i] for i in rest]))
               for rest in itertools.combinations(range(1, len(everything)), size - 1))
    assert minimum_hamming_distance(hamming_permutation_set(num_cells, size, seed=1)) == best == num_cells


def test_jigsaw_permutation_can_be_recovered_from_the_shuffled_cells():
    views = JigsawViews(grid=2, cell_size=12, jitter=2, num_permutations=20, permutation_seed=0, **QUIET)
    permutations = views.permutations
    assert np.array_equal(permutations, hamming_permutation_set(8, 20, seed=0))
    out = views(coordinate_volumes(16), torch.Generator().manual_seed(3))
    assert out["cells"].shape == (16, 8, 1, 10, 10, 10)
    labels = set()
    for cells, start, label in zip(out["cells"], out["starts"].tolist(), out["permutation"].tolist()):
        # Which cell each position shows: its corner relative to the cube, divided by the cell size.
        recovered = []
        for cell in cells:
            d, h, w = (np.array(corner_of(cell)) - np.array(start)) // 12
            recovered.append(int(d * 4 + h * 2 + w))
        assert recovered == permutations[label].tolist()
        labels.add(label)
    assert len(labels) > 5


def test_jigsaw_with_a_3x3x3_grid_draws_from_27_cell_permutations():
    task = create_task("jigsaw_3d", encoder=create_encoder("cnn3d_small", width=4, num_stages=1), grid=3,
                       cell_size=8, jitter=1, num_permutations=10)
    out = task.views(coordinate_volumes(2), torch.Generator().manual_seed(0))
    assert out["cells"].shape == (2, 27, 1, 7, 7, 7)
    assert minimum_hamming_distance(task.views.permutations) >= 20


def test_jigsaw_views_survive_pickling_with_the_same_draws():
    views = JigsawViews(grid=2, cell_size=10, jitter=2, num_permutations=12, permutation_seed=2)
    copy = pickle.loads(pickle.dumps(views))
    volumes = torch.randn(3, 1, 24, 24, 24, generator=torch.Generator().manual_seed(0))
    first, second = views(volumes, torch.Generator().manual_seed(4)), copy(volumes, torch.Generator().manual_seed(4))
    assert all(torch.equal(first[key], second[key]) for key in first)


@pytest.mark.parametrize("name,options", [("relative_patch_location", {}), ("jigsaw_3d", dict(num_permutations=10))])
def test_tasks_train_a_monai_resnet_too(name, options):
    torch.manual_seed(0)
    encoder = create_encoder("resnet10_3d")
    task = create_task(name, encoder=encoder, **options)
    out = task(task.views(torch.randn(4, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0)),
                          torch.Generator().manual_seed(1)))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and 0.0 <= float(out["accuracy"]) <= 1.0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in encoder.parameters() if p.requires_grad)


def test_both_tasks_are_registered():
    assert {"relative_patch_location", "jigsaw_3d"} <= set(list_tasks())


def _train(task, volumes, steps, batch_size):
    logs = train_briefly(task, volumes, batch_size=batch_size, steps=steps)
    assert all(set(log) == {"loss", "accuracy"} for log in logs)
    return losses_of(logs)


@pytest.fixture(scope="module")
def cohort_volumes(small_cohort):
    from rafmedia.shards.volumes import load_volumes

    store, _ = small_cohort
    return load_volumes(store, store.subject_ids(), progress=False)


def test_relative_patch_location_loss_decreases_on_the_synthetic_cohort(cohort_volumes):
    torch.manual_seed(0)
    task = create_task("relative_patch_location", encoder=create_encoder("cnn3d_small", width=8))
    losses = _train(task, cohort_volumes, steps=32, batch_size=16)
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8 - 0.2  # chance level is log(26) = 3.26


def test_jigsaw_loss_decreases_on_the_synthetic_cohort(cohort_volumes):
    torch.manual_seed(0)
    task = create_task("jigsaw_3d", encoder=create_encoder("cnn3d_small", width=8), num_permutations=24)
    losses = _train(task, cohort_volumes, steps=32, batch_size=12)
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8 - 0.2  # chance level is log(24) = 3.18
