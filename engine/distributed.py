"""The process group: where this process sits (rank, local rank, world size) and the few collectives the
trainer needs. Works with one process (no group at all), torchrun, and the `deepspeed` launcher; gloo on CPU,
NCCL on CUDA.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from rafmedia.core.errors import UserError

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = 29500  # torchrun's default


@dataclass(frozen=True)
class Place:
    """This process's place in the job: its ranks, who started it and where the group meets.

    `rafmedia.launch.env.resolve_environment` fills every field from whichever launcher started the process;
    the engine reads it back from torchrun's variables (`place_from_environment`).
    """

    rank: int = 0
    local_rank: int = 0  # rank among the processes of this node: picks the CUDA device
    world_size: int = 1
    launcher: str = "single"  # the launcher that started the job (`raf list launchers`), or single
    node_rank: int = 0
    master_addr: str = DEFAULT_MASTER_ADDR  # rank 0's host: the rendezvous of the process group
    master_port: int = DEFAULT_MASTER_PORT

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def torch_variables(self) -> dict[str, str]:
        """The place as torchrun's environment variables (what `place_from_environment` and torch read)."""
        return {"RANK": str(self.rank), "LOCAL_RANK": str(self.local_rank), "WORLD_SIZE": str(self.world_size),
                "GROUP_RANK": str(self.node_rank), "MASTER_ADDR": self.master_addr,
                "MASTER_PORT": str(self.master_port)}


def place_from_environment(env: dict[str, str] | None = None) -> Place:
    """Reads RANK / LOCAL_RANK / WORLD_SIZE as torchrun and the deepspeed launcher set them.

    No variable at all means one process. A half-set environment is an error naming what is missing. The
    launcher is "torchrun" whenever its variables are set: `rafmedia.launch` writes them for every launcher.
    """
    env = os.environ if env is None else env
    present = [name for name in LAUNCHER_VARIABLES if name in env]
    if not present:
        return Place()
    missing = [name for name in LAUNCHER_VARIABLES if name not in env]
    if missing:
        raise UserError(f"the distributed environment is half set: {', '.join(present)} given but {', '.join(missing)} "
                        "missing; launch with torchrun (or deepspeed), or unset these variables to run one process")
    try:
        place = Place(rank=int(env["RANK"]), local_rank=int(env.get("LOCAL_RANK", env["RANK"])),
                      world_size=int(env["WORLD_SIZE"]), launcher="torchrun",
                      node_rank=int(env.get("GROUP_RANK", 0)), master_addr=env["MASTER_ADDR"],
                      master_port=int(env["MASTER_PORT"]))
    except ValueError:
        raise UserError(f"RANK, LOCAL_RANK, WORLD_SIZE, GROUP_RANK and MASTER_PORT must be integers, got "
                        f"{env.get('RANK')!r}, {env.get('LOCAL_RANK')!r}, {env.get('WORLD_SIZE')!r}, "
                        f"{env.get('GROUP_RANK')!r}, {env.get('MASTER_PORT')!r}") from None
    if not 0 <= place.rank < place.world_size:
        raise UserError(f"RANK={place.rank} is outside WORLD_SIZE={place.world_size}")
    return place


def free_port() -> int:
    """A TCP port free on every interface of this host, for a rendezvous (rank 0's store)."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def device_for(place: Place) -> torch.device:
    """The rank's CUDA device (by local rank) when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        torch.cuda.set_device(place.local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(place: Place, timeout_minutes: float = 30.0) -> None:
    """Joins the process group (NCCL on CUDA, gloo on CPU) when there is more than one process."""
    if place.world_size == 1 or dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    timeout = timedelta(minutes=timeout_minutes)
    store, _, _ = next(dist.rendezvous("env://", rank=place.rank, world_size=place.world_size, timeout=timeout))
    # torchrun's static rendezvous keeps one store for all restarts: a restarted group would read the killed group's
    # gloo addresses under the same keys (connection refused, or a hang), so each attempt gets its own key prefix
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"rafmedia/attempt{attempt}/", store), rank=place.rank,
                            world_size=place.world_size, timeout=timeout)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class StopVote:
    """Agrees on a stop request across ranks without holding up any step.

    One process: `vote(flag)` answers `flag` at once. Several: each step's vote starts a non-blocking MAX all-reduce
    of one CPU number on a gloo group of its own (never the device's stream, so no host-device synchronisation), and
    the answer read back is the previous step's vote, whose reduction has had a whole step to finish. Every rank
    reads the same vote at the same step, so all stop together, one step after the signal's step at worst.
    `close()` settles the vote in flight before the group is left.
    """

    def __init__(self):
        self.group = None
        if dist.is_initialized() and dist.get_world_size() > 1:
            self.group = dist.new_group(backend="gloo")  # collective: every rank builds its StopVote at the same point
        self.pending: tuple[torch.Tensor, Any] | None = None

    def vote(self, flag: bool) -> bool:
        if self.group is None:
            return flag
        decided = self._settle()
        tensor = torch.tensor([1.0 if flag else 0.0])
        self.pending = (tensor, dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group, async_op=True))
        return decided

    def _settle(self) -> bool:
        if self.pending is None:
            return False
        tensor, work = self.pending
        work.wait()
        self.pending = None
        return bool(tensor.item() > 0)

    def close(self) -> None:
        if self.group is not None:
            self._settle()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (one process: `[obj]`)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def mean_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """The element-wise mean of `values` over the ranks (one all-reduce; `values` itself with one process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    total = values.clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
