"""The environment resolver on the variables each launcher sets (pure logic), then under a real mpirun."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rafmedia.core.errors import UserError
from rafmedia.core.registry import Registry
from rafmedia.engine.distributed import Place, place_from_environment
from rafmedia.launch import env as launch_env
from rafmedia.launch.env import export_for_torch, first_host, list_launchers, port_for_job, resolve_environment

TORCHRUN = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "GROUP_RANK": "1", "MASTER_ADDR": "node07",
            "MASTER_PORT": "29400"}
SRUN = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_NODEID": "2",
        "SLURM_STEP_NODELIST": "gpu[007-010,12],cpu01", "SLURM_JOB_ID": "4242"}
OPENMPI = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
           "MASTER_ADDR": "head", "MASTER_PORT": "1234"}
MPICH = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MASTER_ADDR": "head", "MASTER_PORT": "1234"}


@pytest.mark.parametrize("env, expected", [
    ({}, ("single", 0, 0, 1, 0, "127.0.0.1")),
    (TORCHRUN, ("torchrun", 3, 1, 4, 1, "node07")),
    (SRUN, ("slurm", 5, 1, 8, 2, "gpu007")),
    (OPENMPI, ("openmpi", 2, 0, 3, 0, "head")),
    (MPICH, ("mpich", 1, 1, 2, 0, "head")),
    ({**SRUN, **TORCHRUN}, ("torchrun", 3, 1, 4, 1, "node07")),  # torchrun inside a SLURM job is torchrun
    ({**SRUN, "SLURM_STEP_NUM_NODES": "1"}, ("slurm", 5, 1, 8, 2, "127.0.0.1")),  # one node: no name lookup
    ({k: v for k, v in SRUN.items() if k != "SLURM_STEP_ID"}, ("single", 0, 0, 1, 0, "127.0.0.1")),  # the batch script
])
def test_each_launcher_resolves_to_its_rank_and_master(env, expected):
    place = resolve_environment(env, mpi_master=False)
    assert (place.launcher, place.rank, place.local_rank, place.world_size, place.node_rank,
            place.master_addr) == expected


def test_launchers_are_detected_in_priority_order_and_listed_so():
    assert list_launchers() == ["torchrun", "slurm", "openmpi", "mpich"]
    assert [launch_env.LAUNCHERS.tags(name)["priority"] for name in list_launchers()] == [0, 1, 2, 3]


@pytest.mark.parametrize("env", [TORCHRUN, SRUN, OPENMPI, MPICH])
def test_the_engine_reads_back_the_place_launch_exports(env):
    place = resolve_environment(env, mpi_master=False)
    exported: dict[str, str] = {}
    export_for_torch(place, exported)
    assert place_from_environment(exported) == dataclasses.replace(place, launcher="torchrun")
    single: dict[str, str] = {}
    export_for_torch(resolve_environment({}), single)
    assert single == {} and place_from_environment(single) == Place()


def test_a_new_launcher_is_one_registered_function(monkeypatch):
    launchers = Registry("launcher")
    for name in launch_env.LAUNCHERS.names():
        launchers.register(name, **launch_env.LAUNCHERS.tags(name))(launch_env.LAUNCHERS.get(name))
    monkeypatch.setattr(launch_env, "LAUNCHERS", launchers)

    @launchers.register("pbs", priority=1.5, markers=("PBS_TASKNUM",), required=("PBS_NP",))
    def pbs(env, *, mpi_master):
        return Place(launcher="pbs", rank=int(env["PBS_TASKNUM"]), world_size=int(env["PBS_NP"]))

    assert list_launchers() == ["torchrun", "slurm", "pbs", "openmpi", "mpich"]
    assert resolve_environment({**OPENMPI, "PBS_TASKNUM": "1", "PBS_NP": "2"}) == Place(1, 0, 2, launcher="pbs")
    with pytest.raises(UserError, match="the pbs environment is half set: PBS_TASKNUM given but PBS_NP missing"):
        resolve_environment({"PBS_TASKNUM": "1"})
    with pytest.raises(UserError, match="pbs: rank 3 is outside the world size 2"):
        resolve_environment({"PBS_TASKNUM": "3", "PBS_NP": "2"})


def test_slurm_port_is_the_same_for_every_task_of_a_job_and_differs_between_jobs():
    assert resolve_environment(SRUN).master_port == resolve_environment({**SRUN, "SLURM_PROCID": "0"}).master_port
    assert port_for_job("4242") != port_for_job("4243")
    assert resolve_environment({**SRUN, "MASTER_PORT": "5555"}).master_port == 5555


@pytest.mark.parametrize("nodelist, host", [
    ("node01", "node01"), ("gpu[07-09,12],cpu01", "gpu07"), ("a[3,5-6]", "a3"), ("n[0001-0004]", "n0001"),
    ("login1,login2", "login1"),
])
def test_first_host_of_a_slurm_node_list(nodelist, host):
    assert first_host(nodelist) == host


@pytest.mark.parametrize("env, message", [
    ({"RANK": "0", "WORLD_SIZE": "2"}, "torchrun environment is half set: RANK, WORLD_SIZE given but LOCAL_RANK, "
                                       "MASTER_ADDR, MASTER_PORT missing"),
    ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "0"}, "slurm environment is half set"),
    ({"OMPI_COMM_WORLD_RANK": "0"}, "openmpi environment is half set"),
    ({**TORCHRUN, "RANK": "9"}, "rank 9 is outside the world size 4"),
    ({**TORCHRUN, "WORLD_SIZE": "four"}, "WORLD_SIZE='four' is not an integer"),
])
def test_a_half_set_or_inconsistent_environment_names_what_is_wrong(env, message):
    with pytest.raises(UserError, match=message):
        resolve_environment(env, mpi_master=False)


def test_under_a_real_mpirun_every_rank_resolves_and_shares_rank_0s_address(tmp_path):
    mpirun = Path(sys.executable).parent / "mpirun"
    script = ("import json, sys; from rafmedia.launch.env import resolve_environment as r; p = r(); "
              "print(json.dumps([p.launcher, p.rank, p.world_size, p.master_addr, p.master_port]))")
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    env.pop("MASTER_ADDR", None), env.pop("MASTER_PORT", None)
    done = subprocess.run([str(mpirun), "-n", "3", "--oversubscribe", sys.executable, "-c", script], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    places = sorted(json.loads(line) for line in done.stdout.splitlines() if line.startswith("["))
    assert [place[:3] for place in places] == [["openmpi", rank, 3] for rank in range(3)]
    assert len({(place[3], place[4]) for place in places}) == 1  # one master address and port, broadcast from rank 0
