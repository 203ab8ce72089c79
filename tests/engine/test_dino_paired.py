"""`dino_paired`: DINO whose global crops are the two acquisitions of one subject at one place."""
import pytest
import torch

from rafmedia.core.errors import UserError
from rafmedia.engine.encoders import create_encoder
from rafmedia.engine.tasks import TASKS, check_compatible, create_task, list_tasks, task_data_kind
from rafmedia.engine.tasks.dino import Dino3d, MultiCropViews, PairedMultiCropViews

QUIET = {"intensity_scale": 0.0, "intensity_shift": 0.0, "noise_std": 0.0}


def test_registered_as_a_paired_task_with_dino_3d_options():
    assert "dino_paired" in list_tasks() and task_data_kind("dino_paired") == "paired"
    assert task_data_kind("dino_3d") == "image"
    assert TASKS.options("dino_paired") == TASKS.options("dino_3d")
    for encoder in ("cnn3d_small", "vit_3d"):
        check_compatible("dino_paired", encoder)
    task = create_task("dino_paired", encoder=create_encoder("cnn3d_small", width=4), out_dim=16, num_local_crops=1)
    assert isinstance(task, Dino3d) and isinstance(task.views, PairedMultiCropViews)
    assert task.head.prototypes.shape == (16, 64) and task.views.num_local_crops == 1
    with pytest.raises(UserError, match="did you mean 'out_dim'"):
        create_task("dino_paired", encoder=create_encoder("cnn3d_small", width=4), out_dimm=16)


def _two_channel_ramps(batch: int, side: int = 24) -> torch.Tensor:
    """Channel 0 is a ramp along each axis plus 100 b (sample b); channel 1 is channel 0 + 1000: a crop's values
    say which sample and channel it came from, and where."""
    ramp = torch.arange(side, dtype=torch.float32)
    volume = ramp[:, None, None] + 0.1 * ramp[None, :, None] + 0.01 * ramp[None, None, :]
    first = volume + 100 * torch.arange(batch, dtype=torch.float32).view(batch, 1, 1, 1)
    return torch.stack([first, first + 1000], dim=1)


def test_global_crops_are_the_two_channels_at_one_place_and_local_crops_either_channel():
    views = PairedMultiCropViews(global_size=(12, 12, 12), local_size=(6, 6, 6), global_scale=(0.5, 1.0),
                                 num_local_crops=4, flip_probability=0.0, **QUIET)
    volumes = _two_channel_ramps(6)
    out = views(volumes, torch.Generator().manual_seed(0))
    assert out["global_crops"].shape == (6, 2, 1, 12, 12, 12) and out["local_crops"].shape == (6, 4, 1, 6, 6, 6)
    # channel 1 minus channel 0 is exactly 1000 voxel for voxel: the same place, resampled the same way
    torch.testing.assert_close(out["global_crops"][:, 1] - out["global_crops"][:, 0],
                               torch.full((6, 1, 12, 12, 12), 1000.0))
    for b in range(6):
        assert 100 * b <= float(out["global_crops"][b, 0].min()) and float(out["global_crops"][b, 0].max()) < 100 * b + 30
    channel = (out["local_crops"].mean(dim=(2, 3, 4, 5)) >= 1000).long()  # (B, L): sample b < 1000 <= channel 1
    assert torch.equal(channel, out["local_channels"])
    assert 0 < int(out["local_channels"].sum()) < out["local_channels"].numel()  # both channels are drawn


def test_views_are_fixed_by_the_seed_and_match_dino_3d_on_identical_channels():
    volumes = torch.randn(3, 1, 20, 20, 20, generator=torch.Generator().manual_seed(1))
    settings = {"global_size": (10, 10, 10), "local_size": (6, 6, 6), "num_local_crops": 2}
    paired = PairedMultiCropViews(**settings)
    first = paired(volumes.repeat(1, 2, 1, 1, 1), torch.Generator().manual_seed(3))
    again = paired(volumes.repeat(1, 2, 1, 1, 1), torch.Generator().manual_seed(3))
    assert all(torch.equal(first[key], again[key]) for key in first)
    # the two global crops share a place, so (unlike dino_3d's) they differ only by their own flips and jitter
    quiet = PairedMultiCropViews(**settings, flip_probability=0.0, **QUIET)(volumes.repeat(1, 2, 1, 1, 1),
                                                                               torch.Generator().manual_seed(3))
    assert torch.equal(quiet["global_crops"][:, 0], quiet["global_crops"][:, 1])
    single = MultiCropViews(**settings, flip_probability=0.0, **QUIET)(volumes, torch.Generator().manual_seed(3))
    assert not torch.equal(single["global_crops"][:, 0], single["global_crops"][:, 1])


def test_a_single_channel_input_is_a_user_error_naming_data_channels():
    with pytest.raises(UserError, match="data.channels"):
        PairedMultiCropViews()(torch.zeros(2, 1, 24, 24, 24), torch.Generator().manual_seed(0))


def test_pretrains_through_the_paired_pipeline_and_exports_the_teacher(tmp_path):
    from rafmedia.engine.batches import DataConfig
    from rafmedia.engine.encoders import EncoderConfig
    from rafmedia.engine.export import load_encoder
    from rafmedia.engine.pretrain import pretrain_encoder
    from rafmedia.engine.tasks import TaskConfig
    from rafmedia.engine.train import TrainConfig
    from rafmedia.shards.store import StoreConfig
    from rafmedia.shards.synth import generate_cohort
    from tests.conftest import small_cohort_config

    config = small_cohort_config(num_subjects=6, shape=[24, 24, 24], paired_channel="exhale", paired_displacement=3.0)
    store = generate_cohort(config, store_config=StoreConfig(chunk_size=24), out=tmp_path / "p.zarr", progress=False)
    with pytest.raises(UserError, match="data.channels"):
        pretrain_encoder(data=DataConfig(cohort=str(store.path)), encoder=EncoderConfig(name="cnn3d_small"),
                         task=TaskConfig(name="dino_paired"), train_config=TrainConfig(steps=1), out_dir=tmp_path / "x")
    weights = pretrain_encoder(
        data=DataConfig(cohort=str(store.path), channels=["image", "exhale"]),
        encoder=EncoderConfig(name="cnn3d_small", options={"width": 4}),
        task=TaskConfig(name="dino_paired", options={"global_size": 16, "local_size": 8, "num_local_crops": 1}),
        train_config=TrainConfig(steps=3, batch_size=3, warmup_steps=1, checkpoint_every=3, tensorboard=False),
        out_dir=tmp_path / "run", progress=False)
    _, card = load_encoder(weights)
    assert card["task"] == "dino_paired" and card["weights"] == "teacher"
    assert card["data"]["channels"] == ["image", "exhale"] and card["data"]["input"] == "paired"
    assert card["final_loss"] is not None and card["final_loss"] == card["final_loss"]  # finite, not NaN
