"""Evaluator plumbing: encoder entries and the random baseline, binary labels of a target column."""
import pytest
import torch

from rafmedia.core.errors import UserError
from rafmedia.engine.encoders import create_encoder
from rafmedia.engine.export import export_encoder
from rafmedia.evaluate.cohort_data import binary_labels
from rafmedia.evaluate.encoder_entries import build_entries


def _export(folder, seed):
    torch.manual_seed(seed)
    folder.mkdir()
    return str(export_encoder(create_encoder("cnn3d_small", width=8), folder / "encoder.safetensors",
                              architecture="cnn3d_small", options={"width": 8}, card={"name": "recipe"}))


def test_entries_are_named_uniquely_and_the_random_baseline_differs_per_seed(tmp_path):
    first, second = _export(tmp_path / "run0", 0), _export(tmp_path / "run1", 1)
    entries = build_entries([first, second], options={}, seeds=[0, 1], random_baseline=True)
    assert [e.name for e in entries] == ["recipe (run0/encoder.safetensors)", "recipe (run1/encoder.safetensors)",
                                         "random-init cnn3d_small"]
    random_models = [r.model for r in entries[-1].replicates]
    weights = [next(m.parameters()).detach() for m in random_models]
    assert not torch.equal(weights[0], weights[1])  # one fresh initialisation per seed
    assert entries[0].replicates[0].model is entries[0].replicates[1].model  # a checkpoint is one model
    with pytest.raises(UserError, match="given twice"):
        build_entries([first, first], options={}, seeds=[0], random_baseline=True)


def test_binary_labels():
    rows = [{"disease": 0, "sex": "F"}, {"disease": 2, "sex": "M"}, {"disease": 1, "sex": "F"}]
    assert binary_labels(rows, "disease").tolist() == [0, 1, 1]
    assert binary_labels(rows, "sex").tolist() == [0, 1, 0]
    with pytest.raises(UserError, match="must be binary"):
        binary_labels([{"site": "a"}, {"site": "b"}, {"site": "c"}], "site")
