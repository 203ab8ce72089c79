"""The `raf` command. Thin: parse, resolve the config once, call the entry function of one package.

User errors print one line and exit with code 2; bugs keep their traceback.
"""
from __future__ import annotations

import argparse
import signal
import sys
import time

from rafmedia.core.errors import Preempted, UserError
from rafmedia.core.registry import did_you_mean
from rafmedia.launch import __version__
from rafmedia.launch.commands import LISTINGS, run_command

EPILOG_CONFIG = """configuration:
  Values come from the packaged defaults (configs/default.yaml), then --config FILE (a path, or a packaged
  name such as 'tiny'), then key=value overrides, for example:
    train.steps=200  encoder.options.width=24  cohort.sites.2.noise_std=0.12  evaluate.seeds=[0,1]
  The resolved configuration is written to OUT/resolved_config.yaml. See `raf list configs`."""


class RafArgumentParser(argparse.ArgumentParser):
    """argparse, but usage errors are one line with 'did you mean', exit code 2."""

    def error(self, message: str) -> None:
        if "invalid choice" in message:
            bad = message.split("'")[1] if "'" in message else ""
            name = message.split(":")[0].removeprefix("argument ")  # "argument what: invalid choice: 'x' (...)"
            action = self._choice_action(name)
            choices = [str(choice) for choice in action.choices] if action else []
            problem = (f"unknown command '{bad}'" if isinstance(action, argparse._SubParsersAction)
                       else f"'{bad}' is not a choice for {name}")
            message = f"{problem};{did_you_mean(bad, choices)} (choose from: {', '.join(choices)})"
        raise UserError(f"{message} (see `{self.prog} --help`)")

    def _choice_action(self, name: str) -> argparse.Action | None:
        """The argument argparse names `name` in an error (its metavar, destination or option strings)."""
        for action in self._actions:
            if action.choices is not None and name in (action.metavar, action.dest, "/".join(action.option_strings)):
                return action
        return None


EXAMPLES = {
    "synth": """examples:
  raf synth --out runs/synth                              # 200 subjects at 64^3, planted biases of default.yaml
  raf synth --out runs/big cohort.num_subjects=500 cohort.shape=[96,96,96]
  raf synth --out runs/noisy cohort.sites.2.noise_std=0.2 cohort.sex_ratio=0.25
  raf synth --kind brain --out runs/brain brain_cohort.num_subjects=50 brain_cohort.rater_noise=0.2  # T1/FLAIR/PET""",
    "pretrain": """examples:
  raf pretrain --cohort runs/synth --out runs/pretrain
  raf pretrain --cohort runs/synth --out runs/p2 train.steps=1000 task.options.temperature=0.2
  raf pretrain --cohort runs/synth --out runs/rot task.name=rotation 'task.options={crop_size: 40}'
  raf pretrain --cohort runs/synth --out runs/mae encoder.name=vit_3d task.name=mae_3d train.ema_decay=0.999
  raf pretrain --cohort runs/big --out runs/big data.source=stream data.patch_size=96 data.num_workers=8
  torchrun --nproc_per_node 4 -m rafmedia.launch.cli pretrain --cohort runs/synth --out runs/ddp train.wrapper=ddp
  torchrun --nproc_per_node 8 -m rafmedia.launch.cli pretrain ... train.wrapper=deepspeed train.zero_stage=2 \\
      train.precision=bf16 train.grad_accum_steps=4
  Lists: raf list encoders | tasks | wrappers.
  Resume: re-run the same command; it continues from OUT/checkpoints (model, optimizer, schedule, EMA, RNG and
  data position). SIGTERM / SIGUSR1 (SLURM preemption) save a checkpoint and exit with 143 / 138.
  Logs: OUT/metrics.jsonl and tensorboard --logdir OUT/tensorboard. See docs/pretraining.md.""",
    "export": """examples:
  raf export --hf runs/hf-encoder runs/pretrain/encoder.safetensors
  raf evaluate --cohort runs/synth --encoder runs/hf-encoder --out runs/eval
  python -c "from rafmedia.engine.export import RafEncoder; print(RafEncoder.from_pretrained('runs/hf-encoder'))"
  Set the weights' licence when pretraining: raf pretrain ... encoder.licence=apache-2.0""",
    "evaluate": """examples:
  raf evaluate --cohort runs/synth --encoder runs/pretrain/encoder.safetensors --out runs/eval
  raf evaluate --cohort runs/synth --encoder runs/hf-encoder --out runs/eval      # a `raf export --hf` folder
  raf evaluate --cohort runs/synth --encoder a.safetensors --encoder b.safetensors evaluate.seeds=[0,1,2,3,4]
  raf evaluate --cohort runs/siteA --cohort runs/siteB --encoder 'runs/*/encoder.safetensors' --out runs/sweep
      (re-run after adding a checkpoint: only its cells are computed; results in runs/sweep/results.sqlite)
  torchrun --nproc_per_node 4 -m rafmedia.launch.cli evaluate ...     # subjects shared out among 4 ranks
  raf evaluate ... evaluate.alterations=[gaussian_noise] evaluate.group_by=[site,sex,age]
  raf evaluate ... 'evaluate.raf_weights={performance: 2, robustness: 1, fairness: 1}'
  raf evaluate ... evaluate.adaptors.enabled=true    # linear, kNN, MLP, partial/full fine-tuning, LoRA x 1/10/100%
                                                   # labels x 5 seeds, with intervals (docs/evaluation.md)
  raf evaluate --cohort runs/brain --encoder runs/p/encoder.safetensors --out runs/weak evaluate.weak_labels.enabled=true
      (small cohorts with one ordinal grade per patient: attention-MIL vs pooled probes with intervals, ordinal heads,
      label noise, explanation maps scored against planted lesions; docs/weak-labels.md)""",
    "profile": """examples:
  raf profile --cohort runs/synth --out runs/profile                 # the quickstart's settings (data.source=memory)
  raf profile --cohort runs/synth --out runs/profile-stream data.source=stream data.patch_size=48 data.num_workers=1
  raf profile --cohort runs/big --config my_run.yaml --steps 50      # the settings of your run, 50 timed steps
  torchrun --nproc_per_node 2 -m rafmedia.launch.cli profile --cohort runs/synth train.wrapper=ddp  # + all-reduce
  Output: a table here; OUT/profile.html (stage waterfall, throughput per stage, bound, advice), OUT/profile.json
  (every number), OUT/run/ (the end-to-end run: metrics.jsonl) and a Perfetto/Chrome trace per rank in
  OUT/run/profile/ (open it at https://ui.perfetto.dev). How to read it: docs/profiling.md.""",
    "leaderboard": """examples:
  raf leaderboard runs/sweep                     # runs/sweep/results.sqlite -> runs/sweep/leaderboard.{md,csv,html}
  raf leaderboard 'runs/jobs-*/' --out runs/board   # the stores of several SLURM array tasks""",
    "shards export": """examples:
  raf shards export --cohort runs/synth --out runs/wds                       # whole volumes, 512 MB shards
  raf shards export --cohort runs/synth --out runs/wds-patches export.mode=patches export.patch_size=48 \\
      export.patches_per_subject=16 export.shard_size_mb=256""",
    "shards ingest": """examples:
  raf shards ingest --input data/scans/ --out runs/ingest          # a folder of .nii.gz/.nrrd/.mha or DICOM folders
  raf shards ingest --input subjects.csv --out runs/ct --require sex,age ingest.spacing=[1.5,1.5,2.0] \\
      'ingest.intensity.ct={name: ct_window, low: -1000, high: 400}'
  raf shards ingest --input bids_root/ --out runs/mr --workers 8 --skip-bad    # BIDS-like, with participants.tsv
  raf shards ingest --input subjects.csv --out runs/big --task-index 3 --num-tasks 16   # one of 16 array tasks
      (under SLURM --array the task defaults come from SLURM_ARRAY_TASK_ID/COUNT; then: raf shards consolidate)
  Listing columns: subject_id, image or image:<channel> (image:t1, image:t2, ...), optional label, metadata.
  Re-running skips finished subjects. Exit code 1 when some subjects were bad (see OUT/cohort.zarr/ingest_report.md).""",
    "shards consolidate": """examples:
  raf shards consolidate runs/big           # after all --num-tasks N array tasks finished (sbatch --dependency=afterany)
  raf shards consolidate runs/big/cohort.zarr --num-tasks 16 --skip-bad""",
    "shards datasheet": """examples:
  raf shards datasheet runs/synth                          # -> runs/synth/cohort.zarr/datasheet/datasheet.{md,html,json}
  raf shards datasheet runs/synth --attributes site,sex --rare-below 0.1 --out runs/datasheet
  raf shards datasheet runs/cohorts/v1/splits/public_test.csv   # a split from `raf cohort build` (alterations applied)""",
    "cohort build": """examples:
  raf synth --out runs/synth && raf cohort build example --out runs/cohorts/example   # the packaged example spec
  raf cohort build my_cohort.yaml --out runs/cohorts/v1
  raf cohort build my_cohort.yaml --out runs/cohorts/v1 --overwrite --no-datasheets
  (spec keys: name, seed, sources, select, splits, stratify, group_by, out_of_distribution, challenging, imbalance;
   see configs/cohorts/example.yaml)""",
    "quickstart": """examples:
  raf quickstart                          # about 3 minutes on 2 CPU cores, into runs/quickstart
  raf quickstart --config tiny --out runs/tiny   # the same pipeline in seconds""",
    "submit": """examples:
  raf submit pretrain configs/my_run.yaml --out runs/p1 slurm.gpus_per_node=4 slurm.tasks_per_node=4 \\
      slurm.partition=gpu slurm.time_min=720 train.wrapper=ddp
  raf submit evaluate configs/eval.yaml --encoder 'runs/*/encoder.safetensors' --cohort runs/siteA --cohort runs/siteB
      (one array task per checkpoint x cohort; slurm.array_parallelism of them at once)
  raf submit pretrain configs/tiny.yaml --cohort runs/synth --wait     # block until it finishes
  raf submit ingest default --input subjects.csv --out runs/ct --num-tasks 16 ingest.spacing=[1.5,1.5,2.0]
      (16 array tasks share the subjects, then one `raf shards consolidate` job runs when all have succeeded)
  Resources: the slurm section of the config (nodes, tasks_per_node, gpus_per_node, cpus_per_task, mem_gb,
  time_min, partition, account, qos, constraint, sbatch: {any: option}, setup: [module load ...]).
  Preemption or the time limit: the job saves a checkpoint, requeues itself and resumes.""",
    "jobs": """examples:
  raf jobs                      # the jobs submitted from this project (slurm.folder/jobs.jsonl), with their state
  raf jobs --tail 1234          # the last lines of job 1234's stdout and stderr (every array task)
  raf jobs --cancel 1234""",
    "alter preview": """examples:
  raf alter preview runs/synth --out grid.png                     # first subject of a store, every alteration
  raf alter preview runs/synth/cohort.zarr:sub-0003 --out grid.png --alterations rotation,elastic,gamma
  raf alter preview scan.nii.gz --out ct.png --alterations metal_streaks,beam_hardening --seed 3
  (rows: alterations; columns: the clean slice, then severities 1-5 with their parameter; see `raf list alterations`)""",
}


def _add_config_arguments(parser: argparse.ArgumentParser, out_default: str) -> None:
    parser.add_argument("-c", "--config", metavar="FILE", help="YAML config (path or packaged name, e.g. tiny)")
    parser.add_argument("--out", metavar="DIR", default=out_default, help=f"output folder (default: {out_default})")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, applied last")


def build_parser() -> argparse.ArgumentParser:
    parser = RafArgumentParser(prog="raf", description="rafmedia: SSL pretraining of 3D encoders and robustness/fairness "
                               "(RAF) evaluation. Start with `raf quickstart`.", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"rafmedia {__version__}")
    # The deepspeed launcher passes --local_rank=N before the subcommand; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=RafArgumentParser)
    _add_run_commands(commands)
    _add_data_commands(commands)
    _add_cohort_and_alter_commands(commands)
    _add_slurm_commands(commands)
    _add_portal_commands(commands)
    listing = commands.add_parser("list", help="list what is registered: encoders, tasks, alterations, probes, group "
                                  "metrics, latent tests, launchers, configs, ...")
    listing.add_argument("what", choices=sorted(LISTINGS))
    return parser


def _add_run_commands(commands: argparse._SubParsersAction) -> None:
    """synth, pretrain, evaluate, profile, leaderboard, export, report, quickstart."""
    formatter = argparse.RawDescriptionHelpFormatter
    synth = commands.add_parser("synth", help="write the synthetic reference cohort (zarr store + manifest)",
                                description="Generate the synthetic cohort (simplified 3D body scans with labels, "
                                "demographics, per-site acquisition profiles and planted biases; or, with --kind brain, "
                                "T1/FLAIR/PET brain-like subjects with a planted lesion, a rated ordinal grade and "
                                "missing channels) into OUT/cohort.zarr, with manifest.csv and planted.json inside. "
                                "Re-running resumes; --overwrite starts again.",
                                epilog=EXAMPLES["synth"] + "\n\n" + EPILOG_CONFIG, formatter_class=formatter)
    _add_config_arguments(synth, "runs/synth")
    synth.add_argument("--kind", choices=("body", "brain"), default="body", help="body: the body cohort (config "
                       "section cohort); brain: the weak-label brain cohort (section brain_cohort). Default: body")
    synth.add_argument("--overwrite", action="store_true", help="delete an existing store first")

    pretrain = commands.add_parser("pretrain", help="pretrain an encoder with a pretext task",
                                   description="Pretrain encoder.name with task.name on a cohort store, as one process "
                                   "or under torchrun / deepspeed (train.wrapper=plain|ddp|deepspeed); writes "
                                   "OUT/encoder.safetensors + encoder.card.json, metrics.jsonl, tensorboard/ and "
                                   "checkpoints/ (a re-run resumes from the last checkpoint).",
                                   epilog=EXAMPLES["pretrain"] + "\n\n" + EPILOG_CONFIG, formatter_class=formatter)
    _add_config_arguments(pretrain, "runs/pretrain")
    pretrain.add_argument("--cohort", metavar="STORE", help="cohort store (or a folder holding cohort.zarr); sets data.cohort")

    evaluate = commands.add_parser("evaluate", help="score encoders for robustness and fairness (RAF) on cohorts",
                                   description="Embed each cohort with each encoder (and a random-init baseline), fit "
                                   "probes, score robustness under alterations, per-group fairness with intervals and "
                                   "permutation tests, latent bias tests and the RAF index. Every (encoder, cohort) cell "
                                   "is kept in OUT/results.sqlite: a re-run computes only the missing cells. Writes "
                                   "OUT/report.json, report.html, report.md (one cohort; several: OUT/<cohort>/...) and "
                                   "OUT/leaderboard.md/.csv/.html. Under torchrun the ranks share out the subjects.",
                                   epilog=EXAMPLES["evaluate"] + "\n\n" + EPILOG_CONFIG, formatter_class=formatter)
    _add_config_arguments(evaluate, "runs/evaluate")
    evaluate.add_argument("--cohort", metavar="STORE", action="append", default=[],
                          help="cohort store; repeat for several (sets evaluate.cohort)")
    evaluate.add_argument("--encoder", metavar="WEIGHTS", action="append", default=[],
                          help="exported encoder (.safetensors with its .card.json, or a `raf export --hf` folder) or "
                          "a quoted glob; repeat for several. Its card's preprocessing decides how each cohort is "
                          "prepared: resampled to its spacing and reoriented on the fly, or refused when a channel "
                          "or the intensity policy differs; what was done is printed per encoder")
    evaluate.add_argument("--profile", action="store_true",
                          help="also time the evaluator's stages (read, alter, embed, probe, bootstrap, ..., report) "
                          "and write OUT/profile.json and profile.html (docs/profiling.md)")

    profile = commands.add_parser(
        "profile", help="find the stage that bounds pretraining, with advice computed from measurements",
        description="Measure every pretraining stage alone at the run's settings (store read cold and warm, chunk "
        "decode, patch sampling per loader worker, views in torch and DALI, host-to-device copy, forward+backward, "
        "optimizer step, gradient all-reduce under torchrun), then run the real pipeline for --steps steps into "
        "OUT/run. Prints and writes each stage's volumes/s, patches/s and voxels/s, the bounding stage, the "
        "end-to-end rate as a fraction of the bound's isolated rate, the loader workers needed, and advice "
        "(workers, patches per visit, chunk size, DALI, batch size) each citing the numbers it came from.",
        epilog=EXAMPLES["profile"] + "\n\n" + EPILOG_CONFIG, formatter_class=formatter)
    _add_config_arguments(profile, "runs/profile")
    profile.add_argument("--cohort", metavar="STORE", help="cohort store (or a folder holding cohort.zarr); sets "
                         "data.cohort")
    profile.add_argument("--steps", type=int, default=20, metavar="N", help="end-to-end steps timed (default: 20)")
    profile.add_argument("--warmup-steps", type=int, default=3, metavar="N",
                         help="end-to-end steps run before the timing starts (default: 3)")
    profile.add_argument("--trace-steps", type=int, default=3, metavar="N",
                         help="steps traced by torch.profiler after the timed ones (default: 3; 0: no trace)")
    profile.add_argument("--isolated-steps", type=int, default=5, metavar="N",
                         help="batches each stage processes when measured alone (default: 5)")
    profile.add_argument("--read-subjects", type=int, default=8, metavar="N",
                         help="subjects whose chunk files the store-read and decode stages read (default: 8)")

    leaderboard = commands.add_parser(
        "leaderboard", help="rank the encoders of results stores by RAF index",
        description="Read the cells of one or more results stores (OUT/results.sqlite of `raf evaluate`, or folders "
        "holding one; globs allowed), rank the encoders by RAF index per cohort (and by their mean over cohorts), "
        "print the table and write leaderboard.md, leaderboard.csv and leaderboard.html.",
        epilog=EXAMPLES["leaderboard"], formatter_class=formatter)
    leaderboard.add_argument("stores", metavar="STORE", nargs="+", help="results.sqlite, or a folder holding one")
    leaderboard.add_argument("--out", metavar="DIR", help="where to write the files (default: the first store's folder)")

    export = commands.add_parser(
        "export", help="write an exported encoder in the Hugging Face layout",
        description="Write ENCODER (encoder.safetensors of `raf pretrain`, with its encoder.card.json) as a Hugging "
        "Face folder OUT_DIR: config.json (architecture, options, embed_dim and the card: preprocessing, licences, "
        "data sources, code version, config), model.safetensors (the encoder's state dict, plain safetensors) and "
        "README.md (a model card with license, library_name and tags). Load it offline with "
        "rafmedia.engine.export.RafEncoder.from_pretrained(OUT_DIR), or score it with `raf evaluate --encoder "
        "OUT_DIR`. See docs/checkpoints.md.",
        epilog=EXAMPLES["export"], formatter_class=formatter)
    export.add_argument("--hf", metavar="OUT_DIR", required=True, help="the folder to write (replaced if it holds "
                        "an earlier export)")
    export.add_argument("encoder", metavar="ENCODER", help="encoder.safetensors with its .card.json beside it")
    export.add_argument("--overwrite", action="store_true", help="replace OUT_DIR even if it is not an export")

    report = commands.add_parser("report", help="render a results folder to HTML",
                                 description="Render RESULTS/report.json into RESULTS/report.html (self-contained, "
                                 "figures embedded) and RESULTS/summary.png.")
    report.add_argument("results", metavar="RESULTS", help="folder written by `raf evaluate`")

    quickstart = commands.add_parser("quickstart", help="synth -> pretrain -> evaluate -> report, in one run folder",
                                     description="Run the whole main job on the built-in synthetic cohort into OUT/ "
                                     "and print the path of the report. About 3 minutes on 2 CPU cores; "
                                     "`--config tiny` takes seconds.", epilog=EXAMPLES["quickstart"] + "\n\n" + EPILOG_CONFIG, formatter_class=formatter)
    _add_config_arguments(quickstart, "runs/quickstart")


def _add_data_commands(commands: argparse._SubParsersAction) -> None:
    """raf shards export | ingest | consolidate | datasheet."""
    formatter = argparse.RawDescriptionHelpFormatter
    shards = commands.add_parser("shards", help="data layer: ingest, consolidate, datasheet, export",
                                 description="Data-layer tools: ingest image files into a cohort store (and "
                                 "consolidate an ingest split over array tasks), describe a store in a datasheet, "
                                 "export it to webdataset shards.")
    shard_commands = shards.add_subparsers(dest="shards_command", metavar="SHARDS_COMMAND", parser_class=RafArgumentParser,
                                           required=True)
    export = shard_commands.add_parser("export", help="write webdataset tar shards (volumes or patches)",
                                       description="Write the cohort as webdataset tar shards into OUT (a new folder): "
                                       "image.npy (C,D,H,W), label.npy and json per sample, shards rolled at "
                                       "export.shard_size_mb, listed in OUT/index.json. Readable by `tar` and by "
                                       "webdataset.WebDataset(urls).decode().",
                                       epilog=EXAMPLES["shards export"] + "\n\n" + EPILOG_CONFIG, formatter_class=formatter)
    _add_config_arguments(export, "runs/shards")
    export.add_argument("--cohort", metavar="STORE", required=True, help="cohort store (or a folder holding cohort.zarr)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    ingest = shard_commands.add_parser(
        "ingest", help="ingest NIfTI / NRRD / MHA / DICOM files into a cohort store",
        description="Read a folder of images, a CSV/TSV listing or a BIDS-like layout (participants.tsv) into "
        "OUT/cohort.zarr: reoriented (ingest.orientation), resampled (ingest.spacing), intensity policy per channel "
        "(ingest.intensity), optional foreground crop, every step recorded in the subject's provenance. Bad subjects "
        "are listed with their reason in OUT/cohort.zarr/ingest_report.md; the good ones are ingested.",
        epilog=EXAMPLES["shards ingest"] + "\n\n" + EPILOG_CONFIG, formatter_class=formatter)
    _add_config_arguments(ingest, "runs/ingest")
    ingest.add_argument("--input", metavar="PATH", required=True,
                        help="CSV/TSV listing, BIDS-like folder with participants.tsv, or folder of images")
    ingest.add_argument("--workers", type=int, metavar="N", help="worker processes (sets ingest.workers)")
    ingest.add_argument("--require", metavar="A,B", help="metadata columns every subject needs (sets ingest.require)")
    ingest.add_argument("--skip-bad", action="store_true", help="exit 0 even when some subjects were bad")
    ingest.add_argument("--task-index", type=int, metavar="I", help="this array task (default: $SLURM_ARRAY_TASK_ID)")
    ingest.add_argument("--num-tasks", type=int, metavar="N", help="array tasks (default: $SLURM_ARRAY_TASK_COUNT)")
    ingest.add_argument("--overwrite", action="store_true", help="delete an existing store first")
    consolidate = shard_commands.add_parser(
        "consolidate", help="merge the reports of ingest array tasks; write manifest.csv",
        description="After every `raf shards ingest --num-tasks N` task has finished: merge their reports into "
        "STORE/manifest.csv, STORE/ingest_report.json and STORE/ingest_report.md, and remove staging leftovers.",
        epilog=EXAMPLES["shards consolidate"], formatter_class=formatter)
    consolidate.add_argument("store", metavar="STORE", help="cohort store (or a folder holding cohort.zarr)")
    consolidate.add_argument("--num-tasks", type=int, metavar="N", help="consolidate the run with N tasks "
                             "(default: the newest complete one)")
    consolidate.add_argument("--skip-bad", action="store_true", help="exit 0 even when some subjects were bad")
    datasheet = shard_commands.add_parser(
        "datasheet", help="describe a cohort: subgroups, rare categories, missing metadata, quality, intensities",
        description="Write the datasheet of a cohort store (or of a split manifest CSV from `raf cohort build`): "
        "counts per subgroup and per intersection, rare categories flagged by name, missing metadata, quality-flag "
        "prevalence, shape/spacing histograms and voxel-intensity histograms per site (from a strided sample of each "
        "subject). Writes datasheet.md, datasheet.html (figures embedded) and datasheet.json (every number).",
        epilog=EXAMPLES["shards datasheet"], formatter_class=formatter)
    datasheet.add_argument("source", metavar="STORE", help="cohort store, folder holding cohort.zarr, or split CSV")
    datasheet.add_argument("--out", metavar="DIR", help="output folder (default: STORE/datasheet/; for a split CSV, "
                           "datasheet-<split>/ next to it)")
    datasheet.add_argument("--attributes", metavar="A,B,...", help="attributes to count by (default: every "
                           "categorical metadata column)")
    datasheet.add_argument("--rare-below", type=float, default=0.05, metavar="FRACTION",
                           help="flag categories with a smaller share of subjects as rare (default: 0.05)")
    datasheet.add_argument("--channel", default="image", help="channel for the intensity histograms (default: image)")
    datasheet.add_argument("--intensity-by", metavar="COLUMN", help="one intensity histogram per value of this "
                           "column (default: site when the manifest has it, else one for all subjects)")
    datasheet.add_argument("--stride", type=int, default=4, help="read every Nth voxel along each axis (default: 4)")
    datasheet.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_cohort_and_alter_commands(commands: argparse._SubParsersAction) -> None:
    """raf cohort build, raf alter preview."""
    formatter = argparse.RawDescriptionHelpFormatter
    cohort = commands.add_parser("cohort", help="build train / public-test / hidden-test splits from a YAML spec",
                                 description="Cohort builder: aggregate stores, select, split by subject (or group), "
                                 "plant held-out sites, challenging cases and imbalance.")
    cohort_commands = cohort.add_subparsers(dest="cohort_command", metavar="COHORT_COMMAND", parser_class=RafArgumentParser,
                                            required=True)
    cohort_build = cohort_commands.add_parser(
        "build", help="build split manifests, cohort.json and a datasheet per split",
        description="Build the cohort described by SPEC (a YAML path, or a packaged spec such as 'example') into OUT: "
        "splits/<split>.csv (one row per subject, with ood flag and planted alteration), cohort.json (resolved spec, "
        "realised counts and planted proportions), excluded.csv, resolved_spec.yaml and datasheets/<split>/. "
        "Deterministic for the spec's seed; a subject (or group_by group) never appears in two splits.",
        epilog=EXAMPLES["cohort build"], formatter_class=formatter)
    cohort_build.add_argument("spec", metavar="SPEC", help="cohort spec YAML (or a packaged name: example)")
    cohort_build.add_argument("--out", metavar="DIR", help="output folder (default: runs/cohorts/<spec name>)")
    cohort_build.add_argument("--overwrite", action="store_true", help="replace an existing build of a different spec")
    cohort_build.add_argument("--no-datasheets", action="store_true", help="skip the per-split datasheets (faster)")
    cohort_build.add_argument("--quiet", action="store_true", help="no progress bars")

    alter = commands.add_parser("alter", help="graded image alterations: preview them on a volume",
                                description="Tools for the graded alteration library (`raf list alterations`).")
    alter_commands = alter.add_subparsers(dest="alter_command", metavar="ALTER_COMMAND", parser_class=RafArgumentParser,
                                          required=True)
    preview = alter_commands.add_parser(
        "preview", help="PNG grid of alterations x severities on a volume's middle axial slice",
        description="Apply each alteration at severities 1-5 (one seed) to VOLUME and write a PNG grid: one row per "
        "alteration, the clean middle axial slice in the first column. VOLUME is a NIfTI file, a cohort store (its "
        "first subject) or STORE:subject_id; volumes larger than --max-size per side are resampled first.",
        epilog=EXAMPLES["alter preview"], formatter_class=formatter)
    preview.add_argument("volume", metavar="VOLUME", help="NIfTI file, cohort store, or STORE:subject_id")
    preview.add_argument("--out", metavar="PNG", required=True, help="PNG file to write")
    preview.add_argument("--alterations", metavar="A,B,...", help="alterations to show (default: all registered)")
    preview.add_argument("--seed", type=int, default=0, help="seed of the random draws (default: 0)")
    preview.add_argument("--max-size", type=int, default=128, metavar="N",
                         help="resample so that no side exceeds N voxels (default: 128)")


def _add_slurm_commands(commands: argparse._SubParsersAction) -> None:
    """raf submit, raf jobs."""
    formatter = argparse.RawDescriptionHelpFormatter
    submit = commands.add_parser(
        "submit", help="run pretrain, evaluate or ingest as SLURM jobs (submitit): requeued and resumed on preemption",
        description="Submit `raf pretrain`, `raf evaluate` or `raf shards ingest` with CONFIG as SLURM jobs through "
        "submitit. Resources come from the config's slurm section; every task of the job resolves its rank from SLURM. "
        "On preemption or at the time limit the job checkpoints, requeues itself and resumes. Evaluation over several "
        "checkpoints x cohorts is one job array; ingest is one array over --num-tasks shares of the subjects followed "
        "by a consolidation job.", epilog=EXAMPLES["submit"] + "\n\n" + EPILOG_CONFIG, formatter_class=formatter)
    submit.add_argument("what", choices=["pretrain", "evaluate", "ingest"], help="the command to run in the job")
    submit.add_argument("config_file", metavar="CONFIG", help="YAML config of the run (path or packaged name)")
    submit.add_argument("--out", metavar="DIR", help="output folder (default: runs/<command>)")
    submit.add_argument("--cohort", metavar="STORE", action="append", dest="cohort_list", default=[],
                        help="cohort store; evaluate: repeat for several")
    submit.add_argument("--encoder", metavar="WEIGHTS", action="append", default=[],
                        help="evaluate: exported encoder or glob; repeat for several")
    submit.add_argument("--input", metavar="PATH", help="ingest: CSV/TSV listing, BIDS-like folder or folder of images")
    submit.add_argument("--num-tasks", type=int, default=1, metavar="N",
                        help="ingest: array tasks, each ingesting every Nth subject (default: 1)")
    submit.add_argument("--skip-bad", action="store_true",
                        help="ingest: the consolidation exits 0 even when some subjects were bad")
    submit.add_argument("--wait", action="store_true", help="wait until the job(s) finish; exit 1 if one failed")
    submit.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, applied last")
    # Each job runs its command line through this module's `main`, handed to the job here rather than imported by
    # rafmedia.launch.slurm: the CLI imports slurm (through commands), so slurm importing the CLI would be a cycle.
    submit.set_defaults(entry=main)

    jobs = commands.add_parser("jobs", help="list, tail or cancel the project's SLURM jobs",
                               description="List the jobs `raf submit` recorded in slurm.folder/jobs.jsonl with their "
                               "SLURM state (from sacct), print the end of a job's logs, or cancel one.",
                               epilog=EXAMPLES["jobs"], formatter_class=formatter)
    jobs.add_argument("-c", "--config", metavar="FILE", help="config whose slurm.folder to read (default: runs/jobs)")
    jobs.add_argument("--tail", metavar="JOB", help="print the last --lines lines of the job's stdout and stderr")
    jobs.add_argument("--lines", type=int, default=40, help="lines to print with --tail (default: 40)")
    jobs.add_argument("--cancel", metavar="JOB", help="scancel the job")
    jobs.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (e.g. slurm.folder=DIR)")


PORTAL_EXAMPLES = """organiser:
  raf portal init runs/portal                                   # folders, settings, SQLite database
  raf portal user runs/portal add ada --role organiser          # prints a generated password
  raf portal add-challenge runs/portal runs/cohorts/v1 --name body-ct --licence "CC BY 4.0" \\
      --protocol seeds=[0,1,2,3,4] --no-public-test-labels
  raf portal serve runs/portal --host 0.0.0.0 --port 8000      # the web app (put HTTPS in front of it)
  raf portal worker runs/portal                                 # scores queued submissions; run several
participant:
  raf portal submit --url https://portal.example.org --token raf_... --challenge body-ct runs/p/encoder.safetensors
newcomer:
  raf portal demo --out runs/portal-demo                        # everything above on the synthetic cohort"""


PORTAL_COMMAND_EXAMPLES = {
    "init": """examples:
  raf portal init runs/portal
  raf portal init /srv/portal --database-url postgresql+psycopg://portal@dbhost/portal""",
    "add-challenge": """examples:
  raf portal add-challenge runs/portal runs/cohorts/v1 --name body-ct
  raf portal add-challenge runs/portal runs/cohorts/v1 --name body-ct --title "Body CT" --licence "CC BY 4.0" \\
      --no-public-test-labels --protocol seeds=[0,1,2,3,4] --protocol bootstrap_resamples=1000""",
    "serve": """examples:
  raf portal serve runs/portal                         # http://127.0.0.1:8000/
  raf portal serve runs/portal --host 0.0.0.0 --port 8080""",
    "worker": """examples:
  raf portal worker runs/portal                        # until Ctrl-C; start one per free core or machine
  raf portal worker runs/portal --once                 # score what is queued, then stop
  raf portal worker runs/portal --slurm --partition gpu --gpus 1 --time 120 slurm.mem_gb=32 --max-jobs 8
      (on a login node: each submission is a `raf evaluate` SLURM job, as `raf submit evaluate` makes; follow
       them with `raf jobs slurm.folder=runs/portal/jobs`)
  raf portal worker runs/portal --slurm -c cluster.yaml   # the slurm section of a profile, as for `raf submit`""",
    "user": """examples:
  raf portal user runs/portal add ada --role organiser  # prints a generated password
  RAF_PORTAL_PASSWORD='a long passphrase' raf portal user runs/portal add bo --team lab-b
  raf portal user runs/portal token bo                  # a new API token for `raf portal submit`
  raf portal user runs/portal disable bo                # signs bo out, revokes the tokens""",
    "submit": """examples:
  raf portal submit runs/p/encoder.safetensors --url http://127.0.0.1:8000 --token raf_... --challenge body-ct
  RAF_PORTAL_TOKEN=raf_... raf portal submit runs/p/encoder.safetensors --url https://portal.example.org \\
      --challenge body-ct --phase final --name 'contrastive, 400 steps'
  raf portal submit my/encoder.safetensors --code my/my_encoder.py --url ... --challenge body-ct  # own code""",
    "demo": """examples:
  raf portal demo                                      # runs/portal-demo; Ctrl-C stops it
  raf portal demo --out runs/big-demo --subjects 300 cohort.shape=[48,48,48]""",
}


def _add_portal_commands(commands: argparse._SubParsersAction) -> None:
    """raf portal init | add-challenge | serve | worker | user | submit | demo."""
    formatter = argparse.RawDescriptionHelpFormatter
    portal = commands.add_parser(
        "portal", help="the benchmark web portal: public splits, a hidden split, submissions, leaderboards",
        description="A benchmark portal: each challenge publishes its training and public test splits as webdataset "
        "shards and keeps its hidden test split on the server; participants upload encoders (safetensors + card), "
        "workers score them with the RAF evaluator, leaderboards show every number with its bootstrap interval, rank "
        "intervals and ties. See docs/portal.md.", epilog=PORTAL_EXAMPLES, formatter_class=formatter)
    sub = portal.add_subparsers(dest="portal_command", metavar="PORTAL_COMMAND", parser_class=RafArgumentParser,
                                required=True)
    init = sub.add_parser("init", epilog=PORTAL_COMMAND_EXAMPLES["init"], formatter_class=formatter, help="create a portal root (folders, portal.yaml, secret key, database)",
                          description="Create ROOT with portal.yaml (settings: upload cap, lease, cookies), a secret "
                          "key and the database (SQLite ROOT/portal.db unless --database-url), migrated to the newest "
                          "schema. Re-running on an existing root upgrades its database.")
    init.add_argument("root", metavar="ROOT")
    init.add_argument("--database-url", metavar="URL", help="any SQLAlchemy URL, e.g. postgresql+psycopg://u@h/db")
    add = sub.add_parser("add-challenge", epilog=PORTAL_COMMAND_EXAMPLES["add-challenge"], formatter_class=formatter, help="publish a `raf cohort build` output as a challenge",
                         description="Publish BUILD_DIR (from `raf cohort build`): the train and public_test splits "
                         "become webdataset shards with manifest.csv and SHA256SUMS under ROOT/public; the public test "
                         "split (with labels) and the hidden_test split (renamed case-NNNN) become private stores the "
                         "workers score on. Phases: sanity (public test split, logs shown) and final (hidden split).")
    add.add_argument("root", metavar="ROOT")
    add.add_argument("build_dir", metavar="BUILD_DIR")
    add.add_argument("--name", required=True, help="the challenge's short name in URLs (lower case, digits, '-')")
    add.add_argument("--title", help="the title shown on the pages (default: the build's name)")
    add.add_argument("--description", help="what the challenge is about")
    add.add_argument("--licence", help="the licence of the data, shown on the challenge page")
    add.add_argument("--no-public-test-labels", action="store_true",
                     help="publish the public test split without its label columns and label maps")
    add.add_argument("--protocol", action="append", metavar="KEY=VALUE",
                     help="evaluate.* setting of the scoring protocol, e.g. seeds=[0,1,2] (repeat)")
    add.add_argument("--quiet", action="store_true", help="no progress bars")
    serve = sub.add_parser("serve", epilog=PORTAL_COMMAND_EXAMPLES["serve"], formatter_class=formatter, help="run the web app (uvicorn)",
                           description="Serve the pages and the JSON API (/api, documented at /api/docs).")
    serve.add_argument("root", metavar="ROOT")
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    worker = sub.add_parser("worker", epilog=PORTAL_COMMAND_EXAMPLES["worker"], formatter_class=formatter, help="score queued submissions (several workers may run)",
                            description="Claim queued submissions one at a time with a lease in the database and "
                            "score them on their phase's private split. A worker killed mid-scoring is noticed when "
                            "its lease expires; another worker resumes the submission from its results store and "
                            "embedding cache.")
    worker.add_argument("root", metavar="ROOT")
    worker.add_argument("--once", action="store_true", help="stop when the queue is empty")
    worker.add_argument("--poll", type=float, default=2.0, metavar="S", help="seconds between queue checks")
    cluster = worker.add_argument_group(
        "scoring on a cluster", "--slurm: each submission is scored by a SLURM job (`raf evaluate` through submitit, "
        "as `raf submit evaluate` runs it) that this worker submits and follows; ROOT must be on a filesystem the "
        "compute nodes share. Resources: the packaged slurm section <- -c FILE <- slurm.key=value <- the flags.")
    cluster.add_argument("--slurm", action="store_true", help="score each submission as a SLURM job")
    cluster.add_argument("-c", "--config", metavar="FILE", help="config whose slurm section sets the jobs' resources")
    cluster.add_argument("--partition", metavar="P", help="sets slurm.partition")
    cluster.add_argument("--time", type=int, metavar="MIN", help="sets slurm.time_min (the job's time limit)")
    cluster.add_argument("--gpus", type=int, metavar="N", help="sets slurm.gpus_per_node")
    cluster.add_argument("--max-jobs", type=int, default=1, metavar="N",
                         help="submissions whose jobs are followed at once (default: 1)")
    cluster.add_argument("overrides", nargs="*", metavar="slurm.key=value",
                         help="slurm overrides, e.g. slurm.mem_gb=32 slurm.account=lab slurm.folder=DIR "
                         "(default folder: ROOT/jobs)")
    # the job runs its command line through this module's `main`, as `raf submit` does (see RafJob)
    worker.set_defaults(entry=main)
    user = sub.add_parser("user", epilog=PORTAL_COMMAND_EXAMPLES["user"], formatter_class=formatter, help="add users, make API tokens, disable or enable accounts",
                          description="add NAME: a new account (password from $RAF_PORTAL_PASSWORD, else generated and "
                          "printed); token NAME: a new API token; revoke NAME: revoke every token; disable / enable "
                          "NAME (disabling signs the user out and revokes the tokens).")
    user.add_argument("root", metavar="ROOT")
    user.add_argument("action", choices=["add", "token", "revoke", "disable", "enable"])
    user.add_argument("name", metavar="NAME")
    user.add_argument("--role", default="participant", choices=["participant", "organiser", "admin"])
    user.add_argument("--team", help="team name")
    submit = sub.add_parser("submit", epilog=PORTAL_COMMAND_EXAMPLES["submit"], formatter_class=formatter, help="upload an encoder to a portal and wait for its score",
                            description="Upload WEIGHTS (encoder.safetensors, its encoder.card.json next to it) to a "
                            "challenge and wait until it is scored; exits 2 with the portal's reason when refused or "
                            "failed. The weights go as a resumable upload in chunks: a dropped connection or a "
                            "restarting portal is retried with back-off, and the same command run again after an "
                            "interruption continues the upload where the portal has it (docs/portal.md).")
    submit.add_argument("weights", metavar="WEIGHTS")
    submit.add_argument("--url", required=True, help="the portal's address, e.g. https://portal.example.org")
    submit.add_argument("--token", help="API token (default: $RAF_PORTAL_TOKEN)")
    submit.add_argument("--challenge", required=True, help="the challenge's short name")
    submit.add_argument("--phase", default="sanity", help="phase (default: sanity; the hidden split: final)")
    submit.add_argument("--name", help="the entry's name on the leaderboard (default: the weights' folder name)")
    submit.add_argument("--no-wait", action="store_true", help="return once queued")
    submit.add_argument("--timeout", type=float, default=3600, metavar="S", help="give up waiting after S seconds")
    submit.add_argument("--quiet", action="store_true", help="no progress bar")
    submit.add_argument("--chunk-mb", type=float, default=8.0, metavar="MB",
                        help="size of each chunk of the resumable upload (default: 8)")
    submit.add_argument("--retry-for", type=float, default=600, metavar="S",
                        help="keep retrying a dropped connection or a restarting portal for S seconds without "
                        "progress (default: 600); running the same command again later resumes the upload")
    submit.add_argument("--single-request", action="store_true",
                        help="send the weights in one request, not as a resumable upload in chunks")
    submit.add_argument("--code", metavar="FILE",
                        help="your encoder's code (a .py file or a .tar.gz package) when the card names its factory "
                        "('factory': 'module:function'); it runs in the portal's sandbox (docs/portal-security.md)")
    demo = sub.add_parser("demo", help="a working portal on the synthetic cohort with two scored encoders",
                          description="Synthesise a cohort, build its splits, publish a challenge, add users "
                          "(organiser, alice, bob), pretrain an encoder on the public training split, start the server "
                          "and a worker, submit the pretrained and a random-init encoder, and print the URL.",
                          epilog=PORTAL_COMMAND_EXAMPLES["demo"] + "\n\n" + EPILOG_CONFIG, formatter_class=formatter)
    demo.add_argument("--out", default="runs/portal-demo", help="folder for everything (default: runs/portal-demo)")
    demo.add_argument("-c", "--config", default="tiny", metavar="FILE",
                      help="config of the cohort and pretraining (default: the packaged 'tiny')")
    demo.add_argument("--subjects", type=int, default=160, help="subjects of the synthetic cohort (default: 160)")
    demo.add_argument("--port", type=int, help="port (default: a free one)")
    demo.add_argument("--exit-when-scored", action="store_true", help="stop once both encoders are scored")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def main(argv: list[str] | None = None) -> int:
    """Runs one `raf` command line; returns the exit code (0, 1 partly done, 2 user error, 128 + N signal N)."""
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra:  # key=value overrides after options that follow positionals (raf submit pretrain CFG --out X k=v)
            if not hasattr(args, "overrides") or any(item.startswith("-") or "=" not in item for item in extra):
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            args.overrides = [*args.overrides, *extra]
        if args.command is None:
            build_parser().print_help()
            return 2
        began = time.perf_counter()
        run_command(args)
        if args.command not in ("list", "report", "jobs", "leaderboard", "portal"):
            print(f"done in {time.perf_counter() - began:.0f} s", file=sys.stderr)
        return 0
    except UserError as error:
        print(f"raf: error: {error}", file=sys.stderr)
        return getattr(error, "exit_code", 2)  # 1: partly done (e.g. bad subjects in an ingest), see the message
    except Preempted as stopped:  # SIGTERM / SIGUSR1 (SLURM preemption): checkpoint saved, same command resumes
        print(f"raf: {stopped}", file=sys.stderr)
        return 128 + getattr(signal, stopped.signal_name, signal.SIGTERM)
    except KeyboardInterrupt:
        print("raf: interrupted; finished work is kept and a re-run resumes", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
