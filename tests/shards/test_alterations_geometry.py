"""Appearance, geometry and CT alterations and `raf alter preview`.

References: numpy flips/rot90 and axis swaps, scipy.ndimage.affine_transform / map_coordinates for the moved
images and labels, hand-computed formulas (gamma, cupping) and physical properties (ranks kept, streak energy on
the line through the metal, error growing with severity).
"""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import ndimage

from rafmedia.shards.alterations import create_alteration
from rafmedia.shards.alterations.ct import MetalStreaks
from rafmedia.shards.alterations.geometry import FLIP_PERMUTE_LEVELS

APPEARANCE = ["gamma", "intensity_shift_scale", "histogram_shift"]
GEOMETRY = ["rotation", "flip_permute", "affine", "elastic"]
CT = ["metal_streaks", "beam_hardening"]
OURS = APPEARANCE + GEOMETRY + CT


def body_volume(seed: int, shape=(32, 32, 32)) -> torch.Tensor:
    """(1, 1, D, H, W): an elliptic body in air with smooth asymmetric texture and a bright off-centre blob."""
    generator = torch.Generator().manual_seed(seed)
    z, y, x = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in shape], indexing="ij")
    body = ((y / 0.8) ** 2 + (x / 0.7) ** 2 < 1).float()
    texture = torch.nn.functional.interpolate(torch.rand((1, 1, 6, 6, 6), generator=generator), size=shape,
                                              mode="trilinear", align_corners=False)[0, 0]
    blob = (((z - 0.2) ** 2 + (y + 0.3) ** 2 + (x - 0.25) ** 2) < 0.06).float()
    volume = body * (0.4 + 0.25 * torch.sin(3 * x + seed) * torch.cos(2 * y) + 0.15 * z + 0.3 * texture) + 0.5 * blob
    return volume[None, None]


def label_volume(shape=(32, 32, 32)) -> torch.Tensor:
    """(1, 1, D, H, W) int64 with classes 0 (air), 1 (body), 2 (an off-centre organ), 3 (a small lesion)."""
    z, y, x = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in shape], indexing="ij")
    label = ((y / 0.8) ** 2 + (x / 0.7) ** 2 < 1).long()
    label[((z - 0.2) ** 2 + (y + 0.3) ** 2 + (x - 0.25) ** 2) < 0.12] = 2
    label[((z + 0.3) ** 2 + (y - 0.2) ** 2 + (x + 0.2) ** 2) < 0.03] = 3
    return label[None, None]


def dice(a: torch.Tensor, b: torch.Tensor, cls: int) -> float:
    a, b = a == cls, b == cls
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def psnr(clean: torch.Tensor, altered: torch.Tensor) -> float:
    mse = float(((altered - clean) ** 2).mean())
    return 10 * math.log10(float(clean.max() - clean.min()) ** 2 / mse)


# ---- shared contract ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [n for n in OURS if n != "flip_permute"])
def test_psnr_to_clean_decreases_strictly_with_severity_on_three_volumes(name):
    for seed in range(3):
        x = body_volume(seed)
        values = [psnr(x, create_alteration(name, severity=s)(x, torch.Generator().manual_seed(seed + 10)))
                  for s in range(1, 6)]
        assert all(a > b for a, b in zip(values, values[1:])), (name, seed, values)


def test_flip_permute_error_grows_with_each_flipped_axis():
    """Orientation errors have no natural PSNR order (a flip of a symmetric axis changes little), so severities
    1-3 are checked where the physics is additive: on a sum of asymmetric ramps along each axis each further
    flipped axis adds its own squared error. Severities 4-5 swap axes (checked against numpy below)."""
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        ramps = [torch.linspace(0, 1, 16) ** (1.5 + torch.rand((), generator=generator)) for _ in range(3)]
        x = ramps[0].view(-1, 1, 1) + ramps[1].view(1, -1, 1) + ramps[2].view(1, 1, -1)
        x = x[None, None].contiguous()
        values = [psnr(x, create_alteration("flip_permute", severity=s)(x, torch.Generator().manual_seed(seed)))
                  for s in range(1, 4)]
        assert all(a > b for a, b in zip(values, values[1:])), values


@pytest.mark.parametrize("name", OURS)
def test_same_seed_same_output_shape_dtype_kept_and_samples_differ(name):
    x = body_volume(0).repeat(4, 1, 1, 1, 1)
    alteration = create_alteration(name, severity=2)
    first = alteration(x, torch.Generator().manual_seed(5))
    assert torch.equal(first, alteration(x, torch.Generator().manual_seed(5)))
    assert first.shape == x.shape and first.dtype == torch.float32
    assert not torch.equal(first, x)
    if name != "beam_hardening":  # cupping has no random draw: same input, same output
        assert not torch.equal(first, alteration(x, torch.Generator().manual_seed(6)))
        assert any(not torch.equal(first[0], first[i]) for i in range(1, 4)), "every sample drew the same"


@pytest.mark.parametrize("name", GEOMETRY)
@pytest.mark.parametrize("severity", [1, 5])
def test_labels_stay_integer_with_the_same_classes(name, severity):
    x, label = body_volume(1), label_volume()
    for dtype in (torch.int64, torch.uint8):
        moved, moved_label = create_alteration(name, severity=severity)(x, torch.Generator().manual_seed(3),
                                                                        label=label.to(dtype))
        assert moved_label.dtype == dtype and moved_label.shape == label.shape
        assert set(moved_label.unique().tolist()) == {0, 1, 2, 3}
        assert torch.equal(moved, create_alteration(name, severity=severity)(x, torch.Generator().manual_seed(3)))


@pytest.mark.gpu
@pytest.mark.parametrize("name", OURS)
def test_cuda_matches_cpu_for_the_same_seed(name):
    """A CPU generator drives both: the same draws, so CUDA equals CPU within float tolerance."""
    x, label = body_volume(0).repeat(2, 1, 1, 1, 1), label_volume().repeat(2, 1, 1, 1, 1)
    alteration = create_alteration(name, severity=4)
    on_cpu = alteration(x, torch.Generator().manual_seed(4), label=label)
    on_cuda = alteration(x.cuda(), torch.Generator().manual_seed(4), label=label.cuda())
    assert torch.allclose(on_cuda[0].cpu(), on_cpu[0], atol=1e-4 * float(x.max() - x.min()))
    labels_agree = float((on_cuda[1].cpu() == on_cpu[1]).float().mean())
    assert labels_agree > 0.999  # nearest-neighbour ties may round differently on a few voxels


# ---- geometry -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("severity", [1, 2, 3, 4, 5])
def test_flip_permute_matches_numpy_and_inverts_exactly(severity):
    x = torch.rand((3, 1, 12, 12, 12), generator=torch.Generator().manual_seed(severity))
    label = (x * 4).long()
    alteration = create_alteration("flip_permute", severity=severity)
    operations = alteration.draw_operations(3, (12, 12, 12), torch.Generator().manual_seed(9))
    moved, moved_label = alteration(x, torch.Generator().manual_seed(9), label=label)
    num_flips, num_swaps = FLIP_PERMUTE_LEVELS[severity]
    for sample, (flips, swap) in enumerate(operations):
        assert len(flips) == num_flips and len(swap) == 2 * num_swaps
        expected = np.flip(x[sample].numpy(), axis=[d - 1 for d in flips])
        if swap:
            expected = np.swapaxes(expected, swap[0] - 1, swap[1] - 1)
        assert np.array_equal(moved[sample].numpy(), expected)
        back = moved_label[sample]
        back = back.transpose(swap[0] - 1, swap[1] - 1) if swap else back
        back = back.flip([d - 1 for d in flips])
        assert all(dice(back, label[sample], c) == 1.0 for c in range(4))
        assert torch.equal(x[sample], (moved[sample].transpose(swap[0] - 1, swap[1] - 1) if swap
                                       else moved[sample]).flip([d - 1 for d in flips]))


def test_rotation_by_90_degrees_is_rot90_and_inverts_with_dice_1():
    x = torch.rand((6, 1, 16, 16, 16), generator=torch.Generator().manual_seed(0))
    label = (x * 3).long()
    moved, moved_label = create_alteration("rotation", parameter=90.0)(x, torch.Generator().manual_seed(2), label=label)
    planes = [(3, 4), (2, 4), (2, 3)]  # about D, H, W
    for sample in range(6):
        candidates = [(plane, k) for plane in planes for k in (1, -1)
                      if torch.allclose(moved[sample], torch.rot90(x[sample], k, [d - 1 for d in plane]), atol=1e-5)]
        assert len(candidates) == 1, f"sample {sample} is no 90-degree rotation of its input"
        plane, k = candidates[0]
        dims = [d - 1 for d in plane]
        assert torch.equal(moved_label[sample], torch.rot90(label[sample], k, dims))
        back_label = torch.rot90(moved_label[sample], -k, dims)
        assert all(dice(back_label, label[sample], c) == 1.0 for c in range(3))
        assert torch.allclose(torch.rot90(moved[sample], -k, dims), x[sample], atol=1e-5)


def _scipy_matrix(matrix_xyz: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
    """Our (x, y, z) voxel map about the centre as scipy's (d, h, w) matrix and offset."""
    matrix = matrix_xyz[::-1, ::-1]
    centre = (np.asarray(shape) - 1) / 2.0
    return matrix, centre - matrix @ centre


def test_affine_moves_image_and_label_like_scipy_affine_transform():
    x, label = body_volume(2), label_volume()
    alteration = create_alteration("affine", severity=4)
    matrix = alteration.draw_matrix(1, torch.Generator().manual_seed(4))[0].numpy()
    moved, moved_label = alteration(x, torch.Generator().manual_seed(4), label=label)
    scipy_matrix, offset = _scipy_matrix(matrix, x.shape[2:])
    floor = float(x.min())
    expected = ndimage.affine_transform(x[0, 0].double().numpy() - floor, scipy_matrix, offset=offset, order=1,
                                        mode="grid-constant", cval=0.0) + floor
    expected_label = ndimage.affine_transform(label[0, 0].numpy(), scipy_matrix, offset=offset, order=0,
                                              mode="grid-constant", cval=0)
    assert np.abs(moved[0, 0].numpy() - expected).max() < 1e-4
    for cls in (1, 2, 3):  # nearest-neighbour ties may round the other way on a few boundary voxels
        assert dice(moved_label[0, 0], torch.from_numpy(expected_label), cls) > 0.98
    assert not np.allclose(matrix, np.eye(3), atol=0.05), "the affine did not move anything"


def test_elastic_moves_image_and_label_like_scipy_map_coordinates():
    x, label = body_volume(0), label_volume()
    alteration = create_alteration("elastic", severity=5)
    field = alteration.draw_field(1, x.shape[2:], torch.Generator().manual_seed(8), "cpu")[0].numpy()
    moved, moved_label = alteration(x, torch.Generator().manual_seed(8), label=label)
    shape = np.asarray(x.shape[2:])
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).astype(np.float64)
    # field channels are (x, y, z) in [-1, 1] units = (w, h, d); one unit is half the extent in voxels
    coordinates = index + field[::-1] * (shape.reshape(3, 1, 1, 1) / 2.0)
    floor = float(x.min())
    expected = ndimage.map_coordinates(x[0, 0].double().numpy() - floor, coordinates, order=1,
                                       mode="grid-constant", cval=0.0) + floor
    expected_label = ndimage.map_coordinates(label[0, 0].numpy(), coordinates, order=0, mode="grid-constant", cval=0)
    assert np.abs(moved[0, 0].numpy() - expected).max() < 1e-4
    for cls in (1, 2, 3):
        assert dice(moved_label[0, 0], torch.from_numpy(expected_label), cls) > 0.98
    # the largest displacement is the documented fraction of the extent ([-1, 1] units span the extent twice)
    assert np.linalg.norm(field, axis=0).max() / 2 == pytest.approx(alteration.parameter, rel=1e-5)


def test_moved_label_centre_follows_the_moved_organ():
    """The organ's centre of mass moves identically in the image (bright organ) and in the label."""
    label = label_volume()
    x = (label == 2).float()
    for name in ("rotation", "affine", "elastic"):
        moved, moved_label = create_alteration(name, severity=5)(x, torch.Generator().manual_seed(1), label=label)
        image_centre = ndimage.center_of_mass(moved[0, 0].numpy())
        label_centre = ndimage.center_of_mass((moved_label[0, 0] == 2).numpy())
        clean_centre = ndimage.center_of_mass(x[0, 0].numpy())
        assert np.abs(np.subtract(image_centre, label_centre)).max() < 0.5, name
        assert np.abs(np.subtract(image_centre, clean_centre)).max() > 0.5, f"{name} did not move the organ"


# ---- appearance ------------------------------------------------------------------------------------------------

def test_gamma_matches_the_formula_by_hand():
    x = body_volume(0).repeat(2, 1, 1, 1, 1) * torch.tensor([1.0, 300.0]).view(2, 1, 1, 1, 1) - 50
    alteration = create_alteration("gamma", severity=4)
    gammas = alteration.draw_gamma(2, torch.Generator().manual_seed(1), "cpu").numpy()
    altered = alteration(x, torch.Generator().manual_seed(1)).double().numpy()
    assert np.allclose(np.abs(np.log(gammas)), 0.3, rtol=1e-6)
    for sample in range(2):
        volume = x[sample].double().numpy()
        low, high = volume.min(), volume.max()
        expected = low + (high - low) * ((volume - low) / (high - low)) ** gammas[sample]
        assert np.allclose(altered[sample], expected, rtol=1e-5, atol=1e-4 * (high - low))


def test_intensity_shift_scale_changes_mean_and_std_as_documented():
    x = body_volume(1)
    alteration = create_alteration("intensity_shift_scale", severity=5)
    y = alteration(x, torch.Generator().manual_seed(0))
    p = alteration.parameter
    assert float(y.std() / x.std()) == pytest.approx(math.exp(p), rel=1e-4) or \
        float(y.std() / x.std()) == pytest.approx(math.exp(-p), rel=1e-4)
    assert abs(float(y.mean() - x.mean()) / float(x.std())) == pytest.approx(p, rel=1e-3)


@pytest.mark.parametrize("severity", [1, 5])
def test_histogram_shift_is_monotonic_keeps_ranks_and_end_points(severity):
    x = torch.randn((2, 1, 16, 16, 16), generator=torch.Generator().manual_seed(0)).exp()
    y = create_alteration("histogram_shift", severity=severity)(x, torch.Generator().manual_seed(2))
    for sample in range(2):
        order = x[sample].flatten().argsort()
        mapped = y[sample].flatten()[order]
        assert bool((mapped[1:] >= mapped[:-1]).all()), "a brighter voxel became darker"
        assert torch.equal(y[sample].flatten().argsort(), order)  # continuous data: ranks exactly kept
        assert float(y[sample].min()) == pytest.approx(float(x[sample].min()), rel=1e-5)
        assert float(y[sample].max()) == pytest.approx(float(x[sample].max()), rel=1e-5)
        assert float((y[sample] - x[sample]).abs().mean()) > 1e-3 * severity
    # ties (a constant background) stay ties
    tied = x.clone()
    tied[:, :, :4] = 0.0
    out = create_alteration("histogram_shift", severity=5)(tied, torch.Generator().manual_seed(2))
    assert out[:, :, :4].flatten(1).std(dim=1).max() == 0


# ---- CT ---------------------------------------------------------------------------------------------------------

def _cylinder(radius=12.0, shape=(8, 32, 32)) -> torch.Tensor:
    _, height, width = shape
    rows, columns = torch.meshgrid(torch.arange(height) - (height - 1) / 2, torch.arange(width) - (width - 1) / 2,
                                   indexing="ij")
    inside = (rows**2 + columns**2 <= radius**2).float()
    return inside.expand(shape)[None, None].clone()


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_beam_hardening_lowers_the_centre_by_the_documented_fraction(severity):
    x = _cylinder()
    alteration = create_alteration("beam_hardening", severity=severity)
    y = alteration(x, torch.Generator().manual_seed(0))
    centre = float(y[0, 0, :, 15:17, 15:17].mean())
    edge = float(y[0, 0, :, 15:17, 4].mean())  # 11.5 voxels from the centre, just inside the 12-voxel body edge
    assert centre == pytest.approx(1 - alteration.parameter, abs=0.01 * alteration.parameter + 1e-3)
    assert edge == pytest.approx(1.0, abs=0.1 * alteration.parameter)
    assert float(y[x == 0].abs().max()) == 0.0  # air stays air
    # radial profile is monotone: darker toward the centre
    profile = y[0, 0, 0, 15, 4:16]
    assert bool((profile[1:] <= profile[:-1] + 1e-6).all())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metal_streaks_put_energy_along_the_line_through_the_metal(seed):
    """Rays through both rods carry the cross term -2 p1 p2: the streak runs along the line joining them."""
    x = _cylinder(radius=26.0, shape=(6, 64, 64)) * 0.5
    alteration = create_alteration("metal_streaks", severity=4)
    rods = alteration.draw_rods(x, torch.Generator().manual_seed(seed))
    y = alteration(x, torch.Generator().manual_seed(seed))
    first, thickness = int(rods["first"][0]), rods["thickness"]
    slab = y[0, 0, first]
    metal = alteration.rod_mask(rods, 64, 64, "cpu")[0, 0] > 0
    assert float(slab[metal].min()) > float(x.max())  # the metal is brighter than anything in the volume
    outside = [d for d in range(6) if not first <= d < first + thickness]
    assert all(torch.equal(y[0, 0, d], x[0, 0, d]) for d in outside)  # only the slab holds metal and streaks
    difference = (slab - x[0, 0, first]).numpy()
    (r1, c1), (r2, c2) = rods["centres"][0].tolist()
    middle, direction = np.array([(r1 + r2) / 2, (c1 + c2) / 2]), np.array([r2 - r1, c2 - c1])
    direction /= np.linalg.norm(direction)

    def line_energy(angle):
        rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        along = rotation @ direction
        steps = np.concatenate([np.arange(-30, -8), np.arange(9, 31)])  # beyond the rods on both sides
        points = middle[:, None] + along[:, None] * steps[None]
        keep = (points.min(axis=0) >= 0) & (points.max(axis=0) <= 63)
        values = ndimage.map_coordinates(difference, points[:, keep], order=1)
        on_metal = ndimage.map_coordinates(metal.numpy().astype(float), points[:, keep], order=1) > 0
        return float(np.mean(values[~on_metal] ** 2))

    through = line_energy(0.0)
    across = [line_energy(angle) for angle in (math.pi / 4, math.pi / 2, 3 * math.pi / 4)]
    assert through > 5 * max(across), (through, across)


def test_metal_rods_sit_inside_the_body():
    x = _cylinder(radius=20.0, shape=(4, 64, 64))
    rods = MetalStreaks(severity=3).draw_rods(x.repeat(8, 1, 1, 1, 1), torch.Generator().manual_seed(0))
    distance = (rods["centres"] - 31.5).norm(dim=2)
    assert float(distance.max()) < 20.0 - float(rods["rod_radius"])


# ---- `raf alter preview` -----------------------------------------------------------------------------------------

def _raf(*args, cwd):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "rafmedia.launch.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def test_preview_cli_writes_the_grid_from_a_store_and_a_nifti(small_cohort, tmp_path):
    import nibabel
    from PIL import Image

    store, _ = small_cohort
    subject = store.subject_ids()[1]
    out = tmp_path / "grid.png"
    result = _raf("alter", "preview", f"{store.path}:{subject}", "--out", str(out),
                  "--alterations", "rotation,gamma,metal_streaks", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"preview: {out}" in result.stdout and "3 alterations x 5 severities" in result.stdout
    with Image.open(out) as image:
        width, height = image.size
    assert (width, height) == (960, round(2.1 * 3 * 80))  # 6 columns x 2 in, 3 rows x 2.1 in, at 80 dpi

    volume = np.random.default_rng(0).random((20, 24, 16)).astype(np.float32)
    nifti = tmp_path / "scan.nii.gz"
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), str(nifti))
    result = _raf("alter", "preview", str(nifti), "--out", str(tmp_path / "n.png"), "--alterations", "elastic",
                  cwd=tmp_path)
    assert result.returncode == 0 and "volume 16x24x20" in result.stdout, result.stderr[-2000:]



@pytest.mark.parametrize("arguments, message", [
    (["--alterations", "rotaton"], "unknown alteration 'rotaton'; did you mean 'rotation'"),
    (["--max-size", "4"], "--max-size must be at least 8"),
])
def test_preview_user_errors_are_one_line(arguments, message, tmp_path, capsys):
    import nibabel

    from rafmedia.launch.cli import main

    nifti = tmp_path / "scan.nii.gz"
    nibabel.save(nibabel.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), str(nifti))
    assert main(["alter", "preview", str(nifti), "--out", str(tmp_path / "x.png"), *arguments]) == 2
    assert message in capsys.readouterr().err
    assert main(["alter", "preview", str(tmp_path / "nope.nii.gz"), "--out", str(tmp_path / "x.png")]) == 2
    assert "nope.nii.gz' not found" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("x")
    assert main(["alter", "preview", str(tmp_path / "notes.txt"), "--out", str(tmp_path / "x.png")]) == 2
    assert "is not a NIfTI file" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_preview_first_column_is_the_middle_axial_slice(small_cohort, tmp_path):
    import nibabel

    from rafmedia.shards.alterations.preview import load_preview_volume, preview_slices, to_preview_tensor

    volume = np.random.default_rng(1).random((10, 12, 14)).astype(np.float32)
    nifti = tmp_path / "scan.nii"
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), str(nifti))
    loaded, _ = load_preview_volume(str(nifti))
    rows = preview_slices(to_preview_tensor(loaded, 128), ["gamma"], seed=0)
    assert np.array_equal(rows["gamma"][0], volume[:, :, 7].T)  # (k, j, i) layout: slice 14 // 2 of k
    store, _ = small_cohort
    first, description = load_preview_volume(str(store.path))
    assert np.array_equal(first, store.read(store.subject_ids()[0])) and "first subject" in description
    small = to_preview_tensor(np.zeros((300, 150, 60), np.float32), 100)
    assert tuple(small.shape[2:]) == (20, 50, 100)


def test_affine_grid_3d_equals_torch_affine_grid():
    from rafmedia.shards.alterations.geometry import affine_grid_3d

    theta = torch.randn(3, 3, 4, generator=torch.Generator().manual_seed(5))
    expected = torch.nn.functional.affine_grid(theta, [3, 1, 7, 9, 11], align_corners=False)
    assert torch.allclose(affine_grid_3d(theta, (7, 9, 11)), expected, atol=1e-6)
