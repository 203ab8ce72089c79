"""The adaptor protocol (`evaluate.adaptors`): label subsets of the requested sizes, Student-t intervals as scipy's,
embedding adaptors on the cached embeddings (an encoder forward pass counted per subject, none on a re-run), a
volume adaptor that does not apply reported with its reason, the config's errors, and `raf evaluate` writing the
block and the report's table."""
import json

import numpy as np
import pytest
import torch
from scipy import stats

from rafmedia.core.errors import UserError
from rafmedia.engine.encoders import create_encoder
from rafmedia.engine.export import export_encoder
from rafmedia.evaluate.adaptors import label_subsets, t_interval
from rafmedia.evaluate.cache import EmbeddingCache
from rafmedia.evaluate.config import AdaptorsConfig, EvaluateConfig
from rafmedia.evaluate.encoder_entries import EncoderEntry, Replicate
from rafmedia.evaluate.finetune import torch_threads
from rafmedia.evaluate.probes import few_shot_indices
from rafmedia.evaluate.runner import run_evaluation
from rafmedia.launch.cli import main


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):  # small fits on a shared 2-core box: one thread is many times faster
        yield


def test_label_subsets_have_the_requested_stratified_sizes():
    labels_N = np.array([1] * 30 + [0] * 20 + [1] * 10)  # the last 10 are the test split
    train_idx = np.arange(50)
    subsets = label_subsets(labels_N, train_idx, budgets=[0.01, 0.1, 1.0], seeds=[0, 1, 2])
    for seed in (0, 1, 2):
        small, medium, full = (subsets[(seed, b)] for b in (0.01, 0.1, 1.0))
        assert np.bincount(labels_N[small]).tolist() == [1, 1]  # at least one per class
        assert np.bincount(labels_N[medium]).tolist() == [2, 3]  # round(10% of 20), round(10% of 30)
        assert full.tolist() == list(range(50))
        assert set(small) <= set(medium) <= set(full)  # nested
        assert set(medium) <= set(train_idx)
    assert subsets[(0, 0.1)].tolist() != subsets[(1, 0.1)].tolist()  # each seed its own subset
    assert subsets[(2, 0.1)].tolist() == train_idx[few_shot_indices(labels_N[train_idx], 0.1, seed=2)].tolist()


def test_intervals_are_student_t_over_seeds_as_scipy():
    values = [0.61, 0.70, 0.66, 0.73, 0.58]
    summary = t_interval(values)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert summary["ci95"] == pytest.approx([low, high], abs=1e-12)
    assert summary["std"] == pytest.approx(np.std(values, ddof=1))
    assert t_interval([0.7, 0.7])["ci95"] == [0.7, 0.7]
    assert np.isnan(t_interval([0.7, float("nan")])["ci95"][0])  # one finite value: no interval
    assert t_interval([0.9, 0.99], bounds=(0.0, 1.0))["ci95"][1] == 1.0  # t_{0.975, 1} = 12.7: clipped to AUROC's range


@pytest.mark.parametrize("settings, message", [
    ({"adaptors": ["logistc"]}, "did you mean 'logistic'"),
    ({"adaptors": ["linear"]}, "unknown evaluate.adaptors adaptor"),  # the ridge regression is not for binary targets
    ({"budgets": [0.0, 1.0]}, "budgets must list label fractions"),
    ({"seeds": [1, 1]}, "distinct seeds"),
    ({"steps": 0}, "steps >= 1"),
    ({"augmentation": "rotate"}, "augmentation"),
    ({"options": {"lora": {"steps": 5}}}, "the same for every adaptor"),
    ({"options": {"lora": {"rnak": 8}}}, "unknown option"),
])
def test_config_validation_names_the_key_and_the_fix(settings, message):
    AdaptorsConfig(**settings).validate()  # off: nothing is checked
    with pytest.raises(UserError, match=message):
        AdaptorsConfig(enabled=True, **settings).validate()


def test_the_settings_digest_includes_the_adaptor_protocol():
    base = EvaluateConfig(cohort="c", encoders=["e"])
    changed = EvaluateConfig(cohort="c", encoders=["e"], adaptors=AdaptorsConfig(enabled=True, steps=7))
    assert base.settings_digest() != changed.settings_digest()


def counting_entry(model: torch.nn.Module, calls: list[int]) -> EncoderEntry:
    """An entry whose model counts the subjects of every forward pass on itself (not on the adaptors' copies)."""
    model.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])) if module is model else None)
    return EncoderEntry(name="counted", source="test", replicates=[Replicate(0, model)], digest="counted0")


@pytest.fixture(scope="module")
def protocol_runs(small_cohort, tmp_path_factory):
    """The same evaluation twice through one embedding cache; the forward passes of each run."""
    store, _ = small_cohort
    torch.manual_seed(0)
    model = create_encoder("cnn3d_small", width=4, num_stages=2).eval()
    adaptors = AdaptorsConfig(enabled=True, adaptors=["logistic", "knn", "mlp", "finetune_partial", "lora"],
                              budgets=[0.1, 1.0], seeds=[0, 1, 2], steps=3, batch_size=4)
    config = EvaluateConfig(cohort=str(store.path), encoders=["unused"], random_baseline=False, seeds=[0],
                            alterations=[], bootstrap_resamples=20, permutations=9, min_group_size=4, num_workers=0,
                            adaptors=adaptors, c_grid=[1.0])  # one C: no grid search, a fast test
    cache = EmbeddingCache(tmp_path_factory.mktemp("cache") / "cache.zarr")
    runs = []
    for _ in range(2):
        calls = []
        report = run_evaluation(config, progress=False, cache=cache, entries=[counting_entry(model, calls)])
        runs.append((report, list(calls)))
        model._forward_hooks.clear()
    return runs, store


def test_embedding_adaptors_reuse_the_cached_embeddings(protocol_runs):
    (first, first_calls), (_, second_calls) = protocol_runs[0]
    num_subjects = first["cohort"]["num_subjects"]
    assert sum(first_calls) == num_subjects  # embedded once, whatever the seeds, budgets and adaptors
    assert second_calls == []  # the re-run hits the cache: nothing re-embedded
    blocks = [run["encoders"]["counted"]["adaptors"] for run, _ in protocol_runs[0]]
    for name in ("logistic", "knn", "mlp", "finetune_partial"):
        for budget in ("0.1", "1.0"):
            auroc = [[s["auroc"] for s in block["results"][name]["budgets"][budget]["per_seed"]] for block in blocks]
            assert auroc[0] == auroc[1]  # seeded: the re-run gives the same numbers


def test_the_adaptor_block_holds_every_adaptor_budget_and_seed(protocol_runs):
    (report, _), _ = protocol_runs[0]
    store = protocol_runs[1]
    cell = report["encoders"]["counted"]
    block = cell["adaptors"]
    assert block["budgets"] == ["0.1", "1.0"] and block["seeds"] == [0, 1, 2]
    assert block["compute_budget"]["samples_seen"] == 12
    lora = block["results"]["lora"]
    assert lora["applicable"] is False and "no nn.Linear" in lora["reason"]
    labels = np.array([int(float(row["disease"]) > 0) for row in store.read_manifest()])
    num_train = block["num_train_split"]
    for name in ("logistic", "knn", "mlp", "finetune_partial"):
        for budget, result in block["results"][name]["budgets"].items():
            per_seed = result["per_seed"]
            assert [s["seed"] for s in per_seed] == [0, 1, 2]
            auroc = [s["auroc"] for s in per_seed]
            assert result["auroc"]["mean"] == pytest.approx(np.mean(auroc))
            low, high = result["auroc"]["ci95"]
            assert low <= result["auroc"]["mean"] <= high
            assert all(s["seconds"] > 0 for s in per_seed)
            expected = num_train if budget == "1.0" else None
            assert all(s["num_train"] == (expected or s["num_train"]) for s in per_seed)
            assert all(2 <= s["num_train"] <= num_train for s in per_seed)
    assert all(s["steps"] == 3 and s["samples_seen"] == 12
               for s in block["results"]["finetune_partial"]["budgets"]["1.0"]["per_seed"])
    positives = labels.sum()
    assert 0 < positives < len(labels)
    # the logistic adaptor at 100% of the labels with seed 0 is the cell's primary probe (same split, grid, seed)
    full = block["results"]["logistic"]["budgets"]["1.0"]["per_seed"][0]["auroc"]
    assert full == pytest.approx(cell["probes"]["disease"]["per_seed"][0]["auroc"], abs=1e-12)


def test_raf_evaluate_with_adaptors_writes_the_block_and_the_report_table(small_cohort, tmp_path):
    store, _ = small_cohort
    torch.manual_seed(0)
    weights = export_encoder(create_encoder("cnn3d_small", width=4, num_stages=2), tmp_path / "enc" / "encoder.safetensors",
                             architecture="cnn3d_small", options={"width": 4, "num_stages": 2}, card={"name": "tiny"})
    out = tmp_path / "eval"
    code = main(["evaluate", "--cohort", str(store.path), "--encoder", str(weights), "--out", str(out), "--quiet",
                 "--config", "tiny", "evaluate.seeds=[0]", "evaluate.alterations=[]", "evaluate.permutations=9",
                 "evaluate.bootstrap_resamples=20", "evaluate.c_grid=[1.0]", "evaluate.adaptors.enabled=true",
                 "evaluate.adaptors.adaptors=[logistic,finetune_full,lora]", "evaluate.adaptors.budgets=[0.1,1.0]",
                 "evaluate.adaptors.seeds=[0,1]", "evaluate.adaptors.steps=2", "evaluate.adaptors.batch_size=4"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["encoders"]) == {"tiny", "random-init cnn3d_small"}
    for entry in report["encoders"].values():  # the random baseline gets the block too
        results = entry["adaptors"]["results"]
        assert results["lora"]["applicable"] is False
        assert len(results["finetune_full"]["budgets"]["0.1"]["per_seed"]) == 2
    html = (out / "report.html").read_text()
    assert "Adaptors under one protocol" in html and "not applicable: it has no nn.Linear layer" in html
    assert "AUROC by label budget per adaptor" in html  # the figure
    markdown = (out / "report.md").read_text()
    mean = report["encoders"]["tiny"]["adaptors"]["results"]["logistic"]["budgets"]["1.0"]["auroc"]["mean"]
    assert "| tiny | logistic | " in markdown and f"{mean:.3f}" in markdown
