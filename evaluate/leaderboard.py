"""`raf leaderboard`: the encoders of one or more results stores ranked by RAF index, as Markdown, CSV and HTML.

The Markdown table (also printed) holds the ranking; the CSV and HTML tables add every headline number the cells
carry (each group metric's gap per attribute, each probe's AUROC, the latent tests), so a newly registered metric,
probe or latent test appears there with no edit here. Every row carries the licence of the encoder's weights, from
its card (`encoder.licence` at pretraining; "unknown" for sources without a card or a card without it).
"""
from __future__ import annotations

import csv
import glob
import html
import io
from pathlib import Path
from typing import Any

import numpy as np

from rafmedia.core.errors import UserError
from rafmedia.core.files import atomic_write_text, read_json
from rafmedia.engine.export import export_files
from rafmedia.evaluate.encoder_entries import RANDOM_SOURCE
from rafmedia.evaluate.raf import COMPONENTS, RAF_FORMULA
from rafmedia.evaluate.results import RESULTS_FILE, ResultsStore

COLUMNS = ["rank", "encoder", "cohort", "RAF", "RAF 95% CI", "performance", "robustness", "fairness", "licence",
           "source"]
RANDOM_WEIGHTS_LICENCE = "none (random weights)"


def find_stores(patterns: list[str]) -> list[Path]:
    """results.sqlite files named by paths, folders holding one, or globs of either (a glob's matches that are not
    stores, such as other files of a run folder, are passed over)."""
    found: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        for match in matches:
            path = Path(match)
            path = path / RESULTS_FILE if path.is_dir() else path
            if not (path.is_file() and _is_sqlite(path)):
                if glob.has_magic(pattern):
                    continue
                raise UserError(f"no results store at {path}: give OUT/{RESULTS_FILE} of a `raf evaluate` run, or its folder")
            if path not in found:
                found.append(path)
    if not found:
        raise UserError(f"no results store matches {' '.join(patterns)}: give the --out folder(s) of `raf evaluate`")
    return found


def _is_sqlite(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(16) == b"SQLite format 3\x00"


def leaderboard_rows(stores: list[Path]) -> list[dict[str, Any]]:
    """One row per (encoder, cohort) cell, ranked within each cohort by RAF index (best first); then one
    "all cohorts" row per encoder scored on every cohort, with the mean of its indices."""
    cells = [cell for path in stores for cell in ResultsStore(path).cells()]
    if not cells:
        raise UserError(f"the results store(s) {', '.join(map(str, stores))} hold no cells yet")
    latest = {}
    for cell in cells:  # a cell recomputed with other settings replaces the older one in the table
        latest[(cell.encoder, cell.cohort)] = cell
    rows = [_row(cell) for cell in latest.values()]
    cohorts = sorted({row["cohort"] for row in rows if row["RAF"] is not None})
    if len(cohorts) > 1:
        for encoder in sorted({row["encoder"] for row in rows if row["RAF"] is not None}):
            mine = [row for row in rows if row["encoder"] == encoder and row["RAF"] is not None]
            if len(mine) == len(cohorts):
                rows.append({"encoder": encoder, "cohort": "all cohorts (mean)", "source": mine[0]["source"],
                             "licence": mine[0]["licence"],
                             "RAF 95% CI": None, "headline": {}, **{key: float(np.mean([row[key] for row in mine]))
                                                                    for key in ("RAF", *COMPONENTS)}})
    ranked = []
    for cohort in sorted({row["cohort"] for row in rows}, key=lambda c: (c.startswith("all cohorts"), c)):
        group = sorted((row for row in rows if row["cohort"] == cohort), key=lambda row: -_sortable(row["RAF"]))
        ranked += [{"rank": rank, **row} for rank, row in enumerate(group, start=1)]
    return ranked


def _row(cell) -> dict[str, Any]:
    """A cell's row; a weak-label cell (evaluate.weak_labels) has no RAF index, so its row carries its headline only."""
    raf = cell.result.get("raf") or {}
    return {"encoder": cell.encoder, "cohort": cell.cohort, "source": cell.encoder_source,
            "licence": cell.result.get("licence") or weights_licence(cell.encoder_source), "RAF": raf.get("index"),
            "RAF 95% CI": raf.get("index_ci95"), **{name: raf.get(name) for name in COMPONENTS},
            "headline": cell.result.get("headline", {})}


def weights_licence(source: str) -> str:
    """The licence of an encoder's weights from the card of its export (`source` as given to `raf evaluate`):
    "unknown" for a source without a card (timm, monai, a module, a moved file) or a card without a licence."""
    if source == RANDOM_SOURCE:
        return RANDOM_WEIGHTS_LICENCE
    card = export_files(source.partition("=")[0])[1]
    if not card.is_file():
        return "unknown"
    try:
        return str(read_json(card).get("licence") or "unknown")
    except (OSError, ValueError):
        return "unknown"


def _sortable(value: float) -> float:
    return value if value is not None and np.isfinite(value) else -np.inf


def headline_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Every headline number the rows' cells carry, in the order they first appear."""
    return list(dict.fromkeys(column for row in rows for column in row.get("headline", {})))


def _cell_text(row: dict[str, Any], column: str) -> str:
    value = row["headline"].get(column) if column not in row else row.get(column)
    if value is None:
        return ""
    if column == "RAF 95% CI":
        return "" if not value else f"[{value[0]:.3f}, {value[1]:.3f}]"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def to_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell_text(row, column) for column in COLUMNS) + " |" for row in rows]
    return ("# RAF leaderboard\n\n" + "\n".join(lines) + f"\n\n{RAF_FORMULA}\n\nEvery headline number of each cell "
            "(gaps per group metric and attribute, probes, latent tests): leaderboard.csv and leaderboard.html.\n")


def to_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    extra = headline_columns(rows)
    writer.writerow([*COLUMNS[:4], "RAF CI low", "RAF CI high", *COLUMNS[5:], *extra])
    for row in rows:
        low, high = row.get("RAF 95% CI") or ("", "")
        writer.writerow([row["rank"], row["encoder"], row["cohort"], row["RAF"], low, high,
                         *[row[column] for column in COLUMNS[5:]], *[row["headline"].get(column, "") for column in extra]])
    return buffer.getvalue()


def to_html(rows: list[dict[str, Any]]) -> str:
    columns = [*COLUMNS, *headline_columns(rows)]
    head = "".join(f"<th>{html.escape(column)}</th>" for column in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell_text(row, column))}</td>" for column in columns) + "</tr>"
                   for row in rows)
    return ("<!doctype html><html><head><meta charset='utf-8'><title>RAF leaderboard</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
            "padding:4px 8px;text-align:right}td:nth-child(2),td:nth-child(3),td:last-child{text-align:left}</style>"
            f"</head><body><h1>RAF leaderboard</h1><table><tr>{head}</tr>{body}</table>"
            f"<p>{html.escape(RAF_FORMULA)}</p></body></html>")


def write_leaderboard(rows: list[dict[str, Any]], out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    return {"md": atomic_write_text(out / "leaderboard.md", to_markdown(rows)),
            "csv": atomic_write_text(out / "leaderboard.csv", to_csv(rows)),
            "html": atomic_write_text(out / "leaderboard.html", to_html(rows))}
