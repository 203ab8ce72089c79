"""One contract test for every registered encoder (timm-style)."""
import pytest
import torch

from rafmedia.core.errors import UserError
from rafmedia.engine.encoders import create_encoder, list_encoders


@pytest.mark.parametrize("name", list_encoders())  # vit_base_3d too: 88M parameters, about 8 s here
def test_encoder_contract(name):
    torch.manual_seed(0)
    encoder = create_encoder(name)
    x_BCDHW = torch.randn(2, 1, 32, 32, 32)
    features = encoder.forward_features(x_BCDHW)
    emb_BD = encoder(x_BCDHW)
    assert features.ndim == 5 and features.shape[:2] == (2, encoder.embed_dim)
    assert emb_BD.shape == (2, encoder.embed_dim)
    torch.testing.assert_close(emb_BD, features.mean(dim=(2, 3, 4)))
    emb_BD.square().mean().backward()
    grads = [p.grad for p in encoder.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("norm", ["batch", "instance", "group"])
def test_small_cnn_norms_give_finite_embeddings(norm):
    encoder = create_encoder("cnn3d_small", width=8, norm=norm).eval()
    with torch.no_grad():
        assert torch.isfinite(encoder(torch.randn(2, 1, 24, 24, 24))).all()


def test_unknown_norm_is_a_user_error():
    with pytest.raises(UserError, match="did you mean 'batch'"):
        create_encoder("cnn3d_small", norm="batchh")


@pytest.mark.parametrize("name, options", [("cnn3d_small", {"width": 4}), ("resnet10_3d", {}), ("swin_3d", {})])
def test_a_feature_pyramid_ends_with_forward_features_and_the_dense_head_input_concatenates_its_levels(name, options):
    from rafmedia.evaluate.segmentation_head import dense_features

    torch.manual_seed(0)
    encoder = create_encoder(name, **options).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        levels = encoder.forward_pyramid(x)
        assert torch.equal(levels[-1], encoder.forward_features(x))
        sizes = [level.shape[-1] for level in levels]
        assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)  # finest first, each coarser
        dense = dense_features(encoder, x)
    assert dense.shape[1] == sum(level.shape[1] for level in levels[1:])
    assert dense.shape[2:] == levels[1].shape[2:]
    torch.testing.assert_close(dense[:, :levels[1].shape[1]], levels[1])  # the second-finest level is kept as is

