import math

import torch

from rafmedia.engine.encoders import create_encoder
from rafmedia.engine.tasks import create_task, info_nce
from rafmedia.engine.views import TwoCropViews, crop, random_crop_starts


def test_info_nce_matches_hand_computation():
    # Two pairs of orthogonal unit vectors: each sample's positive has cosine 1, the others 0.
    z_a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z_b = z_a.clone()
    loss, accuracy = info_nce(z_a, z_b, temperature=0.5)
    # Row of sample 0 over {1, 2, 3} (self excluded): logits 0/0.5, 1/0.5, 0/0.5 -> positive is index 2.
    expected = -math.log(math.exp(2.0) / (math.exp(0.0) + math.exp(2.0) + math.exp(0.0)))
    assert abs(loss.item() - expected) < 1e-6
    assert accuracy.item() == 1.0


def test_two_crop_views_respect_shift_bound_and_are_deterministic():
    volumes = torch.arange(4 * 20**3, dtype=torch.float32).reshape(4, 1, 20, 20, 20)
    views = TwoCropViews(crop_size=8, max_shift=3, flip_probability=0.0, intensity_scale=0.0,
                         intensity_shift=0.0, noise_std=0.0)
    out1 = views(volumes, torch.Generator().manual_seed(5))
    out2 = views(volumes, torch.Generator().manual_seed(5))
    assert torch.equal(out1["view_a"], out2["view_a"]) and torch.equal(out1["view_b"], out2["view_b"])
    # With no augmentation, a crop's first voxel encodes its corner: value = d*400 + h*20 + w.
    def corner(view):
        value = int(view[0, 0, 0, 0]) % 20**3  # sample i adds i * 20^3
        return value // 400, (value % 400) // 20, value % 20

    for a, b in zip(out1["view_a"], out1["view_b"]):
        assert all(abs(x - y) <= 3 for x, y in zip(corner(a), corner(b)))
        assert all(0 <= x <= 12 for x in corner(b))  # inside the volume


def test_crop_extracts_the_requested_block():
    volumes = torch.randn(2, 1, 10, 10, 10)
    starts = random_crop_starts(torch.Generator().manual_seed(0), (10, 10, 10), 4, 2)
    crops = crop(volumes, starts, 4)
    d, h, w = starts[1].tolist()
    assert torch.equal(crops[1], volumes[1, :, d:d + 4, h:h + 4, w:w + 4])


def test_contrastive_loss_decreases_on_the_synthetic_cohort(small_cohort):
    from rafmedia.shards.stream import load_volumes, view_batches

    store, _ = small_cohort
    volumes = load_volumes(store, store.subject_ids(), progress=False)
    torch.manual_seed(0)
    task = create_task("contrastive_two_crop", encoder=create_encoder("cnn3d_small", width=8), crop_size=24, max_shift=4)
    batches = view_batches(volumes, task.views, batch_size=12, seed=0)
    optimizer = torch.optim.AdamW(task.parameters(), lr=2e-3)
    losses = []
    for step in range(40):
        loss = task(batches(step))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8 - 0.2  # chance level is log(23) = 3.1


def test_gaussian_blur_matches_scipy_and_leaves_unchosen_samples_alone():
    from scipy import ndimage

    from rafmedia.engine.views import gaussian_blur

    x = torch.randn(6, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    y = gaussian_blur(x, torch.Generator().manual_seed(3), max_sigma=1.0, probability=0.5)
    generator = torch.Generator().manual_seed(3)  # replay the draws: sigmas, then which samples are blurred
    sigmas = torch.rand((6,), generator=generator)
    chosen = torch.rand((6,), generator=generator) < 0.5
    assert chosen.any() and (~chosen).any()
    for index in range(6):
        if chosen[index]:
            sigma = float(sigmas[index])
            expected = ndimage.gaussian_filter(x[index, 0].numpy(), sigma, mode="constant", truncate=3.0 / sigma)
            assert abs(expected - y[index, 0].numpy()).max() < 1e-5
        else:
            assert torch.equal(y[index], x[index])


def test_random_gamma_keeps_each_sample_mean_and_std():
    from rafmedia.engine.views import random_gamma

    x = torch.rand(4, 1, 8, 8, 8, generator=torch.Generator().manual_seed(1)) * 3 + 1
    y = random_gamma(x, torch.Generator().manual_seed(2), max_log_gamma=0.5)
    torch.testing.assert_close(y.flatten(1).mean(1), x.flatten(1).mean(1), atol=1e-4, rtol=0)
    torch.testing.assert_close(y.flatten(1).std(1), x.flatten(1).std(1), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(y, x, atol=1e-3)


def test_rotation_views_labels_can_be_recovered():
    from rafmedia.engine.views import ROTATIONS_3D, RotationViews, rotate

    volumes = torch.randn(8, 1, 12, 12, 12, generator=torch.Generator().manual_seed(0))
    views = RotationViews(crop_size=12, intensity_scale=0, intensity_shift=0, noise_std=0)
    out = views(volumes, torch.Generator().manual_seed(1))
    assert len(ROTATIONS_3D) == 10 and len({r for r in ROTATIONS_3D}) == 10
    for volume, view, label in zip(volumes, out["view"], out["rotation"]):
        matches = [r for r in range(10) if torch.equal(rotate(volume, r), view)]
        assert matches == [int(label)]  # exactly one rotation explains the view


def test_random_bias_field_keeps_moments_and_is_smooth():
    from rafmedia.engine.views import random_bias_field

    x = torch.rand(3, 1, 16, 16, 16, generator=torch.Generator().manual_seed(4)) + 2
    y = random_bias_field(x, torch.Generator().manual_seed(5), max_strength=0.5)
    torch.testing.assert_close(y.flatten(1).mean(1), x.flatten(1).mean(1), atol=1e-4, rtol=0)
    torch.testing.assert_close(y.flatten(1).std(1), x.flatten(1).std(1), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(y, x, atol=1e-2)
