"""Acquisition alterations (noise, k-space, resolution): each checked against theory or an independent library."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import ndimage, stats

from rafmedia.shards.alterations import create_alteration
from rafmedia.shards.alterations.kspace import draw_ghost_counts, draw_motion, draw_spikes, gibbs_mask
from rafmedia.shards.alterations.resolution import draw_blur_sigmas, separable_blur

NOISE = ["rician_noise", "poisson_noise"]
KSPACE = ["gibbs_ringing", "kspace_spike", "motion", "ghosting"]
RESOLUTION = ["anisotropic_blur", "thick_slices", "dropped_slices", "fov_truncation"]
ALL = NOISE + KSPACE + RESOLUTION
DETERMINISTIC = {"gibbs_ringing", "thick_slices"}  # no random draw: the same output for every seed


def _seed(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _smooth_volumes(batch=2, shape=(24, 24, 24), seed=0) -> torch.Tensor:
    noise = np.random.default_rng(seed).normal(size=(batch, 1, *shape))
    smooth = ndimage.gaussian_filter(noise, sigma=(0, 0, 2, 2, 2))
    return torch.from_numpy(1.0 + smooth / smooth.std()).float()


def _spectrum(x: torch.Tensor) -> np.ndarray:
    return np.fft.fftn(x.double().numpy(), axes=(-3, -2, -1))


# ----------------------------------------------------------------------------------------------- noise physics
def test_rician_magnitude_of_a_constant_has_the_rice_distribution():
    amplitude, relative_sigma = 2.0, 0.5  # sigma = 1: SNR 2, far from Gaussian
    x = torch.full((2, 1, 32, 32, 32), amplitude)
    y = create_alteration("rician_noise", parameter=relative_sigma)(x, _seed(1)).double().numpy().ravel()
    sigma = relative_sigma * amplitude
    rice = stats.rice(amplitude / sigma, scale=sigma)
    assert abs(y.mean() / rice.mean() - 1) < 0.01
    assert abs(y.var() / rice.var() - 1) < 0.03
    assert stats.kstest(y[::7], rice.cdf).pvalue > 1e-3
    assert y.min() >= 0  # a magnitude


@pytest.mark.parametrize("air", [0.0, -1.0])
def test_rician_noise_in_the_dark_is_a_rayleigh_floor_above_the_minimum(air):
    x = torch.full((1, 1, 32, 32, 32), air)
    x[:, :, :16] = air + 4.0  # half signal, half air: mean signal above the minimum 2, sigma = 0.25 * 2 = 0.5
    y = create_alteration("rician_noise", parameter=0.25)(x, _seed(2))[:, :, 16:].double().numpy().ravel() - air
    rayleigh = stats.rayleigh(scale=0.5)
    assert abs(y.mean() / rayleigh.mean() - 1) < 0.02  # not zero-mean, unlike Gaussian noise
    assert abs(y.var() / rayleigh.var() - 1) < 0.04


def test_poisson_noise_variance_equals_the_mean_in_counts():
    relative_noise = 0.2  # 25 counts at the mean intensity 2.5: k = 10 counts per unit
    x = torch.ones((1, 1, 32, 32, 32))
    x[:, :, 16:] = 4.0
    y = create_alteration("poisson_noise", parameter=relative_noise)(x, _seed(3))
    counts = (y * 10.0).double().numpy()
    assert np.allclose(counts, np.round(counts), atol=1e-3)  # whole counts
    for region, expected in ((counts[:, :, :16], 10.0), (counts[:, :, 16:], 40.0)):
        assert abs(region.mean() / expected - 1) < 0.01
        assert abs(region.var() / region.mean() - 1) < 0.04  # the Poisson property


def test_poisson_noise_shifts_negative_intensities_and_keeps_the_mean():
    x = torch.full((1, 1, 32, 32, 32), -1000.0)  # air in HU
    x[:, :, 8:24] = 40.0  # soft tissue
    y = create_alteration("poisson_noise", severity=3)(x, _seed(4))
    assert abs(float(y[:, :, 8:24].mean()) - 40.0) < 2.0
    assert float(y.min()) >= -1000.0  # counts are >= 0 above the shifted minimum


# ----------------------------------------------------------------------------------------------- k-space physics
def test_gibbs_keeps_exactly_the_kspace_ball_and_matches_monai_on_odd_shapes():
    from monai.transforms import GibbsNoise

    x = _smooth_volumes(batch=1, shape=(33, 33, 33))
    alteration = create_alteration("gibbs_ringing", severity=3)
    y = alteration(x)
    mask = gibbs_mask((33, 33, 33), alteration.parameter, "cpu").numpy()
    clean, altered = _spectrum(x)[0, 0], _spectrum(y)[0, 0]
    scale = np.abs(clean).max()
    assert np.abs(altered[mask] - clean[mask]).max() < 1e-5 * scale  # inside the ball: untouched
    assert np.abs(altered[~mask]).max() < 1e-5 * scale  # outside: every bit of energy removed
    radius = (1 - alteration.parameter) * 33 * math.sqrt(2) / 2  # MONAI's radius, inside the cube here
    assert abs(mask.sum() / (4 / 3 * math.pi * radius**3) - 1) < 0.03
    reference = GibbsNoise(alpha=alteration.parameter)(x[0])
    assert torch.allclose(y[0], torch.as_tensor(reference).float(), atol=1e-4)


def test_kspace_spike_puts_its_energy_at_the_drawn_frequency():
    x = _smooth_volumes(batch=2, shape=(24, 24, 24))
    alteration = create_alteration("kspace_spike", severity=4)
    y = alteration(x, _seed(5))
    frequencies, _ = draw_spikes((24, 24, 24), 2, _seed(5))
    difference = _spectrum(y) - _spectrum(x)
    for sample in range(2):
        position = tuple(int(f) % 24 for f in frequencies[sample])
        mirror = tuple(-int(f) % 24 for f in frequencies[sample])
        power = np.abs(difference[sample, 0]) ** 2
        assert (power[position] + power[mirror]) / power.sum() > 0.9999
        # the real part of a spike of s at +f is s/2 at +f and conj(s)/2 at -f
        expected = alteration.parameter * np.abs(_spectrum(x)[sample, 0]).max() / 2
        assert abs(np.abs(difference[sample, 0][position]) / expected - 1) < 1e-4


def test_ghosting_replicas_repeat_every_fov_over_n_along_the_phase_axis():
    x = _smooth_volumes(batch=4, shape=(16, 16, 24))
    y = create_alteration("ghosting", severity=5)(x, _seed(6))
    counts = draw_ghost_counts(4, _seed(6))
    assert len(set(counts.tolist())) > 1  # the draw differs between volumes
    difference = (y - x).double()
    for sample, count in enumerate(counts.tolist()):
        period = 24 // count
        shifted = torch.roll(difference[sample], shifts=period, dims=-1)
        assert torch.allclose(shifted, difference[sample], atol=1e-5)  # N replicas at FOV/N
        assert not torch.allclose(torch.roll(difference[sample], shifts=1, dims=-1), difference[sample], atol=1e-3)
    assert torch.allclose(y.mean(dim=(2, 3, 4)), x.mean(dim=(2, 3, 4)), atol=1e-5)  # zero line kept


def test_ghosting_equals_torchio_ghosting_at_the_same_parameters():
    import torchio

    x = _smooth_volumes(batch=3, shape=(16, 20, 24))  # W = 24: TorchIO's shifted comb is ours when 12 % N == 0
    alteration = create_alteration("ghosting", severity=4)
    y = alteration(x, _seed(6))
    for sample, count in enumerate(draw_ghost_counts(3, _seed(6)).tolist()):
        reference = torchio.Ghosting(num_ghosts=count, axis=2, intensity=alteration.parameter, restore=None)
        expected = reference(torchio.ScalarImage(tensor=x[sample])).data.float()
        assert torch.allclose(y[sample], expected, atol=1e-5)


def _scipy_rigid_move(volume: np.ndarray, angles, shifts) -> np.ndarray:
    """The rigid motion of `rigid_theta`, independently: rotations about D, H, W then shift, in voxel units."""
    def rotation(angle, i, j):  # in (x=W, y=H, z=D) grid order, as rigid_theta builds it
        matrix = np.eye(3)
        matrix[i, i], matrix[i, j], matrix[j, i], matrix[j, j] = math.cos(angle), -math.sin(angle), \
            math.sin(angle), math.cos(angle)
        return matrix

    xyz = rotation(angles[0], 0, 1) @ rotation(angles[1], 0, 2) @ rotation(angles[2], 1, 2)
    dhw = xyz[::-1, ::-1]  # the same map written in (D, H, W) order
    centre = (np.array(volume.shape) - 1) / 2
    return ndimage.affine_transform(volume, dhw, offset=centre - dhw @ centre + np.asarray(shifts), order=1,
                                    mode="nearest")


def test_motion_takes_each_kspace_line_from_the_copy_moved_at_its_time():
    x = _smooth_volumes(batch=2, shape=(20, 22, 24))
    y = create_alteration("motion", severity=5)(x, _seed(8))
    segment, angles, shifts = draw_motion(2, 8.0, 24, _seed(8), "cpu")
    for sample in range(2):
        volume = x[sample, 0].double().numpy()
        copies = [_scipy_rigid_move(volume, angles[sample, s].numpy(), shifts[sample, s].numpy()) for s in range(3)]
        spectra = np.stack([np.fft.fftshift(np.fft.fftn(copy), axes=-1) for copy in copies])  # lines in time order
        lines = segment[sample].numpy()
        assert lines[12] == 1 and np.all(angles[sample, 1].numpy() == 0)  # k-space centre: the unmoved copy
        assert abs((lines != 1).mean() - 0.6) <= 1 / 24  # min(0.6, 8 / 12) of the lines moved, to a line
        composed = np.take_along_axis(spectra, lines.reshape(1, 1, 1, -1).repeat(20, 1).repeat(22, 2), axis=0)[0]
        # the composed k-space is not Hermitian: its image is complex, and the real part is kept (as TorchIO)
        expected = np.fft.ifftn(np.fft.ifftshift(composed, axes=-1)).real
        assert np.abs(y[sample, 0].numpy() - expected).max() < 1e-4
        assert np.abs(expected - volume).max() > 0.1  # the motion did change the image


# ----------------------------------------------------------------------------------------------- resolution
def test_blur_impulse_response_has_the_requested_std_per_axis():
    x = torch.zeros((2, 1, 41, 41, 41))
    x[:, :, 20, 20, 20] = 1.0
    y = create_alteration("anisotropic_blur", severity=5)(x, _seed(9))
    sigmas = draw_blur_sigmas(3.0, 2, _seed(9), "cpu")
    offsets = torch.arange(41, dtype=torch.float64) - 20
    for sample in range(2):
        response = y[sample, 0].double()
        assert abs(float(response.sum()) - 1) < 1e-5
        for axis in range(3):
            profile = response.sum(dim=tuple(a for a in range(3) if a != axis))
            measured = math.sqrt(float((profile * offsets**2).sum()))
            assert abs(measured / float(sigmas[sample, axis]) - 1) < 0.01
    assert not torch.allclose(sigmas[0], sigmas[1])


def test_separable_blur_matches_scipy_gaussian_filter():
    x = _smooth_volumes(batch=1, shape=(18, 20, 22), seed=3) + torch.rand((1, 1, 18, 20, 22), generator=_seed(0))
    sigmas = torch.tensor([[0.8, 1.7, 2.5]])
    y = separable_blur(x, sigmas)[0, 0].numpy()
    radius = math.ceil(3 * 2.5)
    reference = ndimage.gaussian_filter(x[0, 0].double().numpy(), sigma=(0.8, 1.7, 2.5), radius=radius,
                                        mode="nearest")
    assert np.abs(y - reference).max() < 1e-5


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_thick_slices_equal_slab_means_interpolated_at_the_slices(severity):
    x = _smooth_volumes(batch=1, shape=(29, 8, 8), seed=severity)
    alteration = create_alteration("thick_slices", severity=severity)
    thickness = int(alteration.parameter)
    y = alteration(x)[0, 0].double().numpy()
    volume = x[0, 0].double().numpy()
    num_slabs = math.ceil(29 / thickness)
    padded = np.concatenate([volume, np.repeat(volume[-1:], num_slabs * thickness - 29, axis=0)])
    slab_means = padded.reshape(num_slabs, thickness, 8, 8).mean(axis=1)
    centres = np.arange(num_slabs) * thickness + (thickness - 1) / 2
    reference = np.apply_along_axis(lambda column: np.interp(np.arange(29), centres, column), 0, slab_means)
    assert np.abs(y - reference).max() < 1e-5


def test_dropped_slices_zero_whole_slices_nested_across_severities():
    x = _smooth_volumes(batch=2, shape=(40, 8, 8))
    dropped_sets = []
    for severity in range(1, 6):
        alteration = create_alteration("dropped_slices", severity=severity)
        y = alteration(x, _seed(10))
        zero = (y == 0).all(dim=4).all(dim=3)[:, 0]  # (B, D): whole slices zeroed
        assert zero.sum(dim=1).tolist() == [max(1, round(alteration.parameter * 40))] * 2
        assert torch.equal(y[~zero.view(2, 1, 40, 1, 1).expand_as(y)], x[~zero.view(2, 1, 40, 1, 1).expand_as(x)])
        dropped_sets.append([set(torch.nonzero(zero[b]).ravel().tolist()) for b in range(2)])
    for mild, severe in itertools.pairwise(dropped_sets):
        assert all(m <= s for m, s in zip(mild, severe))
    assert dropped_sets[-1][0] != dropped_sets[-1][1]  # per-volume draws


def test_fov_truncation_cuts_image_and_label_together():
    x = _smooth_volumes(batch=4, shape=(8, 30, 30)) + 5.0  # strictly positive: zero means cut
    label = torch.randint(1, 4, (4, 1, 8, 30, 30), generator=_seed(11))
    alteration = create_alteration("fov_truncation", severity=3)
    y, label_out = alteration(x, _seed(12), label=label)
    cut = y == 0
    assert torch.equal(cut, label_out == 0)
    assert torch.equal(label_out[~cut], label[~cut]) and torch.equal(y[~cut], x[~cut])
    axes = []
    for sample in range(4):
        cut_h = cut[sample, 0].all(dim=(0, 2))  # rows of H cut entirely
        cut_w = cut[sample, 0].all(dim=(0, 1))
        assert int(cut_h.sum()) + int(cut_w.sum()) == round(0.3 * 30)  # the cut fraction, along one axis
        axes.append(bool(cut_w.any()))
    assert len(set(axes)) == 2  # H for some volumes, W for others


# ----------------------------------------------------------------------------------------------- contract
def _cohort_volumes(small_cohort) -> torch.Tensor:
    store, _ = small_cohort
    subjects = store.subject_ids()[:3]
    return torch.from_numpy(np.stack([store.read(s)[None] for s in subjects])).float()  # (3, 1, 32, 32, 32)


def _psnr(clean: torch.Tensor, altered: torch.Tensor) -> torch.Tensor:
    data_range = clean.flatten(1).amax(dim=1) - clean.flatten(1).amin(dim=1)
    mse = ((clean - altered) ** 2).flatten(1).mean(dim=1)
    return 10 * torch.log10(data_range**2 / mse)


@pytest.mark.parametrize("name", ALL)
def test_psnr_to_the_clean_volume_decreases_strictly_with_severity(name, small_cohort):
    volumes = _cohort_volumes(small_cohort)
    psnr = torch.stack([_psnr(volumes, create_alteration(name, severity=s)(volumes, _seed(13)))
                        for s in range(1, 6)])  # (severity, volume)
    assert bool((psnr[1:] < psnr[:-1]).all()), f"{name}: PSNR by severity (rows) and volume\n{psnr}"


@pytest.mark.parametrize("name", ALL)
def test_same_seed_same_output_and_batch_members_get_their_own_draw(name):
    x = _smooth_volumes(batch=1, shape=(16, 20, 24)).expand(2, 1, 16, 20, 24).contiguous()
    alteration = create_alteration(name, severity=3)
    first, again = alteration(x, _seed(14)), alteration(x, _seed(14))
    others = [alteration(x, _seed(seed)) for seed in range(15, 19)]
    assert torch.equal(first, again)
    assert first.shape == x.shape and first.dtype == torch.float32
    if name in DETERMINISTIC:
        assert all(torch.equal(first, other) for other in others) and torch.equal(first[0], first[1])
    else:
        # a draw can repeat by chance (ghosting picks N among three values), so look over a few seeds
        assert any(not torch.equal(first, other) for other in others)
        assert any(not torch.allclose(out[0], out[1]) for out in [first, *others])  # per-volume draws


@pytest.mark.gpu
@pytest.mark.parametrize("name", ALL)
def test_cuda_matches_cpu_for_the_same_seed(name):
    x = _smooth_volumes(batch=2, shape=(16, 20, 24))
    alteration = create_alteration(name, severity=4)
    on_cpu = alteration(x, _seed(16))
    on_gpu = alteration(x.cuda(), _seed(16)).cpu()  # a CPU generator: the same draws on both devices
    assert torch.allclose(on_cpu, on_gpu, atol=1e-4 * float(x.abs().max()))
