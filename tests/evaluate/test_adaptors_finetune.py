"""The adaptors beyond the linear probe: the MLP probe against scikit-learn's on a set no linear model separates,
partial fine-tuning (frozen part bit-identical, tail changed), LoRA through peft (trainable parameters counted by
hand, base weights unchanged, merged weight = W + B A alpha / r), and the compute budget counted from the outside."""
import warnings

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from rafmedia.core.errors import UserError
from rafmedia.engine.encoders import create_encoder
from rafmedia.evaluate.finetune import encoder_blocks, flip, linear_layer_names, tail_modules, torch_threads
from rafmedia.evaluate.probes import categorical_probes, create_probe, describe_probes, list_probes, volume_adaptors

VIT = {"img_size": 16, "patch_size": 8, "hidden_size": 24, "num_layers": 2, "num_heads": 2}


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):  # small fits on a shared 2-core box: one thread is many times faster
        yield


def volumes(num: int = 8, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Random volumes whose positives are brighter in one corner."""
    generator = torch.Generator().manual_seed(seed)
    x_NCDHW = torch.randn(num, 1, size, size, size, generator=generator)
    labels_N = np.arange(num) % 2
    x_NCDHW[labels_N == 1, :, : size // 2, : size // 2] += 1.0
    return x_NCDHW, labels_N


def test_adaptors_are_registered_probes_tagged_with_their_inputs():
    assert {"mlp", "finetune_full", "finetune_partial", "lora"} <= set(list_probes())
    assert set(volume_adaptors()) == {"finetune_full", "finetune_partial", "lora"}
    assert "mlp" in categorical_probes() and not set(volume_adaptors()) & set(categorical_probes())
    assert "lora (targets=categorical, inputs=volumes)" in describe_probes()
    assert "mlp (targets=categorical, inputs=embeddings)" in describe_probes()
    with pytest.raises(UserError, match="did you mean 'flips'"):
        create_probe("finetune_full", augmentation="flip")
    with pytest.raises(UserError, match="steps >= 1"):
        create_probe("lora", steps=0)


def test_the_mlp_separates_xor_where_logistic_cannot_as_sklearn_does():
    rng = np.random.default_rng(0)
    x_N2 = rng.uniform(-1, 1, size=(400, 2))
    y_N = ((x_N2[:, 0] > 0) ^ (x_N2[:, 1] > 0)).astype(int)
    train, test = slice(0, 300), slice(300, None)
    mlp = create_probe("mlp", seed=0).fit(x_N2[train], y_N[train])
    logistic = create_probe("logistic").fit(x_N2[train], y_N[train])
    mlp_auroc = roc_auc_score(y_N[test], mlp.scores(x_N2[test]))
    assert mlp_auroc > 0.95 and roc_auc_score(y_N[test], logistic.scores(x_N2[test])) < 0.65
    reference = make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(64,), alpha=1e-3, max_iter=300,
                                                              learning_rate_init=1e-2, random_state=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "did not converge": the fixed budget
        reference.fit(x_N2[train], y_N[train])
    np.testing.assert_allclose(mlp.scores(x_N2[test]), reference.predict_proba(x_N2[test])[:, 1], atol=1e-12)
    assert (mlp.predict(x_N2[test]) == y_N[test]).mean() > 0.9
    linear_reference = LogisticRegression().fit(x_N2[train], y_N[train])
    assert roc_auc_score(y_N[test], linear_reference.predict_proba(x_N2[test])[:, 1]) < 0.65  # no line separates XOR


def test_blocks_are_found_without_naming_the_architecture():
    vit = create_encoder("vit_3d", **VIT)
    assert [type(b).__name__ for b in encoder_blocks(vit)] == ["PatchEmbeddingBlock", "TransformerBlock",
                                                               "TransformerBlock", "LayerNorm"]
    cnn = create_encoder("cnn3d_small", width=4, num_stages=2)
    assert encoder_blocks(cnn) == list(cnn.features)  # stem + (conv, conv) per stage
    swin = create_encoder("swin_3d", feature_size=12, depths=(1, 1), num_heads=(1, 1))
    assert len(encoder_blocks(swin)) == 3  # patch embedding + two stages
    assert tail_modules(cnn, 2) == list(cnn.features[-2:])  # the last stage
    with pytest.raises(UserError, match="tail_blocks"):
        tail_modules(cnn, 5)


def test_partial_fine_tuning_trains_only_the_tail_and_leaves_the_encoder_untouched():
    torch.manual_seed(0)
    cnn = create_encoder("cnn3d_small", width=4, num_stages=2)
    before = {name: value.clone() for name, value in cnn.state_dict().items()}
    x_NCDHW, labels_N = volumes()
    adaptor = create_probe("finetune_partial", steps=4, batch_size=4, lr=1e-2, tail_blocks=2).fit(cnn, x_NCDHW, labels_N)
    for name, value in cnn.state_dict().items():  # the caller's encoder is never trained
        assert torch.equal(value, before[name]), name
    tuned = adaptor.network_.encoder.state_dict()
    tail = {f"features.{index}." for index in (3, 4)}
    for name, value in tuned.items():
        in_tail = any(name.startswith(prefix) for prefix in tail)
        if in_tail and value.is_floating_point() and "running" not in name:
            assert not torch.equal(value, before[name]), f"{name} did not train"
        elif not in_tail:
            assert torch.equal(value, before[name]), f"frozen {name} changed"  # weights and batch-norm statistics
    tail_size = sum(p.numel() for block in cnn.features[-2:] for p in block.parameters())
    assert adaptor.num_trainable_ == tail_size
    scores = adaptor.scores(x_NCDHW)
    assert scores.shape == (8,) and np.all((0 <= scores) & (scores <= 1))
    assert set(adaptor.predict(x_NCDHW)) <= {0, 1}


def test_full_fine_tuning_trains_every_parameter():
    torch.manual_seed(0)
    cnn = create_encoder("cnn3d_small", width=4, num_stages=2)
    x_NCDHW, labels_N = volumes()
    adaptor = create_probe("finetune_full", steps=3, batch_size=4, lr=1e-2).fit(cnn, x_NCDHW, labels_N)
    assert adaptor.num_trainable_ == sum(p.numel() for p in cnn.parameters())
    changed = [not torch.equal(a, b) for a, b in zip(adaptor.network_.encoder.parameters(), cnn.parameters())]
    assert all(changed)


def test_the_compute_budget_is_honoured_and_counted_from_outside():
    """Forward passes with gradients on the encoder are counted by a hook: steps of batch_size volumes each."""
    torch.manual_seed(0)
    cnn = create_encoder("cnn3d_small", width=4, num_stages=2)
    seen = []
    cnn.register_forward_hook(lambda module, inputs, output: seen.append((torch.is_grad_enabled(), len(inputs[0]))))
    x_NCDHW, labels_N = volumes()
    adaptor = create_probe("finetune_partial", steps=7, batch_size=3).fit(cnn, x_NCDHW, labels_N)
    training = [size for grad, size in seen if grad]
    assert training == [3] * 7 and adaptor.samples_seen_ == 21
    adaptor.scores(x_NCDHW)
    assert sum(size for grad, size in seen if not grad) == 8  # scoring: every volume once, without gradients


def test_fits_are_seeded_and_flips_are_a_true_augmentation():
    cnn = create_encoder("cnn3d_small", width=4, num_stages=2)
    x_NCDHW, labels_N = volumes()
    scores = [create_probe("finetune_full", steps=3, batch_size=4, seed=seed).fit(cnn, x_NCDHW, labels_N).scores(x_NCDHW)
              for seed in (1, 1, 2)]
    np.testing.assert_array_equal(scores[0], scores[1])
    assert not np.array_equal(scores[0], scores[2])
    x = torch.arange(8.0).reshape(1, 1, 2, 2, 2)
    flipped = flip(x.expand(64, -1, -1, -1, -1), torch.Generator().manual_seed(0))
    # every flip pattern is a permutation of the voxels; with 64 draws all 8 patterns appear (probability 1/2 per axis)
    assert torch.equal(flipped.flatten(1).sort(dim=1).values, x.flatten(1).expand(64, -1))
    assert len({tuple(v.flatten().tolist()) for v in flipped}) == 8


def test_lora_trains_only_adapters_counted_by_hand_and_merges_to_base_plus_scaled_ba():
    torch.manual_seed(0)
    vit = create_encoder("vit_3d", **VIT)
    before = {name: value.clone() for name, value in vit.state_dict().items()}
    x_NCDHW, labels_N = volumes()
    rank, alpha = 2, 6.0
    adaptor = create_probe("lora", steps=3, batch_size=4, lr=1e-2, rank=rank, alpha=alpha).fit(vit, x_NCDHW, labels_N)
    linears = {name: module for name, module in vit.named_modules() if isinstance(module, nn.Linear)}
    assert set(linear_layer_names(vit)) == set(linears) and len(linears) == 8  # qkv, out_proj, 2 MLP layers x 2 blocks
    assert adaptor.num_trainable_ == sum(rank * (m.in_features + m.out_features) for m in linears.values())
    tuned = adaptor.network_.encoder
    modules = dict(tuned.named_modules())
    for name, module in linears.items():
        layer = modules[name]
        assert torch.equal(layer.base_layer.weight, module.weight)  # the base weights did not move
        a_RI, b_OR = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert b_OR.abs().max() > 0  # B starts at zero: it trained
        expected = module.weight + (alpha / rank) * b_OR @ a_RI
        probe_IN = torch.randn(5, module.in_features)
        with torch.no_grad():
            np.testing.assert_allclose(layer(probe_IN), probe_IN @ expected.T + module.bias, rtol=1e-5, atol=1e-5)
            layer.merge()
            np.testing.assert_allclose(layer.base_layer.weight, expected, rtol=1e-6, atol=1e-6)
    for name, value in vit.state_dict().items():
        assert torch.equal(value, before[name])


def test_lora_on_an_encoder_without_linear_layers_is_a_clear_error():
    cnn = create_encoder("cnn3d_small", width=4, num_stages=2)
    adaptor = create_probe("lora")
    assert "no nn.Linear" in adaptor.not_applicable(cnn)
    with pytest.raises(UserError, match="no nn.Linear layer"):
        adaptor.fit(cnn, *volumes())
