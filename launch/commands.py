"""One function per `raf` subcommand: resolve the config, write it next to the outputs, call the entry."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
from pathlib import Path

from rafmedia.core.errors import UserError
from rafmedia.core.files import read_json, write_json
from rafmedia.core.profiling import StageClock, format_profile, write_profile
from rafmedia.engine.encoders import list_encoders
from rafmedia.engine.export import export_hf
from rafmedia.engine.pretrain import pretrain_encoder, validate_pretraining
from rafmedia.engine.profile import ProfileSettings, profile_pretraining
from rafmedia.engine.tasks import list_tasks
from rafmedia.engine.wrappers import list_wrappers
from rafmedia.evaluate.cache import EmbeddingCache
from rafmedia.evaluate.config import EvaluateConfig
from rafmedia.evaluate.encoder_entries import EncoderEntry, build_entries
from rafmedia.evaluate.encoder_sources import list_encoder_sources
from rafmedia.evaluate.group_metrics import list_group_metrics
from rafmedia.evaluate.latent import list_latent_tests
from rafmedia.evaluate.leaderboard import find_stores, leaderboard_rows, to_markdown, write_leaderboard
from rafmedia.evaluate.probes import describe_probes
from rafmedia.evaluate.rca import list_reverse_classifiers
from rafmedia.evaluate.report import REPORT_JSON, render_report
from rafmedia.evaluate.results import RESULTS_FILE, ResultsStore
from rafmedia.evaluate.runner import run_evaluation
from rafmedia.launch.config import RafConfig, load_config, packaged_configs, write_resolved
from rafmedia.launch.env import export_for_torch, list_launchers, resolve_environment
from rafmedia.launch.slurm import cancel, job_states, log_paths, recorded_jobs, submit, submit_array, wait_for
from rafmedia.shards.alterations import list_alterations
from rafmedia.shards.alterations.preview import write_preview
from rafmedia.shards.cohort import build_cohort
from rafmedia.shards.cohort_spec import load_spec
from rafmedia.shards.datasheet import DatasheetConfig, load_manifest, write_datasheet
from rafmedia.shards.ingest import (bad_subjects_error, consolidate, format_consolidated, format_summary, ingest,
                                    resolve_task)
from rafmedia.shards.preprocess import list_intensity_policies
from rafmedia.shards.store import COHORT_STORE, CohortStore, resolve_store
from rafmedia.shards.synth import generate_cohort
from rafmedia.shards.synth_brain import generate_brain_cohort
from rafmedia.shards.wds_export import export_webdataset


def run_command(args: argparse.Namespace):
    """Runs the subcommand the parser put in `args.command` (`run_<command>` below) and returns what it returns."""
    return globals()[f"run_{args.command}"](args)


def _config(args: argparse.Namespace) -> RafConfig:
    return load_config(args.config, args.overrides)


SYNTH_KINDS = {"body": (generate_cohort, "cohort"), "brain": (generate_brain_cohort, "brain_cohort")}


def run_synth(args: argparse.Namespace) -> Path:
    config = _config(args)
    out = Path(args.out)
    generate, section = SYNTH_KINDS[getattr(args, "kind", "body")]  # the quickstart's namespace has no kind
    store = generate(getattr(config, section), store_config=config.store, out=out / COHORT_STORE,
                     progress=not args.quiet, overwrite=args.overwrite)
    write_resolved(config, out, [section, "store"])
    print(f"cohort: {store.path} ({len(store.subject_ids())} subjects; manifest.csv and planted.json inside)")
    return store.path


def run_pretrain(args: argparse.Namespace) -> Path:
    config = _config(args)
    validate_pretraining(config.data, config.encoder, config.task, config.train)  # before any file is touched
    place = resolve_environment()
    export_for_torch(place)  # torchrun, srun, mpirun or one process: the engine reads torchrun's variables
    config.data.cohort = args.cohort or config.data.cohort  # a flag, not an override: paths need no YAML quoting
    if not config.data.cohort:
        raise UserError("no cohort to pretrain on: pass --cohort STORE (or data.cohort=STORE)")
    config.data.cohort = str(resolve_store(config.data.cohort))
    is_main = place.is_main  # one rank writes the resolved config and speaks
    if is_main:
        write_resolved(config, args.out, ["data", "encoder", "task", "train"])
    weights = pretrain_encoder(data=config.data, encoder=config.encoder, task=config.task, train_config=config.train,
                               out_dir=args.out, progress=not args.quiet)
    if is_main:
        print(f"encoder: {weights}")
    return weights


def run_evaluate(args: argparse.Namespace) -> Path:
    """Every encoder x cohort cell through one results store; a report per cohort; the leaderboard."""
    config = _config(args)
    cohorts = [str(resolve_store(cohort))
               for cohort in (args.cohort or ([config.evaluate.cohort] if config.evaluate.cohort else []))]
    if args.encoder:
        config.evaluate.encoders = expand_encoders(args.encoder)
    config.evaluate.cohort = cohorts[0] if cohorts else ""
    config.evaluate.validate()
    place = resolve_environment()
    export_for_torch(place)  # torchrun / srun / mpirun: each rank embeds a share of the subjects
    is_main = place.is_main
    out = Path(args.out)
    results = ResultsStore(out / RESULTS_FILE)
    cache = EmbeddingCache(out / "embeddings.zarr")
    if is_main:
        write_resolved(config, out, ["evaluate"])
    html = None
    for cohort in cohorts:
        config.evaluate.cohort = cohort
        clock = StageClock() if getattr(args, "profile", False) else None  # --profile (quickstart has no such flag)
        entries = prepared_entries(config.evaluate, cohort, speak=is_main)
        report = run_evaluation(config.evaluate, progress=not args.quiet, results=results, cache=cache, clock=clock,
                                entries=entries)
        folder = out if len(cohorts) == 1 else out / Path(cohort).parent.name
        if is_main:
            with clock.stage("report", volumes=1) if clock is not None else contextlib.nullcontext():
                write_json(folder / REPORT_JSON, report)
                html = render_report(folder)
            print(f"report: {html.resolve()}")
            if clock is not None:
                write_evaluation_profile(folder, clock, cohort=cohort)
    if is_main:
        files = write_leaderboard(leaderboard_rows([results.path]), out)
        print(f"leaderboard: {files['md'].resolve()} (results store: {results.path.resolve()})")
    return html


def prepared_entries(evaluate: EvaluateConfig, cohort: str, *, speak: bool) -> list[EncoderEntry]:
    """The encoders of `evaluate`, each prepared for `cohort` as its card says (or refused, a `UserError`), with
    what was done printed per encoder."""
    one_seed = evaluate.weak_labels.enabled or evaluate.registration.enabled  # studies of their own: one replicate
    seeds = evaluate.seeds[:1] if one_seed else evaluate.seeds  # as the runner builds them
    channel = (None if evaluate.weak_labels.enabled  # weak labels: every channel
               else evaluate.registration.moving_channel if evaluate.registration.enabled else "image")
    entries = build_entries(evaluate.encoders, options=evaluate.encoder_options, seeds=seeds,
                            random_baseline=evaluate.random_baseline, cohort=cohort, channel=channel)
    if speak:
        for entry in entries:
            print(f"encoder {entry.name}: {entry.info['preparation']['note']} (weights licence: "
                  f"{entry.info['licence']})")
    return entries


def write_evaluation_profile(folder: Path, clock: StageClock, *, cohort: str) -> dict[str, Path]:
    """`raf evaluate --profile`: the evaluator's stages (read, alter, embed, probe, bootstrap, ..., report) as
    FOLDER/profile.json and profile.html. The stages run one after another, so the bound is the longest one."""
    stages = clock.stages()
    total = clock.total_seconds()
    bound = max(stages, key=lambda stage: stage["seconds"])["name"] if stages else None
    advice = [f"{stage['name']} takes {stage['seconds']:.2f} s, {stage['seconds'] / total:.0%} of the "
              f"{total:.2f} s timed" for stage in sorted(stages, key=lambda s: -s["seconds"])[:3] if total > 0]
    profile = {"kind": "evaluation", "stages": stages, "bound": bound, "advice": advice, "cohort": cohort}
    files = write_profile(folder, profile, title=f"raf evaluate profile: {Path(cohort).parent.name}")
    print(format_profile(profile))
    print(f"profile: {files['html'].resolve()} ({files['json'].name} beside it)")
    return files


def run_profile(args: argparse.Namespace) -> dict:
    """`raf profile`: every pretraining stage alone, the real loop end to end, the bound and advice."""
    config = _config(args)
    config.data.cohort = args.cohort or config.data.cohort
    if not config.data.cohort:
        raise UserError("no cohort to profile: pass --cohort STORE (or data.cohort=STORE)")
    config.data.cohort = str(resolve_store(config.data.cohort))
    validate_pretraining(config.data, config.encoder, config.task, config.train)
    settings = ProfileSettings(steps=args.steps, warmup_steps=args.warmup_steps, trace_steps=args.trace_steps,
                               isolated_steps=args.isolated_steps, read_subjects=args.read_subjects)
    settings.validate()
    place = resolve_environment()
    export_for_torch(place)
    out = Path(args.out)
    profile = profile_pretraining(data=config.data, encoder=config.encoder, task=config.task,
                                  train_config=config.train, out_dir=out, settings=settings, progress=not args.quiet)
    if place.is_main:
        write_resolved(config, out, ["data", "encoder", "task", "train"])
        files = write_profile(out, profile, title=f"raf profile: {config.encoder.name} / {config.task.name}, "
                              f"data.source={config.data.source}")
        print(format_profile(profile))
        fraction = profile["end_to_end_fraction_of_bound"]
        print(f"end to end: {profile['end_to_end_rate']:.2f} samples/s"
              + (f", {fraction:.0%} of the bound's isolated rate" if fraction else "")
              + (f"; loader workers needed: {profile['workers_needed']}"
                 if profile["workers_needed"] and config.data.source == "stream" else ""))
        print(f"trace: {', '.join(profile['trace']) or 'none (--trace-steps 0)'} (open in https://ui.perfetto.dev)")
        print(f"profile: {files['html'].resolve()} ({files['json'].name} beside it; the run: {profile['run']})")
    return profile


def expand_encoders(patterns: list[str]) -> list[str]:
    """Encoder paths from paths and quoted globs, in the order given; a glob that matches nothing is an error."""
    paths: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise UserError(f"--encoder '{pattern}' matches no file")
        paths += [path for path in matches if path not in paths]
    return paths


def run_leaderboard(args: argparse.Namespace) -> Path:
    stores = find_stores(args.stores)
    rows = leaderboard_rows(stores)
    files = write_leaderboard(rows, Path(args.out) if args.out else stores[0].parent)
    print(to_markdown(rows))
    print(f"written: {files['md']}, {files['csv']}, {files['html']}")
    return files["md"]


def run_export(args: argparse.Namespace) -> Path:
    """`raf export --hf OUT_DIR ENCODER`: the Hugging Face layout (`rafmedia.engine.export.export_hf`)."""
    folder = export_hf(args.encoder, args.hf, overwrite=args.overwrite)
    print(f"exported: {folder} (config.json, model.safetensors, README.md); load it with "
          f"RafEncoder.from_pretrained('{folder}') or `raf evaluate --encoder {folder}`")
    return folder


def run_report(args: argparse.Namespace) -> Path:
    html = render_report(args.results)
    print(f"report: {html.resolve()}")
    return html


def run_quickstart(args: argparse.Namespace) -> Path:
    """synth -> pretrain -> evaluate (with report) into one run folder."""
    out = Path(args.out)
    common = {"config": args.config, "overrides": args.overrides, "quiet": args.quiet}
    run_synth(argparse.Namespace(**common, out=str(out), overwrite=False))
    weights = run_pretrain(argparse.Namespace(**common, out=str(out / "pretrain"), cohort=str(out / COHORT_STORE)))
    html = run_evaluate(argparse.Namespace(**common, out=str(out / "evaluate"), cohort=[str(out / COHORT_STORE)],
                                           encoder=[str(weights)]))
    config = _config(argparse.Namespace(**common))
    config.data.cohort = config.evaluate.cohort = str(out / COHORT_STORE)
    config.evaluate.encoders = [str(weights)]
    write_resolved(config, out, ["cohort", "store", "data", "encoder", "task", "train", "evaluate"])
    print(f"\nquickstart finished. Open the report:\n  {html.resolve()}")
    return html


def run_portal(args: argparse.Namespace):
    # the web stack (FastAPI, SQLAlchemy, Alembic, uvicorn, httpx) would cost every other command ~1.5 s of imports
    from rafmedia.launch.portal_commands import run_portal_command
    return run_portal_command(args)


def run_shards(args: argparse.Namespace) -> Path:
    return globals()[f"run_shards_{args.shards_command}"](args)


def run_shards_export(args: argparse.Namespace) -> Path:
    config = _config(args)
    store = CohortStore(resolve_store(args.cohort))
    index = export_webdataset(store, args.out, config=config.export, overwrite=args.overwrite, progress=not args.quiet)
    write_resolved(config, args.out, ["export"])
    print(f"shards: {index.parent} (index: {index})")
    return index


def run_shards_ingest(args: argparse.Namespace) -> Path:
    config = _config(args)
    if args.workers is not None:
        config.ingest.workers = args.workers
    if args.require:
        config.ingest.require = [column.strip() for column in args.require.split(",") if column.strip()]
    task_index, num_tasks = resolve_task(args.task_index, args.num_tasks)
    out = Path(args.out)
    summary = ingest(args.input, out / COHORT_STORE, config=config.ingest, store_config=config.store,
                     task_index=task_index, num_tasks=num_tasks, overwrite=args.overwrite, progress=not args.quiet,
                     log=print)
    write_resolved(config, out, ["ingest", "store"])
    print(format_summary(summary))
    if summary.bad and not args.skip_bad:
        raise bad_subjects_error(len(summary.bad), len(summary.outcomes), summary.report or summary.task_report)
    return summary.store


def run_shards_consolidate(args: argparse.Namespace) -> Path:
    result = consolidate(resolve_store(args.store), num_tasks=args.num_tasks)
    print(format_consolidated(result))
    if result["bad"] and not args.skip_bad:
        raise bad_subjects_error(len(result["bad"]), result["num_outcomes"], result["report"])
    return result["report"]


def run_shards_datasheet(args: argparse.Namespace) -> Path:
    attributes = [a.strip() for a in args.attributes.split(",") if a.strip()] if args.attributes else None
    config = DatasheetConfig(attributes=attributes, rare_below=args.rare_below, channel=args.channel,
                             intensity_by=args.intensity_by, stride=args.stride)
    config.validate()
    rows, read_sample, title, default_out = load_manifest(args.source, channel=config.channel, stride=config.stride)
    html = write_datasheet(rows, out=args.out or default_out, config=config, title=title, read_sample=read_sample,
                           progress=not args.quiet)
    print(f"datasheet: {html.parent} (datasheet.md, datasheet.html, datasheet.json; {len(rows)} subjects)")
    return html


def run_cohort(args: argparse.Namespace) -> Path:
    return globals()[f"run_cohort_{args.cohort_command}"](args)


def run_cohort_build(args: argparse.Namespace) -> Path:
    spec = load_spec(args.spec)
    try:
        out = build_cohort(spec, out=args.out or Path("runs/cohorts") / spec.name, overwrite=args.overwrite,
                           datasheets=not args.no_datasheets, progress=not args.quiet)
    except UserError as error:  # a spec key that the data contradicts: name the spec file too
        if str(error).startswith("key '"):
            raise UserError(f"cohort spec '{args.spec}': {error}") from None
        raise
    summary = read_json(out / "cohort.json")
    counts = ", ".join(f"{name} {s['num_subjects']} ({s['num_ood']} OOD, {s['num_altered']} altered)"
                       for name, s in summary["splits"].items())
    print(f"cohort: {out} ({counts}; excluded: {sum(summary['excluded'].values())})")
    return out


def run_alter(args: argparse.Namespace) -> Path:
    return globals()[f"run_alter_{args.alter_command}"](args)


def run_alter_preview(args: argparse.Namespace) -> Path:
    names = [name.strip() for name in args.alterations.split(",") if name.strip()] if args.alterations else None
    if args.max_size < 8:
        raise UserError(f"--max-size must be at least 8 voxels, got {args.max_size}")
    drawn = write_preview(args.volume, args.out, alterations=names, seed=args.seed, max_size=args.max_size)
    print(f"preview: {drawn['path']} ({len(drawn['alterations'])} alterations x 5 severities; "
          f"{drawn['source']}, volume {'x'.join(map(str, drawn['shape']))})")
    return drawn["path"]


# `raf list WHAT`: the names each registry (or the packaged configs) holds.
LISTINGS = {
    "configs": packaged_configs,
    "encoders": list_encoders,
    "tasks": list_tasks,
    "alterations": list_alterations,
    "probes": describe_probes,
    "intensity-policies": list_intensity_policies,
    "wrappers": list_wrappers,
    "encoder-sources": list_encoder_sources,
    "reverse-classifiers": list_reverse_classifiers,
    "group-metrics": list_group_metrics,
    "latent-tests": list_latent_tests,
    "launchers": list_launchers,
}


def run_list(args: argparse.Namespace) -> list[str]:
    names = LISTINGS[args.what]()
    print("\n".join(names))
    return names


def run_submit(args: argparse.Namespace) -> list:
    """`raf submit pretrain|evaluate|ingest CONFIG`: the same command as a SLURM job (an array for evaluation sweeps
    and for ingest over sub-cohorts). Every job runs its command line through `args.entry`, the function the CLI's
    parser gives (its own `main`), so the job behaves as `raf` run by hand."""
    _check_submit_options(args)
    config = load_config(args.config_file, args.overrides)
    out = Path(args.out or f"runs/{args.what}").resolve()
    config_file = str(Path(args.config_file).resolve()) if Path(args.config_file).is_file() else args.config_file
    common = ["--config", config_file, "--quiet", *args.overrides]
    submit_jobs = {"pretrain": _submit_pretrain, "evaluate": _submit_evaluate, "ingest": _submit_ingest}[args.what]
    jobs = submit_jobs(args, config, common, out)
    write_resolved(config, out, ["slurm"])
    for job in jobs:
        print(f"submitted {args.what} job {job.job_id} (logs: {job.paths.stdout})")
    print(f"follow with: raf jobs   |   raf jobs --tail {jobs[0].job_id}")
    if args.what == "evaluate":
        print(f"when they have finished: raf leaderboard '{out}/*/' --out {out}")
    if args.wait:
        wait_for(jobs)
        print(f"all {len(jobs)} job(s) finished; outputs in {out}")
    return jobs


def _check_submit_options(args: argparse.Namespace) -> None:
    """Options of another mode are an error, not silently ignored."""
    given = {"--input": args.input is not None, "--num-tasks": args.num_tasks != 1, "--skip-bad": args.skip_bad,
             "--cohort": bool(args.cohort_list), "--encoder": bool(args.encoder)}
    modes = {"pretrain": {"--cohort"}, "evaluate": {"--cohort", "--encoder"},
             "ingest": {"--input", "--num-tasks", "--skip-bad"}}
    foreign = [option for option, present in given.items() if present and option not in modes[args.what]]
    if foreign:
        owners = [mode for mode, options in modes.items() if set(foreign) & options]
        raise UserError(f"raf submit {args.what} does not take {', '.join(foreign)} (for raf submit "
                        f"{' / '.join(owners)}); see raf submit --help")


def _submit_pretrain(args: argparse.Namespace, config: RafConfig, common: list[str], out: Path) -> list:
    if len(args.cohort_list) > 1:
        raise UserError("raf submit pretrain takes one --cohort")
    validate_pretraining(config.data, config.encoder, config.task, config.train)  # refused here, not in the queue
    cohort = args.cohort_list[0] if args.cohort_list else config.data.cohort
    if not cohort:
        raise UserError("no cohort to pretrain on: pass --cohort STORE (or data.cohort=STORE)")
    common = [*common, "--cohort", str(resolve_store(cohort).resolve())]
    return [submit(config.slurm, ["pretrain", *common, "--out", str(out)], entry=args.entry, job_name="raf-pretrain",
                   out=str(out))]


def _submit_evaluate(args: argparse.Namespace, config: RafConfig, common: list[str], out: Path) -> list:
    cells = evaluation_cells(args, config)
    argvs = [["evaluate", *common, "--cohort", cohort, "--encoder", encoder, "--out", str(out / name)]
             for name, encoder, cohort in cells]
    outs = [str(out / name) for name, _, _ in cells]
    if len(argvs) == 1:
        return [submit(config.slurm, argvs[0], entry=args.entry, job_name="raf-evaluate", out=outs[0])]
    return submit_array(config.slurm, argvs, entry=args.entry, job_name="raf-evaluate", outs=outs)


def _submit_ingest(args: argparse.Namespace, config: RafConfig, common: list[str], out: Path) -> list:
    """One array task per share of the subjects, each `raf shards ingest --task-index i --num-tasks N`, then one
    `raf shards consolidate` job that SLURM starts when every task has succeeded (and cancels if one failed)."""
    if not args.input:
        raise UserError("raf submit ingest needs --input PATH (a CSV/TSV listing, a BIDS-like folder or a folder of "
                        "images)")
    if args.num_tasks < 1:
        raise UserError(f"--num-tasks must be >= 1, got {args.num_tasks}")
    listing = Path(args.input)
    if not listing.exists():
        raise UserError(f"--input {listing} does not exist")
    config.ingest.validate()  # refused here, not in the queue
    # a bad subject is reported by the consolidation, not a failed task: the tasks always pass --skip-bad
    argvs = [["shards", "ingest", *common, "--input", str(listing.resolve()), "--out", str(out), "--skip-bad",
              "--task-index", str(index), "--num-tasks", str(args.num_tasks)] for index in range(args.num_tasks)]
    tasks = submit_array(config.slurm, argvs, entry=args.entry, job_name="raf-ingest", outs=[str(out)] * len(argvs))
    array_id = tasks[0].job_id.split("_")[0]
    after = dataclasses.replace(config.slurm, nodes=1, tasks_per_node=1, gpus_per_node=0,
                                sbatch={**config.slurm.sbatch, "dependency": f"afterok:{array_id}",
                                        "kill_on_invalid_dep": "yes"})
    consolidate_argv = ["shards", "consolidate", str(out / "cohort.zarr"), "--num-tasks", str(args.num_tasks),
                   *(["--skip-bad"] if args.skip_bad else [])]
    return [*tasks, submit(after, consolidate_argv, entry=args.entry, job_name="raf-consolidate", out=str(out))]


def evaluation_cells(args: argparse.Namespace, config: RafConfig) -> list[tuple[str, str, str]]:
    """(name, encoder, cohort) of every checkpoint x cohort cell of an evaluation sweep."""
    encoders = sorted({path for pattern in (args.encoder or config.evaluate.encoders) for path in
                       (glob.glob(pattern) or [pattern])})
    cohorts = list(args.cohort_list or ([config.evaluate.cohort] if config.evaluate.cohort else []))
    if not encoders or not cohorts:
        raise UserError("nothing to evaluate: give --encoder WEIGHTS (repeatable, globs allowed) and --cohort STORE "
                        "(repeatable), or evaluate.encoders and evaluate.cohort in the config")
    cells = []
    for encoder in encoders:
        for cohort in cohorts:
            store = resolve_store(cohort)
            name = f"{Path(encoder).parent.name}-{Path(encoder).stem}__{Path(store).parent.name}"
            cells.append((name, str(Path(encoder).resolve()), str(Path(store).resolve())))
    return cells


def run_jobs(args: argparse.Namespace) -> list[dict]:
    """`raf jobs`: the project's SLURM jobs with their state; --tail JOB prints its logs, --cancel JOB cancels it."""
    config = _config(args)
    entries = recorded_jobs(config.slurm.folder)
    if args.cancel:
        cancel(args.cancel)
        print(f"cancelled {args.cancel}")
        return entries
    if args.tail:
        chosen = [entry for entry in entries if entry["job_id"] == args.tail or entry["job_id"].startswith(f"{args.tail}_")]
        if not chosen:
            raise UserError(f"job {args.tail} is not in {Path(config.slurm.folder) / 'jobs.jsonl'} (see `raf jobs`)")
        for entry in chosen:
            for path in log_paths(entry):
                lines = path.read_text(encoding="utf-8", errors="replace").splitlines()[-args.lines:]
                print(f"==> {path} <==\n" + "\n".join(lines))
        return chosen
    states = job_states([entry["job_id"] for entry in entries])
    print(f"{'job':<14} {'command':<14} {'state':<12} {'submitted':<20} out")
    for entry in entries:
        print(f"{entry['job_id']:<14} {entry['command']:<14} {states[entry['job_id']]:<12} {entry['submitted']:<20} "
              f"{entry['out']}")
    if not entries:
        print(f"(no jobs recorded in {Path(config.slurm.folder) / 'jobs.jsonl'})")
    return entries
