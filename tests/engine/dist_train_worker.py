"""Started by torchrun in tests/engine/test_distributed.py (not a test module itself).

Trains the rotation task on fixed random volumes with a BatchNorm-free encoder and head (so a rank's loss does not
depend on the other rank's samples), then writes this rank's parameters and the run's losses to OUT.

    torchrun --nproc_per_node 2 tests/engine/dist_train_worker.py OUT WRAPPER STEPS [key=value ...]
"""
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from rafmedia.engine.batches import view_batches
from rafmedia.engine.distributed import place_from_environment
from rafmedia.engine.encoders import create_encoder
from rafmedia.engine.tasks import create_task
from rafmedia.engine.train import TrainConfig, train

BATCH_PER_RANK = 4


def fixed_volumes() -> torch.Tensor:
    return torch.randn((16, 1, 20, 20, 20), generator=torch.Generator().manual_seed(0))


def build_task() -> torch.nn.Module:
    torch.manual_seed(0)
    encoder = create_encoder("cnn3d_small", width=4, num_stages=2, norm="group")
    return create_task("rotation", encoder=encoder, crop_size=12, hidden_dim=16, head_norm="layer")


def config(wrapper: str, steps: int, **options) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=BATCH_PER_RANK, lr=1e-2, warmup_steps=1, wrapper=wrapper, log_every=1,
                       checkpoint_every=options.pop("checkpoint_every", 0), tensorboard=False, num_threads=1, **options)


def main(out: str, wrapper: str, steps: str, *overrides: str) -> None:
    out_dir = Path(out)
    options = {key: int(value) for key, value in (item.split("=") for item in overrides)}
    place = place_from_environment()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"pid_rank{place.rank}").write_text(str(os.getpid()))
    task = build_task()
    batches = view_batches(fixed_volumes(), task.views, batch_size=BATCH_PER_RANK, seed=0, rank=place.rank,
                           world_size=place.world_size)
    result = train(task, batches, config=config(wrapper, int(steps), **options), out_dir=out_dir / "run",
                   progress=False, place=place)
    state = {key: value.detach().float().cpu().contiguous() for key, value in task.state_dict().items()}
    save_file(state, str(out_dir / f"rank{place.rank}.safetensors"))
    (out_dir / f"losses_rank{place.rank}.json").write_text(json.dumps(result.losses))


if __name__ == "__main__":
    main(*sys.argv[1:])
