"""Loading encoders from every source: embeddings against the source library run directly, weights-file
mismatches explained, prefixes stripped only when exact, and pickled code never executed."""
import pickle
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from rafmedia.core.errors import UserError
from rafmedia.engine.encoders import create_encoder
from rafmedia.engine.export import export_encoder
from rafmedia.engine.torchvision_compat import import_timm
from rafmedia.evaluate.encoder_sources import list_encoder_sources, load_any_encoder

RESNET = {"spatial_dims": 3, "n_input_channels": 1, "feed_forward": False}
SMALL_RESNET = {"block": "basic", "layers": [1, 1, 1, 1], "block_inplanes": [4, 8, 16, 32], **RESNET}
CONV = {"in_channels": 1, "out_channels": 4, "kernel_size": 3}


def volume(shape=(2, 1, 16, 16, 16), seed=0):
    return torch.from_numpy(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def seeded(build, seed=1):
    torch.manual_seed(seed)
    return build().eval()


class TupleNet(nn.Module):
    """Returns (tokens (B, N, C), an auxiliary tensor), as transformer encoders often do."""

    def __init__(self, channels: int = 6):
        super().__init__()
        self.proj = nn.Conv3d(1, channels, kernel_size=4, stride=4)

    def forward(self, x_BCDHW):
        tokens = self.proj(x_BCDHW).flatten(2).transpose(1, 2)  # (B, N, C)
        return tokens, tokens.sum()


def monai_resnet(**options):
    from monai.networks import nets

    return nets.ResNet(**{**SMALL_RESNET, **options})


def test_every_source_is_covered():
    assert list_encoder_sources() == ["module", "monai", "rafmedia", "timm"]


def test_our_export_loads_embeds_like_the_original_and_has_a_content_digest(tmp_path):
    encoder = seeded(lambda: create_encoder("cnn3d_small", width=4))
    path = export_encoder(encoder, tmp_path / "a" / "encoder.safetensors", architecture="cnn3d_small",
                          options={"width": 4}, card={"name": "recipe"})
    module, info = load_any_encoder(str(path))
    x = volume()
    with torch.no_grad():
        assert torch.equal(module(x), encoder(x))
    assert info["embed_dim"] == 32 and info["adapter"] == "none" and info["source"] == "rafmedia"

    moved = tmp_path / "b"
    moved.mkdir()
    for file in (tmp_path / "a").iterdir():
        shutil.copy(file, moved / file.name)
    assert load_any_encoder(str(moved / "encoder.safetensors"))[1]["digest"] == info["digest"]  # bytes, not place
    other = export_encoder(seeded(lambda: create_encoder("cnn3d_small", width=4), seed=2),
                           tmp_path / "c" / "encoder.safetensors", architecture="cnn3d_small", options={"width": 4},
                           card={"name": "recipe"})
    assert load_any_encoder(str(other))[1]["digest"] != info["digest"]


def test_timm_weights_embed_per_slice_like_timm_itself(tmp_path):
    timm = import_timm()
    classifier_model = seeded(lambda: timm.create_model("resnet18", pretrained=False, num_classes=10, in_chans=1))
    torch.save(classifier_model.state_dict(), tmp_path / "resnet18.pt")
    module, info = load_any_encoder("timm:resnet18", weights=str(tmp_path / "resnet18.pt"))
    assert info["dropped_keys"] == ["fc.bias", "fc.weight"] and info["embed_dim"] == 512

    reference = timm.create_model("resnet18", pretrained=False, num_classes=0, in_chans=1).eval()
    reference.load_state_dict({k: v for k, v in classifier_model.state_dict().items() if not k.startswith("fc.")})
    x = volume((2, 1, 3, 32, 32))
    with torch.no_grad():
        expected = torch.stack([reference(x[:, :, d]) for d in range(x.shape[2])]).mean(dim=0)
        assert torch.allclose(module(x), expected, atol=1e-5)


@pytest.mark.parametrize("spec", ["monai:ResNet", "monai:resnet10"])
def test_monai_networks_by_class_or_function_name(tmp_path, spec):
    from monai.networks import nets

    options = SMALL_RESNET if spec == "monai:ResNet" else RESNET
    network = seeded(lambda: getattr(nets, spec.split(":")[1])(**options))
    save_file(network.state_dict(), str(tmp_path / "w.safetensors"))
    module, info = load_any_encoder(spec, weights=str(tmp_path / "w.safetensors"), options=options)
    x = volume()
    with torch.no_grad():
        assert torch.equal(module(x), network(x))
    assert module(x).shape == (2, module.embed_dim) and info["embed_dim"] == module.embed_dim


def test_a_module_factory_returning_a_feature_map_is_pooled_mean_or_max(tmp_path):
    conv = seeded(lambda: nn.Conv3d(**CONV))
    torch.save(conv.state_dict(), tmp_path / "conv.pt")
    x = volume()
    with torch.no_grad():
        feature_map = conv(x)
    for pool, expected in (("mean", feature_map.mean(dim=(2, 3, 4))), ("max", feature_map.amax(dim=(2, 3, 4)))):
        module, info = load_any_encoder("torch.nn:Conv3d", weights=str(tmp_path / "conv.pt"),
                                        options={**CONV, "feature_pool": pool})
        assert module.embed_dim == info["embed_dim"] == 4 and info["adapter"] == f"{pool} over space"
        with torch.no_grad():
            assert torch.allclose(module(x), expected, atol=1e-6)


def test_a_tuple_output_is_selected_and_its_tokens_averaged(tmp_path):
    network = seeded(TupleNet)
    torch.save(network.state_dict(), tmp_path / "tuple.pt")
    module, info = load_any_encoder("module:tests.evaluate.test_encoders:TupleNet", weights=str(tmp_path / "tuple.pt"))
    x = volume()
    with torch.no_grad():
        expected = network.proj(x).mean(dim=(2, 3, 4))  # the token mean is the mean over the patch grid
        assert torch.allclose(module(x), expected, atol=1e-6)
    assert info["embed_dim"] == 6 and info["adapter"] == "output[0], mean over tokens"


def test_without_weights_the_module_is_the_same_every_time_and_so_is_its_digest():
    (first, info_a), (second, info_b) = (load_any_encoder("torch.nn:Conv3d", options=CONV) for _ in range(2))
    assert torch.equal(first.network.weight, second.network.weight) and info_a["digest"] == info_b["digest"]
    assert load_any_encoder("torch.nn:Conv3d", options={**CONV, "out_channels": 5})[1]["digest"] != info_a["digest"]


def test_editing_a_factorys_source_file_changes_the_digest(tmp_path, monkeypatch):
    import importlib

    source = tmp_path / "my_factory_module.py"
    source.write_text("from torch import nn\n\ndef build(width=4):\n    return nn.Conv3d(1, width, 3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    first = load_any_encoder("my_factory_module:build")[1]["digest"]
    assert load_any_encoder("my_factory_module:build")[1]["digest"] == first
    source.write_text(source.read_text().replace("3)", "3, padding=1)"))  # same options and weights, other module
    importlib.invalidate_caches()
    assert load_any_encoder("my_factory_module:build")[1]["digest"] != first


def test_ddp_prefix_is_stripped_and_reported(tmp_path):
    network = seeded(monai_resnet)
    save_file({f"module.{k}": v for k, v in network.state_dict().items()}, str(tmp_path / "ddp.safetensors"))
    module, info = load_any_encoder("monai:ResNet", weights=str(tmp_path / "ddp.safetensors"), options=SMALL_RESNET)
    assert info["stripped_prefix"] == "module."
    x = volume()
    with torch.no_grad():
        assert torch.equal(module(x), network(x))


def test_a_checkpoint_dict_with_nested_prefixes_loads_from_its_state_dict_entry(tmp_path):
    network = seeded(monai_resnet)
    state = {f"module.encoder.{k}": v for k, v in network.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "ckpt.pt")
    module, info = load_any_encoder("monai:ResNet", weights=str(tmp_path / "ckpt.pt"), options=SMALL_RESNET)
    assert (info["state_dict_key"], info["stripped_prefix"]) == ("state_dict", "module.encoder.")
    with torch.no_grad():
        assert torch.equal(module(volume()), network(volume()))


def test_a_checkpoint_with_two_state_dicts_needs_state_dict_key(tmp_path):
    teacher, student = seeded(monai_resnet, seed=1), seeded(monai_resnet, seed=2)
    torch.save({"teacher": teacher.state_dict(), "student": student.state_dict(), "epoch": 9}, tmp_path / "dino.pt")
    with pytest.raises(UserError, match=r"state_dict_key=\.\.\. \(entries holding tensors: \['teacher', 'student'\]\)"):
        load_any_encoder("monai:ResNet", weights=str(tmp_path / "dino.pt"), options=SMALL_RESNET)
    module, info = load_any_encoder("monai:ResNet", weights=str(tmp_path / "dino.pt"),
                                    options={**SMALL_RESNET, "state_dict_key": "student"})
    assert info["state_dict_key"] == "student"
    with torch.no_grad():
        assert torch.equal(module(volume()), student(volume()))
        assert not torch.equal(module(volume()), teacher(volume()))


def test_a_prefix_is_not_stripped_when_other_keys_remain_but_the_error_suggests_it(tmp_path):
    network = seeded(monai_resnet)
    state = {f"encoder.{k}": v for k, v in network.state_dict().items()}
    state["head.weight"] = torch.zeros(2, 32)
    save_file(state, str(tmp_path / "with_head.safetensors"))
    with pytest.raises(UserError) as error:
        load_any_encoder("monai:ResNet", weights=str(tmp_path / "with_head.safetensors"), options=SMALL_RESNET)
    message = str(error.value)
    expected_keys = len(network.state_dict())
    assert f"{expected_keys} missing keys" in message and f"{expected_keys + 1} unexpected keys" in message
    hint = f"{expected_keys} of the module's {expected_keys} keys are in the file under the prefix 'encoder.'"
    assert hint in message


def test_weights_of_another_architecture_list_missing_and_unexpected_keys_with_counts(tmp_path):
    conv = seeded(lambda: nn.Conv3d(**CONV))
    torch.save(conv.state_dict(), tmp_path / "conv.pt")
    with pytest.raises(UserError) as error:
        load_any_encoder("monai:ResNet", weights=str(tmp_path / "conv.pt"), options=SMALL_RESNET)
    message = str(error.value)
    module_keys = set(monai_resnet().state_dict())
    missing, unexpected = module_keys - set(conv.state_dict()), set(conv.state_dict()) - module_keys
    assert f"{len(missing)} missing keys" in message and f"{len(unexpected)} unexpected keys" in message
    assert "['bias', 'weight']" in message and sorted(missing)[0] in message and "another architecture" in message


def test_right_keys_with_wrong_shapes_name_the_tensors(tmp_path):
    torch.save(nn.Conv3d(**{**CONV, "out_channels": 3}).state_dict(), tmp_path / "conv3.pt")
    with pytest.raises(UserError, match=r"wrong shape.*weight: file \(3, 1, 3, 3, 3\) vs model \(4, 1, 3, 3, 3\)"):
        load_any_encoder("torch.nn:Conv3d", weights=str(tmp_path / "conv3.pt"), options=CONV)


class WritesMarker:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('unpickled')",)


def test_a_malicious_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "marker"
    with open(tmp_path / "evil.pt", "wb") as handle:
        pickle.dump({"weight": WritesMarker(marker)}, handle)
    with pytest.raises(UserError, match="holds pickled Python objects.*never unpickles"):
        load_any_encoder("torch.nn:Conv3d", weights=str(tmp_path / "evil.pt"), options=CONV)
    assert not marker.exists()
    with open(tmp_path / "evil.pt", "rb") as handle:  # the payload is live: plain unpickling runs it
        pickle.load(handle)
    assert marker.read_text() == "unpickled"


def test_a_whole_pickled_module_is_refused_with_how_to_resave_it(tmp_path):
    torch.save(nn.Conv3d(**CONV), tmp_path / "full_module.pt")
    with pytest.raises(UserError, match=r"holds pickled Python objects, not only tensors \(Unsupported global: GLOBAL "
                                        r"torch.nn.modules.conv.Conv3d\).*state_dict\(\)"):
        load_any_encoder("torch.nn:Conv3d", weights=str(tmp_path / "full_module.pt"), options=CONV)


@pytest.mark.parametrize("spec, options, match", [
    ("timn:resnet18", {}, "did you mean 'timm'"),
    ("monai:ResNot", {}, "unknown MONAI network 'ResNot'; did you mean 'ResNet'"),
    ("monai:ResNet", {**SMALL_RESNET, "n_input_channel": 1}, "no option 'n_input_channel'; did you mean"),
    ("no_such_package.models:build", {}, "cannot import 'no_such_package.models'"),
    ("torch.nn:Conv3d", {**CONV, "feature_pool": "median"}, "unknown feature_pool 'median'"),
    ("resnet18", {}, "is not one of"),
])
def test_spec_and_option_mistakes_teach(spec, options, match):
    with pytest.raises(UserError, match=match):
        load_any_encoder(spec, options=options)


def test_a_dummy_forward_that_fails_asks_for_input_shape():
    options = {"in_channels": 1, "img_size": 16, "patch_size": 8, "spatial_dims": 3, "hidden_size": 48,
               "mlp_dim": 48, "num_layers": 1, "num_heads": 2}
    with pytest.raises(UserError, match=r"set options input_shape=\[C, D, H, W\]"):
        load_any_encoder("monai:ViT", options=options)
    module, info = load_any_encoder("monai:ViT", options={**options, "input_shape": [1, 16, 16, 16]})
    assert info["adapter"] == "output[0], mean over tokens" and module(volume()).shape == (2, 48)
