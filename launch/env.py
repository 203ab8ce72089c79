"""One resolver for where a process sits in a job, whatever started it.

    torchrun / deepspeed launcher   RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (GROUP_RANK)
    SLURM (srun)                    SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, SLURM_NODEID, SLURM_STEP_NODELIST
    Open MPI (mpirun)               OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_LOCAL_RANK, OMPI_COMM_WORLD_SIZE
    MPICH / Intel MPI (mpiexec)     PMI_RANK, PMI_SIZE, MPI_LOCALRANKID
    nothing                         one process

The first launcher whose variables are present wins, in that order (torchrun started inside a SLURM job is
torchrun). A launcher whose variables are only partly set is refused with the names of the missing ones.
`export_for_torch` writes the result as torchrun's variables, which is all the engine reads.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import Mapping

from rafmedia.core.errors import UserError
from rafmedia.engine.distributed import free_port

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class JobEnvironment:
    launcher: str  # torchrun | slurm | openmpi | mpich | single
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT

    def torch_variables(self) -> dict[str, str]:
        return {"RANK": str(self.rank), "LOCAL_RANK": str(self.local_rank), "WORLD_SIZE": str(self.world_size),
                "GROUP_RANK": str(self.node_rank), "MASTER_ADDR": self.master_addr,
                "MASTER_PORT": str(self.master_port)}


# launcher -> (variables that say it started us, variables it must also set)
SIGNATURES = {
    "torchrun": (("RANK", "WORLD_SIZE"), ("LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")),
    "slurm": (("SLURM_STEP_ID", "SLURM_PROCID"), ("SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NODEID")),
    "openmpi": (("OMPI_COMM_WORLD_RANK",), ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK")),
    "mpich": (("PMI_RANK",), ("PMI_SIZE",)),
}


def resolve_environment(env: Mapping[str, str] | None = None, *, mpi_master: bool = True) -> JobEnvironment:
    """The job environment of this process (see the module docstring). `mpi_master=False` skips asking MPI
    for rank 0's host name when MASTER_ADDR is not set (for tests of pure logic)."""
    env = os.environ if env is None else env
    for launcher, (markers, required) in SIGNATURES.items():
        present = [name for name in markers if name in env]
        if not present:
            continue
        missing = [name for name in markers + required if name not in env]
        if missing:
            if launcher == "slurm" and "SLURM_STEP_ID" not in env:
                continue  # a batch script itself (not an srun step) is one process
            raise UserError(f"the {launcher} environment is half set: {', '.join(sorted(set(markers + required) - set(missing)))} "
                            f"given but {', '.join(missing)} missing; start the job with its launcher, or unset these "
                            "variables to run one process")
        return RESOLVERS[launcher](env, mpi_master)
    return JobEnvironment("single")


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise UserError(f"{name}={env[name]!r} is not an integer") from None


def _torchrun(env: Mapping[str, str], _: bool) -> JobEnvironment:
    return _checked(JobEnvironment("torchrun", rank=_int(env, "RANK"), local_rank=_int(env, "LOCAL_RANK"),
                                   world_size=_int(env, "WORLD_SIZE"),
                                   node_rank=_int(env, "GROUP_RANK") if "GROUP_RANK" in env else 0,
                                   master_addr=env["MASTER_ADDR"], master_port=_int(env, "MASTER_PORT")))


def _slurm(env: Mapping[str, str], _: bool) -> JobEnvironment:
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodes:
        raise UserError("the slurm environment is half set: SLURM_STEP_NODELIST (or SLURM_JOB_NODELIST) missing")
    job = env.get("SLURM_JOB_ID", "0")
    port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else port_for_job(job)
    return _checked(JobEnvironment("slurm", rank=_int(env, "SLURM_PROCID"), local_rank=_int(env, "SLURM_LOCALID"),
                                   world_size=_int(env, "SLURM_NTASKS"), node_rank=_int(env, "SLURM_NODEID"),
                                   master_addr=env.get("MASTER_ADDR") or _slurm_master(env, nodes), master_port=port))


def _slurm_master(env: Mapping[str, str], nodes: str) -> str:
    """Loopback when the whole step runs on one node (no name lookup needed), else the first host of the node list."""
    if env.get("SLURM_STEP_NUM_NODES", env.get("SLURM_NNODES")) == "1":
        return "127.0.0.1"
    return first_host(nodes)


def _mpi(launcher: str, rank: str, size: str, local: str | None):
    def resolve(env: Mapping[str, str], mpi_master: bool) -> JobEnvironment:
        address, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
        if (address is None or port is None) and mpi_master:
            address, port = mpi_rank0_address(address, port)
        return _checked(JobEnvironment(launcher, rank=_int(env, rank), world_size=_int(env, size),
                                       local_rank=_int(env, local) if local and local in env else 0,
                                       node_rank=_int(env, "OMPI_COMM_WORLD_NODE_RANK") if "OMPI_COMM_WORLD_NODE_RANK" in env else 0,
                                       master_addr=address or "127.0.0.1", master_port=int(port or DEFAULT_PORT)))
    return resolve


RESOLVERS = {
    "torchrun": _torchrun,
    "slurm": _slurm,
    "openmpi": _mpi("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    "mpich": _mpi("mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
}


def _checked(job: JobEnvironment) -> JobEnvironment:
    if not 0 <= job.rank < job.world_size:
        raise UserError(f"{job.launcher}: rank {job.rank} is outside the world size {job.world_size}")
    return job


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
        from mpi4py import MPI
    except ImportError:
        raise UserError("started by mpirun without MASTER_ADDR / MASTER_PORT: install mpi4py (pip install "
                        "'rafmedia[mpi]') or export MASTER_ADDR and MASTER_PORT") from None
    comm = MPI.COMM_WORLD
    mine = (address or socket.gethostname(), port or str(free_port())) if comm.Get_rank() == 0 else None
    return comm.bcast(mine, root=0)


def export_for_torch(job: JobEnvironment, env: dict[str, str] | None = None) -> None:
    """Writes the job's place as torchrun's variables (what `rafmedia.engine` and torch.distributed read)."""
    if job.launcher == "single":
        return
    (os.environ if env is None else env).update(job.torch_variables())
