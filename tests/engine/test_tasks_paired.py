import math
import pickle

import pytest
import torch

import rafmedia.engine.tasks.paired  # noqa: F401  (registers contrastive_paired)
from rafmedia.core.errors import UserError
from rafmedia.engine.encoders import create_encoder
from rafmedia.engine.tasks import create_task, list_tasks, task_data_kind
from rafmedia.engine.tasks.contrastive import TwoCropContrastive
from rafmedia.engine.tasks.paired import PairedViews
from rafmedia.engine.views import TwoCropViews
from tests.engine.helpers import losses_of, train_briefly

SHAPE = (20, 22, 24)


def _ramps(batch: int) -> torch.Tensor:
    """Channel 0 holds d*10000 + h*100 + w + 1, channel 1 its negative: a voxel's value names its channel and place."""
    d, h, w = torch.meshgrid(*(torch.arange(size, dtype=torch.float64) for size in SHAPE), indexing="ij")
    code = d * 10000 + h * 100 + w + 1
    return torch.stack([code, -code])[None].repeat(batch, 1, 1, 1, 1)


def _decode(value: float) -> tuple[int, int, int]:
    code = int(round(abs(value))) - 1
    return code // 10000, code // 100 % 100, code % 100


PLAIN = dict(flip_probability=0.0, intensity_scale=0.0, intensity_shift=0.0, noise_std=0.0)


def test_registered_as_a_paired_task_reusing_the_two_crop_head():
    assert "contrastive_paired" in list_tasks()
    assert task_data_kind("contrastive_paired") == "paired"
    task = create_task("contrastive_paired", encoder=create_encoder("cnn3d_small", width=4), crop_size=16)
    assert type(task) is TwoCropContrastive and isinstance(task.views, PairedViews)
    assert pickle.loads(pickle.dumps(task.views)) == task.views


@pytest.mark.parametrize("max_shift", [0, 3])
def test_view_a_is_channel_0_and_view_b_channel_1_at_the_drawn_place(max_shift):
    views = PairedViews(crop_size=8, max_shift=max_shift, **PLAIN)
    volumes = _ramps(64)
    out = views(volumes, torch.Generator().manual_seed(0))
    assert out["view_a"].shape == out["view_b"].shape == (64, 1, 8, 8, 8)
    for b in range(64):
        a_first, b_first = out["view_a"][b, 0, 0, 0, 0].item(), out["view_b"][b, 0, 0, 0, 0].item()
        assert a_first > 0 > b_first  # channel 0, then channel 1
        corner_a, corner_b = _decode(a_first), _decode(b_first)
        assert corner_a == tuple(out["origin_a"][b].tolist()) and corner_b == tuple(out["origin_b"][b].tolist())
        assert torch.equal(out["view_b"][b, 0], -volumes[b, 0, corner_b[0]:corner_b[0] + 8,
                                                          corner_b[1]:corner_b[1] + 8, corner_b[2]:corner_b[2] + 8])
        assert all(0 <= corner_b[axis] <= SHAPE[axis] - 8 for axis in range(3))
    shifts = (out["origin_b"] - out["origin_a"]).abs()
    assert int(shifts.max()) == max_shift  # same place when 0; within, and reaching, the bound otherwise
    if max_shift:
        assert (shifts > 0).any(dim=1).float().mean() > 0.5


def test_each_view_is_augmented_on_its_own_and_a_seed_fixes_the_views():
    views = PairedViews(crop_size=8, flip_probability=0.5, noise_std=0.0, intensity_scale=0.0, intensity_shift=0.0)
    volumes = _ramps(64)
    out = views(volumes, torch.Generator().manual_seed(1))
    # a view flipped along depth starts at a higher depth than it ends: compare each view's corner voxels
    flipped_a = [_decode(v[0, 0, 0, 0].item())[0] > _decode(v[0, -1, 0, 0].item())[0] for v in out["view_a"]]
    flipped_b = [_decode(v[0, 0, 0, 0].item())[0] > _decode(v[0, -1, 0, 0].item())[0] for v in out["view_b"]]
    assert 0.3 < sum(flipped_a) / 64 < 0.7 and any(fa != fb for fa, fb in zip(flipped_a, flipped_b))
    noisy = PairedViews(crop_size=8, noise_std=0.5)
    first = noisy(volumes, torch.Generator().manual_seed(2))
    again = noisy(volumes, torch.Generator().manual_seed(2))
    other = noisy(volumes, torch.Generator().manual_seed(3))
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not torch.equal(first["view_a"], other["view_a"])
    # jitter and noise are drawn per view: the two views' offsets from their clean crops differ
    clean = PairedViews(crop_size=8, **PLAIN)(volumes, torch.Generator().manual_seed(2))
    assert torch.equal(clean["origin_a"], first["origin_a"])  # the place is drawn before any augmentation
    offset_a = (first["view_a"].abs() - clean["view_a"].abs()).mean(dim=(1, 2, 3, 4))
    offset_b = (first["view_b"].abs() - clean["view_b"].abs()).mean(dim=(1, 2, 3, 4))
    assert not torch.allclose(offset_a, offset_b)


def test_a_single_channel_input_is_a_user_error_naming_data_channels():
    with pytest.raises(UserError, match="data.channels"):
        PairedViews(crop_size=8)(torch.zeros(2, 1, *SHAPE), torch.Generator().manual_seed(0))
    with pytest.raises(UserError, match="max_shift"):
        create_task("contrastive_paired", encoder=create_encoder("cnn3d_small", width=4), max_shift=-1)


def test_paired_loss_decreases_on_a_synthetic_two_acquisition_cohort(tmp_path):
    from rafmedia.shards.store import StoreConfig
    from rafmedia.shards.synth import generate_cohort
    from rafmedia.shards.volumes import load_volumes
    from tests.conftest import small_cohort_config

    config = small_cohort_config(num_subjects=16, shape=[32, 32, 32], paired_channel="exhale")
    store = generate_cohort(config, store_config=StoreConfig(chunk_size=16), out=tmp_path / "p.zarr", progress=False)
    ids = store.subject_ids()
    volumes = torch.cat([load_volumes(store, ids, channel=name, progress=False) for name in ("image", "exhale")], dim=1)
    torch.manual_seed(0)
    task = create_task("contrastive_paired", encoder=create_encoder("cnn3d_small", width=8), crop_size=16,
                       temperature=0.1, noise_std=0.1)
    logs = train_briefly(task, volumes, batch_size=8, steps=80, lr=5e-3)
    losses, accuracies = losses_of(logs), [log["pair_accuracy"] for log in logs]
    start, end = sum(losses[:5]) / 5, sum(losses[-20:]) / 20
    print(f"contrastive_paired loss {start:.3f} -> {end:.3f}, pair accuracy {sum(accuracies[-20:]) / 20:.2f}")
    # chance: each of the 16 views picks its partner among 15 others, log(15) = 2.71
    assert start > 0.9 * math.log(15)
    assert end < math.log(15) - 0.4 and end < start - 0.5  # below chance: the two contrasts are matched
    assert sum(accuracies[-20:]) / 20 > 2 / 15


def test_paired_views_are_two_crop_views_of_the_two_channels():
    # Both channels equal: the paired views are the two-crop views with the same settings and seed, draw for draw.
    volumes = torch.randn(3, 1, 20, 20, 20, generator=torch.Generator().manual_seed(0)).repeat(1, 2, 1, 1, 1)
    settings = dict(crop_size=10, max_shift=3, blur_sigma=1.0, gamma=0.2, rotate90=True, resized_crop_scale=(0.8, 1.2))
    paired = PairedViews(**settings)(volumes, torch.Generator().manual_seed(4))
    two_crop = TwoCropViews(**settings)(volumes[:, :1], torch.Generator().manual_seed(4))
    assert torch.equal(paired["view_a"], two_crop["view_a"]) and torch.equal(paired["view_b"], two_crop["view_b"])
