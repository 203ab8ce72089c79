"""The pretraining entry: build data, encoder and task from their config slices, train, export the encoder.

The same function runs under every launcher (one process, torchrun, deepspeed); it takes slices of the config,
never the whole tree. Each rank reads its own share of the data; rank 0 exports.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from rafmedia.core.errors import UserError
from rafmedia.engine.accounting import Footprint
from rafmedia.engine.batches import DataConfig, StreamBatches, view_batches
from rafmedia.engine.card import encoder_input_size, trained_card
from rafmedia.engine.distributed import Place, barrier, place_from_environment
from rafmedia.engine.encoders import EncoderConfig, create_encoder
from rafmedia.engine.export import export_encoder
from rafmedia.engine.monitors import pretraining_monitor
from rafmedia.engine.tasks import TaskConfig, check_compatible, create_task, task_data_kind
from rafmedia.engine.train import TrainConfig, train
from rafmedia.shards.store import CohortStore
from rafmedia.shards.streaming import StreamConfig, build_stream_loader
from rafmedia.shards.volumes import load_volumes

ENCODER_FILE = "encoder.safetensors"


def validate_pretraining(data: DataConfig, encoder: EncoderConfig, task: TaskConfig, train_config: TrainConfig) -> None:
    """Checks the config slices against each other before anything is built or read."""
    data.validate()
    train_config.validate()
    check_compatible(task.name, encoder.name)
    if task_data_kind(task.name) == "paired" and len(data.channels) != 2:
        raise UserError(f"task '{task.name}' learns from two acquisitions of each subject: set data.channels to the "
                        "two channel names, e.g. data.channels=[inhale,exhale]")


def load_task_inputs(store: CohortStore, subject_ids: list[str], data: DataConfig, kind: str,
                     progress: bool) -> torch.Tensor:
    """The (N, C, D, H, W) volumes the task's view maker crops from: z-scored image channel(s), or label maps."""
    if kind == "label":
        return torch.stack([torch.from_numpy(np.asarray(store.read_label(subject), dtype=np.float32))
                            for subject in subject_ids]).unsqueeze(1)
    channels = data.channels if kind == "paired" else [data.channel]
    return torch.cat([load_volumes(store, subject_ids, channel=channel, progress=progress, desc=f"load {channel}")
                      for channel in channels], dim=1)


def build_batches(data: DataConfig, kind: str, views, train_config: TrainConfig, place: Place, progress: bool):
    """This rank's batch source: views of in-memory volumes, or of patches streamed from the store."""
    if data.source == "stream":
        paired = kind == "paired"
        sampler_options = {"patch_size": data.patch_size, **({"channels": data.channels} if paired else {})}
        stream = StreamConfig(sampler="paired" if paired else "uniform", sampler_options=sampler_options,
                              channels=data.channels if paired else [data.channel],
                              patches_per_subject=data.patches_per_subject, batch_size=train_config.batch_size,
                              seed=train_config.seed, epochs=None, num_workers=data.num_workers)
        loader = build_stream_loader(stream, data.cohort, rank=place.rank, world_size=place.world_size)
        return StreamBatches(loader, views, seed=train_config.seed, rank=place.rank, data=kind)
    store = CohortStore(data.cohort)
    volumes = load_task_inputs(store, store.subject_ids(), data, kind, progress and place.is_main)
    return view_batches(volumes, views, batch_size=train_config.batch_size, seed=train_config.seed, rank=place.rank,
                        world_size=place.world_size)


def pretrain_encoder(*, data: DataConfig, encoder: EncoderConfig, task: TaskConfig, train_config: TrainConfig,
                     out_dir: str | Path, progress: bool = True) -> Path:
    """Pretrains `encoder` with `task` on the cohort at `data.cohort`; returns the exported weights path."""
    validate_pretraining(data, encoder, task, train_config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    place = place_from_environment()
    kind = task_data_kind(task.name)
    torch.manual_seed(train_config.seed)
    model = create_encoder(encoder.name, **encoder.options)
    pretext = create_task(task.name, encoder=model, **task.options)
    footprint = Footprint()  # from before the data is read
    batches = build_batches(data, kind, pretext.views, train_config, place, progress)
    monitor = pretraining_monitor(data, kind=kind, num_classes=getattr(pretext, "num_classes", None),
                                  every=train_config.monitor_every, count=train_config.monitor_subjects,
                                  seed=train_config.seed) if place.is_main else None
    result = train(pretext, batches, config=train_config, out_dir=out_dir, progress=progress, place=place,
                   store=data.cohort, footprint=footprint, monitor=monitor)
    weights = out_dir / ENCODER_FILE
    if place.is_main:
        store = CohortStore(data.cohort)
        exported = pretext.exported_encoder() if hasattr(pretext, "exported_encoder") else model
        export_encoder(result.ema if result.ema is not None else exported, weights, architecture=encoder.name,
                       options=encoder.options, card={
                           "name": f"{task.name} {encoder.name}", "task": task.name, "task_options": task.options,
                           "steps": train_config.steps, "train": dataclasses.asdict(train_config),
                           "weights": "ema" if result.ema is not None else "final" if exported is model else "teacher",
                           "world_size": place.world_size,
                           "final_loss": result.losses[-1] if result.losses else None,
                           **trained_card(store, data=data, encoder=encoder, task=task, train_config=train_config,
                                          kind=kind, input_size=encoder_input_size(model, pretext.views))})
        if hasattr(pretext, "export_extra"):
            pretext.export_extra(out_dir)
    barrier()
    return weights
