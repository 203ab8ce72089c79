"""The same torch code on CUDA gives the CPU's results (run on GPU machines; skipped elsewhere)."""
import pytest
import torch

from rafmedia.engine.encoders import create_encoder
from rafmedia.shards.alterations import create_alteration


@pytest.mark.gpu
def test_encoder_on_cuda_matches_cpu():
    torch.manual_seed(0)
    encoder = create_encoder("cnn3d_small", width=8).eval()
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        cpu = encoder(x)
        cuda = encoder.cuda()(x.cuda()).cpu()
    torch.testing.assert_close(cuda, cpu, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
def test_bias_field_on_cuda_has_the_requested_strength():
    x = 1.0 + torch.rand(2, 1, 32, 32, 32, device="cuda")
    alteration = create_alteration("bias_field", severity=4)
    y = alteration(x, torch.Generator(device="cuda").manual_seed(0))
    assert abs(torch.log(y / x)[0].std().item() / alteration.parameter - 1) < 1e-3
