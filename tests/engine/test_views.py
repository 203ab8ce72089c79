"""The torch view makers and augmentations of `rafmedia.engine.views`, against hand computations and scipy."""
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from rafmedia.core.errors import UserError
from rafmedia.engine.views import (ROTATIONS_3D, RotationViews, TwoCropViews, crop, gaussian_blur, random_bias_field,
                                   random_crop_starts, random_gamma, random_rotation, resized_crops, rotate)


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


def test_gaussian_blur_matches_scipy_and_leaves_unchosen_samples_alone():
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


def test_rotation_views_labels_can_be_recovered():
    volumes = torch.randn(8, 1, 12, 12, 12, generator=torch.Generator().manual_seed(0))
    views = RotationViews(crop_size=12, intensity_scale=0, intensity_shift=0, noise_std=0)
    out = views(volumes, torch.Generator().manual_seed(1))
    assert len(ROTATIONS_3D) == 10 and len({r for r in ROTATIONS_3D}) == 10
    for volume, view, label in zip(volumes, out["view"], out["rotation"]):
        matches = [r for r in range(10) if torch.equal(rotate(volume, r), view)]
        assert matches == [int(label)]  # exactly one rotation explains the view


@pytest.mark.parametrize("augmentation, x, changed_by", [
    (lambda x, generator: random_gamma(x, generator, max_log_gamma=0.5),
     torch.rand(4, 1, 8, 8, 8, generator=torch.Generator().manual_seed(1)) * 3 + 1, 1e-3),
    (lambda x, generator: random_bias_field(x, generator, max_strength=0.5),
     torch.rand(3, 1, 16, 16, 16, generator=torch.Generator().manual_seed(4)) + 2, 1e-2),
], ids=["gamma", "bias_field"])
def test_contrast_changes_keep_each_sample_mean_and_std(augmentation, x, changed_by):
    y = augmentation(x, torch.Generator().manual_seed(5))
    torch.testing.assert_close(y.flatten(1).mean(1), x.flatten(1).mean(1), atol=1e-4, rtol=0)
    torch.testing.assert_close(y.flatten(1).std(1), x.flatten(1).std(1), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(y, x, atol=changed_by)


def test_resized_crops_equal_interpolating_the_hand_computed_box():
    volumes = torch.randn(2, 1, 30, 30, 30, generator=torch.Generator().manual_seed(0))
    out = resized_crops(volumes, torch.tensor([[5, 6, 7], [0, 0, 0]]), torch.tensor([18, 9]), 12)
    expected = [F.interpolate(volumes[0:1, :, 5:23, 6:24, 7:25], size=(12,) * 3, mode="trilinear", align_corners=False),
                F.interpolate(volumes[1:2, :, 0:9, 0:9, 0:9], size=(12,) * 3, mode="trilinear", align_corners=False)]
    assert torch.allclose(out, torch.cat(expected))


def test_rotate90_views_are_quarter_turns_of_the_plain_crop():
    volumes = torch.randn(4, 1, 20, 20, 20, generator=torch.Generator().manual_seed(2))
    quiet = dict(crop_size=12, max_shift=0, flip_probability=0.0, intensity_scale=0.0, intensity_shift=0.0,
                 noise_std=0.0)
    plain = TwoCropViews(**quiet)(volumes, torch.Generator().manual_seed(3))["view_a"]
    turned = TwoCropViews(**quiet, rotate90=True)(volumes, torch.Generator().manual_seed(3))["view_a"]
    found = [next(r for r in range(len(ROTATIONS_3D)) if torch.equal(rotate(p, r), t)) for p, t in zip(plain, turned)]
    assert len(found) == 4 and len(set(found)) > 1  # every view is one of the 10 rotations, not always the same


def test_arbitrary_rotation_keeps_a_radial_volume_and_turns_others():
    grid = torch.stack(torch.meshgrid(*[torch.arange(24.0) - 11.5] * 3, indexing="ij"))
    radius = grid.norm(dim=0)
    radial = torch.exp(-(radius / 6) ** 2).expand(3, 1, 24, 24, 24).contiguous()
    rotated = random_rotation(radial, torch.Generator().manual_seed(4), 40.0)
    inside = radius < 8
    assert (rotated[:, 0][:, inside] - radial[:, 0][:, inside]).abs().max() < 0.03  # a sphere is rotation-invariant
    ramp = (grid[0] / 12).expand(3, 1, 24, 24, 24).contiguous()
    turned = random_rotation(ramp, torch.Generator().manual_seed(4), 40.0)
    # a linear ramp stays linear with the same gradient norm (a rotation is an isometry), but its gradient turns
    points = torch.cat([grid[:, inside].T, torch.ones(int(inside.sum()), 1)], dim=1)
    for sample in turned[:, 0]:
        gradient = torch.linalg.lstsq(points, sample[inside].unsqueeze(1)).solution[:3, 0]
        assert gradient.norm() == pytest.approx(1 / 12, rel=0.03)
    assert (turned[:, 0][:, inside] - ramp[:, 0][:, inside]).abs().mean() > 0.01
    assert torch.equal(random_rotation(ramp, torch.Generator().manual_seed(4), 0.0), ramp)


def test_an_inverted_resized_crop_scale_is_refused():
    with pytest.raises(UserError, match=r"resized_crop_scale must be \(low, high\) with 0 < low <= high"):
        TwoCropViews(resized_crop_scale=(1.2, 0.8))
