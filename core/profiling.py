"""Stage timing and the profile page: where the wall time of a pipeline goes, and at what rate each stage works.

`StageClock` accumulates, per named stage (in first-seen order), wall seconds, calls and work counts (volumes,
patches, voxels, bytes); `stages()` turns them into rows with rates. `write_profile` writes a profile as
`profile.json` (every number) and `profile.html` (a self-contained page: a waterfall of the stages on a time axis,
a throughput bar per stage, the tables, the bounding stage highlighted and the advice). `raf profile` (pretraining)
and `raf evaluate --profile` (evaluation) both write through it, so the two pages read the same way.

Units: seconds of wall time (`time.perf_counter`); MB are 10^6 bytes; a rate is work / seconds, None when either
is 0 (a stage that did no counted work, or took no measurable time, has no rate rather than a misleading 0 or inf).
"""
from __future__ import annotations

import html
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rafmedia.core.files import atomic_write_text, write_json
from rafmedia.core.render import Markup, bold, html_image, html_note, html_page, html_table, png, subplots

WORK_UNITS = ("volumes", "patches", "voxels", "bytes")
RATE_KEYS = ("volumes_per_s", "patches_per_s", "voxels_per_s", "mb_per_s")
STAGE_KEYS = ("name", "seconds", "calls", *WORK_UNITS, *RATE_KEYS)


def _rate(work: float, seconds: float, scale: float = 1.0) -> float | None:
    return work / scale / seconds if work > 0 and seconds > 0 else None


class StageClock:
    """Accumulates wall time and work counts per named stage, in first-seen order.

    Args:
        synchronize: called at both edges of every `stage` block (e.g. `torch.cuda.synchronize`), so asynchronous
            device work launched inside a stage is charged to it rather than to whichever stage waits next.
    """

    def __init__(self, *, synchronize: Callable[[], None] | None = None):
        self._synchronize = synchronize
        self._totals: dict[str, dict[str, float]] = {}

    def _entry(self, name: str) -> dict[str, float]:
        if name not in self._totals:
            self._totals[name] = {"seconds": 0.0, "calls": 0, **{unit: 0.0 for unit in WORK_UNITS}}
        return self._totals[name]

    @contextmanager
    def stage(self, name: str, *, volumes: float = 0, patches: float = 0, voxels: float = 0,
              bytes: float = 0) -> Iterator[None]:
        """Times the block as one call of stage `name` and adds the given work to it (also when the block raises)."""
        if self._synchronize is not None:
            self._synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._synchronize is not None:
                self._synchronize()
            self.add(name, time.perf_counter() - start, volumes=volumes, patches=patches, voxels=voxels, bytes=bytes)

    def add(self, name: str, seconds: float, *, volumes: float = 0, patches: float = 0, voxels: float = 0,
            bytes: float = 0) -> None:
        """Adds one call of `seconds` (measured elsewhere) and its work to stage `name`."""
        entry = self._entry(name)
        entry["seconds"] += float(seconds)
        entry["calls"] += 1
        self.count(name, volumes=volumes, patches=patches, voxels=voxels, bytes=bytes)

    def count(self, name: str, *, volumes: float = 0, patches: float = 0, voxels: float = 0,
              bytes: float = 0) -> None:
        """Adds work to stage `name` without time or a call (work known only after the timed block)."""
        entry = self._entry(name)
        for unit, amount in zip(WORK_UNITS, (volumes, patches, voxels, bytes)):
            entry[unit] += float(amount)

    def stages(self) -> list[dict[str, Any]]:
        """One row per stage: name, seconds, calls, the work counts and their rates (None where undefined)."""
        return [stage_row(name, **entry) for name, entry in self._totals.items()]

    def total_seconds(self) -> float:
        return sum(entry["seconds"] for entry in self._totals.values())


def stage_row(name: str, seconds: float, calls: int = 1, *, volumes: float = 0, patches: float = 0,
              voxels: float = 0, bytes: float = 0, **extra: Any) -> dict[str, Any]:
    """A stage row as `StageClock.stages()` gives it, built from totals measured another way; `extra` keys
    (e.g. "note": "not measured: no GPU") are kept and shown on the page."""
    return {"name": name, "seconds": float(seconds), "calls": int(calls), "volumes": float(volumes),
            "patches": float(patches), "voxels": float(voxels), "bytes": float(bytes),
            "volumes_per_s": _rate(volumes, seconds), "patches_per_s": _rate(patches, seconds),
            "voxels_per_s": _rate(voxels, seconds), "mb_per_s": _rate(bytes, seconds, 1e6), **extra}


# ---- the page ---------------------------------------------------------------------------------------------------
def _timed(stages: list[dict]) -> list[dict]:
    return [stage for stage in stages if stage.get("seconds") and stage["seconds"] > 0]


def _waterfall_png(stages: list[dict], bound: str | None) -> bytes | None:
    """Sequential stages as horizontal bars on one time axis, each starting where the one before it ended."""
    timed = _timed(stages)
    if not timed:
        return None
    figure, axis = subplots(figsize=(9, 0.45 * len(timed) + 1.2))
    start = 0.0
    for index, stage in enumerate(timed):
        colour = "#c0392b" if stage["name"] == bound else "#4c72b0"
        axis.barh(index, stage["seconds"], left=start, color=colour)
        axis.text(start + stage["seconds"], index, f" {stage['seconds']:.3g} s", va="center", fontsize=8)
        start += stage["seconds"]
    axis.set_yticks(range(len(timed)), [stage["name"] for stage in timed])
    axis.invert_yaxis()
    axis.set_xlabel("wall seconds (stages laid end to end)")
    axis.set_xlim(0, start * 1.15)
    axis.set_title("stage waterfall")
    return png(figure)


def _throughput_unit(stages: list[dict]) -> str | None:
    """The rate most stages have (patches/s for a training step's stages, volumes/s for an evaluation's)."""
    counts = {key: sum(1 for stage in stages if stage.get(key)) for key in
              ("patches_per_s", "volumes_per_s", "voxels_per_s", "mb_per_s")}
    best = max(counts, key=counts.get)
    return best if counts[best] else None


def _throughput_png(stages: list[dict], bound: str | None) -> bytes | None:
    """One bar per stage: its rate in the unit most stages have (`_throughput_unit`); the bound in red."""
    unit = _throughput_unit(stages)
    if unit is None:
        return None
    rated = [stage for stage in stages if stage.get(unit)]
    figure, axis = subplots(figsize=(9, 0.45 * len(rated) + 1.2))
    colours = ["#c0392b" if stage["name"] == bound else "#4c72b0" for stage in rated]
    axis.barh(range(len(rated)), [stage[unit] for stage in rated], color=colours)
    axis.set_yticks(range(len(rated)), [stage["name"] for stage in rated])
    axis.invert_yaxis()
    axis.set_xscale("log")
    axis.set_xlabel(unit.replace("_per_s", "/s") + " (log scale; the bounding stage in red)")
    axis.set_title("throughput per stage")
    return png(figure)


def _stage_table(stages: list[dict], bound: str | None) -> str:
    extra = sorted({key for stage in stages for key in stage if key not in STAGE_KEYS})
    header = [*STAGE_KEYS, *extra]
    def cell(value: Any) -> Any:
        return int(value) if isinstance(value, float) and value.is_integer() else value

    rows = [[bold(stage["name"]) if stage["name"] == bound else stage["name"],
             *[cell(stage.get(key)) for key in header[1:]]] for stage in stages]
    return html_table(header, rows)


def _scalar_rows(profile: dict) -> list[list[Any]]:
    skip = {"kind", "stages", "bound", "advice"}
    rows = []
    for key, value in profile.items():
        if key in skip:
            continue
        rows.append([key, value if isinstance(value, (int, float, str, type(None))) else Markup(
            f"<code>{_escape_json(value)}</code>")])
    return rows


def _escape_json(value: Any) -> str:
    return html.escape(json.dumps(value, default=str))


def profile_html(profile: dict, *, title: str) -> str:
    """The page `write_profile` writes, as a string."""
    stages = profile.get("stages") or []
    bound = profile.get("bound")
    body = [f"<h1>{html.escape(title)}</h1>",
            html_note(f"kind: {profile.get('kind')}; total stage seconds: "
                      f"{sum(stage.get('seconds') or 0 for stage in stages):.3f}")]
    body.append(f"<h2>Bound</h2><p>{'the pipeline is bound by ' if bound else 'no bounding stage was named'}"
                + (f"<span class='flag'>{html.escape(str(bound))}</span>" if bound else "") + "</p>")
    advice = profile.get("advice") or []
    body.append("<h2>Advice</h2>" + ("<ul>" + "".join(f"<li>{html.escape(str(line))}</li>" for line in advice)
                                     + "</ul>" if advice else html_note("no advice: nothing measured calls for it")))
    body += ["<h2>Stages</h2>", html_image(_waterfall_png(stages, bound), "stage waterfall"),
             html_image(_throughput_png(stages, bound), "throughput per stage"), _stage_table(stages, bound)]
    scalars = _scalar_rows(profile)
    if scalars:
        body += ["<h2>Other figures</h2>", html_table(["key", "value"], scalars)]
    return html_page(title, body)


def write_profile(out_dir: str | Path, profile: dict, *, title: str) -> dict[str, Path]:
    """Writes `out_dir/profile.json` (every number) and `out_dir/profile.html` (waterfall, throughput bars, tables,
    bound and advice), both atomically.

    Args:
        out_dir: created if missing.
        profile: {"kind": "pretraining" | "evaluation", "stages": `StageClock.stages()` or rows of the same keys,
            "bound": a stage name or None, "advice": [str, ...], plus any other JSON keys (shown as a table)}.
        title: the page title.

    Returns:
        {"json": path, "html": path}.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = write_json(out / "profile.json", profile)
    html_path = atomic_write_text(out / "profile.html", profile_html(profile, title=title))
    return {"json": json_path, "html": html_path}


def format_profile(profile: dict) -> str:
    """The profile as the terminal shows it: one line per stage (seconds, calls, rates, note), the bound, advice."""
    def rate(value: float | None, scale: float = 1.0) -> str:
        return "-" if not value else f"{value / scale:.3g}"

    lines = [(f"{'stage':<46} {'seconds':>8} {'calls':>5} {'volumes/s':>10} {'patches/s':>10} {'Mvoxels/s':>10} "
             f"{'MB/s':>8}")]
    for stage in profile.get("stages") or []:
        marker = "*" if stage["name"] == profile.get("bound") else " "
        if not stage.get("calls") and stage.get("note"):
            lines.append(f"{marker}{stage['name']:<45} {stage['note']}")
            continue
        lines.append(f"{marker}{stage['name']:<45} {stage['seconds']:>8.3f} {stage['calls']:>5} "
                     f"{rate(stage.get('volumes_per_s')):>10} {rate(stage.get('patches_per_s')):>10} "
                     f"{rate(stage.get('voxels_per_s'), 1e6):>10} {rate(stage.get('mb_per_s')):>8}"
                     + (f"  ({stage['note']})" if stage.get("note") else ""))
    lines.append(f"bound: {profile.get('bound') or 'none named'} (marked *)")
    lines += [f"advice: {line}" for line in profile.get("advice") or []] or [("advice: none (nothing measured calls "
                                                                               "for a change)")]
    return "\n".join(lines)
