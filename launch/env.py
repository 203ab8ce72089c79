"""One resolver for where a process sits in a job, whatever started it.

    torchrun / deepspeed launcher   RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (GROUP_RANK)
    SLURM (srun)                    SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, SLURM_NODEID, SLURM_STEP_NODELIST
    Open MPI (mpirun)               OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_LOCAL_RANK, OMPI_COMM_WORLD_SIZE
    MPICH / Intel MPI (mpiexec)     PMI_RANK, PMI_SIZE, MPI_LOCALRANKID
    nothing                         one process

Each launcher is one function in the `LAUNCHERS` registry, tagged with the variables that say it started us
(`markers`), the ones it must also set (`required`) and its `priority`. The first launcher whose markers are
present wins, in priority order (torchrun started inside a SLURM job is torchrun). A launcher whose variables are
only partly set is refused with the names of the missing ones. `export_for_torch` writes the resulting `Place`
as torchrun's variables, which is all the engine reads.
"""
from __future__ import annotations

import os
import re
import socket
from typing import Mapping

from rafmedia.core.errors import UserError
from rafmedia.core.registry import Registry
from rafmedia.engine.distributed import DEFAULT_MASTER_ADDR, DEFAULT_MASTER_PORT, Place, free_port

# A launcher is a function (env, *, mpi_master) -> Place, where `mpi_master` says whether it may ask MPI for rank 0's
# address. Detection follows the `priority` tag (lowest first), not the names' order nor the order of registration:
# a launcher that may run inside another (torchrun inside a SLURM allocation) must be asked before the outer one, and
# a launcher registered in another module must be able to say where it goes.
LAUNCHERS: Registry[Place] = Registry("launcher")


def list_launchers() -> list[str]:
    """The registered launchers in the order they are detected."""
    return sorted(LAUNCHERS.names(), key=lambda name: LAUNCHERS.tags(name)["priority"])


def resolve_environment(env: Mapping[str, str] | None = None, *, mpi_master: bool = True) -> Place:
    """The place of this process in its job (see the module docstring).

    Args:
        env: the environment variables to read (default: this process's).
        mpi_master: under MPI without MASTER_ADDR / MASTER_PORT, ask rank 0 for its host over MPI; False skips
            that (for tests of pure logic).
    """
    env = os.environ if env is None else env
    for launcher in list_launchers():
        tags = LAUNCHERS.tags(launcher)
        markers, required = tags["markers"], tags["required"]
        if not any(name in env for name in markers):
            continue
        missing = [name for name in markers + required if name not in env]
        if missing:
            given = ", ".join(sorted(set(markers + required) - set(missing)))
            raise UserError(f"the {launcher} environment is half set: {given} given but {', '.join(missing)} "
                            "missing; start the job with its launcher, or unset these variables to run one process")
        return _checked(LAUNCHERS.get(launcher)(env, mpi_master=mpi_master))
    return Place()


@LAUNCHERS.register("torchrun", priority=0, markers=("RANK", "WORLD_SIZE"),
                    required=("LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))
def torchrun(env: Mapping[str, str], *, mpi_master: bool) -> Place:
    """torchrun and the deepspeed launcher."""
    return Place(launcher="torchrun", rank=_int(env, "RANK"), local_rank=_int(env, "LOCAL_RANK"),
                 world_size=_int(env, "WORLD_SIZE"), node_rank=_int(env, "GROUP_RANK") if "GROUP_RANK" in env else 0,
                 master_addr=env["MASTER_ADDR"], master_port=_int(env, "MASTER_PORT"))


# SLURM_PROCID alone is no marker: a batch script (not an srun step) has it too, and is one process.
@LAUNCHERS.register("slurm", priority=1, markers=("SLURM_STEP_ID",),
                    required=("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NODEID"))
def slurm(env: Mapping[str, str], *, mpi_master: bool) -> Place:
    """A task of an srun step; the rendezvous is the step's first node, on a port derived from the job id."""
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodes:
        raise UserError("the slurm environment is half set: SLURM_STEP_NODELIST (or SLURM_JOB_NODELIST) missing")
    port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else port_for_job(env.get("SLURM_JOB_ID", "0"))
    return Place(launcher="slurm", rank=_int(env, "SLURM_PROCID"), local_rank=_int(env, "SLURM_LOCALID"),
                 world_size=_int(env, "SLURM_NTASKS"), node_rank=_int(env, "SLURM_NODEID"),
                 master_addr=env.get("MASTER_ADDR") or _slurm_master(env, nodes), master_port=port)


@LAUNCHERS.register("openmpi", priority=2, markers=("OMPI_COMM_WORLD_RANK",),
                    required=("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"))
def openmpi(env: Mapping[str, str], *, mpi_master: bool) -> Place:
    """Open MPI's mpirun."""
    return mpi_place("openmpi", env, rank="OMPI_COMM_WORLD_RANK", size="OMPI_COMM_WORLD_SIZE",
                     local="OMPI_COMM_WORLD_LOCAL_RANK", mpi_master=mpi_master)


@LAUNCHERS.register("mpich", priority=3, markers=("PMI_RANK",), required=("PMI_SIZE",))
def mpich(env: Mapping[str, str], *, mpi_master: bool) -> Place:
    """MPICH's and Intel MPI's mpiexec (Hydra)."""
    return mpi_place("mpich", env, rank="PMI_RANK", size="PMI_SIZE", local="MPI_LOCALRANKID", mpi_master=mpi_master)


def mpi_place(launcher: str, env: Mapping[str, str], *, rank: str, size: str, local: str, mpi_master: bool) -> Place:
    """The place under an MPI launcher whose rank, size and local rank are in the named variables. Without
    MASTER_ADDR / MASTER_PORT, rank 0's host and a free port on it come over MPI (when `mpi_master`)."""
    address, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    if (address is None or port is None) and mpi_master:
        address, port = mpi_rank0_address(address, port)
    node_rank = _int(env, "OMPI_COMM_WORLD_NODE_RANK") if "OMPI_COMM_WORLD_NODE_RANK" in env else 0
    return Place(launcher=launcher, rank=_int(env, rank), world_size=_int(env, size),
                 local_rank=_int(env, local) if local in env else 0, node_rank=node_rank,
                 master_addr=address or DEFAULT_MASTER_ADDR, master_port=int(port or DEFAULT_MASTER_PORT))


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise UserError(f"{name}={env[name]!r} is not an integer") from None


def _slurm_master(env: Mapping[str, str], nodes: str) -> str:
    """Loopback when the whole step runs on one node (no name lookup needed), else the first host of the node list."""
    if env.get("SLURM_STEP_NUM_NODES", env.get("SLURM_NNODES")) == "1":
        return "127.0.0.1"
    return first_host(nodes)


def _checked(place: Place) -> Place:
    if not 0 <= place.rank < place.world_size:
        raise UserError(f"{place.launcher}: rank {place.rank} is outside the world size {place.world_size}")
    return place


def port_for_job(job_id: str) -> int:
    """A port every task of a SLURM job computes alike (and two jobs on one node rarely share)."""
    digits = "".join(ch for ch in str(job_id) if ch.isdigit()) or "0"
    return 15000 + int(digits[-6:]) % 20000


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[07-09,12],cpu01' -> 'gpu07' (zero padding kept)."""
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise UserError(f"cannot read the SLURM node list {nodelist!r}")
    prefix, ranges = match.group(1), match.group(3)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def mpi_rank0_address(address: str | None, port: str | None) -> tuple[str, str]:
    """Rank 0's host name and a free port on it, broadcast to every rank over MPI (mpi4py)."""
    try:
        from mpi4py import MPI  # optional extra (rafmedia[mpi]): only mpirun without MASTER_ADDR needs it
    except ImportError:
        raise UserError("started by mpirun without MASTER_ADDR / MASTER_PORT: install mpi4py (pip install "
                        "'rafmedia[mpi]') or export MASTER_ADDR and MASTER_PORT") from None
    comm = MPI.COMM_WORLD
    mine = (address or socket.gethostname(), port or str(free_port())) if comm.Get_rank() == 0 else None
    return comm.bcast(mine, root=0)


def export_for_torch(place: Place, env: dict[str, str] | None = None) -> None:
    """Writes the job's place as torchrun's variables (what `rafmedia.engine` and torch.distributed read)."""
    if place.launcher == "single":
        return
    (os.environ if env is None else env).update(place.torch_variables())
