"""`raf shards ingest`: real image files (NIfTI, NRRD, MHA/MHD, DICOM series) into a cohort store.

The stages::

    list_inputs(INPUT)            (shards/listing.py) CSV/TSV listing | BIDS-like layout | plain folder
      -> check_listing            (shards/listing.py) duplicate ids, required metadata
      -> split_for_task(i, n)     subjects[i::n]: array tasks share one listing, each takes its share
      -> ingest_subject (pool)    read -> check -> reorient -> resample -> crop -> intensity -> write (atomic)
      -> task report              ingest_tasks/task-<i>-of-<n>.json: outcome and manifest row per subject
      -> consolidate(STORE)       merges the task reports: manifest.csv, ingest_report.json / .md

A subject is bad, not fatal: its reason goes into the report, the others are ingested, and the command exits
with 1 (unless --skip-bad) pointing to the report. Subjects are written by `CohortStore.write_subject` (staged,
then renamed), so a killed run leaves no half-written subject, and a re-run skips finished subjects without
re-reading their sources. Their manifest rows are recomputed from the store, so the task report of a resumed
run is complete. A single-process run (one task) consolidates by itself.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import traceback
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from rafmedia.core.environment import single_threaded_children
from rafmedia.core.errors import UserError
from rafmedia.core.files import atomic_write_text, read_json, write_json
from rafmedia.shards import preprocess
from rafmedia.shards.description import UNKNOWN_LICENCE, summarise_sources
from rafmedia.shards.formats import BadInput, read_volume, source_checksum
from rafmedia.shards.listing import Listing, SubjectSource, check_listing, list_inputs
from rafmedia.shards.manifest import summary_row
from rafmedia.shards.store import STAGING, CohortStore, StoreConfig

TASKS_FOLDER = "ingest_tasks"
SUMMARY = "summary"  # subject attribute holding the subject's manifest row
REPORT_JSON, REPORT_MD = "ingest_report.json", "ingest_report.md"


def _default_intensity() -> dict[str, Any]:
    return {"default": {"name": "none"}}


@dataclass
class CropConfig:
    """Optional crop to the foreground of the first channel (voxels above `threshold`, in source units)."""

    enabled: bool = False
    threshold: float = 0.0
    margin: int = 0  # voxels added on each side of the box


@dataclass
class IngestConfig:
    """How files become a cohort store. `recipe()` (all but workers, require and tolerance) must match to resume."""

    orientation: str = "RAS"  # nibabel axis codes of the stored arrays, e.g. RAS or LPS
    spacing: Any = None  # null keeps native spacing; [x, y, z] mm (or one number) resamples
    intensity: dict[str, Any] = field(default_factory=_default_intensity)  # channel -> {name: policy, **options}
    crop_foreground: CropConfig = field(default_factory=CropConfig)
    require: list[str] = field(default_factory=list)  # metadata columns every subject must have a value for
    workers: int = 2
    tolerance_mm: float = 1e-3  # how far grids may differ (shape equal, origin/spacing/corners within this)

    def validate(self) -> None:
        codes = self.orientation.upper()
        axes = sorted(next((axis for axis, pair in enumerate(("LR", "AP", "SI")) if code in pair), -1) for code in codes)
        if axes != [0, 1, 2]:
            raise UserError(f"ingest.orientation must be three axis codes, one of L/R, A/P and S/I each (e.g. RAS "
                            f"or LPS), got '{self.orientation}'")
        self.orientation = codes
        self.target_spacing()
        if self.workers < 1 or self.crop_foreground.margin < 0 or self.tolerance_mm <= 0:
            raise UserError("ingest.workers must be >= 1, ingest.crop_foreground.margin >= 0, ingest.tolerance_mm > 0")
        for channel, entry in self.intensity.items():
            if not isinstance(entry, dict) or "name" not in entry:
                raise UserError(f"ingest.intensity.{channel} must be a mapping with a policy name, e.g. "
                                "{name: ct_window, low: -1000, high: 1000}")
            try:
                preprocess.create_intensity_policy(**entry)
            except UserError as error:
                raise UserError(f"ingest.intensity.{channel}: {error}") from None

    def target_spacing(self) -> list[float] | None:
        if self.spacing is None:
            return None
        values = [self.spacing] * 3 if isinstance(self.spacing, (int, float)) else self.spacing
        if (not isinstance(values, list) or len(values) != 3
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values)):
            raise UserError(f"ingest.spacing must be null (keep native), a positive number or three positive "
                            f"numbers in mm, got {self.spacing!r}")
        return [float(v) for v in values]

    def recipe(self) -> dict[str, Any]:
        return json.loads(json.dumps({"orientation": self.orientation, "spacing": self.target_spacing(),
                                      "intensity": self.intensity, "crop_foreground": asdict(self.crop_foreground)}))



def resolve_task(task_index: int | None, num_tasks: int | None, env: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """(index, count) from the flags, else from SLURM_ARRAY_TASK_ID/COUNT (offset by _MIN), else (0, 1)."""
    if task_index is None and num_tasks is None and "SLURM_ARRAY_TASK_ID" in env:
        if "SLURM_ARRAY_TASK_COUNT" not in env:
            raise UserError("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not; pass --task-index and "
                            "--num-tasks explicitly")
        task_index = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        num_tasks = int(env["SLURM_ARRAY_TASK_COUNT"])
    if (task_index is None) != (num_tasks is None):
        raise UserError("give both --task-index and --num-tasks (or neither)")
    task_index, num_tasks = (0, 1) if task_index is None else (task_index, num_tasks)
    if not 0 <= task_index < num_tasks:
        raise UserError(f"--task-index must be in [0, {num_tasks - 1}] for --num-tasks {num_tasks}, got {task_index}")
    return task_index, num_tasks


def split_for_task(subjects: list[SubjectSource], task_index: int, num_tasks: int) -> list[SubjectSource]:
    """Task i of n takes subjects i, i+n, i+2n, ... of the listing (balanced, and the same in every task)."""
    return subjects[task_index::num_tasks]


# ---- one subject -----------------------------------------------------------------------------------
def prepare_subject(source: SubjectSource, config: IngestConfig):
    """Reads and preprocesses one subject. Returns (channels, label, attrs); raises `BadInput`."""
    volumes = {channel: read_volume(path) for channel, path in source.images.items()}
    label = read_volume(source.label) if source.label is not None else None
    subject = preprocess.assemble(volumes, label, tolerance_mm=config.tolerance_mm)
    subject = preprocess.reorient(subject, config.orientation)
    subject = preprocess.resample(subject, config.target_spacing(), tolerance_mm=config.tolerance_mm)
    if config.crop_foreground.enabled:
        subject = preprocess.crop_foreground(subject, threshold=config.crop_foreground.threshold,
                                             margin=config.crop_foreground.margin)
    subject = preprocess.apply_intensity(subject, config.intensity, source.metadata)
    subject = preprocess.finalize(subject)
    sources = {name: {"path": str(v.path), "sha256": source_checksum(v.files, v.path)} for name, v in volumes.items()}
    if label is not None:
        sources["label"] = {"path": str(label.path), "sha256": source_checksum(label.files, label.path)}
    combined = hashlib.sha256("".join(f"{k}:{v['sha256']};" for k, v in sorted(sources.items())).encode()).hexdigest()
    attrs = {"metadata": source.metadata, **preprocess.geometry_attrs(subject.affine), "sources": sources,
             "source_sha256": combined, "provenance": subject.provenance, "data_source": source.data_source()}
    return subject.channels, subject.label, attrs


def ingest_subject(store_path: str, source: SubjectSource, config: IngestConfig) -> dict[str, Any]:
    """Ingests one subject (or skips it when finished). Returns its outcome; never raises for bad input."""
    outcome: dict[str, Any] = {"subject_id": source.subject_id, "where": source.where}
    try:
        if source.problem:
            raise BadInput(source.problem)
        store = CohortStore(store_path)
        if store.has_subject(source.subject_id):
            return {**outcome, "status": "skipped", "row": row_from_store(store, source.subject_id)}
        channels, label, attrs = prepare_subject(source, config)
        row = summary_row(source.subject_id, metadata=source.metadata, channels=channels, label=label,
                          spacing=attrs["spacing"])
        # Kept with the subject, so a resumed run or a consolidation never re-reads the volumes for its row.
        store.write_subject(source.subject_id, channels=channels, label=label, attrs={**attrs, SUMMARY: row})
        return {**outcome, "status": "ingested", "row": row}
    except UserError as error:
        return {**outcome, "status": "bad", "reason": str(error)}
    except Exception as error:  # an unforeseen input (or a bug) must not stop a cohort-sized ingest; it is reported
        return {**outcome, "status": "bad", "reason": f"unexpected error {type(error).__name__}: {error}",
                "traceback": traceback.format_exc()}


def row_from_store(store: CohortStore, subject_id: str) -> dict[str, Any]:
    """The manifest row of a finished subject, from the store (for resumed runs)."""
    attrs = store.subject_attrs(subject_id)
    if SUMMARY in attrs:
        return attrs[SUMMARY]
    channels = {name: store.read(subject_id, name) for name in attrs["channels"]}
    label = store.read_label(subject_id) if attrs.get("has_label") else None
    return summary_row(subject_id, metadata=attrs.get("metadata", {}), channels=channels, label=label,
                       spacing=attrs["spacing"])


# ---- one task --------------------------------------------------------------------------------------
@dataclass
class IngestSummary:
    store: Path
    listing: Listing
    task_index: int
    num_tasks: int
    outcomes: list[dict[str, Any]]
    task_report: Path
    report: Path | None = None  # the consolidated Markdown report (None for a task of several)

    def count(self, status: str) -> int:
        return sum(outcome["status"] == status for outcome in self.outcomes)

    @property
    def bad(self) -> list[dict[str, Any]]:
        return [outcome for outcome in self.outcomes if outcome["status"] == "bad"]


def open_store(out: str | Path, *, store_config: StoreConfig, config: IngestConfig, name: str,
               overwrite: bool = False) -> CohortStore:
    """Creates the store atomically (array tasks may start together) or opens it, refusing another recipe."""
    out = Path(os.path.abspath(out))
    if overwrite and out.exists():
        shutil.rmtree(out)
    if not (out / "zarr.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        temporary = out.with_name(f".{out.name}.creating.{uuid.uuid4().hex[:8]}")
        CohortStore.create(temporary, config=store_config, name=name).update_attrs({"ingest_config": config.recipe()})
        try:
            os.rename(temporary, out)  # fails if another task created it first (or OUT is a non-empty folder)
        except OSError:
            shutil.rmtree(temporary, ignore_errors=True)
    store = CohortStore(out)
    existing = store.attrs().get("ingest_config")
    if existing != config.recipe():
        changed = sorted(key for key in config.recipe() if (existing or {}).get(key) != config.recipe()[key])
        what = "was not made by `raf shards ingest`" if existing is None else \
            f"was ingested with different preprocessing (changed: {', '.join(changed)})"
        raise UserError(f"{store.path} {what}; pass --overwrite to start it again, or choose another --out")
    return store


def ingest(input_path: str | Path, out: str | Path, *, config: IngestConfig, store_config: StoreConfig,
           task_index: int = 0, num_tasks: int = 1, overwrite: bool = False, progress: bool = True,
           log: Callable[[str], None] = lambda text: None) -> IngestSummary:
    """Ingests this task's share of the input into the store at `out`; consolidates when it is the only task."""
    config.validate()
    if overwrite and num_tasks > 1:
        raise UserError("--overwrite with --num-tasks > 1 would let each task delete the others' subjects; delete "
                        "the store once before submitting the array, or ingest into a new --out")
    listing = check_listing(list_inputs(input_path), config.require)
    log(listing.describe())
    store = open_store(out, store_config=store_config, config=config, name=listing.path.name, overwrite=overwrite)
    mine = split_for_task(listing.subjects, task_index, num_tasks)
    if num_tasks > 1:
        log(f"task {task_index} of {num_tasks}: {len(mine)} of {len(listing.subjects)} subjects")
    outcomes = _run(store, mine, config, progress=progress)
    position = {(source.subject_id, source.where): index for index, source in enumerate(listing.subjects)}
    for outcome in outcomes:  # the listing position orders the reports (workers finish in any order)
        outcome["position"] = position[outcome["subject_id"], outcome["where"]]
    outcomes.sort(key=lambda outcome: outcome["position"])
    task_report = write_json(store.path / TASKS_FOLDER / f"task-{task_index}-of-{num_tasks}.json", {
        "format": "rafmedia.ingest-task/1", "task_index": task_index, "num_tasks": num_tasks,
        "input": str(listing.path), "kind": listing.kind, "fingerprint": listing.fingerprint(),
        "listing_order": [source.subject_id for source in listing.subjects], "ignored": listing.ignored,
        "outcomes": outcomes})
    summary = IngestSummary(store.path, listing, task_index, num_tasks, outcomes, task_report)
    if num_tasks == 1:
        summary.report = consolidate(store.path, num_tasks=1)["report"]
    return summary


def _run(store: CohortStore, sources: list[SubjectSource], config: IngestConfig, *, progress: bool):
    outcomes = []
    bar = tqdm(total=len(sources), desc="ingest", unit="subject", disable=not progress)
    if config.workers > 1 and len(sources) > 1:
        # spawn, not fork, and one native thread per worker: the reasons are in shards/synth.py's generate_cohort.
        context = multiprocessing.get_context("spawn")
        try:
            with single_threaded_children(), ProcessPoolExecutor(config.workers, mp_context=context) as pool:
                futures = [pool.submit(ingest_subject, str(store.path), source, config) for source in sources]
                for future in as_completed(futures):
                    outcomes.append(future.result())
                    bar.update()
                    bar.set_postfix(bad=sum(o["status"] == "bad" for o in outcomes), refresh=False)
        except BrokenProcessPool:
            raise UserError(f"a worker process died (killed, or out of memory on a large volume) after {len(outcomes)} "
                            "subjects; re-run with fewer --workers: finished subjects are kept and skipped") from None
    else:
        for source in sources:
            outcomes.append(ingest_subject(str(store.path), source, config))
            bar.update()
    bar.close()
    return outcomes


# ---- consolidation ---------------------------------------------------------------------------------
def _task_reports(store_path: Path, num_tasks: int | None) -> list[dict[str, Any]]:
    """The newest complete set of task reports (all of 0..n-1 from one listing), or a UserError saying what is missing."""
    groups: dict[tuple[int, str], dict[int, tuple[float, dict]]] = {}
    for path in sorted((store_path / TASKS_FOLDER).glob("task-*-of-*.json")):
        report = read_json(path)
        key = (report["num_tasks"], report["fingerprint"])
        groups.setdefault(key, {})[report["task_index"]] = (path.stat().st_mtime, report)
    if num_tasks is not None:
        groups = {key: tasks for key, tasks in groups.items() if key[0] == num_tasks}
    complete = {key: tasks for key, tasks in groups.items() if len(tasks) == key[0]}
    if not complete:
        if not groups:
            raise UserError(f"{store_path} has no ingest task reports{'' if num_tasks is None else f' for {num_tasks} tasks'}"
                            f" (in {TASKS_FOLDER}/); run `raf shards ingest` first")
        (count, _), tasks = max(groups.items(), key=lambda item: max(t for t, _ in item[1].values()))
        missing = sorted(set(range(count)) - set(tasks))
        raise UserError(f"{store_path}: task(s) {', '.join(map(str, missing))} of {count} have not finished (no report "
                        f"in {TASKS_FOLDER}/); run them (--task-index i --num-tasks {count}) then consolidate again")
    newest = max(complete.values(), key=lambda tasks: max(t for t, _ in tasks.values()))
    return [newest[index][1] for index in sorted(newest)]


def consolidate(store_path: str | Path, *, num_tasks: int | None = None) -> dict[str, Any]:
    """Merges the task reports into manifest.csv, ingest_report.json and ingest_report.md.

    The manifest covers every subject in the store: listing order first, then any other (ingested from another
    input), with rows from the task reports or, when absent, recomputed from the store. Staging leftovers of
    killed runs are removed (every task has finished by now).
    """
    store = CohortStore(os.path.abspath(store_path))
    reports = _task_reports(store.path, num_tasks)
    ranked: dict[str, int] = {}
    for index, subject_id in enumerate(reports[0]["listing_order"]):
        ranked.setdefault(subject_id, index)
    outcomes = sorted((o for report in reports for o in report["outcomes"]), key=lambda o: o["position"])
    good = {o["subject_id"]: o["row"] for o in outcomes if o["status"] in ("ingested", "skipped")}
    in_store = store.subject_ids()
    rows = [good[s] if s in good else row_from_store(store, s)
            for s in sorted(in_store, key=lambda s: (ranked.get(s, len(ranked)), s))]
    manifest = store.write_manifest(rows) if rows else None
    removed = _clear_staging(store.path)
    bad = [{key: o[key] for key in ("subject_id", "where", "reason", "traceback") if key in o}
           for o in outcomes if o["status"] == "bad"]
    counts = {status: sum(o["status"] == status for o in outcomes) for status in ("ingested", "skipped")}
    result = {"format": "rafmedia.ingest-report/1", "store": str(store.path), "input": reports[0]["input"],
              "kind": reports[0]["kind"], "num_tasks": len(reports), "num_outcomes": len(outcomes),
              "counts": {**counts, "bad": len(bad), "in_store": len(in_store),
                         "not_in_listing": len(set(in_store) - set(ranked))},
              "staging_leftovers_removed": removed, "ignored": reports[0]["ignored"], "bad": bad}
    write_json(store.path / REPORT_JSON, result)
    atomic_write_text(store.path / REPORT_MD, render_report(result))
    store.update_attrs({"ingest": {key: result[key] for key in ("input", "kind", "num_tasks", "counts")},
                        "provenance": data_provenance(store, in_store)})
    return {**result, "report": store.path / REPORT_MD, "manifest": manifest}


def data_provenance(store: CohortStore, subject_ids: list[str]) -> dict[str, Any]:
    """The store's licence and sources from its subjects' `data_source` attributes (the listing's optional
    `source`/`dataset` and `licence`/`license` columns): root attribute `provenance`, read by `raf pretrain` into
    the encoder's card (`rafmedia.shards.description.store_provenance`)."""
    pairs = []
    for subject_id in subject_ids:
        source = store.subject_attrs(subject_id).get("data_source") or {}
        pairs.append((str(source.get("name") or store.path.name), str(source.get("licence") or UNKNOWN_LICENCE)))
    return summarise_sources(pairs)


def _clear_staging(store_path: Path) -> int:
    staging = store_path / STAGING
    leftovers = list(staging.iterdir()) if staging.is_dir() else []
    for entry in leftovers:
        shutil.rmtree(entry, ignore_errors=True)
    return len(leftovers)


def render_report(result: dict[str, Any]) -> str:
    """The readable error report: counts, then one table row per bad subject with its reason."""
    counts = result["counts"]
    lines = ["# Ingest report", "", f"- input: `{result['input']}` ({result['kind']})", f"- store: `{result['store']}`",
             (f"- ingested: {counts['ingested']}, skipped (already in the store): {counts['skipped']}, "
              f"bad: {counts['bad']}; subjects in the store: {counts['in_store']}")]
    if result["ignored"]:
        lines.append(f"- ignored (not inputs): {len(result['ignored'])}: " + ", ".join(result["ignored"][:20]))
    if not result["bad"]:
        return "\n".join(lines + ["", "No bad subjects."]) + "\n"
    lines += ["", f"## Bad subjects ({len(result['bad'])})", "", "| subject | where | reason |", "| --- | --- | --- |"]
    for entry in result["bad"]:
        reason = entry["reason"].replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {entry['subject_id'] or '(empty)'} | {entry['where']} | {reason} |")
    lines += ["", ("Fix the inputs and re-run the same command: finished subjects are skipped. Or pass --skip-bad to "
                   "accept the store without them (tracebacks of unexpected errors are in ingest_report.json).")]
    return "\n".join(lines) + "\n"


def format_summary(summary: IngestSummary, *, max_listed: int = 5) -> str:
    """The few lines printed after an ingest task."""
    head = f"task {summary.task_index} of {summary.num_tasks}: " if summary.num_tasks > 1 else ""
    lines = [(f"{head}ingested {summary.count('ingested')}, skipped {summary.count('skipped')} (already in the "
              f"store), bad {summary.count('bad')}")]
    for outcome in summary.bad[:max_listed]:
        lines.append(f"  bad {outcome['subject_id'] or '(empty id)'} ({outcome['where']}): {outcome['reason']}")
    if len(summary.bad) > max_listed:
        lines.append(f"  ... and {len(summary.bad) - max_listed} more")
    if summary.report is not None:
        lines.append(f"store: {summary.store} (manifest.csv inside); report: {summary.report}")
    else:
        lines.append(f"store: {summary.store}; when every task has finished, run: raf shards consolidate {summary.store}")
    return "\n".join(lines)


class BadSubjectsError(UserError):
    """Some subjects were bad: the good ones are in the store; exit code 1 points to the report."""

    exit_code = 1


def format_consolidated(result: dict[str, Any], *, max_listed: int = 5) -> str:
    """The few lines printed by `raf shards consolidate`."""
    counts = result["counts"]
    lines = [(f"consolidated {result['num_tasks']} task report(s): ingested {counts['ingested']}, skipped "
              f"{counts['skipped']} (already in the store), bad {counts['bad']}; {counts['in_store']} subjects in "
              "the store")]
    lines += [f"  bad {entry['subject_id'] or '(empty id)'} ({entry['where']}): {entry['reason']}"
              for entry in result["bad"][:max_listed]]
    if len(result["bad"]) > max_listed:
        lines.append(f"  ... and {len(result['bad']) - max_listed} more")
    if result["staging_leftovers_removed"]:
        lines.append(f"removed {result['staging_leftovers_removed']} half-written subject(s) left by killed runs")
    lines.append(f"store: {result['store']} (manifest.csv inside); report: {result['report']}")
    return "\n".join(lines)


def bad_subjects_error(num_bad: int, num_subjects: int, report: Path) -> BadSubjectsError:
    return BadSubjectsError(f"{num_bad} of {num_subjects} subjects were bad and not ingested (reasons in {report}); "
                            "fix them and re-run (finished subjects are skipped), or pass --skip-bad to accept")
