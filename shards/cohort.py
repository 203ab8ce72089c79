"""The cohort builder: stores + a YAML spec -> train / public-test / hidden-test split manifests.

Stages, each a small function over a list of manifest rows (one dict per subject):

    gather sources (filter `where`, unique ids) -> select -> hold out OOD subjects -> split in-distribution
    units (stratified, count-exact) -> place OOD units in the test splits -> imbalance (subsample) ->
    challenging cases (alteration recorded per subject) -> write splits/, cohort.json, datasheets/

A unit is a subject, or with `group_by` every subject sharing the group value (all scans of one patient),
so a group never straddles two splits. Every random choice comes from `numpy.random.default_rng` seeded
with (spec seed, purpose, split), after sorting subjects by their unique id: the same spec and stores give
byte-identical CSVs, whatever the order of the sources' manifests. Alterations are not written as voxels:
each challenging subject gets (alteration, severity, seed) and `CohortSplit.read` applies it on the fly.

Outputs (written into a staging folder, then renamed into place):

    OUT/splits/<split>.csv      one row per subject (columns: `cohort_reader.SPLIT_COLUMNS`, then the manifest's)
    OUT/excluded.csv            subjects left out, with the reason (filter, unused held-out, imbalance)
    OUT/cohort.json             resolved spec, realised counts per split / subgroup, planted proportions
    OUT/resolved_spec.yaml      the spec with defaults filled in and store paths made absolute
    OUT/datasheets/<split>/     datasheet.{md,html,json} of each split (`rafmedia.shards.datasheet`)
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Hashable

import numpy as np
import yaml

from rafmedia.core.errors import UserError
from rafmedia.core.files import publish_folder, read_json, write_json
from rafmedia.core.registry import did_you_mean
from rafmedia.shards.cohort_reader import NO_ALTERATION, SPLIT_COLUMNS, split_sample_reader
from rafmedia.shards.cohort_spec import ChallengingSpec, CohortSpec, ImbalanceSpec, OutOfDistributionSpec, spec_to_dict
from rafmedia.shards.datasheet import DatasheetConfig, default_attributes, metadata_columns, write_datasheet
from rafmedia.shards.splits import exact_counts, stratified_assign
from rafmedia.shards.store import CohortStore, resolve_store, write_rows_csv

BUILD_FORMAT = "rafmedia.cohort-build/1"
# Seed purposes: one independent stream per decision, so changing one part of a spec leaves the others alone.
SPLIT, OOD, IMBALANCE, CHALLENGE = 1, 2, 3, 4
Row = dict[str, Any]


# ---- values and filters --------------------------------------------------------------------------
def value_key(value: Any) -> str:
    """One spelling per value, so YAML `1`, manifest `1` and `1.0` compare equal; "" means missing."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def _check_attribute(key: str, attribute: str, rows: list[Row]) -> None:
    columns = [c for c in dict.fromkeys(column for row in rows for column in row) if c not in SPLIT_COLUMNS]
    if attribute not in columns:
        described = [c for c in metadata_columns(rows) if c not in SPLIT_COLUMNS]
        raise UserError(f"key '{key}': unknown attribute '{attribute}';{did_you_mean(attribute, columns)} "
                        f"(metadata columns: {', '.join(described)})")


def _check_values(key: str, attribute: str, values: list[Any], rows: list[Row]) -> None:
    observed = sorted({value_key(row.get(attribute, "")) for row in rows} - {""})
    for value in values:
        if value_key(value) not in observed:
            raise UserError(f"key '{key}': value '{value}' of '{attribute}' is not in the data;"
                            f"{did_you_mean(value_key(value), observed)} (values: {', '.join(observed)})")


def apply_filter(key: str, rows: list[Row], conditions: dict[str, Any]) -> tuple[list[Row], dict[str, int]]:
    """Keeps rows meeting every condition (a value, a list of values, or {min, max}); counts what each drops."""
    dropped: dict[str, int] = {}
    for attribute, condition in conditions.items():
        _check_attribute(f"{key}.{attribute}", attribute, rows)
        keep = _condition(f"{key}.{attribute}", attribute, condition, rows)
        dropped[attribute] = len(rows) - sum(keep)
        rows = [row for row, kept in zip(rows, keep) if kept]
    return rows, dropped


def _condition(key: str, attribute: str, condition: Any, rows: list[Row]) -> list[bool]:
    if isinstance(condition, dict):
        unknown = set(condition) - {"min", "max"}
        if unknown or not condition:
            raise UserError(f"key '{key}': a range is {{min: x, max: y}}, got {condition}")
        low, high = condition.get("min", -np.inf), condition.get("max", np.inf)
        if not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in (low, high)):
            raise UserError(f"key '{key}': min and max must be numbers, got {condition}")
        values = [row.get(attribute, "") for row in rows]
        if any(isinstance(v, str) and v != "" for v in values):
            raise UserError(f"key '{key}': '{attribute}' holds text, so it takes a list of values, not a range")
        return [v != "" and low <= v <= high for v in values]  # a missing value is outside every range
    wanted = condition if isinstance(condition, list) else [condition]
    _check_values(key, attribute, wanted, rows)
    wanted_keys = {value_key(v) for v in wanted}
    return [value_key(row.get(attribute, "")) in wanted_keys for row in rows]


# ---- stage 1: gather sources ---------------------------------------------------------------------
def gather_sources(spec: CohortSpec) -> tuple[list[Row], list[Row], list[dict[str, Any]]]:
    """Reads every source's manifest, applies `where`; returns (rows, excluded rows, per-source report)."""
    rows, excluded, report = [], [], []
    for index, source in enumerate(spec.sources):
        store = CohortStore(resolve_store(source.store).resolve())
        manifest = store.read_manifest()
        missing = sorted({str(row["subject_id"]) for row in manifest} - set(store.subject_ids()))
        if missing:
            raise UserError(f"source '{source.name}': {len(missing)} manifest subjects are not in {store.path} "
                            f"(first: {missing[0]}); re-run the ingest (or synth) that wrote the store to finish it")
        source_rows = [_source_row(row, source.name, store.path) for row in manifest]
        kept, dropped = apply_filter(f"sources.{index}.where", source_rows, source.where)
        kept_ids = {row["subject_id"] for row in kept}
        excluded += [{**row, "reason": f"sources.{source.name}.where"} for row in source_rows
                     if row["subject_id"] not in kept_ids]
        rows += kept
        report.append({"name": source.name, "store": str(store.path), "num_manifest": len(manifest),
                       "num_kept": len(kept), "dropped_by_where": dropped})
    _assign_unique_ids(rows + excluded)
    return rows, excluded, report


def _source_row(manifest_row: Row, source: str, store: Path) -> Row:
    row: Row = {"uid": "", "source": source, "store": str(store), "subject_id": str(manifest_row["subject_id"]),
                "split": "", "ood": 0, "alteration": NO_ALTERATION, "alteration_severity": 0, "alteration_seed": 0}
    for column, value in manifest_row.items():
        if column != "subject_id":  # a manifest column that shadows one of ours keeps its value under a new name
            row[f"manifest_{column}" if column in SPLIT_COLUMNS else column] = value
    return row


def _assign_unique_ids(rows: list[Row]) -> None:
    """`subject_id` when unique across sources; `<source>/<subject_id>` for every subject once any collides."""
    sources_per_id = Counter(row["subject_id"] for row in {(r["source"], r["subject_id"]): r for r in rows}.values())
    collide = any(count > 1 for count in sources_per_id.values())
    for row in rows:
        row["uid"] = f"{row['source']}/{row['subject_id']}" if collide else row["subject_id"]


# ---- stage 2: units and strata -------------------------------------------------------------------
def make_units(rows: list[Row], group_by: str | None) -> list[list[Row]]:
    """Subjects, or with `group_by` the groups of subjects sharing its value, sorted by their first uid."""
    if group_by is None:
        return [[row] for row in sorted(rows, key=lambda r: r["uid"])]
    groups: dict[str, list[Row]] = {}
    for row in sorted(rows, key=lambda r: r["uid"]):
        group = value_key(row.get(group_by, ""))
        if group == "":
            raise UserError(f"key 'group_by': subject '{row['uid']}' has no '{group_by}' value; fill it in the "
                            "manifest or filter the subject out with `select`")
        groups.setdefault(group, []).append(row)
    return sorted(groups.values(), key=lambda members: members[0]["uid"])


def stratum_of(rows: list[Row], attributes: list[str]) -> tuple[str, ...]:
    """The stratum of a unit: its members' most common value tuple (ties: the smallest)."""
    counts = Counter(tuple(value_key(row.get(a, "")) for a in attributes) for row in rows)
    return min(counts, key=lambda key: (-counts[key], key))


# ---- stage 3: held-out (out-of-distribution) subjects --------------------------------------------
def is_held_out(row: Row, hold_out: dict[str, list[Any]]) -> bool:
    """A subject is out of distribution when it matches any held-out value of any listed attribute."""
    return any(value_key(row.get(a, "")) in {value_key(v) for v in values} for a, values in hold_out.items())


def place_held_out(units: list[list[Row]], strata: list[Hashable], *, ood: OutOfDistributionSpec,
                   split_fractions: dict[str, float], in_distribution_units: Counter, rng: np.random.Generator
                   ) -> tuple[list[str | None], dict[str, int]]:
    """Assigns held-out units to the OOD splits (None: not used). Returns (split per unit, planted count per split).

    Without `ood.fraction` every held-out unit is used, spread over the splits in proportion to their
    fractions. With it, split k receives round(f * m_k / (1 - f)) units (m_k: its in-distribution units), so
    held-out units make up the fraction f of it; the rest are left out (and counted).
    """
    names = list(ood.splits)
    if ood.fraction is None:
        shares = np.array([split_fractions[name] for name in names])
        counts = exact_counts(len(units), (shares / shares.sum()).tolist())
    else:
        odds = ood.fraction / (1 - ood.fraction)
        counts = [int(np.floor(odds * in_distribution_units[name] + 0.5)) for name in names]  # round half up
        if sum(counts) > len(units):
            feasible = len(units) / (len(units) + sum(in_distribution_units[name] for name in names))
            raise UserError(f"key 'out_of_distribution.fraction': {ood.fraction:g} needs {sum(counts)} held-out units "
                            f"in {', '.join(names)}, but only {len(units)} match hold_out {ood.hold_out}; "
                            f"the largest feasible fraction is about {feasible:.3f}")
    planted = dict(zip(names, counts))
    if not units:
        return [], planted
    unused = len(units) - sum(counts)
    bins = stratified_assign(strata, [c / len(units) for c in counts] + [unused / len(units)], rng)
    return [names[b] if b < len(names) else None for b in bins], planted


# ---- stage 4: imbalance ----------------------------------------------------------------------------
def apply_imbalance(rows: list[Row], entry: ImbalanceSpec, *, key: str, stratify: list[str], all_rows: list[Row],
                    rng: np.random.Generator) -> tuple[list[Row], dict[str, Any]]:
    """Subsamples the subjects of `entry.split` so `entry.attribute`'s value counts stand exactly in `entry.ratio`.

    Returns (rows kept from the whole cohort, report). Within each value the kept subjects are drawn
    stratified by the other stratify attributes, so the subsample keeps their proportions.
    """
    _check_attribute(f"{key}.attribute", entry.attribute, all_rows)
    _check_values(f"{key}.ratio", entry.attribute, list(entry.ratio), all_rows)
    members = [row for row in rows if row["split"] == entry.split]
    by_value: dict[str, list[Row]] = {}
    for row in sorted(members, key=lambda r: r["uid"]):
        by_value.setdefault(value_key(row.get(entry.attribute, "")), []).append(row)
    ratio = {value_key(value): weight for value, weight in entry.ratio.items()}
    unlisted = sorted(set(by_value) - set(ratio))
    if unlisted:
        raise UserError(f"key '{key}.ratio': split '{entry.split}' also has {entry.attribute} = "
                        f"{', '.join(v or '(missing)' for v in unlisted)}; give each a ratio (0 drops it) or "
                        "filter them out with select")
    scale = min(len(by_value.get(value, [])) // weight for value, weight in ratio.items() if weight > 0)
    if scale == 0:
        raise UserError(f"key '{key}.ratio': split '{entry.split}' has too few subjects to reach {entry.ratio} "
                        f"(counts: {({v: len(by_value.get(v, [])) for v in ratio})})")
    others = [a for a in stratify if a != entry.attribute]
    dropped: set[str] = set()
    for value, value_rows in by_value.items():
        target = scale * ratio[value]
        strata = [stratum_of([row], others) for row in value_rows]
        keep = stratified_assign(strata, [target / len(value_rows), 1 - target / len(value_rows)], rng)
        dropped |= {row["uid"] for row, bin_ in zip(value_rows, keep) if bin_ == 1}
    report = {"split": entry.split, "attribute": entry.attribute, "ratio": dict(entry.ratio),
              "counts_before": {v: len(by_value.get(v, [])) for v in ratio},
              "counts_after": {v: scale * ratio[v] for v in ratio}, "num_dropped": len(dropped)}
    return [row for row in rows if row["uid"] not in dropped], report


# ---- stage 5: challenging cases --------------------------------------------------------------------
def assign_challenging(rows: list[Row], challenging: ChallengingSpec, *, stratify: list[str], seed: int,
                       split_names: list[str]) -> dict[str, Any]:
    """Marks an exact fraction of each listed split's subjects as altered; records name, severity and seed."""
    report = {}
    labels = [f"{a.name}@{a.severity}" for a in challenging.alterations]
    for name in challenging.splits:
        rng = np.random.default_rng([seed, CHALLENGE, split_names.index(name)])
        members = sorted((row for row in rows if row["split"] == name), key=lambda r: r["uid"])
        num_altered = exact_counts(len(members), [challenging.fraction, 1 - challenging.fraction])[0] if members else 0
        chosen = []
        if members:
            strata = [stratum_of([row], stratify) + (str(row["ood"]),) for row in members]
            picked = stratified_assign(strata, [num_altered / len(members), 1 - num_altered / len(members)], rng)
            chosen = [row for row, bin_ in zip(members, picked) if bin_ == 0]
        which = rng.permutation(np.repeat(np.arange(len(labels)),
                                          exact_counts(len(chosen), [a.weight for a in challenging.alterations])))
        for row, index in zip(chosen, which):
            alteration = challenging.alterations[index]
            row.update(alteration=alteration.name, alteration_severity=alteration.severity,
                       alteration_seed=int(rng.integers(0, 2**31 - 1)))
        report[name] = {"num_subjects": len(members), "num_planted": num_altered,
                        "by_alteration": dict(zip(labels, np.bincount(which, minlength=len(labels)).tolist()))}
    return report


# ---- the whole build -------------------------------------------------------------------------------
def assign_splits(spec: CohortSpec, rows: list[Row]) -> tuple[list[Row], list[Row], dict[str, Any]]:
    """Runs stages 2-5 on gathered rows. Returns (rows with `split` set, newly excluded rows, planted report)."""
    _check_spec_attributes(spec, rows)
    split_names = list(spec.splits)
    ood = spec.out_of_distribution
    units = make_units(rows, spec.group_by)
    held_out = [ood is not None and any(is_held_out(row, ood.hold_out) for row in unit) for unit in units]
    inside = [unit for unit, out in zip(units, held_out) if not out]
    bins = stratified_assign([stratum_of(u, spec.stratify) for u in inside], list(spec.splits.values()),
                             np.random.default_rng([spec.seed, SPLIT]))
    for unit, bin_ in zip(inside, bins):
        for row in unit:
            row["split"] = split_names[bin_]
    planted: dict[str, Any] = {"out_of_distribution": None, "imbalance": [], "challenging": None}
    excluded: list[Row] = []
    if ood is not None:
        outside = [unit for unit, out in zip(units, held_out) if out]
        planted["out_of_distribution"], excluded = _plant_held_out(spec, outside, Counter(split_names[b] for b in bins))
    kept = [row for row in rows if row["split"]]
    for index, entry in enumerate(spec.imbalance):
        before = {row["uid"]: row for row in kept}
        kept, report = apply_imbalance(kept, entry, key=f"imbalance.{index}", stratify=spec.stratify, all_rows=rows,
                                       rng=np.random.default_rng([spec.seed, IMBALANCE, index]))
        dropped = set(before) - {row["uid"] for row in kept}
        excluded += [{**before[uid], "reason": f"imbalance.{index}"} for uid in sorted(dropped)]
        planted["imbalance"].append(report)
    if spec.challenging is not None:
        planted["challenging"] = {"fraction": spec.challenging.fraction, "per_split": assign_challenging(
            kept, spec.challenging, stratify=spec.stratify, seed=spec.seed, split_names=split_names)}
    return sorted(kept, key=lambda r: r["uid"]), excluded, planted


def _check_spec_attributes(spec: CohortSpec, rows: list[Row]) -> None:
    """The spec's attribute names (and held-out values) must exist in the gathered manifests."""
    for index, attribute in enumerate(spec.stratify):
        _check_attribute(f"stratify.{index}", attribute, rows)
    if spec.group_by is not None:
        _check_attribute("group_by", spec.group_by, rows)
    if spec.out_of_distribution is not None:
        for attribute, values in spec.out_of_distribution.hold_out.items():
            _check_attribute(f"out_of_distribution.hold_out.{attribute}", attribute, rows)
            _check_values(f"out_of_distribution.hold_out.{attribute}", attribute, values, rows)


def _plant_held_out(spec: CohortSpec, outside: list[list[Row]],
                    inside_counts: Counter) -> tuple[dict[str, Any], list[Row]]:
    """Places the held-out units (sets `split` and `ood` on their rows). Returns (planted report, rows left out)."""
    ood = spec.out_of_distribution
    placed, planted_counts = place_held_out(outside, [stratum_of(u, spec.stratify) for u in outside], ood=ood,
                                            split_fractions=spec.splits, in_distribution_units=inside_counts,
                                            rng=np.random.default_rng([spec.seed, OOD]))
    for unit, split in zip(outside, placed):
        for row in unit:
            row.update(split=split or "", ood=1)
    unused = [{**row, "reason": "out_of_distribution.unused"} for unit, split in zip(outside, placed) if split is None
              for row in unit]
    report = {"hold_out": ood.hold_out, "fraction": ood.fraction, "num_held_out_units": len(outside),
              "units_per_split": planted_counts}
    return report, unused


def realised_counts(rows: list[Row], spec: CohortSpec) -> dict[str, Any]:
    """Counts per split: subjects, groups, OOD and altered subjects, values of each stratify attribute, strata."""
    total = len(rows)
    out = {}
    for name in spec.splits:
        members = [row for row in rows if row["split"] == name]
        num_ood = sum(int(row["ood"]) for row in members)
        altered = Counter(f"{row['alteration']}@{row['alteration_severity']}" for row in members
                          if row["alteration"] != NO_ALTERATION)
        out[name] = {
            "num_subjects": len(members), "fraction_of_cohort": len(members) / total if total else 0.0,
            "num_groups": len({value_key(row[spec.group_by]) for row in members}) if spec.group_by else len(members),
            "num_ood": num_ood, "ood_fraction": num_ood / len(members) if members else 0.0,
            "num_altered": sum(altered.values()),
            "altered_fraction": sum(altered.values()) / len(members) if members else 0.0,
            "alterations": dict(sorted(altered.items())),
            "attributes": {a: dict(sorted(Counter(value_key(row.get(a, "")) for row in members).items()))
                           for a in spec.stratify},
            "strata": {" | ".join(key): count for key, count in
                       sorted(Counter(stratum_of([row], spec.stratify) for row in members).items())},
        }
    return out


def build_cohort(spec: CohortSpec, *, out: str | Path, overwrite: bool = False, datasheets: bool = True,
                 progress: bool = True) -> Path:
    """Builds the cohort described by `spec` into `out` (see the module docstring). Returns `out`.

    Refuses to replace an existing build of a different spec (or of the same spec whose sources have since
    changed) unless `overwrite`; never replaces a folder that is not a cohort build.
    """
    out = Path(out)
    spec = copy.deepcopy(spec)  # store paths are resolved below; the caller's spec stays as given
    for source in spec.sources:
        source.store = str(resolve_store(source.store).resolve())
    resolved = json.loads(json.dumps(spec_to_dict(spec)))
    _check_destination(out, resolved, overwrite)
    rows, excluded, sources = gather_sources(spec)
    selected, dropped_by_select = apply_filter("select", rows, spec.select)
    kept_ids = {row["uid"] for row in selected}
    excluded += [{**row, "reason": "select"} for row in rows if row["uid"] not in kept_ids]
    rows = selected
    if not rows:
        raise UserError("no subject is left after `where` and `select`; loosen the filters")
    rows, dropped, planted = assign_splits(spec, rows)
    excluded += dropped
    summary = {"format": BUILD_FORMAT, "name": spec.name, "seed": spec.seed, "spec": resolved, "sources": sources,
               "dropped_by_select": dropped_by_select, "num_subjects": len(rows),
               "splits": realised_counts(rows, spec), "planted": planted,
               "excluded": dict(sorted(Counter(row["reason"] for row in excluded).items()))}
    staging = out.parent / f".{out.name}.staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _write_build(staging, rows, excluded, summary, list(spec.splits), datasheets=datasheets, progress=progress)
        if out.exists() and not overwrite and _splits_differ(out, staging, list(spec.splits)):
            raise UserError(f"{out} holds a build of this spec whose splits differ from a rebuild (the sources "
                            "changed since); pass --overwrite to replace it, or choose another --out")
        publish_folder(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _check_destination(out: Path, resolved: dict[str, Any], overwrite: bool) -> None:
    if not out.exists() or not any(out.iterdir()):
        return
    existing = out / "cohort.json"
    if not existing.is_file():
        raise UserError(f"{out} exists and is not a cohort build (no cohort.json); choose another --out")
    previous = read_json(existing).get("spec", {})
    if previous != resolved and not overwrite:
        changed = sorted(key for key in set(previous) | set(resolved) if previous.get(key) != resolved.get(key))
        raise UserError(f"{out} holds a different cohort build (changed: {', '.join(changed)}); pass --overwrite to "
                        "replace it, or choose another --out")


def _splits_differ(out: Path, staging: Path, names: list[str]) -> bool:
    return any(not (out / "splits" / f"{n}.csv").is_file()
               or (out / "splits" / f"{n}.csv").read_bytes() != (staging / "splits" / f"{n}.csv").read_bytes()
               for n in names)


def _write_build(folder: Path, rows: list[Row], excluded: list[Row], summary: dict[str, Any], split_names: list[str],
                 *, datasheets: bool, progress: bool) -> None:
    columns = list(dict.fromkeys([*SPLIT_COLUMNS, *(key for row in rows for key in row)]))
    for name in split_names:
        write_rows_csv(folder / "splits" / f"{name}.csv", [row for row in rows if row["split"] == name], columns)
    write_rows_csv(folder / "excluded.csv", [{k: row[k] for k in ("uid", "source", "subject_id", "reason")}
                                             for row in sorted(excluded, key=lambda r: r["uid"])],
                   ["uid", "source", "subject_id", "reason"])
    write_json(folder / "cohort.json", summary)
    (folder / "resolved_spec.yaml").write_text(yaml.safe_dump(summary["spec"], sort_keys=False), encoding="utf-8")
    if datasheets:  # the same attributes in every split's datasheet, chosen on the whole cohort
        config = DatasheetConfig()
        config.attributes = default_attributes(rows, config.max_categories)
        for name in split_names:
            members = [row for row in rows if row["split"] == name]
            if members:
                write_datasheet(members, out=folder / "datasheets" / name, config=config,
                                title=f"{summary['name']}: {name}",
                                read_sample=split_sample_reader(config.channel, config.stride), progress=progress)
