"""What each kind of task is fed by `pretrain_encoder`: image channels, two acquisitions, or label maps, from memory
or streamed from the store; and what gets exported."""
import numpy as np
import pytest
import torch

from rafmedia.engine.batches import DataConfig
from rafmedia.engine.encoders import EncoderConfig
from rafmedia.engine.export import load_encoder
from rafmedia.engine.pretrain import load_task_inputs, pretrain_encoder
from rafmedia.engine.tasks import TaskConfig
from rafmedia.engine.train import TrainConfig
from rafmedia.shards.store import CohortStore, StoreConfig
from rafmedia.shards.synth import generate_cohort
from tests.conftest import small_cohort_config


@pytest.fixture(scope="module")
def paired_store(tmp_path_factory):
    config = small_cohort_config(num_subjects=8, shape=[24, 24, 24], paired_channel="exhale")
    out = tmp_path_factory.mktemp("paired") / "cohort.zarr"
    return generate_cohort(config, store_config=StoreConfig(chunk_size=12), out=out, progress=False)


def _train(steps=2, **changes):
    return TrainConfig(steps=steps, batch_size=4, warmup_steps=1, checkpoint_every=0, tensorboard=False, **changes)


def test_paired_inputs_stack_the_two_channels_each_z_scored(paired_store):
    store = CohortStore(paired_store.path)
    ids = store.subject_ids()[:3]
    volumes = load_task_inputs(store, ids, DataConfig(channels=["image", "exhale"]), "paired", progress=False)
    assert volumes.shape == (3, 2, 24, 24, 24)
    for index, subject in enumerate(ids):
        for channel, name in enumerate(["image", "exhale"]):
            raw = np.asarray(store.read(subject, name), dtype=np.float64)
            expected = (raw - raw.mean()) / raw.std(ddof=1)
            np.testing.assert_allclose(volumes[index, channel].numpy(), expected, atol=1e-4)
    labels = load_task_inputs(store, ids, DataConfig(), "label", progress=False)
    assert labels.shape == (3, 1, 24, 24, 24) and labels.dtype == torch.float32
    assert torch.equal(labels[0, 0], torch.from_numpy(np.asarray(store.read_label(ids[0]))).float())


@pytest.mark.parametrize("source", ["memory", "stream"])
def test_paired_contrastive_pretrains_from_both_sources(paired_store, source, tmp_path):
    weights = pretrain_encoder(
        data=DataConfig(cohort=str(paired_store.path), channels=["image", "exhale"], source=source, patch_size=20,
                        patches_per_subject=2, num_workers=1),
        encoder=EncoderConfig("cnn3d_small", {"width": 4}),
        task=TaskConfig("contrastive_paired", {"crop_size": 16}), train_config=_train(), out_dir=tmp_path,
        progress=False)
    encoder, card = load_encoder(weights)
    assert card["data"]["input"] == "paired" and card["data"]["channels"] == ["image", "exhale"]
    assert card["data"]["source"] == source and card["task"] == "contrastive_paired"
    assert encoder(torch.zeros(1, 1, 16, 16, 16)).shape == (1, encoder.embed_dim)


def test_shape_prior_pretrains_on_label_maps_and_exports_the_whole_autoencoder(paired_store, tmp_path):
    from rafmedia.engine.tasks.shape import load_shape_prior

    classes = int(max(np.asarray(paired_store.read_label(s)).max() for s in paired_store.subject_ids())) + 1
    pretrain_encoder(data=DataConfig(cohort=str(paired_store.path)),
                     encoder=EncoderConfig("cnn3d_small", {"width": 4, "in_channels": classes}),
                     task=TaskConfig("shape_prior_dae", {"num_classes": classes, "crop_size": 16}),
                     train_config=_train(), out_dir=tmp_path, progress=False)
    model, card = load_shape_prior(tmp_path / "shape_prior.safetensors")
    label = torch.from_numpy(np.asarray(paired_store.read_label(paired_store.subject_ids()[0]))).float()[None, None]
    error = model.reconstruction_error(label[..., :16, :16, :16])
    assert error.shape == (1,) and 0.0 <= float(error) <= 1.0
