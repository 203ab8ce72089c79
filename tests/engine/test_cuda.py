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


@pytest.mark.gpu
@pytest.mark.parametrize("wrapper", ["plain", "deepspeed"])
def test_bf16_pretraining_on_cuda_learns(wrapper, tmp_path):
    """The rotation task on CUDA in bf16 (autocast, or DeepSpeed's bf16 engine with ZeRO-2) lowers its loss."""
    from rafmedia.engine.batches import view_batches
    from rafmedia.engine.tasks import create_task
    from rafmedia.engine.train import TrainConfig, train

    torch.manual_seed(0)
    task = create_task("rotation", encoder=create_encoder("cnn3d_small", width=8), crop_size=24)
    volumes = torch.randn((32, 1, 32, 32, 32), generator=torch.Generator().manual_seed(0)).cumsum(2)
    result = train(task, view_batches(volumes, task.views, batch_size=16, seed=0), out_dir=tmp_path, progress=False,
                   config=TrainConfig(steps=60, batch_size=16, lr=1e-3, warmup_steps=5, precision="bf16",
                                      wrapper=wrapper, tensorboard=False))
    assert next(task.parameters()).is_cuda
    assert sum(result.losses[-10:]) / 10 < 0.8 * sum(result.losses[:10]) / 10
