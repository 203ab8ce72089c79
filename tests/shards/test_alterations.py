"""Alterations: the measured physical effect equals the requested parameter; deterministic; graded."""
import pytest
import torch

from rafmedia.core.errors import UserError
from rafmedia.shards.alterations import create_alteration, list_alterations


def _volume(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return 1.0 + torch.rand((2, 1, 32, 32, 32), generator=generator)


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_gaussian_noise_has_the_requested_std(severity):
    x = _volume()
    alteration = create_alteration("gaussian_noise", severity=severity)
    y = alteration(x, torch.Generator().manual_seed(1))
    for sample in range(2):
        requested = alteration.parameter * x[sample].std().item()
        measured = (y[sample] - x[sample]).std().item()
        assert abs(measured / requested - 1) < 0.02


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_bias_field_log_ratio_has_the_requested_std_and_is_smooth(severity):
    x = _volume()
    alteration = create_alteration("bias_field", severity=severity)
    log_ratio = torch.log(alteration(x, torch.Generator().manual_seed(2)) / x)
    for sample in range(2):
        assert abs(log_ratio[sample].std().item() / alteration.parameter - 1) < 1e-3
        # smooth: neighbouring voxels differ far less than the field varies overall
        step = (log_ratio[sample, 0, 1:] - log_ratio[sample, 0, :-1]).abs().mean()
        assert step < 0.2 * log_ratio[sample].std()


@pytest.mark.parametrize("name", list_alterations())
def test_alterations_are_deterministic_graded_and_shape_preserving(name):
    x = _volume()
    outputs = [create_alteration(name, severity=s)(x, torch.Generator().manual_seed(7)) for s in range(1, 6)]
    again = create_alteration(name, severity=3)(x, torch.Generator().manual_seed(7))
    assert torch.equal(outputs[2], again)
    assert all(o.shape == x.shape for o in outputs)
    changes = [float((o - x).abs().mean()) for o in outputs]
    if getattr(type(create_alteration(name)), "graded_by_severity", True):  # flip_permute: categorical levels
        assert all(a < b for a, b in zip(changes, changes[1:])), changes


def test_severity_table_and_errors():
    assert create_alteration("gaussian_noise", severity=2).parameter == 0.20
    assert create_alteration("bias_field", parameter=0.33).parameter == 0.33
    with pytest.raises(UserError, match="severity must be 1 to 5"):
        create_alteration("bias_field", severity=6)
    with pytest.raises(UserError, match="did you mean 'gaussian_noise'"):
        create_alteration("gausian_noise")
    with pytest.raises(ValueError, match=r"\(B, C, D, H, W\)"):
        create_alteration("bias_field")(torch.zeros(4, 4, 4))


def test_intensity_alterations_pass_labels_through_and_check_their_shape():
    x = torch.randn(2, 1, 12, 12, 12, generator=torch.Generator().manual_seed(0))
    label = (x > 0).to(torch.uint8)
    alteration = create_alteration("gaussian_noise", severity=2)
    altered, same_label = alteration(x, torch.Generator().manual_seed(3), label=label)
    assert torch.equal(same_label, label) and not alteration.moves_anatomy
    assert torch.equal(altered, alteration(x, torch.Generator().manual_seed(3)))  # the label does not change the draw
    with pytest.raises(ValueError, match="does not match"):
        alteration(x, label=label[:, :, :-1])


def test_docs_table_lists_every_alteration_with_its_current_parameters():
    from pathlib import Path

    from rafmedia.shards.alterations.base import severity_table

    docs = (Path(__file__).resolve().parents[2] / "docs" / "alterations.md").read_text(encoding="utf-8")
    assert severity_table() in docs, "docs/alterations.md is stale: paste severity_table()'s output into it"
    assert all(f"`{name}`" in docs for name in list_alterations()) and len(list_alterations()) >= 21


def test_bias_field_energy_is_in_low_frequencies_and_its_log_has_zero_mean():
    x = _volume()
    alteration = create_alteration("bias_field", severity=4)
    log_ratio = torch.log(alteration(x, torch.Generator().manual_seed(3)) / x)[:, 0].double()
    for field in log_ratio:
        assert abs(field.mean().item()) < 1e-5  # documented: the multiplier's geometric mean is 1
        mirrored = field - field.mean()
        for dim in range(3):  # even extension: no jump at the borders for the FFT to see (a DCT, in effect)
            mirrored = torch.cat([mirrored, mirrored.flip(dim)], dim=dim)
        power = torch.fft.fftn(mirrored).abs() ** 2
        frequencies = torch.stack(torch.meshgrid(*[torch.fft.fftfreq(n) * n for n in mirrored.shape], indexing="ij"))
        low = frequencies.norm(dim=0) <= 6  # at most 3 cycles across the volume (6 across the mirrored one)
        assert power[low].sum() / power.sum() > 0.99  # white noise would put 0.3% of its energy there
