"""An on-disk cache of embeddings keyed by (encoder digest, cohort, subject, alteration, severity, seed).

Embedding a cohort under every alteration and severity is the slow part of an evaluation; the cache makes a
re-run (another probe, another metric, a crashed job resumed) compute only what is new. The encoder digest
(`evaluate.encoders.load_any_encoder` -> `info["digest"]`) hashes the weights bytes, so retrained or changed
weights never hit stale entries; the seed is the alteration's (`shards.alterations.alteration_seed`, 0 for clean
embeddings), so embeddings drawn with other random alterations are never served.

Layout on disk (zarr v3)::

    cache.zarr/
      zarr.json                        root group; attrs: format
      <digest>/<cohort>/               one group per encoder and cohort (cohort name percent-encoded)
        <batch id>                     one (n, D) float32/float64 array per `put_many` call;
                                       attrs: keys [[subject, alteration, severity, seed], ...], created_ns
      .staging/                        a group of batches being written; never read

Every batch is written completely into `.staging/` and then renamed into its cohort group, so a process
killed mid-write leaves only a staged batch that no reader looks at: a key is either fully there or missing.
Staged entries untouched for six hours (killed writers' leftovers) are removed by the next writer.
When a key was written twice, the newest batch wins. Batches written before keys had a seed hold
[subject, alteration, severity]: their clean embeddings (seed 0) are still served, their altered ones never are.
"""
from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote

import numpy as np
import zarr

from rafmedia.core.errors import UserError

CACHE_FORMAT = "rafmedia.embedding_cache/1"
CLEAN = "clean"
MAX_SEVERITY = 5
STAGING = ".staging"
STALE_STAGING_S = 6 * 3600  # staged entries older than this were left by killed writers
ROWS_PER_CHUNK = 4096
STORED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


LEGACY_SEED = -1  # the seed of altered embeddings stored before keys had one: no key asks for it


class CacheKey(NamedTuple):
    """One cached embedding: which encoder, cohort and subject, under which alteration ("clean"), severity and
    alteration seed."""

    digest: str
    cohort: str
    subject: str
    alteration: str = CLEAN
    severity: int = 0
    seed: int = 0


def as_key(key: Sequence[Any]) -> CacheKey:
    """Checks a key (a `CacheKey` or a 5-tuple) and returns it as a `CacheKey`."""
    try:
        key = CacheKey(*key)
    except TypeError:
        raise UserError(f"a cache key is (digest, cohort, subject, alteration, severity, seed), got {key!r}") from None
    for name in ("digest", "cohort", "subject", "alteration"):
        if not isinstance(getattr(key, name), str) or not getattr(key, name):
            raise UserError(f"cache key {tuple(key)}: {name} must be a non-empty string")
    if not key.digest.replace("-", "").replace("_", "").isalnum():
        raise UserError(f"cache key digest '{key.digest}' must be letters, digits, '-' or '_' "
                        "(use load_any_encoder's info['digest'])")
    if isinstance(key.severity, bool) or not isinstance(key.severity, (int, np.integer)) \
            or not 0 <= key.severity <= MAX_SEVERITY:
        raise UserError(f"cache key {tuple(key)}: severity must be an int 0..{MAX_SEVERITY}, got {key.severity!r}")
    if key.alteration == CLEAN and key.severity != 0:
        raise UserError(f"cache key {tuple(key)}: '{CLEAN}' has severity 0, got {key.severity}")
    if isinstance(key.seed, bool) or not isinstance(key.seed, (int, np.integer)) or key.seed < 0:
        raise UserError(f"cache key {tuple(key)}: seed must be an int >= 0 (the alteration's seed), got {key.seed!r}")
    return key._replace(severity=int(key.severity), seed=int(key.seed))


class EmbeddingCache:
    """Embeddings on disk: `get_many`, `put_many`, `missing`. Safe with several writers (each writes new batches)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._staging_swept = False  # stale staged entries are removed once, at this instance's first write
        if (self.path / "zarr.json").is_file():
            attrs = dict(zarr.open_group(str(self.path), mode="r").attrs)
            if attrs.get("format") != CACHE_FORMAT:
                raise UserError(f"{self.path} is a zarr store but not an embedding cache (format "
                                f"{attrs.get('format')!r}); choose another cache path")
        elif self.path.exists() and any(self.path.iterdir()):
            raise UserError(f"{self.path} exists and is not an embedding cache; choose another cache path")
        else:
            self._make_group(self.path, {"format": CACHE_FORMAT})
        # (digest, cohort) -> {(subject, alteration, severity, seed): (created_ns, batch id, row)}; batches never change
        self._index: dict[tuple[str, str], dict[tuple[str, str, int, int], tuple[int, str, int]]] = {}
        self._seen_batches: dict[tuple[str, str], set[str]] = {}

    # ---- reading --------------------------------------------------------------------------------
    def get_many(self, keys: Iterable[Sequence[Any]]) -> dict[CacheKey, np.ndarray]:
        """The cached vectors of those `keys` that are in the cache (missing keys are absent from the dict)."""
        keys = [as_key(key) for key in keys]
        indexes = self._refreshed_indexes(keys)
        found: dict[CacheKey, np.ndarray] = {}
        wanted: dict[tuple[str, str], dict[str, list[tuple[int, CacheKey]]]] = {}
        for key in keys:
            where = indexes[key[:2]].get(key[2:])
            if where is not None:
                wanted.setdefault(key[:2], {}).setdefault(where[1], []).append((where[2], key))
        for (digest, cohort), batches in wanted.items():
            for batch, rows in batches.items():
                vectors_ND = zarr.open_array(str(self._group_path(digest, cohort) / batch), mode="r")[...]
                for row, key in rows:
                    found[key] = vectors_ND[row].copy()
        return found

    def missing(self, keys: Iterable[Sequence[Any]]) -> list[CacheKey]:
        """The keys not in the cache, in the given order, each once."""
        keys = [as_key(key) for key in keys]
        indexes = self._refreshed_indexes(keys)
        return list(dict.fromkeys(key for key in keys if key[2:] not in indexes[key[:2]]))

    def _refreshed_indexes(self, keys: list[CacheKey]) -> dict[tuple[str, str], dict]:
        return {group: self._refreshed(*group) for group in dict.fromkeys(key[:2] for key in keys)}

    def _refreshed(self, digest: str, cohort: str) -> dict[tuple[str, str, int, int], tuple[int, str, int]]:
        """The index of one (digest, cohort), after reading any batch published since the last look."""
        index = self._index.setdefault((digest, cohort), {})
        seen = self._seen_batches.setdefault((digest, cohort), set())
        group = self._group_path(digest, cohort)
        if not group.is_dir():
            return index
        for entry in os.scandir(group):
            if entry.name.startswith(".") or entry.name in seen or not entry.is_dir():
                continue
            seen.add(entry.name)
            attrs = zarr.open_array(entry.path, mode="r").attrs
            created = int(attrs["created_ns"])
            for row, stored in enumerate(attrs["keys"]):
                key = stored_key(stored)
                if key not in index or index[key][:2] < (created, entry.name):  # the newest batch wins
                    index[key] = (created, entry.name, row)
        return index

    # ---- writing --------------------------------------------------------------------------------
    def put_many(self, items: Mapping[Sequence[Any], Any] | Iterable[tuple[Sequence[Any], Any]]) -> int:
        """Stores (key, vector) pairs: one batch per (digest, cohort, dtype, size). Returns the number stored.

        float32 and float64 vectors are stored as they are (they read back bit for bit); others as float64.
        """
        pairs = items.items() if isinstance(items, Mapping) else items
        batches: dict[tuple[str, str, np.dtype, int], dict[CacheKey, np.ndarray]] = {}
        for key, vector in pairs:
            key, vector = as_key(key), np.asarray(vector)
            if vector.ndim != 1:
                raise UserError(f"cache key {tuple(key)}: an embedding is one vector (D,), got shape {vector.shape}")
            if vector.dtype not in STORED_DTYPES:
                vector = vector.astype(np.float64)
            batches.setdefault((key.digest, key.cohort, vector.dtype, len(vector)), {})[key] = vector
        for (digest, cohort, _, _), batch in batches.items():
            self._write_batch(digest, cohort, batch)
        return sum(len(batch) for batch in batches.values())

    def _write_batch(self, digest: str, cohort: str, batch: dict[CacheKey, np.ndarray]) -> None:
        group = self._group_path(digest, cohort)
        if not (group / "zarr.json").is_file():
            if not (group.parent / "zarr.json").is_file():
                self._make_group(group.parent, {"digest": digest})
            self._make_group(group, {"digest": digest, "cohort": cohort})
        vectors_ND = np.stack(list(batch.values()))
        name = f"{time.time_ns()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        staged = self._staging() / name
        try:
            array = zarr.create_array(str(staged), shape=vectors_ND.shape, dtype=vectors_ND.dtype, zarr_format=3,
                                      chunks=(min(len(vectors_ND), ROWS_PER_CHUNK), vectors_ND.shape[1]),
                                      attributes={"keys": [[k.subject, k.alteration, k.severity, k.seed]
                                                           for k in batch],
                                                  "created_ns": time.time_ns()})
            array[...] = vectors_ND
            os.rename(staged, group / name)  # the publish step: before it the batch is invisible
        finally:
            shutil.rmtree(staged, ignore_errors=True)

    def _make_group(self, path: Path, attrs: dict[str, Any]) -> None:
        """Creates a group atomically (staged, then renamed); another writer may create it first."""
        path.parent.mkdir(parents=True, exist_ok=True)
        staged = (self._staging() if path != self.path else path.parent) / f".group-{uuid.uuid4().hex}"
        zarr.open_group(str(staged), mode="w", zarr_format=3).attrs.update(attrs)
        try:
            os.rename(staged, path)
        except OSError:  # it exists now (created by another writer): keep theirs
            if not (path / "zarr.json").is_file():
                raise
        finally:
            shutil.rmtree(staged, ignore_errors=True)

    def _staging(self) -> Path:
        staging = self.path / STAGING
        if not (staging / "zarr.json").is_file():  # a group, so zarr tools see a valid hierarchy
            try:
                zarr.open_group(str(staging), mode="a", zarr_format=3)
            except zarr.errors.ContainsGroupError:  # another writer (a rank, an array task) created it just now
                pass
        if not self._staging_swept:
            remove_stale_staging(staging)
            self._staging_swept = True
        return staging

    def _group_path(self, digest: str, cohort: str) -> Path:
        # Percent-encode the cohort (and its dots, so '..' or a hidden name cannot occur) into one folder name.
        return self.path / digest / quote(cohort, safe="").replace(".", "%2E")


def stored_key(stored: Sequence[Any]) -> tuple[str, str, int, int]:
    """(subject, alteration, severity, seed) of a key as a batch stores it; a key stored without a seed (older
    caches) is clean with seed 0, or altered with `LEGACY_SEED`."""
    subject, alteration, severity, *seed = stored
    if not seed:
        seed = [0 if alteration == CLEAN else LEGACY_SEED]
    return subject, alteration, int(severity), int(seed[0])


def remove_stale_staging(staging: Path, max_age_s: float = STALE_STAGING_S) -> int:
    """Removes what killed writers left in `.staging/` (untouched for `max_age_s`; a live writer stages one batch
    in seconds). Returns how many entries were removed."""
    removed = 0
    for entry in staging.iterdir():
        if entry.name == "zarr.json":
            continue
        try:
            stale = time.time() - entry.stat().st_mtime > max_age_s
        except FileNotFoundError:  # its writer just published or removed it
            continue
        if stale:
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
    return removed


def cached_embeddings(cache: EmbeddingCache, keys: Sequence[Sequence[Any]],
                      compute_fn: Callable[[list[CacheKey]], Any]) -> np.ndarray:
    """Returns the (N, D) embeddings of `keys` in order, calling `compute_fn` only for the missing ones.

    Args:
        cache: the cache to read and fill.
        keys: cache keys (`CacheKey` or 5-tuples); all of one vector size.
        compute_fn: receives the list of missing keys (in order, each once) and returns one vector per key,
            as an (M, D) array or a sequence of (D,) vectors. Not called when nothing is missing.
    """
    keys = [as_key(key) for key in keys]
    todo = cache.missing(keys)
    if todo:
        computed = list(compute_fn(list(todo)))
        if len(computed) != len(todo):
            raise UserError(f"compute_fn returned {len(computed)} embeddings for {len(todo)} missing keys")
        cache.put_many(zip(todo, computed))
    found = cache.get_many(keys)
    sizes = {len(vector) for vector in found.values()}
    if len(sizes) > 1:
        raise UserError(f"the cached embeddings of these keys have different sizes {sorted(sizes)}; ask for one "
                        "encoder at a time")
    if not keys:
        return np.zeros((0, 0))
    return np.stack([found[key] for key in keys])
