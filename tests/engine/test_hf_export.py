"""`raf export --hf`: a folder Hugging Face tooling loads offline (config.json + model.safetensors + README.md),
round-tripped bit for bit, its model card parsed by huggingface_hub, and read by the evaluator as an export."""
from __future__ import annotations

import json

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from rafmedia.engine.encoders import create_encoder
from rafmedia.engine.export import RafEncoder, export_encoder, load_encoder
from rafmedia.evaluate.encoder_entries import build_entries
from rafmedia.evaluate.encoder_sources import load_any_encoder
from rafmedia.launch.cli import main

CARD = {"name": "contrastive cnn", "task": "contrastive_two_crop", "task_options": {"crop_size": 16}, "steps": 3,
        "licence": "Apache-2.0", "data": {"cohort": "runs/synth/cohort.zarr", "num_subjects": 8, "licence": "CC0-1.0",
                                         "sources": [{"name": "synthetic", "licence": "CC0-1.0", "subjects": 8}]},
        "preprocessing": {"orientation": "RAS", "spacing": [1.5, 1.5, 1.5], "channels": ["image"], "input": "image",
                          "input_size": [16, 16, 16], "intensity": {"image": {"policy": {"name": "mr_zscore"},
                                                                             "then": "per-volume z-score"}}},
        "code_version": {"rafmedia": "0.1.0", "git": {"commit": "0123456789abcdef", "dirty": False}}}


@pytest.fixture
def exported(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may be fetched: the folder alone must do
    torch.manual_seed(0)
    encoder = create_encoder("cnn3d_small", width=4).eval()
    weights = export_encoder(encoder, tmp_path / "run" / "encoder.safetensors", architecture="cnn3d_small",
                             options={"width": 4}, card=CARD)
    assert main(["export", "--hf", str(tmp_path / "hf"), str(weights)]) == 0
    return encoder, weights, tmp_path / "hf"


def test_from_pretrained_rebuilds_the_encoder_bit_for_bit_offline(exported):
    encoder, _, folder = exported
    assert sorted(path.name for path in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    reloaded = RafEncoder.from_pretrained(folder)
    x_BCDHW = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(reloaded(x_BCDHW), encoder(x_BCDHW))
        assert torch.equal(reloaded.forward_features(x_BCDHW), encoder.forward_features(x_BCDHW))
    assert reloaded.embed_dim == encoder.embed_dim
    # plain safetensors: the encoder's own state dict, no wrapper prefix
    state = load_file(str(folder / "model.safetensors"))
    assert state.keys() == encoder.state_dict().keys()
    assert all(torch.equal(state[key], value) for key, value in encoder.state_dict().items())
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "cnn3d_small" and config["options"] == {"width": 4}
    assert config["embed_dim"] == encoder.embed_dim
    for key in ("preprocessing", "licence", "data", "code_version"):
        assert config[key] == CARD[key]


def test_model_card_front_matter_parses_with_huggingface_hub(exported):
    card = ModelCard.load(exported[2] / "README.md")
    assert card.data.license == "apache-2.0" and card.data.library_name == "rafmedia"
    assert {"rafmedia", "contrastive_two_crop", "cnn3d_small"} <= set(card.data.tags)
    assert "spacing (mm): [1.5, 1.5, 1.5]" in card.text and "RafEncoder.from_pretrained" in card.text
    assert "synthetic (CC0-1.0, 8 subjects)" in card.text


def test_the_evaluator_loads_the_folder_as_an_export(exported):
    encoder, weights, folder = exported
    module, info = load_any_encoder(str(folder))
    assert info["source"] == "rafmedia" and info["weights"] == str(folder / "model.safetensors")
    x_BCDHW = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(module(x_BCDHW), encoder(x_BCDHW))
    assert load_encoder(folder)[1]["name"] == load_encoder(weights)[1]["name"] == "contrastive cnn"
    entry = build_entries([str(folder)], options={}, seeds=[0], random_baseline=False)[0]
    assert entry.name == "contrastive cnn" and entry.info["licence"] == "Apache-2.0"


def test_an_unrelated_folder_is_not_overwritten(exported, tmp_path, capsys):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert main(["export", "--hf", str(other), str(exported[1])]) == 2
    assert "is not a rafmedia Hugging Face export" in capsys.readouterr().err
    assert (other / "keep.txt").read_text() == "mine"
    assert main(["export", "--hf", str(exported[2]), str(exported[1])]) == 0  # an earlier export is replaced
