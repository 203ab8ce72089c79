"""The pretraining entry: build data, encoder and task from their config slices, train, export the encoder.

The same function runs under every launcher; it takes slices of the config, never the whole tree.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from rafmedia.engine.encoders import EncoderConfig, create_encoder
from rafmedia.engine.export import export_encoder
from rafmedia.engine.tasks import TaskConfig, create_task
from rafmedia.engine.train import TrainConfig, train
from rafmedia.shards.store import CohortStore
from rafmedia.shards.stream import DataConfig, load_volumes, view_batches

ENCODER_FILE = "encoder.safetensors"


def pretrain_encoder(*, data: DataConfig, encoder: EncoderConfig, task: TaskConfig, train_config: TrainConfig,
                     out_dir: str | Path, progress: bool = True) -> Path:
    """Pretrains `encoder` with `task` on the cohort at `data.cohort`; returns the exported weights path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    store = CohortStore(data.cohort)
    subject_ids = store.subject_ids()
    volumes = load_volumes(store, subject_ids, channel=data.channel, progress=progress)
    torch.manual_seed(train_config.seed)
    model = create_encoder(encoder.name, **encoder.options)
    pretext = create_task(task.name, encoder=model, **task.options)
    losses = train(pretext, view_batches(volumes, pretext.views, batch_size=train_config.batch_size, seed=train_config.seed),
                   config=train_config, out_dir=out_dir, progress=progress)
    return export_encoder(model, out_dir / ENCODER_FILE, architecture=encoder.name, options=encoder.options, card={
        "name": f"{task.name} {encoder.name}", "task": task.name, "task_options": task.options,
        "data": {"cohort": str(store.path), "num_subjects": len(subject_ids), "channel": data.channel},
        "steps": train_config.steps, "train": dataclasses.asdict(train_config),
        "final_loss": losses[-1] if losses else None})
