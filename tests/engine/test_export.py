"""Weights plus card: the encoder export round trip, and the errors of a missing, foreign or unfitting export."""
import json

import pytest
import torch

from rafmedia.core.errors import UserError
from rafmedia.engine.encoders import create_encoder
from rafmedia.engine.export import card_path, export_encoder, load_encoder
from rafmedia.engine.tasks.shape import load_shape_prior


def test_export_round_trip_gives_identical_embeddings(tmp_path):
    torch.manual_seed(0)
    encoder = create_encoder("cnn3d_small", width=8).eval()
    weights = export_encoder(encoder, tmp_path / "enc.safetensors", architecture="cnn3d_small",
                             options={"width": 8}, card={"name": "test"})
    loaded, card = load_encoder(weights)
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), encoder(x), rtol=0, atol=0)
    assert card["embed_dim"] == encoder.embed_dim and card["architecture"] == "cnn3d_small"


def test_weights_that_do_not_fit_name_the_keys(tmp_path):
    encoder = create_encoder("cnn3d_small", width=8)
    weights = export_encoder(encoder, tmp_path / "enc.safetensors", architecture="cnn3d_small",
                             options={"width": 8}, card={})
    card_file = card_path(weights)
    card = json.loads(card_file.read_text())
    card["options"]["num_stages"] = 2  # the weights have a third stage this architecture lacks
    card_file.write_text(json.dumps(card))
    with pytest.raises(UserError, match=r"does not fit architecture 'cnn3d_small' .*: missing keys \[\], "
                                        r"unexpected keys \['features\.5\.0\.weight'.* and \d+ more"):
        load_encoder(weights)


def test_missing_weights_a_missing_card_and_a_card_of_another_kind_are_named(tmp_path):
    with pytest.raises(UserError, match="encoder weights not found: .*nowhere.safetensors"):
        load_encoder(tmp_path / "nowhere.safetensors")
    weights = export_encoder(create_encoder("cnn3d_small", width=4), tmp_path / "enc.safetensors",
                             architecture="cnn3d_small", options={"width": 4}, card={})
    assert card_path(weights) == tmp_path / "enc.card.json"
    with pytest.raises(UserError, match="is a 'rafmedia.encoder/1' card, not a shape prior card "
                                        r"\(rafmedia.shape_prior/1\)"):
        load_shape_prior(weights)
    card_path(weights).unlink()
    with pytest.raises(UserError, match="has no model card enc.card.json next to it; export it with `raf pretrain`"):
        load_encoder(weights)
