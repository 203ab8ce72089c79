"""SLURM through submitit: `raf submit` and `raf jobs`.

A submitted job runs a `raf` command (the same entry functions as a local run) in every SLURM task; the tasks
find their rank, world size and master address through `rafmedia.launch.env`. The job is checkpointable:

- SLURM's warning signal before the time limit (submitit asks for USR2 `slurm.signal_delay_s` seconds before it)
  or a USR1 someone sends: the trainer saves a checkpoint at the end of its step, then rank 0 requeues the job
  (`scontrol requeue`) and the requeued job resumes from that checkpoint: no step is lost or repeated.
- Preemption or `scontrol requeue` (SLURM sends SIGTERM, then requeues the job itself): the trainer saves and
  exits; the requeued job resumes.
- A signal that arrives outside the training loop (loading data, evaluating) requeues through submitit's
  `checkpoint()`, and the re-run resumes from the last periodic checkpoint.

Every submission is recorded in `<slurm.folder>/jobs.jsonl`, which `raf jobs` lists.
"""
from __future__ import annotations

import json
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from shutil import which
from typing import Any, Callable, Sequence

from rafmedia.core.errors import UserError
from rafmedia.core.files import atomic_write_text

JOBS_FILE = "jobs.jsonl"
REQUEUE_SIGNALS = {128 + signal.SIGUSR1, 128 + signal.SIGUSR2}  # exit codes of a run stopped by a warning signal


@dataclass
class SlurmConfig:
    """SLURM resources for `raf submit` (each maps to an sbatch option, see the README)."""

    nodes: int = 1  # --nodes
    tasks_per_node: int = 1  # --ntasks-per-node (one per GPU for training)
    gpus_per_node: int = 0  # --gpus-per-node
    cpus_per_task: int = 4  # --cpus-per-task (DataLoader workers + 1)
    mem_gb: float = 16.0  # --mem
    time_min: int = 60  # --time, in minutes
    partition: str = ""  # --partition
    account: str = ""  # --account
    qos: str = ""  # --qos
    constraint: str = ""  # --constraint
    signal_delay_s: int = 120  # --signal=USR2@N: warning before the time limit, time to checkpoint
    max_requeues: int = 10  # time-limit requeues before giving up
    array_parallelism: int = 32  # --array=...%N: array tasks running at once
    setup: list[str] = field(default_factory=list)  # shell lines before the job (module load, source venv)
    sbatch: dict[str, Any] = field(default_factory=dict)  # any other sbatch option, e.g. {exclusive: true}
    folder: str = "runs/jobs"  # submitit's logs and pickles (%j: job id), and jobs.jsonl

    def validate(self) -> None:
        for name in ("nodes", "tasks_per_node", "cpus_per_task", "time_min"):
            if getattr(self, name) < 1:
                raise UserError(f"slurm.{name} must be >= 1, got {getattr(self, name)}")

    def executor_parameters(self, job_name: str) -> dict[str, Any]:
        """submitit SlurmExecutor parameters (SLURM's own names)."""
        parameters: dict[str, Any] = {
            "job_name": job_name, "nodes": self.nodes, "ntasks_per_node": self.tasks_per_node,
            "cpus_per_task": self.cpus_per_task, "mem": f"{int(self.mem_gb * 1024)}M", "time": self.time_min,
            "signal_delay_s": self.signal_delay_s, "array_parallelism": self.array_parallelism,
            "setup": list(self.setup), "additional_parameters": dict(self.sbatch)}
        if self.gpus_per_node:
            parameters["gpus_per_node"] = self.gpus_per_node
        for name in ("partition", "account", "qos", "constraint"):
            if getattr(self, name):
                parameters[name] = getattr(self, name)
        return parameters


class JobFailed(UserError):
    """A submitted job failed (`raf submit --wait`): exit code 1, the message names the job and its log."""

    exit_code = 1


def wait_for(jobs: list[Any]) -> None:
    """Blocks until every job (or array task) ends; raises JobFailed naming the first that failed and its error."""
    from submitit.core.utils import FailedJobError, UncompletedJobError  # optional extra (rafmedia[slurm])

    for job in jobs:
        try:
            job.results()  # every task's result
        except (FailedJobError, UncompletedJobError):
            raise JobFailed(f"job {job.job_id} failed ({job.state}): {last_error(Path(job.paths.stderr))}; log: "
                            f"{job.paths.stderr} (or `raf jobs --tail {job.job_id}`)") from None


def last_error(stderr: Path) -> str:
    """The `raf: error:` line of a job's stderr log, else its last line."""
    lines = [line.strip() for line in stderr.read_text(encoding="utf-8", errors="replace").splitlines()
             if line.strip()] if stderr.is_file() else []
    errors = [line for line in lines if line.startswith("raf: error:")]
    return (errors or lines or ["no log written"])[-1]


# A command line -> its exit code: `rafmedia.launch.cli.main`.
Entry = Callable[[list[str]], int]


class RafJob:
    """One `raf` command as a checkpointable SLURM job (submitit calls it in every task of the job).

    Args:
        argv: the command line after `raf`.
        entry: the function that runs a command line as `raf` does and returns its exit code, given by whoever
            submits (the CLI gives its own `main`). It is not imported here because the CLI imports this module
            (cli -> commands -> slurm): importing the CLI back would close an import cycle. submitit pickles the
            job, so `entry` must be a module-level function (pickled by reference).
    """

    def __init__(self, argv: Sequence[str], entry: Entry):
        self.argv = list(argv)
        self.entry = entry

    def __call__(self) -> str:
        code = self.entry(self.argv)
        if code == 0:
            return "done"
        if code in REQUEUE_SIGNALS:
            self.requeue()
        if code > 128:  # SIGTERM: SLURM is preempting or requeueing the job itself; its checkpoint is saved
            raise SystemExit(code)
        raise RuntimeError(f"raf {' '.join(self.argv)} failed with exit code {code}; see the job's stderr log")

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on the warning signal when it reaches the job outside our training loop."""
        import submitit  # optional extra (rafmedia[slurm]); present here since submitit runs this job

        return submitit.helpers.DelayedSubmission(RafJob(self.argv, self.entry))

    @staticmethod
    def requeue() -> None:
        import submitit  # optional extra (rafmedia[slurm]); present here since submitit runs this job

        environment = submitit.JobEnvironment()
        if environment.global_rank == 0:
            subprocess.run(["scontrol", "requeue", environment.job_id], check=True, timeout=60)

    def __repr__(self) -> str:
        return f"RafJob(raf {' '.join(self.argv)})"


def executor(config: SlurmConfig, job_name: str):
    try:
        import submitit  # optional extra (rafmedia[slurm]): only `raf submit` needs it
    except ImportError:
        raise UserError("raf submit needs submitit: pip install 'rafmedia[slurm]'") from None
    if not _has_slurm():
        raise UserError("no SLURM here: `sbatch` is not on PATH (submit from a login node, or start a local test "
                        "cluster with launch/local_slurm.sh start and `source /tmp/rafmedia-slurm/env.sh`)")
    config.validate()
    folder = Path(config.folder).resolve()
    runner = submitit.SlurmExecutor(folder=folder / "%j", max_num_timeout=config.max_requeues)
    runner.update_parameters(**config.executor_parameters(job_name))
    return runner


def submit(config: SlurmConfig, argv: Sequence[str], *, entry: Entry, job_name: str, out: str) -> Any:
    """Submits `raf ARGV` as one job, run by `entry` (see `RafJob`); records it in jobs.jsonl; returns the job."""
    job = executor(config, job_name).submit(RafJob(argv, entry))
    record_jobs(config, [job], command=job_name, argvs=[argv], outs=[out])
    return job


def submit_array(config: SlurmConfig, argvs: list[list[str]], *, entry: Entry, job_name: str,
                 outs: list[str]) -> list[Any]:
    """Submits one array job with a task per `raf ARGV`, each run by `entry` (at most slurm.array_parallelism
    running at once)."""
    runner = executor(config, job_name)
    jobs = runner.submit_array([RafJob(argv, entry) for argv in argvs])
    record_jobs(config, jobs, command=job_name, argvs=argvs, outs=outs)
    return jobs


def record_jobs(config: SlurmConfig, jobs: list[Any], *, command: str, argvs: list[Sequence[str]],
                outs: list[str]) -> None:
    path = Path(config.folder) / JOBS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"job_id": job.job_id, "command": command, "argv": list(argv), "out": out,
                                "submitted": time.strftime("%Y-%m-%d %H:%M:%S"), "folder": str(job.paths.folder)}) + "\n"
                    for job, argv, out in zip(jobs, argvs, outs))
    existing = path.read_text(encoding="utf-8") if path.is_file() else ""
    atomic_write_text(path, existing + lines)


def recorded_jobs(folder: str | Path) -> list[dict[str, Any]]:
    path = Path(folder) / JOBS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def job_states(job_ids: list[str]) -> dict[str, str]:
    """SLURM state of each job (sacct, so finished jobs are included); UNKNOWN when SLURM has none."""
    if not job_ids or not _has_slurm():
        return {job_id: "UNKNOWN" for job_id in job_ids}
    done = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(job_ids)],
                          capture_output=True, text=True, timeout=60)
    states = {}
    for line in done.stdout.splitlines():
        job_id, _, state = line.partition("|")
        states[job_id] = state.split()[0] if state else "UNKNOWN"
    return {job_id: states.get(job_id, "UNKNOWN") for job_id in job_ids}


def log_paths(entry: dict[str, Any]) -> list[Path]:
    folder = Path(entry["folder"])
    return sorted(folder.glob(f"{entry['job_id']}_*_log.out")) + sorted(folder.glob(f"{entry['job_id']}_*_log.err"))


def _has_slurm() -> bool:
    return which("sbatch") is not None and (which("sacct") is not None)


def cancel(job_id: str) -> None:
    subprocess.run(["scancel", job_id], check=True, timeout=60)

