"""`raf portal ...`: the handlers of the portal's commands (the portal itself is rafmedia.portal), and the demo,
which composes synth -> cohort build -> portal -> pretrain -> two submissions scored by a real worker."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from rafmedia.core.errors import UserError
from rafmedia.engine.distributed import free_port
from rafmedia.engine.encoders import create_encoder
from rafmedia.engine.export import export_encoder
from rafmedia.engine.pretrain import pretrain_encoder
from rafmedia.launch.config import load_config
from rafmedia.launch.portal_cluster import run_cluster_worker, worker_slurm_config
from rafmedia.portal import sandbox
from rafmedia.portal.client import submit, wait_until_answers
from rafmedia.portal.scoring import run_worker
from rafmedia.portal.service import init_portal, manage_user, publish_challenge, serve
from rafmedia.shards.cohort import build_cohort
from rafmedia.shards.cohort_spec import spec_from_dict
from rafmedia.shards.split_store import write_split_store
from rafmedia.shards.synth import generate_cohort

DEMO_PROTOCOL = {"seeds": [0, 1, 2], "bootstrap_resamples": 200, "permutations": 200, "min_group_size": 4}


def run_portal_command(args: argparse.Namespace):
    """Runs `raf portal <portal_command>` (`run_portal_<command>` below)."""
    return globals()[f"run_portal_{args.portal_command.replace('-', '_')}"](args)


def run_portal_init(args: argparse.Namespace) -> Path:
    portal = init_portal(args.root, database_url=args.database_url or "")
    print(f"portal: {portal.path} (database {portal.database_url.split('@')[-1]}); next: "
          f"raf portal user {args.root} add NAME --role admin, raf portal add-challenge {args.root} BUILD --name NAME")
    return portal.path


def run_portal_add_challenge(args: argparse.Namespace) -> str:
    protocol = {}
    for item in args.protocol or []:
        key, _, value = item.partition("=")
        if not value:
            raise UserError(f"--protocol '{item}' must be evaluate-key=value, e.g. seeds=[0,1,2]")
        protocol[key] = yaml.safe_load(value)
    slug = publish_challenge(args.root, args.build_dir, slug=args.name, title=args.title or "",
                             description=args.description or "", licence=args.licence or "",
                             public_test_labels=not args.no_public_test_labels, protocol=protocol,
                             progress=not args.quiet)
    print(f"challenge '{slug}' published: phases sanity (public test split, logs shown) and final (hidden split)")
    return slug


def run_portal_serve(args: argparse.Namespace) -> None:
    serve(args.root, host=args.host, port=args.port)


def run_portal_worker(args: argparse.Namespace) -> int:
    print(sandbox.detect().describe())  # what submitted code would run under, before any is claimed
    if args.slurm:
        slurm = worker_slurm_config(args.root, config_file=args.config, overrides=args.overrides,
                                    partition=args.partition, time_min=args.time, gpus=args.gpus)
        return run_cluster_worker(args.root, slurm=slurm, entry=args.entry, once=args.once, poll_s=args.poll,
                                  max_jobs=args.max_jobs)
    given = [option for option, value in (("-c/--config", args.config), ("--partition", args.partition is not None),
                                          ("--time", args.time is not None), ("--gpus", args.gpus is not None),
                                          ("--max-jobs", args.max_jobs != 1), ("slurm.* overrides", args.overrides))
             if value]
    if given:
        raise UserError(f"{', '.join(given)} only apply with --slurm (scoring on a cluster); add --slurm or drop them")
    return run_worker(args.root, once=args.once, poll_s=args.poll)


def run_portal_user(args: argparse.Namespace) -> str:
    password = os.environ.get("RAF_PORTAL_PASSWORD", "") if args.action == "add" else ""
    message = manage_user(args.root, args.action, args.name, role=args.role, team=args.team or "", password=password)
    print(message)
    return message


def run_portal_submit(args: argparse.Namespace) -> dict:
    token = args.token or os.environ.get("RAF_PORTAL_TOKEN", "")
    if not token:
        raise UserError("no API token: pass --token or set RAF_PORTAL_TOKEN (make one on your account page, or "
                        "`raf portal user ROOT token NAME`)")
    return submit(args.url, token, args.challenge, args.weights, phase=args.phase, name=args.name or "",
                  wait=not args.no_wait, timeout_s=args.timeout, progress=not args.quiet,
                  single_request=args.single_request, chunk_mb=args.chunk_mb, retry_for_s=args.retry_for,
                  code=args.code)


def demo_spec(store: Path) -> dict:
    return {"name": "synth-raf-demo", "seed": 0,
            "sources": [{"name": "synth", "store": str(store)}],
            "splits": {"train": 0.5, "public_test": 0.2, "hidden_test": 0.3},
            "stratify": ["site", "sex", "disease"],
            "out_of_distribution": {"hold_out": {"site": ["site-c"]}, "splits": ["public_test", "hidden_test"],
                                    "fraction": 0.3},
            "challenging": {"fraction": 0.25, "splits": ["public_test", "hidden_test"],
                            "alterations": [{"name": "gaussian_noise", "severity": 3},
                                            {"name": "bias_field", "severity": 2}]}}


def run_portal_demo(args: argparse.Namespace) -> str:
    """Builds everything into OUT, starts the server and a worker, submits two encoders, prints the URL."""
    out = Path(args.out).resolve()
    root = out / "portal"
    if (root / "portal.yaml").is_file():
        raise UserError(f"{root} exists already: remove {out} or pass another --out")
    config = load_config(args.config, [f"cohort.num_subjects={args.subjects}", *args.overrides])
    quiet = args.quiet
    print("1/5 synthetic cohort and its split into train / public test / hidden test", flush=True)
    store = generate_cohort(config.cohort, store_config=config.store, out=out / "synth" / "cohort.zarr",
                            progress=not quiet)
    build = build_cohort(spec_from_dict(demo_spec(store.path)), out=out / "build", progress=not quiet)
    print("2/5 portal root, challenge and accounts", flush=True)
    init_portal(root)
    publish_challenge(root, build, slug="synth-raf", title="Synthetic body CT: robust and fair disease probes",
                      description="Pretrain an encoder on the training split; the organisers' probes score it on "
                      "the hidden test split for performance, robustness and fairness (the RAF index).",
                      licence="CC BY 4.0 (synthetic data made by rafmedia)", protocol=DEMO_PROTOCOL,
                      progress=not quiet)
    for name, role in (("organiser", "organiser"), ("alice", "participant"), ("bob", "participant")):
        manage_user(root, "add", name, role=role, password=f"{name}-demo-password")
    tokens = {name: manage_user(root, "token", name) for name in ("alice", "bob")}
    print("3/5 two encoders: pretrained on the public training split, and a random initialisation", flush=True)
    train_store = write_split_store(build, "train", out / "train" / "cohort.zarr", progress=not quiet)
    config.data.cohort = str(train_store.path)
    pretrained = pretrain_encoder(data=config.data, encoder=config.encoder, task=config.task,
                                  train_config=config.train, out_dir=out / "pretrain", progress=not quiet)
    random_init = create_encoder(config.encoder.name, **config.encoder.options)
    baseline = export_encoder(random_init, out / "random" / "encoder.safetensors", architecture=config.encoder.name,
                              options=config.encoder.options, card={"name": "random init"})
    print("4/5 server and worker", flush=True)
    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    raf = [sys.executable, "-m", "rafmedia.launch.cli", "portal"]
    logs = {name: open(out / f"{name}.log", "w") for name in ("server", "worker")}
    processes = [subprocess.Popen([*raf, "serve", str(root), "--port", str(port)], stdout=logs["server"],
                                  stderr=subprocess.STDOUT),
                 subprocess.Popen([*raf, "worker", str(root)], stdout=logs["worker"], stderr=subprocess.STDOUT)]
    try:
        wait_until_answers(url + "/api/challenges", processes[0], out / "server.log")
        print("5/5 submissions (through the HTTP API, as `raf portal submit` does)", flush=True)
        for user, weights, name in (("alice", pretrained, f"{config.task.name} {config.encoder.name}"),
                                    ("bob", baseline, "random init")):
            submit(url, tokens[user], "synth-raf", weights, phase="sanity", name=name, progress=not quiet)
        print(f"\nportal demo running: {url}/challenges/synth-raf/leaderboard?phase=sanity\n"
              "  (the final phase's leaderboard stays private until the organiser reveals it)\n"
              f"  sign in as organiser / organiser-demo-password, alice / alice-demo-password or "
              f"bob / bob-demo-password\n  logs: {out}/server.log, {out}/worker.log", flush=True)
        if args.exit_when_scored:
            return url
        print("Ctrl-C stops the server and the worker.", flush=True)
        while all(process.poll() is None for process in processes):
            time.sleep(1)
        raise UserError(f"the portal's server or worker stopped; see {out}/server.log and {out}/worker.log")
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)
