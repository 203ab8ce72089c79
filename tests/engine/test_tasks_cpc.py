import math
import pickle

import pytest
import torch

from rafmedia.engine.encoders import create_encoder
from rafmedia.engine.tasks import create_task, list_tasks
from rafmedia.engine.tasks.cpc import CausalContext, PatchGridViews, cpc_info_nce, patch_grid, triplet_loss
from tests.engine.helpers import losses_of, train_briefly


def test_both_tasks_are_registered_and_their_views_pickle():
    assert {"cpc_3d", "exemplar"} <= set(list_tasks())
    for name in ("cpc_3d", "exemplar"):
        task = create_task(name, encoder=create_encoder("cnn3d_small", width=4))
        assert pickle.loads(pickle.dumps(task.views)) == task.views


def test_patch_grid_puts_patch_ijk_at_its_hand_computed_corner():
    # value = d*400 + h*20 + w, so a patch's first voxel names its corner
    volumes = torch.arange(2 * 20**3, dtype=torch.float32).reshape(2, 1, 20, 20, 20)
    starts = torch.tensor([[1, 2, 3], [0, 4, 0]])
    patches = patch_grid(volumes, starts, grid=3, patch_size=6, stride=3)
    assert patches.shape == (2, 3, 3, 3, 1, 6, 6, 6)
    for b in range(2):
        for i, j, k in [(0, 0, 0), (2, 1, 0), (1, 2, 2), (2, 2, 2)]:
            d, h, w = starts[b, 0] + 3 * i, starts[b, 1] + 3 * j, starts[b, 2] + 3 * k
            assert int(patches[b, i, j, k, 0, 0, 0, 0]) == b * 20**3 + d * 400 + h * 20 + w
            assert torch.equal(patches[b, i, j, k], volumes[b, :, d:d + 6, h:h + 6, w:w + 6])
    # overlap: patch (1,0,0) begins half way into patch (0,0,0)
    assert torch.equal(patches[0, 1, 0, 0, :, :3], patches[0, 0, 0, 0, :, 3:])


def test_patch_grid_views_are_deterministic_and_noise_each_patch_separately():
    volumes = torch.randn(3, 1, 24, 24, 24, generator=torch.Generator().manual_seed(0))
    views = PatchGridViews(grid=3, patch_size=8, stride=4)
    out1, out2 = views(volumes, torch.Generator().manual_seed(1)), views(volumes, torch.Generator().manual_seed(1))
    assert torch.equal(out1["patches"], out2["patches"])
    clean = patch_grid(volumes, out1["starts"], 3, 8, 4)
    offsets = (out1["patches"] - clean).mean(dim=(4, 5, 6, 7))  # per-patch jitter differs from patch to patch
    assert offsets.flatten().unique().numel() == 3 * 27


def test_cpc_info_nce_matches_hand_computation():
    predictions = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    targets = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    loss, accuracy = cpc_info_nce(predictions, targets, temperature=0.5)
    p = [(1, 0), (0, 1), (0.6, 0.8)]
    t = [(1, 0), (2**-0.5, 2**-0.5), (0, -1)]
    expected = 0.0
    correct = 0
    for n in range(3):
        scores = [(p[n][0] * t[m][0] + p[n][1] * t[m][1]) / 0.5 for m in range(3)]
        expected += -math.log(math.exp(scores[n]) / sum(math.exp(s) for s in scores)) / 3
        correct += max(range(3), key=lambda m: scores[m]) == n
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert accuracy.item() == pytest.approx(correct / 3)  # sample 2 prefers target 1 (0.99 > 0.8): 2/3
    assert correct == 2


def test_context_of_a_row_does_not_see_the_rows_it_predicts():
    torch.manual_seed(0)
    context = CausalContext(embed_dim=6, context_dim=5)
    task = create_task("cpc_3d", encoder=create_encoder("cnn3d_small", width=4), grid=4, patch_size=8,
                       prediction_steps=2)
    z = torch.randn(2, 4, 4, 4, task.encoder.embed_dim)
    perturbed = z.clone()
    perturbed[:, 2:] += 10 * torch.randn_like(perturbed[:, 2:])  # rows 2 and 3 change
    c, c_perturbed = context(z[..., :6]), context(perturbed[..., :6])
    assert torch.equal(c[:, :2], c_perturbed[:, :2]) and not torch.allclose(c[:, 2:], c_perturbed[:, 2:])
    # the task's predictions from rows 0 and 1 (of rows 1..3) are unchanged; a later one does move
    for step, (before, after) in enumerate(zip(task.predictions(z), task.predictions(perturbed)), start=1):
        assert torch.equal(before[:, :2], after[:, :2]), step
    assert not torch.allclose(task.predictions(z)[0][:, 2], task.predictions(perturbed)[0][:, 2])


def test_cpc_refuses_a_prediction_horizon_past_the_grid():
    with pytest.raises(ValueError, match="prediction_steps=3"):
        create_task("cpc_3d", encoder=create_encoder("cnn3d_small", width=4), grid=3, prediction_steps=3)


def test_triplet_loss_matches_hand_computation():
    anchors = torch.tensor([[1.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    positives = torch.tensor([[2.0, 2.0], [0.0, 1.0], [0.0, -5.0]])
    margin = 0.5
    a = [(1, 0), (0, 1), (-1, 0)]
    p = [(2**-0.5, 2**-0.5), (0, 1), (0, -1)]

    def dist(u, v):
        return math.hypot(u[0] - v[0], u[1] - v[1])

    terms = [max(0.0, margin + dist(a[i], p[i]) - dist(a[i], p[j])) for i in range(3) for j in range(3) if j != i]
    expected = sum(terms) / 6
    assert triplet_loss(anchors, positives, margin).item() == pytest.approx(expected, abs=1e-6)
    assert 0 < expected and any(term == 0 for term in terms)  # the case exercises both sides of the hinge


def _train(task, volumes, batch_size: int, steps: int) -> list[float]:
    return losses_of(train_briefly(task, volumes, batch_size=batch_size, steps=steps, weight_decay=0.01))


def test_cpc_loss_decreases_on_the_synthetic_cohort(small_cohort):
    from rafmedia.shards.volumes import load_volumes

    store, _ = small_cohort
    volumes = load_volumes(store, store.subject_ids(), progress=False)
    torch.manual_seed(0)
    task = create_task("cpc_3d", encoder=create_encoder("cnn3d_small", width=8), grid=3, patch_size=12)
    losses = _train(task, volumes, batch_size=8, steps=30)
    # chance: step 1 picks among 8*2*9 = 144 targets, step 2 among 72: (log 144 + log 72) / 2 = 4.6
    assert sum(losses[:3]) / 3 > 4.0
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8 - 0.8


def test_exemplar_loss_decreases_on_the_synthetic_cohort(small_cohort):
    from rafmedia.shards.volumes import load_volumes

    store, _ = small_cohort
    volumes = load_volumes(store, store.subject_ids(), progress=False)
    torch.manual_seed(0)
    task = create_task("exemplar", encoder=create_encoder("cnn3d_small", width=8), crop_size=24, max_shift=4,
                       blur_sigma=0.0, gamma=0.0, rotate90=False)
    losses = _train(task, volumes, batch_size=12, steps=40)
    # a random embedding sits near the margin (0.5); a learned one separates the pairs
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8 - 0.1
