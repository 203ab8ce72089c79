"""The results store of evaluation sweeps: one SQLite file, one row per (encoder, cohort, evaluation settings) cell.

A sweep asks the store which cells it already holds and computes only the others, so a killed or extended sweep
(more checkpoints, another cohort) re-runs nothing that finished. A cell is written in one transaction when it is
complete: a killed run leaves either the whole cell or nothing. Several ranks or SLURM array tasks can write to
one store (SQLite locks the file; writers wait up to `timeout` seconds).

Keys are digests: the encoder's (its weights file and architecture, or the random initialisation's recipe), the
cohort's (its manifest) and the settings' (every evaluation option that changes a number). Change a probe option
and every cell is computed again; add a checkpoint and only its cells are.
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

RESULTS_FILE = "results.sqlite"

SCHEMA = """
CREATE TABLE IF NOT EXISTS cells (
    encoder_digest TEXT NOT NULL,
    cohort_digest TEXT NOT NULL,
    settings_digest TEXT NOT NULL,
    encoder TEXT NOT NULL,
    encoder_source TEXT NOT NULL,
    cohort TEXT NOT NULL,
    cohort_path TEXT NOT NULL,
    created TEXT NOT NULL,
    seconds REAL NOT NULL,
    result TEXT NOT NULL,
    PRIMARY KEY (encoder_digest, cohort_digest, settings_digest)
)
"""


def digest(*parts: Any) -> str:
    """A short stable digest of JSON-serialisable parts (16 hex characters of SHA-256)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class CellKey:
    encoder_digest: str
    cohort_digest: str
    settings_digest: str


@dataclass
class Cell:
    key: CellKey
    encoder: str
    encoder_source: str
    cohort: str
    cohort_path: str
    created: str
    seconds: float
    result: dict[str, Any]


class ResultsStore:
    """`results.sqlite` of a sweep. `has`, `get`, `put`, `cells`."""

    def __init__(self, path: str | Path, *, timeout: float = 120.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.timeout = timeout
        with self._connect() as connection:
            connection.execute(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=self.timeout)

    def has(self, key: CellKey) -> bool:
        with self._connect() as connection:
            row = connection.execute("SELECT 1 FROM cells WHERE encoder_digest=? AND cohort_digest=? AND "
                                     "settings_digest=?", (key.encoder_digest, key.cohort_digest,
                                                           key.settings_digest)).fetchone()
        return row is not None

    def get(self, key: CellKey) -> Cell | None:
        with self._connect() as connection:
            row = connection.execute("SELECT * FROM cells WHERE encoder_digest=? AND cohort_digest=? AND "
                                     "settings_digest=?", (key.encoder_digest, key.cohort_digest,
                                                           key.settings_digest)).fetchone()
        return _cell(row) if row else None

    def put(self, key: CellKey, *, encoder: str, encoder_source: str, cohort: str, cohort_path: str, seconds: float,
            result: dict[str, Any]) -> None:
        """Writes one complete cell (replacing an older copy of the same key) in one transaction."""
        text = json.dumps(result, allow_nan=True, default=jsonable)
        with self._connect() as connection:  # commits on success, rolls back on any error
            connection.execute("INSERT OR REPLACE INTO cells VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                               (key.encoder_digest, key.cohort_digest, key.settings_digest, encoder, encoder_source,
                                cohort, cohort_path, time.strftime("%Y-%m-%d %H:%M:%S"), float(seconds), text))

    def cells(self, settings_digest: str | None = None) -> Iterator[Cell]:
        """Every cell (of one settings digest when given), in the order they were written."""
        query, parameters = "SELECT * FROM cells", ()
        if settings_digest is not None:
            query, parameters = query + " WHERE settings_digest=?", (settings_digest,)
        with self._connect() as connection:
            rows = connection.execute(query + " ORDER BY rowid", parameters).fetchall()
        return iter([_cell(row) for row in rows])

    def __len__(self) -> int:
        with self._connect() as connection:
            return int(connection.execute("SELECT COUNT(*) FROM cells").fetchone()[0])


def _cell(row: tuple) -> Cell:
    return Cell(CellKey(row[0], row[1], row[2]), encoder=row[3], encoder_source=row[4], cohort=row[5],
                cohort_path=row[6], created=row[7], seconds=row[8], result=json.loads(row[9]))


def jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in a results cell")
