"""The 3D ViT, the SwinUNETR encoder and the timm per-slice adapter, checked against MONAI and timm themselves."""
import pytest
import torch

from rafmedia.core.errors import UserError
from rafmedia.engine.encoders import create_encoder
from rafmedia.engine.encoders.transformers import VIT_SIZES
from rafmedia.engine.export import export_encoder, load_encoder
from rafmedia.engine.torchvision_compat import import_timm


@pytest.mark.parametrize("img_size, patch_size", [(32, 8), ((48, 32, 16), (16, 8, 4))])
def test_vit_feature_grid_is_img_size_over_patch_size(img_size, patch_size):
    encoder = create_encoder("vit_3d", img_size=img_size, patch_size=patch_size, hidden_size=24, num_layers=1,
                             num_heads=2).eval()
    img = (img_size,) * 3 if isinstance(img_size, int) else img_size
    patch = (patch_size,) * 3 if isinstance(patch_size, int) else patch_size
    with torch.no_grad():
        features = encoder.forward_features(torch.randn(1, 1, *img))
    assert features.shape == (1, 24, *(i // p for i, p in zip(img, patch)))


def test_vit_features_follow_monai_token_order():
    """Grid cell (i, j, k) holds MONAI ViT's token number i*h*w + j*w + k: the same weights in MONAI agree."""
    from monai.networks.nets import ViT

    torch.manual_seed(0)
    encoder = create_encoder("vit_3d", img_size=(32, 16, 16), patch_size=8, hidden_size=24, num_layers=2,
                             num_heads=2).eval()
    monai_vit = ViT(in_channels=1, img_size=(32, 16, 16), patch_size=8, hidden_size=24, mlp_dim=96, num_layers=2,
                    num_heads=2, qkv_bias=True).eval()
    monai_vit.load_state_dict({k.removeprefix("vit."): v for k, v in encoder.state_dict().items()})
    x = torch.randn(2, 1, 32, 16, 16)
    with torch.no_grad():
        tokens_BND, _ = monai_vit(x)
        features = encoder.forward_features(x)
    assert features.shape == (2, 24, 4, 2, 2)
    torch.testing.assert_close(features[:, :, 3, 1, 0], tokens_BND[:, 3 * 4 + 1 * 2 + 0])
    torch.testing.assert_close(features.flatten(2).transpose(1, 2), tokens_BND)


def test_vit_cls_pool_returns_the_cls_token_and_trains_it():
    torch.manual_seed(0)
    encoder = create_encoder("vit_3d", hidden_size=24, num_layers=1, num_heads=2, pool="cls")
    x = torch.randn(2, 1, 32, 32, 32)
    emb_BD = encoder(x)
    assert emb_BD.shape == (2, 24)
    torch.testing.assert_close(emb_BD, encoder.tokens(x)[:, 0])
    assert not torch.allclose(emb_BD, encoder.forward_features(x).mean(dim=(2, 3, 4)))
    emb_BD.square().mean().backward()
    assert encoder.vit.cls_token.grad is not None and encoder.vit.cls_token.grad.abs().sum() > 0


@pytest.mark.parametrize("size, width, heads", [("tiny", 192, 3), ("base", 768, 12)])
def test_vit_size_names_match_timm_sizes(size, width, heads):
    encoder = create_encoder(f"vit_{size}_3d", img_size=32, patch_size=16)
    assert VIT_SIZES[size] == (width, 12, heads)
    assert encoder.embed_dim == width and len(encoder.vit.blocks) == 12
    assert encoder.vit.blocks[0].attn.num_heads == heads
    if size == "base":  # timm's vit_base_patch16_224 has 85,054,464 parameters in its 12 blocks (counted there)
        assert sum(p.numel() for p in encoder.vit.blocks.parameters() if p.requires_grad) == 85_054_464


def test_vit_refuses_wrong_sizes_with_a_clear_message():
    with pytest.raises(UserError, match="divisible by patch_size"):
        create_encoder("vit_3d", img_size=30, patch_size=8)
    encoder = create_encoder("vit_3d", hidden_size=24, num_layers=1, num_heads=2)
    with pytest.raises(UserError, match="built for img_size"):
        encoder(torch.randn(1, 1, 16, 16, 16))
    with pytest.raises(UserError, match="did you mean 'cls'"):
        create_encoder("vit_3d", pool="clss")


def test_swin_weights_load_into_monai_swinunetr_and_give_its_last_stage():
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(0)
    encoder = create_encoder("swin_3d", feature_size=12).eval()
    assert encoder.embed_dim == 12 * 16
    try:
        unetr = SwinUNETR(in_channels=1, out_channels=2, feature_size=12)
    except TypeError:  # older MONAI still asks for img_size
        unetr = SwinUNETR(img_size=(32, 32, 32), in_channels=1, out_channels=2, feature_size=12)
    unetr.swinViT.load_state_dict({k.removeprefix("swinViT."): v for k, v in encoder.state_dict().items()})
    unetr.eval()
    x = torch.randn(1, 1, 64, 32, 32)
    with torch.no_grad():
        features = encoder.forward_features(x)
        expected = unetr.swinViT(x, normalize=True)[-1]
    assert features.shape == (1, 192, 2, 1, 1)
    torch.testing.assert_close(features, expected)
    with pytest.raises(UserError, match="divisible by 32"):
        encoder(torch.randn(1, 1, 40, 32, 32))


def _by_hand(model, x_BCDHW, axis_dim, neighbours):
    """Runs `model` on each slice (with its neighbours, border slices repeated) one at a time; averages."""
    count = x_BCDHW.shape[axis_dim]
    embeddings = []
    for s in range(count):
        picks = [min(max(s + o, 0), count - 1) for o in range(-neighbours, neighbours + 1)]
        slab = torch.stack([x_BCDHW.select(axis_dim, i) for i in picks], dim=2)  # (B, C, 2k+1, a, b)
        slab = slab.flatten(1, 2)  # channel c*(2k+1) + offset
        embeddings.append(model.forward_features(slab).mean(dim=(2, 3)))
    return torch.stack(embeddings).mean(dim=0)


@pytest.mark.parametrize("axis, axis_dim, neighbours", [("D", 2, 0), ("H", 3, 1), ("W", 4, 1)])
def test_timm_slices_equal_running_timm_slice_by_slice(axis, axis_dim, neighbours):
    torch.manual_seed(0)
    encoder = create_encoder("timm2d_slices", backbone="resnet18", axis=axis, neighbours=neighbours).eval()
    reference = import_timm().create_model("resnet18", pretrained=False, num_classes=0, in_chans=2 * neighbours + 1)
    reference.load_state_dict({k.removeprefix("backbone."): v for k, v in encoder.state_dict().items()})
    reference.eval()
    shape = [2, 1, 32, 40, 48]
    shape[axis_dim] = 5  # few slices along the chosen axis, 2D images of at least 32 x 32
    x = torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), _by_hand(reference, x, axis_dim, neighbours), atol=1e-5, rtol=1e-5)
        assert encoder.forward_features(x).shape[2] == x.shape[axis_dim]


def test_timm_slices_25d_stacks_the_neighbours_as_channels():
    encoder = create_encoder("timm2d_slices", backbone="resnet18", neighbours=1)
    x = torch.arange(4.0).view(1, 1, 4, 1, 1).expand(1, 1, 4, 2, 2)
    slabs = encoder.slices(x)
    assert slabs.shape == (4, 3, 2, 2)
    assert slabs[:, :, 0, 0].tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]]


def test_timm_slices_unknown_backbone_is_a_user_error():
    with pytest.raises(UserError, match="did you mean 'resnet18'"):
        create_encoder("timm2d_slices", backbone="resnet18x")


def test_timm_slices_take_a_name_with_a_pretrained_tag():
    from rafmedia.engine.torchvision_compat import import_timm

    timm = import_timm()
    tagged = create_encoder("timm2d_slices", backbone="resnet18.a1_in1k")  # tag chooses weights; none are downloaded
    plain = timm.create_model("resnet18", num_classes=0, in_chans=1)
    assert type(tagged.backbone) is type(plain) and tagged.embed_dim == plain.num_features == 512
    assert tagged.backbone.pretrained_cfg["tag"] == "a1_in1k"


@pytest.mark.parametrize("name, options", [
    ("vit_3d", {"hidden_size": 24, "num_layers": 2, "num_heads": 2, "pool": "cls"}),
    ("timm2d_slices", {"backbone": "resnet18", "neighbours": 1}),
])
def test_export_and_load_round_trip(tmp_path, name, options):
    torch.manual_seed(0)
    encoder = create_encoder(name, **options).eval()
    weights = export_encoder(encoder, tmp_path / "encoder.safetensors", architecture=name, options=options,
                             card={"task": "test"})
    loaded, card = load_encoder(weights)
    assert card["architecture"] == name and card["embed_dim"] == encoder.embed_dim
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), encoder(x), atol=0, rtol=0)
