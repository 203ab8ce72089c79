"""Collapse and shortcut monitors: RankMe, normalised std and the site probe against hand cases and references, and
the records a real pretraining run (straight and resumed) writes."""
import json

import numpy as np
import pytest
import scipy.linalg
import torch
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.model_selection import cross_val_score

from rafmedia.engine.batches import DataConfig, view_batches
from rafmedia.engine.encoders import EncoderConfig, create_encoder
from rafmedia.engine.monitors import EmbeddingMonitor, compute_rankme, normalised_std, site_leakage, summarise_embedding
from rafmedia.engine.pretrain import pretrain_encoder
from rafmedia.engine.tasks import TaskConfig, create_task
from rafmedia.engine.train import TrainConfig, train


def _orthonormal(rows: int, cols: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(rows, cols)))
    return q


@pytest.mark.parametrize("k", [1, 3, 8])
def test_rankme_of_k_equal_singular_values_is_k(k):
    emb_ND = 5.0 * _orthonormal(40, k, seed=k) @ _orthonormal(16, k, seed=100 + k).T  # singular values: k fives
    assert compute_rankme(emb_ND) == pytest.approx(k, rel=1e-4)


def test_rankme_matches_the_entropy_of_scipys_singular_values():
    emb_ND = np.random.default_rng(0).normal(size=(30, 12)) * np.linspace(0.1, 3.0, 12)
    singular = scipy.linalg.svdvals(emb_ND)
    p = singular / singular.sum() + 1e-7
    assert compute_rankme(emb_ND) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-9)
    assert 1.0 < compute_rankme(emb_ND) < 12.0


def test_a_constant_embedding_is_a_collapse_and_the_monitor_warns(capsys):
    emb_ND = np.tile(np.linspace(0.5, 2.0, 16), (24, 1))
    assert compute_rankme(emb_ND) == pytest.approx(1.0, abs=1e-3)
    std_mean, low_fraction = normalised_std(emb_ND)
    assert std_mean < 1e-9 and low_fraction == 1.0
    record = summarise_embedding(emb_ND, None)
    assert record["collapse"] is True and record["spread"] == pytest.approx(0.0, abs=1e-9)
    assert record["rankme"] == pytest.approx(1.0, abs=1e-3)

    class Constant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def forward(self, x):
            return self.scale * torch.ones(len(x), 16)

    record = EmbeddingMonitor(torch.zeros(6, 1, 4, 4, 4), None, every=1).measure(Constant(), step=7)
    assert record["collapse"] is True and "site_leakage" not in record
    assert "step 7: the embedding has collapsed" in capsys.readouterr().err


def test_a_spread_embedding_is_not_a_collapse():
    emb_ND = np.random.default_rng(1).normal(size=(64, 16))
    std_mean, low_fraction = normalised_std(emb_ND)
    assert std_mean == pytest.approx(1 / 4, rel=0.15)  # unit vectors spread over the sphere: std ~ 1/sqrt(D)
    assert low_fraction == 0.0
    assert summarise_embedding(emb_ND, None)["collapse"] is False


def test_a_common_offset_is_not_a_collapse_but_float_noise_around_a_constant_is():
    rng = np.random.default_rng(3)
    offset_D = 50.0 * np.abs(rng.normal(size=16))  # pooled post-ReLU features: one large shared mean vector
    varied_ND = offset_D + rng.normal(size=(64, 16))
    assert compute_rankme(varied_ND) < 2.0  # Garrido's uncentred RankMe would call this collapsed
    record = summarise_embedding(varied_ND, None)
    assert record["collapse"] is False and record["rankme"] > 12.0 and record["rankme_raw"] < 2.0
    assert record["spread"] == pytest.approx(4.0 / np.linalg.norm(offset_D), rel=0.15)  # sqrt(D * 1) / |offset|
    assert summarise_embedding(offset_D + 1e-9 * rng.normal(size=(64, 16)), None)["collapse"] is True


def test_site_probe_is_at_chance_on_noise_and_near_one_on_site_shifted_embeddings():
    rng = np.random.default_rng(2)
    sites_N = np.repeat(np.array(["a", "b", "c"]), 30)
    noise_ND = rng.normal(size=(90, 8))
    shifted_ND = noise_ND + 5.0 * np.eye(8)[np.repeat([0, 1, 2], 30)]
    # scikit-learn's reference: another linear classifier's cross-validated balanced accuracy
    reference = {name: cross_val_score(LinearDiscriminantAnalysis(), emb, sites_N, cv=3,
                                       scoring="balanced_accuracy").mean()
                 for name, emb in (("noise", noise_ND), ("shifted", shifted_ND))}
    assert site_leakage(noise_ND, sites_N, seed=0) == pytest.approx(1 / 3, abs=0.17)
    assert reference["noise"] == pytest.approx(1 / 3, abs=0.17)
    assert site_leakage(shifted_ND, sites_N, seed=0) > 0.95 and reference["shifted"] > 0.95
    assert site_leakage(noise_ND, np.array(["a"] * 90), seed=0) is None  # one site: nothing to predict


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_pretraining_logs_monitor_records_at_the_monitor_steps(small_cohort, tmp_path):
    store, _ = small_cohort
    config = TrainConfig(steps=5, batch_size=4, warmup_steps=1, checkpoint_every=0, log_every=100,
                         monitor_every=2, monitor_subjects=24, tensorboard=False)
    pretrain_encoder(data=DataConfig(cohort=str(store.path)), encoder=EncoderConfig("cnn3d_small", {"width": 4}),
                     task=TaskConfig("rotation", {"crop_size": 16}), train_config=config, out_dir=tmp_path,
                     progress=False)
    monitored = {r["step"]: r["monitor"] for r in _records(tmp_path) if "monitor" in r}
    assert sorted(monitored) == [0, 2, 4]  # every 2 steps, and the last
    for record in monitored.values():
        assert 1.0 <= record["rankme"] <= record["dim"] == 32  # cnn3d_small width 4: 8 * width dims
        assert record["site_chance"] == pytest.approx(1 / 3, abs=1e-3) and 0.0 <= record["site_leakage"] <= 1.0


def test_a_resumed_run_logs_the_uninterrupted_runs_monitor_values(tmp_path):
    volumes = torch.randn((12, 1, 24, 24, 24), generator=torch.Generator().manual_seed(0))
    sites = np.repeat(np.array(["a", "b"]), 6)
    config = TrainConfig(steps=8, batch_size=6, warmup_steps=2, checkpoint_every=4, log_every=100, monitor_every=2,
                         tensorboard=False)

    def run(out, seed=0, die_at=None):
        torch.manual_seed(seed)
        task = create_task("contrastive_two_crop", encoder=create_encoder("cnn3d_small", width=8), crop_size=16,
                           max_shift=4)
        batches = view_batches(volumes, task.views, batch_size=6, seed=0)

        def source(step):
            if step == die_at:
                raise KeyboardInterrupt
            return batches(step)

        monitor = EmbeddingMonitor(volumes, sites, every=config.monitor_every)
        return train(task, source, config=config, out_dir=out, progress=False, monitor=monitor)

    run(tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", die_at=5)
    run(tmp_path / "resumed", seed=123)  # a restart builds anew: the state comes from the step-4 checkpoint
    straight, resumed = ({r["step"]: r["monitor"] for r in _records(tmp_path / name) if "monitor" in r}
                         for name in ("straight", "resumed"))
    assert sorted(straight) == sorted(resumed) == [0, 2, 4, 6, 7]
    for step in (4, 6, 7):
        assert resumed[step]["rankme"] == pytest.approx(straight[step]["rankme"], rel=1e-5)
        assert resumed[step]["std_mean"] == pytest.approx(straight[step]["std_mean"], rel=1e-5)
