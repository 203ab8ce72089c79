"""Manifest rows: statistics against numpy, the noise estimate against the noise that was added, flags."""
import numpy as np
import pytest

from rafmedia.shards.manifest import QUALITY_FLAGS, noise_estimate, summary_row


def _smooth(shape, rng):
    from scipy import ndimage

    return ndimage.gaussian_filter(rng.normal(size=shape), 6) * 40 + 100


@pytest.mark.parametrize("sigma", [0.5, 2.0, 8.0])
def test_noise_estimate_recovers_the_std_of_added_white_noise(sigma):
    rng = np.random.default_rng(3)
    volume = _smooth((48, 48, 48), rng) + rng.normal(0, sigma, size=(48, 48, 48))
    assert noise_estimate(volume) == pytest.approx(sigma, rel=0.08)


def test_summary_row_columns_statistics_and_flags():
    rng = np.random.default_rng(0)
    image = (_smooth((40, 36, 20), rng) + rng.normal(0, 1, (40, 36, 20))).astype(np.float32)
    label = np.zeros(image.shape, np.uint8)
    label[10:20, 10:20, 5:10] = 2
    row = summary_row("s1", metadata={"site": "a", "age": 50}, channels={"ct": image}, label=label,
                      spacing=[0.8, 0.8, 3.0])
    assert (row["subject_id"], row["site"], row["age"]) == ("s1", "a", 50)
    assert [row[f"shape_{axis}"] for axis in range(3)] == [40, 36, 20]
    assert [row[f"spacing_{axis}"] for axis in range(3)] == [0.8, 0.8, 3.0]
    assert row["ct_mean"] == pytest.approx(float(image.mean()), abs=1e-5)
    assert row["ct_p99"] == pytest.approx(float(np.percentile(image, 99)), abs=1e-4)
    assert row["label_foreground"] == pytest.approx(500 / image.size, abs=1e-6)
    assert row["flags"].split(";") == ["anisotropic", "small_fov"]  # 3.75x spacing ratio; an axis of 20 voxels


def test_saturated_constant_noisy_and_empty_label_flags():
    rng = np.random.default_rng(1)
    saturated = np.clip(_smooth((40, 40, 40), rng), None, 100.0)  # about half the voxels clipped at the maximum
    constant = np.full((40, 40, 40), 3.0)
    noisy = rng.normal(0, 1, (40, 40, 40))
    row = summary_row("s", metadata={}, channels={"a": saturated, "b": constant}, label=np.zeros((40, 40, 40)),
                      spacing=[1, 1, 1])
    assert row["flags"].split(";") == ["saturated", "constant", "empty_label"]
    assert set(QUALITY_FLAGS) >= set(row["flags"].split(";"))
    pure_noise = summary_row("n", metadata={}, channels={"a": noisy}, label=None, spacing=[1, 1, 1])
    assert pure_noise["flags"] == "noisy"  # (p99 - p01) of N(0,1) is 4.65 noise stds, below NOISY_SNR = 5
    clean = summary_row("c", metadata={}, channels={"a": _smooth((40, 40, 40), rng) + rng.normal(0, 0.1, (40,) * 3)},
                        label=None, spacing=[1, 1, 1])
    assert clean["flags"] == ""
