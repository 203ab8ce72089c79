"""Two-crop contrastive learning (`rafmedia.engine.tasks.contrastive`): the loss by hand, and learning."""
import math

import torch

from rafmedia.engine.encoders import create_encoder
from rafmedia.engine.tasks import create_task
from rafmedia.engine.tasks.contrastive import info_nce
from tests.engine.helpers import losses_of, train_briefly


def test_info_nce_matches_hand_computation():
    # Two pairs of orthogonal unit vectors: each sample's positive has cosine 1, the others 0.
    z_a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z_b = z_a.clone()
    loss, accuracy = info_nce(z_a, z_b, temperature=0.5)
    # Row of sample 0 over {1, 2, 3} (self excluded): logits 0/0.5, 1/0.5, 0/0.5 -> positive is index 2.
    expected = -math.log(math.exp(2.0) / (math.exp(0.0) + math.exp(2.0) + math.exp(0.0)))
    assert abs(loss.item() - expected) < 1e-6
    assert accuracy.item() == 1.0


def test_contrastive_loss_decreases_on_the_synthetic_cohort(small_cohort):
    from rafmedia.shards.volumes import load_volumes

    store, _ = small_cohort
    volumes = load_volumes(store, store.subject_ids(), progress=False)
    torch.manual_seed(0)
    task = create_task("contrastive_two_crop", encoder=create_encoder("cnn3d_small", width=8), crop_size=24,
                       max_shift=4)
    losses = losses_of(train_briefly(task, volumes, batch_size=12, steps=40))
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8 - 0.2  # chance level is log(23) = 3.1
