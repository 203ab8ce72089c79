import pickle

import pytest
import torch

from rafmedia.core.errors import UserError
from rafmedia.engine.encoders import create_encoder
from rafmedia.engine.tasks import check_compatible, create_task, list_tasks
from rafmedia.engine.tasks.mae import MaskedCropViews, masked_patch_loss, patchify, unpatchify
from tests.engine.helpers import losses_of, train_briefly

TINY_VIT = dict(img_size=16, patch_size=8, hidden_size=48, num_layers=2, num_heads=3)


def tiny_task(**options):
    torch.manual_seed(0)
    return create_task("mae_3d", encoder=create_encoder("vit_3d", **TINY_VIT), **options)


def test_patchify_lays_out_patches_in_monai_token_order_and_unpatchify_inverts_it():
    x = torch.randn(2, 3, 8, 12, 4, generator=torch.Generator().manual_seed(0))
    patches = patchify(x, (4, 4, 2))
    assert patches.shape == (2, 2 * 3 * 2, 4 * 4 * 2 * 3)
    # token n = (i * 3 + j) * 2 + k holds voxel (a, b, c) of channel ch at index ((a * 4 + b) * 2 + c) * 3 + ch
    for i, j, k, a, b, c, ch in [(0, 0, 0, 0, 0, 0, 0), (1, 2, 1, 3, 1, 0, 2), (0, 1, 1, 2, 3, 1, 1)]:
        token, voxel = (i * 3 + j) * 2 + k, ((a * 4 + b) * 2 + c) * 3 + ch
        assert patches[1, token, voxel] == x[1, ch, 4 * i + a, 4 * j + b, 2 * k + c]
    assert torch.equal(unpatchify(patches, (4, 4, 2), (2, 3, 2), channels=3), x)


def test_token_order_matches_the_vit_patch_embedding():
    # A 1x1x1-output linear map of each patch equals MONAI's conv patch embedding, token by token.
    encoder = create_encoder("vit_3d", **TINY_VIT)
    conv = encoder.vit.patch_embedding.patch_embeddings
    x = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    expected = conv(x).flatten(2).transpose(1, 2)
    weight = conv.weight.permute(0, 2, 3, 4, 1).reshape(conv.out_channels, -1)  # (pd, ph, pw, C) voxel order
    torch.testing.assert_close(patchify(x, (8, 8, 8)) @ weight.t() + conv.bias, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.6])
def test_mask_masks_exactly_round_ratio_tokens_and_is_fixed_by_the_seed(ratio):
    views = MaskedCropViews(crop_size=(24, 24, 24), patch_size=(8, 8, 8), mask_ratio=ratio)
    volumes = torch.randn(6, 1, 32, 32, 32)
    out = views(volumes, torch.Generator().manual_seed(3))
    assert out["view"].shape == (6, 1, 24, 24, 24) and out["mask"].shape == (6, 27)
    assert out["mask"].sum(dim=1).tolist() == [round(ratio * 27)] * 6  # 20, 14 (13.5 rounds to even), 16
    assert len({tuple(m.tolist()) for m in out["mask"]}) > 1  # each sample has its own mask
    torch.manual_seed(0)
    again = views(volumes, torch.Generator().manual_seed(3))
    torch.manual_seed(1)  # the global RNG plays no part
    third = views(volumes, torch.Generator().manual_seed(3))
    assert torch.equal(again["mask"], out["mask"]) and torch.equal(third["mask"], out["mask"])
    assert torch.equal(again["view"], out["view"])
    assert not torch.equal(views(volumes, torch.Generator().manual_seed(4))["mask"], out["mask"])


def test_views_crop_the_volume_and_pickle():
    views = MaskedCropViews(crop_size=(16, 16, 16), patch_size=(8, 8, 8), flip_probability=0.0)
    volumes = torch.arange(2 * 20**3, dtype=torch.float32).reshape(2, 1, 20, 20, 20)
    view = views(volumes, torch.Generator().manual_seed(0))["view"]
    for b in range(2):
        corner = int(view[b, 0, 0, 0, 0]) - b * 20**3
        d, h, w = corner // 400, corner // 20 % 20, corner % 20
        assert torch.equal(view[b], volumes[b, :, d:d + 16, h:h + 16, w:w + 16])
    assert pickle.loads(pickle.dumps(views)) == views


def test_masked_patch_loss_matches_hand_computation_and_ignores_visible_patches():
    pred = torch.tensor([[[1.0, 2.0], [0.0, 0.0], [3.0, 1.0]]])
    target = torch.tensor([[[0.0, 2.0], [5.0, 5.0], [1.0, 1.0]]])
    mask = torch.tensor([[True, False, True]])
    # masked patches 0 and 2: mean((1, 0)^2) = 0.5 and mean((2, 0)^2) = 2, averaged: 1.25
    assert masked_patch_loss(pred, target, mask, norm_pix_loss=False).item() == pytest.approx(1.25)
    changed_visible = target.clone()
    changed_visible[0, 1] = torch.tensor([-7.0, 11.0])
    assert masked_patch_loss(pred, changed_visible, mask, norm_pix_loss=False).item() == pytest.approx(1.25)
    changed_masked = target.clone()
    changed_masked[0, 2, 0] = 2.0
    assert masked_patch_loss(pred, changed_masked, mask, norm_pix_loss=False).item() == pytest.approx(0.25 + 0.25)
    # norm_pix_loss: target patch (0, 2) -> (-1, 1) / sqrt(2 + 1e-6) (unbiased variance 2); (1, 1) -> (0, 0)
    s = 2**0.5
    expected = (((1 + 1 / s) ** 2 + (2 - 1 / s) ** 2) / 2 + (9 + 1) / 2) / 2
    assert masked_patch_loss(pred, target, mask, norm_pix_loss=True).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_the_encoder_sees_only_visible_tokens_and_the_loss_only_masked_patches(pool):
    torch.manual_seed(0)
    task = create_task("mae_3d", encoder=create_encoder("vit_3d", **TINY_VIT, pool=pool), mask_ratio=0.75)
    batch = task.views(torch.randn(3, 1, 24, 24, 24, generator=torch.Generator().manual_seed(0)),
                       torch.Generator().manual_seed(1))
    seen = []
    task.encoder.vit.blocks[0].register_forward_hook(lambda module, args, output: seen.append(args[0].shape))
    loss = task(batch)["loss"]
    # 8 tokens, round(0.75 * 8) = 6 masked, 2 visible (and the CLS token when the encoder pools by it)
    assert seen == [torch.Size([3, 2 + (pool == "cls"), 48])]
    # Changing the voxels of one masked patch changes the loss but not what the encoder saw.
    masked_token = int(batch["mask"][0].nonzero()[0])
    i, j, k = masked_token // 4, masked_token // 2 % 2, masked_token % 2
    changed = dict(batch, view=batch["view"].clone())
    changed["view"][0, :, 8 * i:8 * i + 8, 8 * j:8 * j + 8, 8 * k:8 * k + 8] = torch.randn(1, 8, 8, 8)
    outputs = []
    task.encoder.vit.norm.register_forward_hook(lambda module, args, output: outputs.append(output))
    changed_loss = task(changed)["loss"]
    task(batch)
    assert torch.equal(outputs[0], outputs[1]) and changed_loss.item() != pytest.approx(loss.item())
    # Training still reaches the whole encoder that gets exported (all of its trainable weights get gradients).
    loss.backward()
    grads = [p.grad for p in task.encoder.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_mae_is_refused_for_a_cnn_with_the_fitting_encoders_named():
    assert "mae_3d" in list_tasks()
    with pytest.raises(UserError, match="vit_3d.*vit_small_3d.*vit_tiny_3d"):
        check_compatible("mae_3d", "cnn3d_small")
    check_compatible("mae_3d", "vit_3d")  # fits
    with pytest.raises(UserError, match="encoder.name=vit_3d"):
        create_task("mae_3d", encoder=create_encoder("cnn3d_small", width=4))


def test_crop_size_must_equal_the_encoder_img_size():
    encoder = create_encoder("vit_3d", **TINY_VIT)
    with pytest.raises(UserError, match=r"crop_size=24 differs from the encoder's img_size \(16, 16, 16\)"):
        create_task("mae_3d", encoder=encoder, crop_size=24)
    assert create_task("mae_3d", encoder=encoder, crop_size=16).views.crop_size == (16, 16, 16)
    with pytest.raises(UserError, match="at least one must be masked and one visible"):
        create_task("mae_3d", encoder=encoder, mask_ratio=0.99)


def test_mae_loss_decreases_on_the_synthetic_cohort(small_cohort):
    from rafmedia.shards.volumes import load_volumes

    store, _ = small_cohort
    volumes = load_volumes(store, store.subject_ids(), progress=False)
    torch.manual_seed(0)
    task = create_task("mae_3d", encoder=create_encoder("vit_3d", **dict(TINY_VIT, img_size=24)))
    losses = losses_of(train_briefly(task, volumes, batch_size=8, steps=80, lr=1e-3, weight_decay=0.05))
    # With norm_pix_loss, predicting each patch's mean (zero) scores ~1; below it, the voxels are being predicted.
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert first > 1.05 and last < 0.9
