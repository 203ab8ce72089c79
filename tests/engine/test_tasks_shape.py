import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import rafmedia.engine.tasks.shape  # noqa: F401  (registers shape_prior_dae)
from rafmedia.core.errors import UserError
from rafmedia.engine.encoders import create_encoder
from rafmedia.engine.tasks import create_task, list_tasks, task_data_kind
from rafmedia.engine.tasks.shape import (SHAPE_PRIOR_FILE, LabelCorruptionViews, foreground_dice, load_shape_prior,
                                         soft_dice_loss)
from tests.engine.helpers import losses_of, train_briefly

NUM_CLASSES = 6  # the synthetic cohort: background, body, heart, liver, kidney, lesion


def _encoder(in_channels: int = NUM_CLASSES, width: int = 8):
    return create_encoder("cnn3d_small", width=width, num_stages=1, in_channels=in_channels)


def _labels(store, subjects=None) -> torch.Tensor:
    subjects = subjects or store.subject_ids()
    return torch.stack([torch.from_numpy(np.asarray(store.read_label(s), dtype=np.float32)) for s in subjects])[:, None]


def _changed(out) -> torch.Tensor:
    """(B, D, H, W): voxels whose class the corruption changed."""
    return out["corrupted"].argmax(dim=1) != out["clean"].argmax(dim=1)


def _rim(indices_BDHW: torch.Tensor) -> torch.Tensor:
    """Voxels with another class among their 26 neighbours (or themselves next to one)."""
    onehot = F.one_hot(indices_BDHW, NUM_CLASSES).permute(0, 4, 1, 2, 3).float()
    return (F.max_pool3d(onehot, 3, stride=1, padding=1).sum(dim=1) > 1)


def test_registered_as_a_label_task_and_its_views_pickle():
    assert "shape_prior_dae" in list_tasks() and task_data_kind("shape_prior_dae") == "label"
    task = create_task("shape_prior_dae", encoder=_encoder(), crop_size=16)
    assert pickle.loads(pickle.dumps(task.views)) == task.views
    assert task.decoder_options == {"in_channels": 16, "num_upsamplings": 2, "width": 16}  # 16^3 -> 4^3 -> 16^3


def test_corruptions_change_a_bounded_share_of_voxels_and_a_seed_fixes_them(small_cohort):
    store, _ = small_cohort
    labels = _labels(store, store.subject_ids()[:8])
    volume = labels[0].numel()
    off = dict(num_blocks=0, num_blobs=0, boundary_probability=0.0)
    clean = LabelCorruptionViews(crop_size=None, **off)(labels, torch.Generator().manual_seed(0))
    assert torch.equal(clean["corrupted"], clean["clean"])  # nothing asked, nothing changed
    assert torch.equal(clean["clean"].argmax(dim=1), labels[:, 0].long()) and torch.all(clean["clean"].sum(dim=1) == 1)

    rim = _rim(labels[:, 0].long())
    border = LabelCorruptionViews(crop_size=None, **{**off, "boundary_probability": 1.0})(labels, torch.Generator().manual_seed(1))
    changed = _changed(border)
    assert changed.flatten(1).any(dim=1).all()  # every map had one structure eroded or dilated...
    assert not (changed & ~rim).any()  # ...and only on a structure's one-voxel rim

    blocks = _changed(LabelCorruptionViews(crop_size=None, **{**off, "num_blocks": 2, "max_block_size": 6})(
        labels, torch.Generator().manual_seed(2))).flatten(1).float().sum(dim=1)
    assert blocks.max() <= 2 * 6**3 and blocks.sum() > 0
    blobs = _changed(LabelCorruptionViews(crop_size=None, **{**off, "num_blobs": 2, "max_blob_radius": 4.0})(
        labels, torch.Generator().manual_seed(3))).flatten(1).float().sum(dim=1)
    assert blobs.max() <= 2 * 4 / 3 * math.pi * 4.0**3 and blobs.sum() > 0

    views = LabelCorruptionViews(crop_size=None)  # defaults: 2 blocks <= 8^3, 2 blobs r <= 4, one rim
    out = views(labels, torch.Generator().manual_seed(4))
    fraction = _changed(out).flatten(1).float().mean(dim=1)
    bound = (2 * 8**3 + 2 * 4 / 3 * math.pi * 4.0**3) / volume + rim.flatten(1).float().mean(dim=1)
    assert (fraction <= bound).all() and fraction.mean() > 0.001, (fraction, bound)
    again = views(labels, torch.Generator().manual_seed(4))
    assert torch.equal(out["corrupted"], again["corrupted"])
    assert not torch.equal(out["corrupted"], views(labels, torch.Generator().manual_seed(5))["corrupted"])


def test_crops_are_blocks_of_the_label_map():
    label = torch.randint(0, NUM_CLASSES, (1, 1, 20, 21, 22), generator=torch.Generator().manual_seed(0)).float()
    out = LabelCorruptionViews(crop_size=16)(label, torch.Generator().manual_seed(1))
    assert out["clean"].shape == out["corrupted"].shape == (1, NUM_CLASSES, 16, 16, 16)
    crop = out["clean"].argmax(dim=1)[0]
    places = [(d, h, w) for d in range(5) for h in range(6) for w in range(7)
              if torch.equal(label[0, 0, d:d + 16, h:h + 16, w:w + 16].long(), crop)]
    assert len(places) == 1


def test_wrong_encoder_channels_and_labels_past_num_classes_are_user_errors():
    with pytest.raises(UserError, match=f"encoder.options.in_channels={NUM_CLASSES}"):
        create_task("shape_prior_dae", encoder=create_encoder("cnn3d_small", width=4))  # in_channels=1
    task = create_task("shape_prior_dae", encoder=_encoder(in_channels=3), num_classes=3, crop_size=16)
    with pytest.raises(UserError, match="num_classes=6"):
        task.views(torch.full((1, 1, 16, 16, 16), 5.0), torch.Generator().manual_seed(0))


def test_dice_helpers_match_hand_computation():
    a = torch.tensor([[0, 1, 1, 2], [0, 0, 3, 3]]).view(1, 2, 2, 2)
    b = torch.tensor([[0, 1, 2, 2], [0, 0, 0, 0]]).view(1, 2, 2, 2)
    # class 1: 2*1/(2+1); class 2: 2*1/(1+2); class 3: 0/(2+0); class 4 absent from both: left out
    assert foreground_dice(a, b, 5).item() == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    p = torch.tensor([0.5, 0.5]).view(1, 2, 1, 1, 1).repeat(1, 1, 1, 1, 2)  # two voxels, p = 0.5 each class
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 1, 2)
    assert soft_dice_loss(p, t, smooth=1.0).item() == pytest.approx(1 - (2 * 0.5 + 1) / (1 + 1 + 1))


def _train(task, labels, steps: int, lr: float = 3e-3, batch_size: int = 8) -> list[float]:
    return losses_of(train_briefly(task, labels, batch_size=batch_size, steps=steps, lr=lr))


def test_shape_prior_loss_decreases_on_the_synthetic_label_maps(small_cohort):
    store, _ = small_cohort
    torch.manual_seed(0)
    task = create_task("shape_prior_dae", encoder=_encoder(), crop_size=16, decoder_width=8)
    losses = _train(task, _labels(store), steps=40)
    start, end = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"shape_prior_dae loss {start:.3f} -> {end:.3f}")
    assert start > math.log(2)  # a random decoder: CE near log(6) = 1.8 plus a soft Dice loss near 0.8
    assert end < start - 0.6


def _implausible(indices_BDHW: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Body masks with noise blobs (random labels in 5^3 boxes anywhere) and holes (3^3 balls of background
    punched into the body)."""
    out = indices_BDHW.clone()
    for mask in out:
        for _ in range(8):
            d, h, w = torch.randint(2, 30, (3,), generator=generator).tolist()
            mask[d - 2:d + 3, h - 2:h + 3, w - 2:w + 3] = torch.randint(0, 2, (5, 5, 5), generator=generator)
        inside = mask.nonzero()
        for d, h, w in inside[torch.randint(len(inside), (4,), generator=generator)].tolist():
            mask[d - 1:d + 2, h - 1:h + 2, w - 1:w + 2] = 0
    return out


def test_reconstruction_error_is_higher_for_implausible_masks_after_brief_training(small_cohort):
    # Body masks (two classes): a few dozen CPU steps learn the body's shape; organs need hundreds.
    store, _ = small_cohort
    masks = (_labels(store) > 0).float()
    train, held_out = masks[:28], masks[28:]
    torch.manual_seed(0)
    task = create_task("shape_prior_dae", encoder=_encoder(in_channels=2), num_classes=2, crop_size=16,
                       decoder_width=8)
    _train(task, train, steps=40, lr=5e-3)
    implausible = _implausible(held_out[:, 0].long(), torch.Generator().manual_seed(0))
    clean_error = task.reconstruction_error(held_out)
    implausible_error = task.reconstruction_error(implausible)
    print(f"reconstruction error: clean {clean_error.mean():.3f}, implausible {implausible_error.mean():.3f}")
    assert task.training  # the score restores the mode it found
    assert (implausible_error > clean_error).all()
    assert implausible_error.mean() > clean_error.mean() + 0.03
    assert clean_error.max() < 0.2


def test_export_extra_and_load_shape_prior_give_identical_outputs(tmp_path, small_cohort):
    from rafmedia.engine.export import export_encoder

    store, _ = small_cohort
    labels = _labels(store, store.subject_ids()[:4])
    torch.manual_seed(1)
    task = create_task("shape_prior_dae", encoder=_encoder(), crop_size=16, decoder_width=8)
    _train(task, labels, steps=2, batch_size=4)  # moves the BatchNorm statistics off their defaults
    options = {"width": 8, "num_stages": 1, "in_channels": NUM_CLASSES}
    with pytest.raises(UserError, match="architecture"):
        task.export_extra(tmp_path)  # no exported encoder card there to name the architecture
    export_encoder(task.encoder, tmp_path / "encoder.safetensors", architecture="cnn3d_small", options=options, card={})
    paths = task.export_extra(tmp_path)  # as the pretraining calls it: the encoder card names the architecture
    assert [p.name for p in paths] == [SHAPE_PRIOR_FILE, "shape_prior.card.json"]
    torch.manual_seed(2)  # the rebuilt model starts from other weights: equal outputs come from the file
    loaded, card = load_shape_prior(tmp_path / SHAPE_PRIOR_FILE)
    assert card["architecture"] == "cnn3d_small" and card["options"] == options and card["num_classes"] == NUM_CLASSES
    task.eval()
    onehot = task.views(labels, torch.Generator().manual_seed(0))["clean"]
    assert torch.equal(task.reconstruct(onehot), loaded.reconstruct(onehot))
    assert torch.equal(task.reconstruction_error(labels), loaded.reconstruction_error(labels))
