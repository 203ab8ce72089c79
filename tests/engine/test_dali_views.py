"""The DALI view pipeline against the torch view functions it stands in for, op by op, with identical parameters.

Every test runs DALI's CPU backend (CI has no GPU); the GPU test runs the same graph with device="gpu".
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("nvidia.dali", reason="the DALI view tests need the dali extra (pip install -e '.[dali]')")

from rafmedia.core.errors import UserError  # noqa: E402
from rafmedia.engine import views as torch_views  # noqa: E402
from rafmedia.engine.dali_views import DaliViews, ViewParameters, draw_blur_sigmas, stream_views  # noqa: E402

# Every augmentation off: each test turns on the one it checks.
PLAIN = dict(crop_size=12, max_shift=3, flip_probability=0.0, intensity_scale=0.0, intensity_shift=0.0, noise_std=0.0)


def _volumes(batch=4, size=20, seed=0):
    return torch.randn(batch, 1, size, size, size, generator=torch.Generator().manual_seed(seed))


def _run(views: DaliViews, volumes, parameters: ViewParameters) -> torch.Tensor:
    """View a of explicit parameters (view b gets the same ones; only a is compared)."""
    return views.run(volumes, parameters, parameters)["view_a"]


def _starts(batch, seed=1, volume=20, side=12):
    return torch_views.random_crop_starts(torch.Generator().manual_seed(seed), (volume,) * 3, side, batch)


def test_crop_matches_torch_crop_at_fixed_corners():
    volumes, starts = _volumes(), torch.tensor([[0, 0, 0], [8, 8, 8], [0, 5, 8], [3, 1, 7]])
    out = _run(DaliViews(**PLAIN), volumes, ViewParameters.identity(starts.numpy(), 12))
    assert torch.equal(out, torch_views.crop(volumes, starts, 12))


def test_flip_matches_torch_for_fixed_axes_and_for_seeded_draws():
    volumes, starts = _volumes(), _starts(4)
    crops = torch_views.crop(volumes, starts, 12)
    fixed = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]], np.int32)
    base = ViewParameters.identity(starts.numpy(), 12)
    out = _run(DaliViews(**PLAIN), volumes, dataclasses.replace(base, flips_B3=fixed))
    for index, flips in enumerate(fixed):
        dims = [axis + 1 for axis in range(3) if flips[axis]]
        assert torch.equal(out[index], torch.flip(crops[index], dims=dims))
    # The same seed draws the same flips as views.random_flip, so the outputs agree voxel for voxel.
    drawn = torch_views.draw_flips(torch.Generator().manual_seed(7), 4, 0.5).numpy()
    assert 0 < drawn.sum() < drawn.size
    out = _run(DaliViews(**PLAIN), volumes, dataclasses.replace(base, flips_B3=drawn))
    assert torch.equal(out, torch_views.random_flip(crops, torch.Generator().manual_seed(7), 0.5))


@pytest.mark.parametrize("rotation", range(len(torch_views.ROTATIONS_3D)))
def test_rotation90_matches_torch_rot90(rotation):
    volumes, starts = _volumes(batch=2), _starts(2)
    parameters = dataclasses.replace(ViewParameters.identity(starts.numpy(), 12), rotations_B=np.array([rotation] * 2))
    out = _run(DaliViews(**PLAIN, rotate90=True), volumes, parameters)
    expected = torch.stack([torch_views.rotate(c, rotation) for c in torch_views.crop(volumes, starts, 12)])
    assert (out - expected).abs().max() < 1e-5  # fn.rotate interpolates; at quarter turns it lands on voxels


def test_arbitrary_rotation_of_a_radial_volume_changes_nothing_inside_it():
    # A function of the distance to the crop centre is invariant under any rotation about that centre: a
    # physical check of angle, axis and centre that needs no convention matching.
    grid = torch.arange(12, dtype=torch.float32) - 5.5
    radius = torch.sqrt(grid[:, None, None] ** 2 + grid[None, :, None] ** 2 + grid[None, None, :] ** 2)
    volumes = torch.cos(radius / 4.0)[None, None].repeat(2, 1, 1, 1, 1)
    parameters = dataclasses.replace(ViewParameters.identity(np.zeros((2, 3)), 12), angles_B=np.float32([33.0, -71.0]),
                                     axes_B3=np.float32([[0.6, 0.0, 0.8], [0.0, 1.0, 0.0]]))
    out = _run(DaliViews(**PLAIN, max_rotation_degrees=90.0), volumes, parameters)
    inside = radius < 4.5
    # linear interpolation errs by <= 3/8 * max|f''| = 0.023 here; a centre off by half a voxel would err by ~0.1
    assert (out[:, 0][:, inside] - volumes[:, 0][:, inside]).abs().max() < 0.03
    square = volumes.clone()
    square[:, :, :, :6] = -1.0  # no longer radial: the rotation must move it
    assert (_run(DaliViews(**PLAIN, max_rotation_degrees=90.0), square, parameters) - square).abs().max() > 0.5


def test_intensity_jitter_matches_torch_for_seeded_draws():
    volumes, starts = _volumes(), _starts(4)
    crops = torch_views.crop(volumes, starts, 12)
    gains, offsets = torch_views.draw_jitter(torch.Generator().manual_seed(4), 4, 0.3, 0.5)
    parameters = dataclasses.replace(ViewParameters.identity(starts.numpy(), 12), gains_B=gains.numpy(),
                                     offsets_B=offsets.numpy())
    out = _run(DaliViews(**PLAIN), volumes, parameters)
    expected = torch_views.intensity_jitter(crops, torch.Generator().manual_seed(4), 0.3, 0.5)
    assert (out - expected).abs().max() < 1e-5
    assert not torch.allclose(expected, crops)


def test_blur_matches_torch_inside_and_mirrors_the_border():
    from scipy import ndimage

    volumes, starts = _volumes(), _starts(4)
    crops = torch_views.crop(volumes, starts, 12)
    max_sigma = 1.0
    sigmas = draw_blur_sigmas(torch.Generator().manual_seed(2), 4, max_sigma, probability=1.0)
    parameters = dataclasses.replace(ViewParameters.identity(starts.numpy(), 12), sigmas_B=sigmas)
    out = _run(DaliViews(**PLAIN, blur_sigma=max_sigma), volumes, parameters)
    expected = torch_views.gaussian_blur(crops, torch.Generator().manual_seed(2), max_sigma, probability=1.0)
    radius = 3  # views.gaussian_blur's radius for max_sigma=1: voxels farther than it never see the padding
    inner = (slice(None), slice(None)) + (slice(radius, -radius),) * 3
    assert (out[inner] - expected[inner]).abs().max() < 1e-5
    # Over the whole volume DALI equals scipy's "mirror" border (reflect-101: ... 2 1 | 0 1 2 ...), same window.
    for index, sigma in enumerate(sigmas):
        mirrored = ndimage.gaussian_filter(crops[index, 0].double().numpy(), float(sigma), mode="mirror",
                                           truncate=radius / float(sigma))
        assert np.abs(out[index, 0].numpy() - mirrored).max() < 1e-5
    assert (out - expected).abs().max() > 1e-3  # ... and the zero-padded torch path differs at the border


def test_unchosen_samples_are_not_blurred():
    volumes, starts = _volumes(), _starts(4)
    sigmas = draw_blur_sigmas(torch.Generator().manual_seed(1), 4, 1.5, probability=0.5)  # 1.14, -, 0.60, -
    chosen = sigmas > 1e-3
    assert chosen.any() and not chosen.all()
    out = _run(DaliViews(**PLAIN, blur_sigma=1.5), volumes,
               dataclasses.replace(ViewParameters.identity(starts.numpy(), 12), sigmas_B=sigmas))
    crops = torch_views.crop(volumes, starts, 12)
    assert torch.allclose(out[~torch.from_numpy(chosen)], crops[~torch.from_numpy(chosen)], atol=1e-6)
    assert not torch.allclose(out[torch.from_numpy(chosen)], crops[torch.from_numpy(chosen)], atol=1e-3)


@pytest.mark.parametrize("side", [8, 17])  # upsampling and downsampling to 12
def test_resized_crop_matches_trilinear_interpolate(side):
    volumes = _volumes(batch=2)
    starts = np.array([[0, 2, 3], [20 - side, 1, 0]])
    parameters = dataclasses.replace(ViewParameters.identity(starts, 12), sides_B=np.array([side, side]))
    out = _run(DaliViews(**PLAIN, resized_crop_scale=(0.5, 1.5)), volumes, parameters)
    crops = torch_views.crop(volumes, torch.from_numpy(starts), side)
    expected = F.interpolate(crops, size=(12, 12, 12), mode="trilinear", align_corners=False)
    assert (out - expected).abs().max() < 1e-4


def test_noise_has_the_requested_std():
    volumes = torch.zeros(2, 1, 40, 40, 40)
    stds = np.float32([0.5, 2.0])
    parameters = dataclasses.replace(ViewParameters.identity(np.zeros((2, 3)), 40), noise_stds_B=stds)
    out = _run(DaliViews(**{**PLAIN, "crop_size": 40, "noise_std": 2.0}), volumes, parameters)
    for index, std in enumerate(stds):
        assert abs(out[index].std().item() / std - 1) < 0.05
        assert abs(out[index].mean().item()) < 0.05 * std


def test_same_seed_same_views_other_seed_other_views():
    volumes = _volumes()
    settings = dict(crop_size=12, max_shift=3, blur_sigma=1.0, rotate90=True, max_rotation_degrees=20.0,
                    resized_crop_scale=(0.8, 1.2))
    first = DaliViews(**settings)(volumes, torch.Generator().manual_seed(5))
    second = DaliViews(**settings)(volumes, torch.Generator().manual_seed(5))  # a fresh pipeline, same noise seed
    other = DaliViews(**settings)(volumes, torch.Generator().manual_seed(6))
    for key in ("view_a", "view_b"):
        assert torch.equal(first[key], second[key])
        assert not torch.allclose(first[key], other[key])


def test_views_draw_the_same_crops_flips_and_gains_as_two_crop_views():
    # Without noise, view a of both makers is the same function of the seed (view b differs only because the
    # torch path draws its noise field from the same generator).
    volumes = _volumes()
    settings = dict(crop_size=12, max_shift=3, flip_probability=0.5, intensity_scale=0.2, intensity_shift=0.2,
                    noise_std=0.0, blur_sigma=1.0)
    dali = DaliViews(**settings)(volumes, torch.Generator().manual_seed(9))["view_a"]
    torch_out = torch_views.TwoCropViews(**settings)(volumes, torch.Generator().manual_seed(9))["view_a"]
    inner = (slice(None), slice(None)) + (slice(3, -3),) * 3  # blur borders differ (see the blur test)
    assert (dali[inner] - torch_out[inner]).abs().max() < 1e-5


@pytest.mark.parametrize("options", [dict(rotate90=True), dict(resized_crop_scale=(0.75, 1.3)),
                                     dict(rotate90=True, resized_crop_scale=(0.8, 1.2), blur_sigma=1.0)])
def test_torch_views_equal_the_dali_pipeline_for_the_same_seed(options):
    volumes = torch.randn(4, 1, 26, 26, 26, generator=torch.Generator().manual_seed(1))
    two_crop = torch_views.TwoCropViews(crop_size=16, max_shift=4, noise_std=0.0, **options)  # DALI has its own noise
    ours = two_crop(volumes, torch.Generator().manual_seed(5))
    dali = DaliViews.like(two_crop)(volumes, torch.Generator().manual_seed(5))
    inner = (slice(None), slice(None)) + (slice(3, -3),) * 3  # blur borders differ: zero padding vs DALI's mirror
    for view in ("view_a", "view_b"):
        assert torch.allclose(ours[view][inner], dali[view][inner], atol=1e-4), view


def test_like_copies_the_torch_settings_and_refuses_what_dali_lacks():
    twin = DaliViews.like(torch_views.TwoCropViews(crop_size=20, max_shift=5, noise_std=0.1, blur_sigma=0.5),
                          rotate90=True)
    assert (twin.crop_size, twin.max_shift, twin.noise_std, twin.blur_sigma, twin.rotate90) == (20, 5, 0.1, 0.5, True)
    with pytest.raises(UserError, match="gamma"):
        DaliViews.like(torch_views.TwoCropViews(gamma=0.3))


def test_two_views_from_a_patch_stream_over_a_real_store(small_cohort):
    from rafmedia.shards.sampling import create_sampler
    from rafmedia.shards.sources import ZarrSource
    from rafmedia.shards.streaming import PatchStream

    store, _ = small_cohort
    stream = PatchStream(ZarrSource(store.path), create_sampler("uniform", patch_size=24), patches_per_subject=2,
                         batch_size=4, epochs=1, seed=0)
    views = DaliViews(crop_size=16, max_shift=4, blur_sigma=1.0, rotate90=True, resized_crop_scale=(0.75, 1.25))
    batches = list(zip(range(3), stream_views(stream, views, torch.Generator().manual_seed(0))))
    assert len(batches) == 3
    for _, batch in batches:
        assert batch["view_a"].shape == batch["view_b"].shape == (4, 1, 16, 16, 16)
        assert batch["view_a"].dtype == torch.float32 and torch.isfinite(batch["view_a"]).all()
        assert "image" in batch  # the stream's own keys pass through
    # With every augmentation off, view a is the crop of the streamed patch at the corners the generator drew.
    plain = DaliViews(**{**PLAIN, "crop_size": 16})
    first = next(iter(stream))
    out = next(stream_views([first], plain, torch.Generator().manual_seed(3)))
    starts = torch_views.random_crop_starts(torch.Generator().manual_seed(3), (24, 24, 24), 16, 4)
    assert torch.equal(out["view_a"], torch_views.crop(first["image"], starts, 16))


def test_user_errors_name_the_fix():
    with pytest.raises(UserError, match="no 'image'"):
        next(stream_views([{"label": torch.zeros(1)}], DaliViews(**PLAIN), torch.Generator()))
    with pytest.raises(UserError, match="'cpu' or 'gpu'"):
        DaliViews(device="cuda")
    with pytest.raises(UserError, match="resized_crop_scale"):
        DaliViews(resized_crop_scale=(1.2, 0.8))


def test_views_pickle_without_their_pipelines():
    import pickle

    views = DaliViews(**PLAIN)
    views(_volumes(), torch.Generator().manual_seed(0))
    copy = pickle.loads(pickle.dumps(views))
    assert copy == views and copy._pipelines == {}


@pytest.mark.gpu
def test_gpu_backend_equals_cpu_backend():
    volumes, settings = _volumes(), dict(crop_size=12, max_shift=3, blur_sigma=1.0, rotate90=True, noise_std=0.0,
                                         resized_crop_scale=(0.8, 1.2), max_rotation_degrees=20.0)
    cpu = DaliViews(**settings)(volumes, torch.Generator().manual_seed(1))
    gpu = DaliViews(**settings, device="gpu")(volumes.cuda(), torch.Generator().manual_seed(1))
    for key in ("view_a", "view_b"):
        assert gpu[key].is_cuda and (gpu[key].cpu() - cpu[key]).abs().max() < 1e-4
