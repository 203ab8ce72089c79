import math
import pickle

import pytest
import torch

from rafmedia.core.errors import UserError
from rafmedia.engine.encoders import create_encoder
from rafmedia.engine.tasks import check_compatible, create_task, list_tasks
from rafmedia.engine.tasks.dino import MultiCropViews, cosine_momentum, dino_cross_entropy, teacher_temperature
from tests.engine.helpers import train_briefly

QUIET = dict(intensity_scale=0.0, intensity_shift=0.0, noise_std=0.0)


def small_task(**options):
    torch.manual_seed(0)
    return create_task("dino_3d", encoder=create_encoder("cnn3d_small", width=4, num_stages=2), **options)


def constant_volumes(batch: int, side: int = 32) -> torch.Tensor:
    """Sample b is the constant b + 1: any crop, resampled or flipped, of sample b must be b + 1 everywhere."""
    return (torch.arange(batch, dtype=torch.float32) + 1).view(batch, 1, 1, 1, 1).expand(batch, 1, side, side, side)


def test_dino_is_registered_for_every_encoder_family():
    assert "dino_3d" in list_tasks()
    for encoder in ("cnn3d_small", "vit_3d", "swin_3d", "timm2d_slices"):
        check_compatible("dino_3d", encoder)


def test_multi_crop_gives_two_global_and_n_local_crops_of_each_sample_volume():
    views = MultiCropViews(global_size=(20, 20, 20), local_size=(10, 10, 10), num_local_crops=3, **QUIET)
    out = views(constant_volumes(4), torch.Generator().manual_seed(0))
    assert out["global_crops"].shape == (4, 2, 1, 20, 20, 20)
    assert out["local_crops"].shape == (4, 3, 1, 10, 10, 10)
    for b in range(4):
        torch.testing.assert_close(out["global_crops"][b], torch.full((2, 1, 20, 20, 20), b + 1.0))
        torch.testing.assert_close(out["local_crops"][b], torch.full((3, 1, 10, 10, 10), b + 1.0))


def test_global_crops_cover_their_scale_of_the_volume():
    # A volume whose value is its depth index: a crop of side s resampled from corner d0 spans about
    # [d0, d0 + s - 1] in value, so the range of a crop's values tells its side.
    ramp = torch.arange(32, dtype=torch.float32).view(1, 1, 32, 1, 1).expand(64, 1, 32, 32, 32)
    views = MultiCropViews(global_size=(16, 16, 16), global_scale=(0.5, 0.75), num_local_crops=0,
                           flip_probability=0.0, **QUIET)
    crops = views(ramp, torch.Generator().manual_seed(1))["global_crops"]
    spans = crops.amax(dim=(2, 3, 4, 5)) - crops.amin(dim=(2, 3, 4, 5))  # (B, 2)
    # side s in [16, 24] voxels; trilinear sampling at 16 points spans s - s / 16 of the original ramp
    assert spans.min() >= 16 - 1 - 1e-4 and spans.max() <= 24 - 24 / 16 + 1e-4
    assert spans.max() - spans.min() > 4  # sizes are drawn, not fixed


def test_multi_crop_is_fixed_by_the_generator_seed_and_pickles():
    views = MultiCropViews(global_size=(16, 16, 16), local_size=(8, 8, 8), num_local_crops=2)
    volumes = torch.randn(3, 1, 24, 24, 24, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    first = views(volumes, torch.Generator().manual_seed(5))
    torch.manual_seed(1)  # the global RNG plays no part
    second = pickle.loads(pickle.dumps(views))(volumes, torch.Generator().manual_seed(5))
    other = views(volumes, torch.Generator().manual_seed(6))
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert not torch.equal(first["global_crops"], other["global_crops"])
    assert not torch.equal(first["global_crops"][:, 0], first["global_crops"][:, 1])  # two different crops


def test_a_vit_gets_every_crop_at_its_img_size():
    encoder = create_encoder("vit_3d", img_size=16, patch_size=8, hidden_size=48, num_layers=1, num_heads=3)
    task = create_task("dino_3d", encoder=encoder, local_size=8, num_local_crops=2)
    out = task.views(constant_volumes(2), torch.Generator().manual_seed(0))
    assert out["global_crops"].shape == (2, 2, 1, 16, 16, 16) and out["local_crops"].shape == (2, 2, 1, 16, 16, 16)
    assert torch.isfinite(task(out)["loss"])
    with pytest.raises(UserError, match=r"global_size=24 but the encoder takes inputs of exactly \(16, 16, 16\)"):
        create_task("dino_3d", encoder=encoder, global_size=24)


def test_momentum_schedule_endpoints_and_midpoint():
    assert cosine_momentum(0, 100, 0.996) == pytest.approx(0.996)
    assert cosine_momentum(99, 100, 0.996) == 1.0
    assert cosine_momentum(50, 101, 0.996) == pytest.approx(1 - 0.004 / 2)  # half way: half the gap
    assert cosine_momentum(25, 101, 0.9) == pytest.approx(1 - 0.1 * (1 + math.cos(math.pi / 4)) / 2)


def test_teacher_temperature_warms_up_linearly():
    assert teacher_temperature(0, start=0.04, end=0.07, warmup_steps=10) == pytest.approx(0.04)
    assert teacher_temperature(5, start=0.04, end=0.07, warmup_steps=10) == pytest.approx(0.055)
    assert teacher_temperature(10, start=0.04, end=0.07, warmup_steps=10) == pytest.approx(0.07)
    assert teacher_temperature(500, start=0.04, end=0.07, warmup_steps=10) == pytest.approx(0.07)
    task = small_task(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_steps=10)
    task.on_step_end(4, 100)  # five optimizer steps done
    assert task.current_teacher_temp() == pytest.approx(0.055)


def test_ema_update_equals_the_hand_computed_average():
    task = small_task(teacher_momentum=0.99)
    with torch.no_grad():  # make the student differ from the teacher it was copied into
        for p in list(task.encoder.parameters()) + list(task.head.parameters()):
            p.add_(torch.randn_like(p))
    student = [p.detach().clone() for p in list(task.encoder.parameters()) + list(task.head.parameters())]
    teacher = [p.detach().clone() for p in task.teacher.parameters()]
    assert len(student) == len(teacher) and all(s.shape == t.shape for s, t in zip(student, teacher))
    task.on_step_end(3, 10)
    m = 1 - 0.01 * (1 + math.cos(math.pi * 3 / 9)) / 2  # 0.9925
    assert m == pytest.approx(0.9925)
    for before, s, after in zip(teacher, student, task.teacher.parameters()):
        torch.testing.assert_close(after, m * before + (1 - m) * s)
    assert int(task.steps_done) == 4


def test_center_update_is_an_ema_of_the_teacher_outputs_on_the_global_crops():
    task = small_task(center_momentum=0.9, num_local_crops=1)
    task.update_center(torch.tensor([[1.0] * 32 + [0.0] * 32, [3.0] * 32 + [2.0] * 32]))
    torch.testing.assert_close(task.center, torch.tensor([[0.2] * 32 + [0.1] * 32]))
    task.center.zero_()
    batch = task.views(torch.randn(4, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0)),
                       torch.Generator().manual_seed(1))
    with torch.no_grad():  # the teacher in train mode normalises by batch statistics: recomputable
        globals_flat = batch["global_crops"].transpose(0, 1).flatten(0, 1)
        teacher_mean = task.teacher["head"](task.teacher["encoder"](globals_flat)).mean(dim=0)
    task(batch)
    torch.testing.assert_close(task.center[0], 0.1 * teacher_mean)
    task.eval()(batch)  # evaluation leaves the center alone
    torch.testing.assert_close(task.center[0], 0.1 * teacher_mean)


def test_dino_cross_entropy_matches_hand_computation():
    teacher = torch.tensor([[[0.7, 0.3]], [[0.2, 0.8]]])  # (G=2, B=1, K=2)
    student = torch.tensor([[[1.0, 0.0]], [[0.0, 0.5]], [[0.3, 0.3]]])  # (V=3, B=1, K=2)

    def log_softmax(logits):
        total = math.log(sum(math.exp(x / 0.1) for x in logits))
        return [x / 0.1 - total for x in logits]

    pairs = [(0, 1), (0, 2), (1, 0), (1, 2)]  # teacher crop g against every student crop v != g
    expected = sum(-sum(q * lp for q, lp in zip(teacher[g, 0].tolist(), log_softmax(student[v, 0].tolist())))
                   for g, v in pairs) / 4
    assert dino_cross_entropy(teacher, student, 0.1).item() == pytest.approx(expected, rel=1e-5)


def test_the_teacher_gets_no_gradients_and_is_checkpointed_but_not_optimized():
    from rafmedia.engine.train import TrainConfig, build_optimizer

    task = small_task(num_local_crops=2)
    batch = task.views(torch.randn(4, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0)),
                       torch.Generator().manual_seed(1))
    out = task(batch)
    out["loss"].backward()
    assert set(out) == {"loss", "teacher_entropy", "teacher_batch_entropy", "agreement", "teacher_temp"}
    assert all(not p.requires_grad and p.grad is None for p in task.teacher.parameters())
    assert all(p.grad is not None for p in task.head.parameters())
    optimized = {id(p) for group in build_optimizer(task, TrainConfig()).param_groups for p in group["params"]}
    assert optimized.isdisjoint(id(p) for p in task.teacher.parameters())
    assert optimized == {id(p) for p in task.parameters() if p.requires_grad}
    keys = task.state_dict().keys()
    assert {"center", "steps_done"} <= set(keys) and any(k.startswith("teacher.encoder.") for k in keys)


def test_dino_learns_on_the_synthetic_cohort_without_collapsing(small_cohort):
    from rafmedia.shards.volumes import load_volumes

    store, _ = small_cohort
    volumes = load_volumes(store, store.subject_ids(), progress=False)
    torch.manual_seed(0)
    task = create_task("dino_3d", encoder=create_encoder("cnn3d_small", width=8))
    steps = 80
    logs = train_briefly(task, volumes, batch_size=12, steps=steps, weight_decay=0.04)

    def window(key, start, stop):
        return sum(log[key] for log in logs[start:stop]) / (stop - start)

    first, last = (0, 10), (steps - 20, steps)
    # The student-teacher KL (cross-entropy minus the teacher's entropy) falls well below its start ...
    kl_start = window("loss", *first) - window("teacher_entropy", *first)
    kl_end = window("loss", *last) - window("teacher_entropy", *last)
    assert kl_end < 0.5 * kl_start
    # ... the student's top prototype matches the teacher's (on another crop) far more often than at the start
    # (0.09; measured 0.46 at the end) ...
    assert window("agreement", *last) > max(0.3, 3 * window("agreement", *first))
    # ... and the teacher collapsed neither to a uniform output (entropy log 64 = 4.16) nor onto one prototype
    # (entropy of its batch-mean output near 0); measured 2.6 and 3.3.
    assert window("teacher_entropy", *last) < math.log(64) - 0.5
    assert window("teacher_batch_entropy", *last) > 2.0
