"""The loop: exact resume after a kill, NaN handling, schedule values, export round trip."""
import json
from pathlib import Path

import pytest
import torch

from rafmedia.engine.encoders import create_encoder
from rafmedia.engine.errors import UserError
from rafmedia.engine.export import export_encoder, load_encoder
from rafmedia.engine.tasks import create_task
from rafmedia.engine.train import TrainConfig, train, warmup_cosine


def _task_and_batches(volumes, seed=0):
    from rafmedia.shards.stream import view_batches

    torch.manual_seed(seed)
    task = create_task("contrastive_two_crop", encoder=create_encoder("cnn3d_small", width=8), crop_size=16, max_shift=4)
    return task, view_batches(volumes, task.views, batch_size=6, seed=seed)


@pytest.fixture(scope="module")
def volumes():
    generator = torch.Generator().manual_seed(0)
    return torch.randn((12, 1, 24, 24, 24), generator=generator)


def test_resume_reproduces_the_uninterrupted_loss_sequence_bitwise(volumes, tmp_path):
    config = TrainConfig(steps=8, batch_size=6, warmup_steps=2, checkpoint_every=4, log_every=1)
    task, batches = _task_and_batches(volumes)
    straight = train(task, batches, config=config, out_dir=tmp_path / "straight", progress=False)

    # Interrupted run: dies between the step-4 checkpoint and step 5, like a kill -9.
    class Killed(Exception):
        pass

    task, batches = _task_and_batches(volumes)

    def dying_batches(step):
        if step == 5:
            raise Killed
        return batches(step)

    with pytest.raises(Killed):
        train(task, dying_batches, config=config, out_dir=tmp_path / "resumed", progress=False)
    # A restart builds everything anew (with a different init): the state must come from the checkpoint.
    task, _ = _task_and_batches(volumes, seed=123)
    rest = train(task, batches, config=config, out_dir=tmp_path / "resumed", progress=False)
    assert len(rest) == 4
    assert rest == straight[4:]


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(volumes, tmp_path):
    config = TrainConfig(steps=6, batch_size=6, warmup_steps=1, checkpoint_every=2)
    task, batches = _task_and_batches(volumes)

    def poisoned(step):
        batch = batches(step)
        if step == 3:
            batch = {key: value * float("nan") for key, value in batch.items()}
        return batch

    with pytest.raises(UserError, match="loss became nan at step 3"):
        train(task, poisoned, config=config, out_dir=tmp_path, progress=False)
    state = torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=True)
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_warmup_cosine_schedule_values():
    assert warmup_cosine(0, warmup_steps=4, total_steps=12) == 0.25
    assert warmup_cosine(3, warmup_steps=4, total_steps=12) == 1.0
    assert warmup_cosine(4, warmup_steps=4, total_steps=12) == 1.0
    assert abs(warmup_cosine(8, warmup_steps=4, total_steps=12) - 0.5) < 1e-12
    assert warmup_cosine(12, warmup_steps=4, total_steps=12) == 0.0


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
    card_file = Path(str(weights).replace(".safetensors", ".card.json"))
    card = json.loads(card_file.read_text())
    card["options"]["num_stages"] = 2  # the weights have a third stage this architecture lacks
    card_file.write_text(json.dumps(card))
    with pytest.raises(UserError, match=r"does not fit architecture 'cnn3d_small' .*: missing keys \[\], "
                                        r"unexpected keys \['features\.5\.0\.weight'.* and \d+ more"):
        load_encoder(weights)
