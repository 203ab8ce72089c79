"""Training wrappers behind one registry: how a task's forward, backward, optimizer step and checkpoint are run.

- `plain`: one process, plain PyTorch;
- `ddp`: PyTorch DistributedDataParallel (gloo on CPU, NCCL on CUDA);
- `deepspeed`: a DeepSpeed engine (ZeRO stage 0-3, bf16/fp16, gradient accumulation and clipping).

All share one small contract, so the loop never names a wrapper:
    wrapper.micro_step(batch, boundary) -> outputs   # forward + backward of one micro-batch
    wrapper.optimizer_step() -> grad norm            # clip, step, schedule, zero (after the last micro-batch);
                                                     # a tensor left on the device (read at logging boundaries)
    wrapper.lr() -> float
    wrapper.save(folder, extra) / wrapper.load(folder) -> extra or None   # collective; every rank calls them
`wrapper.task` is the unwrapped task (what `on_step_end`, EMA and export see).
"""
from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from rafmedia.core.environment import temporary_environ
from rafmedia.core.errors import UserError
from rafmedia.core.files import atomic_write, atomic_write_text
from rafmedia.core.registry import Registry
from rafmedia.engine.distributed import Place, barrier, free_port

WRAPPERS: Registry = Registry("training wrapper")
CHECKPOINT_FILE = "latest.pt"
DEEPSPEED_POINTER = "latest_deepspeed.txt"
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def create_wrapper(name: str, *, task: nn.Module, optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler, config, place: Place,
                   device: torch.device):
    """Builds a registered wrapper around `task` (already on `device`) and its optimizer and scheduler."""
    return WRAPPERS.create(name, task=task, optimizer=optimizer, scheduler=scheduler, config=config, place=place,
                           device=device)


def list_wrappers() -> list[str]:
    return WRAPPERS.names()


def cpu_half_precision_kernels(device: torch.device, dtype: torch.dtype | None):
    """Runs half precision on CPU with PyTorch's own kernels instead of oneDNN's.

    oneDNN 3.12 (torch 2.13's CPU build) returns garbage weight gradients for a bf16 conv3d over a 2x2x2 map with 16
    or more channels (different at every call, sometimes inf); the encoders' last stage has such maps on small crops.
    Full precision and CUDA are unaffected and keep their kernels."""
    if device.type == "cpu" and dtype is not None:
        return torch.backends.mkldnn.flags(enabled=False)
    return contextlib.nullcontext()


class TorchWrapper:
    """Plain PyTorch, optionally under DistributedDataParallel; autocast for bf16/fp16 (with a GradScaler for fp16)."""

    def __init__(self, task: nn.Module, optimizer, scheduler, config, place: Place, device: torch.device,
                 distributed: bool):
        if config.precision not in PRECISIONS:
            raise UserError(f"train.precision must be one of {', '.join(PRECISIONS)}, got '{config.precision}'")
        self.task, self.optimizer, self.scheduler, self.config, self.place = task, optimizer, scheduler, config, place
        self.device, self.dtype = device, PRECISIONS[config.precision]
        self.model: nn.Module = task
        if distributed:
            self.model = DistributedDataParallel(task, device_ids=[device.index] if device.type == "cuda" else None)
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")

    def micro_step(self, batch: dict[str, torch.Tensor], boundary: bool) -> dict[str, Any]:
        sync = contextlib.nullcontext() if boundary or self.model is self.task else self.model.no_sync()
        with sync, cpu_half_precision_kernels(self.device, self.dtype):
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
                outputs = self.model(batch)
            self.scaler.scale(outputs["loss"] / self.config.grad_accum_steps).backward()
        return outputs

    def optimizer_step(self) -> float:
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.task.parameters(), self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm.detach()

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, folder: Path, extra: dict[str, Any]) -> None:
        if self.place.is_main:
            state = {"model": self.task.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), **extra}
            atomic_write(folder / CHECKPOINT_FILE, lambda tmp: torch.save(state, tmp))
        barrier()

    def load(self, folder: Path) -> dict[str, Any] | None:
        path = folder / CHECKPOINT_FILE
        if not path.is_file():
            return None
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.task.load_state_dict(state.pop("model"))
        self.optimizer.load_state_dict(state.pop("optimizer"))
        self.scheduler.load_state_dict(state.pop("scheduler"))
        self.scaler.load_state_dict(state.pop("scaler"))
        return state

    def close(self) -> None:
        """Nothing to release: the process group belongs to the launcher."""


@WRAPPERS.register("plain")
def plain(task, optimizer, scheduler, config, place: Place, device: torch.device) -> TorchWrapper:
    if place.world_size > 1:
        raise UserError(f"train.wrapper=plain runs one process but the launcher started {place.world_size}; "
                        "use train.wrapper=ddp or train.wrapper=deepspeed")
    return TorchWrapper(task, optimizer, scheduler, config, place, device, distributed=False)


@WRAPPERS.register("ddp")
def ddp(task, optimizer, scheduler, config, place: Place, device: torch.device) -> TorchWrapper:
    return TorchWrapper(task, optimizer, scheduler, config, place, device, distributed=place.world_size > 1)


def deepspeed_config(config) -> dict[str, Any]:
    """The DeepSpeed JSON config the engine runs with: our train settings plus `train.deepspeed` on top."""
    return {
        "train_micro_batch_size_per_gpu": config.batch_size,
        "gradient_accumulation_steps": config.grad_accum_steps,
        "gradient_clipping": config.grad_clip,
        "zero_optimization": {"stage": config.zero_stage},
        "bf16": {"enabled": config.precision == "bf16"},
        "fp16": {"enabled": config.precision == "fp16"},
        "zero_allow_untested_optimizer": True,  # our AdamW is a plain torch optimizer: nothing to JIT-compile
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        **config.deepspeed,
    }


def import_deepspeed():
    """Imports DeepSpeed. On CPU its shared-memory all-reduce op would be JIT-compiled (minutes) at the first
    `init_distributed`; gloo's all-reduce is used instead."""
    try:
        # an optional extra (rafmedia[deepspeed]): imported only when the deepspeed wrapper is built
        import deepspeed
        import deepspeed.ops  # the same extra (its op registry, switched below on CPU)
    except ImportError:
        raise UserError("train.wrapper=deepspeed needs DeepSpeed: pip install 'rafmedia[deepspeed]' "
                        "(DS_BUILD_OPS=0 pip install deepspeed compiles nothing at install time)") from None
    if not torch.cuda.is_available():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.utils.logger.setLevel(logging.WARNING)  # its INFO lines would bury the progress bar
    return deepspeed


def one_process_variables() -> dict[str, str]:
    """torchrun's variables for a one-process group (set while DeepSpeed starts, then put back)."""
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port())}


class DeepSpeedWrapper:
    """A DeepSpeed engine around the task, with our torch AdamW and LR schedule."""

    def __init__(self, task: nn.Module, optimizer, scheduler, config, place: Place, device: torch.device):
        deepspeed = import_deepspeed()
        if config.zero_stage not in (0, 1, 2, 3):
            raise UserError(f"train.zero_stage must be 0, 1, 2 or 3, got {config.zero_stage}")
        if config.precision not in PRECISIONS:
            raise UserError(f"train.precision must be one of {', '.join(PRECISIONS)}, got '{config.precision}'")
        # DeepSpeed wants a process group even for one process: it gets one for this run only, and the
        # process's environment is left as it was found
        self.owns_group = place.world_size == 1 and not torch.distributed.is_initialized()
        environment = temporary_environ(one_process_variables(), keep_existing=True)
        with environment if self.owns_group else contextlib.nullcontext():
            deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                       auto_mpi_discovery=False)
            self.engine, _, _, _ = deepspeed.initialize(model=task, optimizer=optimizer, lr_scheduler=scheduler,
                                                        config=deepspeed_config(config))
        self.task, self.scheduler, self.place, self.device = task, scheduler, place, device
        self.dtype = PRECISIONS[config.precision]

    def micro_step(self, batch: dict[str, torch.Tensor], boundary: bool) -> dict[str, Any]:
        if self.dtype is not None:  # DeepSpeed casts the weights, the inputs are ours to cast
            batch = {key: value.to(self.dtype) if torch.is_tensor(value) and value.is_floating_point() else value
                     for key, value in batch.items()}
        with cpu_half_precision_kernels(self.device, self.dtype):
            outputs = self.engine(batch)
            self.engine.backward(outputs["loss"])
        self.engine.step()  # only a bookkeeping call until the accumulation boundary
        return outputs

    def optimizer_step(self) -> float:
        norm = self.engine.get_global_grad_norm()  # a tensor or a number, read at logging boundaries only
        return norm if norm is not None else float("nan")

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, folder: Path, extra: dict[str, Any]) -> None:
        """Saves under `folder/deepspeed/<tag>`, then points `latest_deepspeed.txt` at it (atomically, once every rank
        has written its shard), then removes older tags: a killed save leaves the previous checkpoint in charge."""
        tag = f"step{extra['step']:08d}"
        self.engine.save_checkpoint(str(folder / "deepspeed"), tag=tag, client_state=extra, save_latest=False)
        barrier()
        if self.place.is_main:
            atomic_write_text(folder / DEEPSPEED_POINTER, tag + "\n")
            for old in (folder / "deepspeed").iterdir():
                if old.is_dir() and old.name != tag:
                    shutil.rmtree(old, ignore_errors=True)
        barrier()

    def load(self, folder: Path) -> dict[str, Any] | None:
        pointer = folder / DEEPSPEED_POINTER
        if not pointer.is_file():
            return None
        tag = pointer.read_text(encoding="utf-8").strip()
        path, client = self.engine.load_checkpoint(str(folder / "deepspeed"), tag=tag)
        if path is None:
            raise UserError(f"the DeepSpeed checkpoint {folder / 'deepspeed' / tag} named by {pointer} could not be "
                            "loaded; move the checkpoints folder away to start over")
        return client

    def close(self) -> None:
        """Ends the one-process group made for DeepSpeed, so that the process is as it was before the run."""
        if self.owns_group and torch.distributed.is_initialized():
            import deepspeed.comm  # the optional extra, already loaded by import_deepspeed

            deepspeed.comm.destroy_process_group()  # also drops DeepSpeed's cached groups, so a next run can start


@WRAPPERS.register("deepspeed")
def deepspeed(task, optimizer, scheduler, config, place: Place, device: torch.device) -> DeepSpeedWrapper:
    return DeepSpeedWrapper(task, optimizer, scheduler, config, place, device)
