"""The embedding cache: exact round trips, compute-only-what-is-missing, and writes that a kill cannot corrupt."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import zarr

from rafmedia.core.errors import UserError
from rafmedia.evaluate.cache import STAGING, STALE_STAGING_S, CacheKey, EmbeddingCache, cached_embeddings

DIGEST = "0f27b7ede1567fd2"


def keys_for(digest=DIGEST, cohort="cohort-a", subjects=range(6), levels=(("clean", 0), ("gamma", 2), ("motion", 5))):
    return [CacheKey(digest, cohort, f"sub-{s:03d}", alteration, severity)
            for s in subjects for alteration, severity in levels]


class CountingCompute:
    """A compute_fn that records the keys it was asked for; its vectors are a seeded function of the key."""

    def __init__(self, dim=8, dtype=np.float64):
        self.dim, self.dtype, self.calls = dim, dtype, []

    def vector(self, key):
        seed = [ord(char) for char in "|".join(map(str, key))]
        return np.random.default_rng(seed).normal(size=self.dim).astype(self.dtype)

    def __call__(self, keys):
        self.calls.append(list(keys))
        return np.stack([self.vector(key) for key in keys])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_values_round_trip_bit_for_bit_in_their_dtype(tmp_path, dtype):
    rng = np.random.default_rng(0)
    items = {key: (rng.normal(size=5) * 10.0 ** rng.integers(-30, 30)).astype(dtype) for key in keys_for()}
    cache = EmbeddingCache(tmp_path / "cache.zarr")
    assert cache.put_many(items) == len(items)
    reopened = EmbeddingCache(tmp_path / "cache.zarr").get_many(list(items))
    assert set(reopened) == set(items)
    for key, vector in items.items():
        assert reopened[key].dtype == dtype
        assert np.array_equal(reopened[key], vector)
        assert reopened[key].tobytes() == vector.tobytes()


def test_a_second_call_computes_nothing_and_returns_the_same_embeddings_in_order(tmp_path):
    compute = CountingCompute()
    keys = keys_for()
    first = cached_embeddings(EmbeddingCache(tmp_path / "cache.zarr"), keys, compute)
    assert [len(call) for call in compute.calls] == [len(keys)]
    assert np.array_equal(first, np.stack([compute.vector(key) for key in keys]))  # in the order asked

    again = cached_embeddings(EmbeddingCache(tmp_path / "cache.zarr"), keys[::-1], compute)
    assert len(compute.calls) == 1  # nothing recomputed, also from a freshly opened cache
    assert np.array_equal(again, first[::-1])


def test_only_the_missing_keys_are_computed(tmp_path):
    compute = CountingCompute()
    cache = EmbeddingCache(tmp_path / "cache.zarr")
    cached_embeddings(cache, keys_for(subjects=range(4)), compute)
    wider = keys_for(subjects=range(6))
    result = cached_embeddings(cache, wider, compute)
    assert compute.calls[1] == keys_for(subjects=range(4, 6))  # exactly the new subjects, in order
    assert np.array_equal(result, np.stack([compute.vector(key) for key in wider]))
    assert cache.missing(wider) == []


def test_a_changed_digest_misses(tmp_path):
    compute = CountingCompute()
    cache = EmbeddingCache(tmp_path / "cache.zarr")
    cached_embeddings(cache, keys_for(), compute)
    other = keys_for(digest="aa00bb11cc22dd33")
    assert cache.missing(other) == other
    assert cache.get_many(other) == {}
    cached_embeddings(cache, other, compute)
    assert compute.calls[1] == other


def test_missing_is_in_order_and_once_and_keys_are_checked(tmp_path):
    cache = EmbeddingCache(tmp_path / "cache.zarr")
    a, b, c = keys_for(subjects=range(1))
    cache.put_many([(b, np.ones(3))])
    assert cache.missing([c, a, b, c, a]) == [c, a]
    with pytest.raises(UserError, match="severity 0"):
        cache.missing([(DIGEST, "cohort-a", "sub-000", "clean", 2)])
    with pytest.raises(UserError, match="severity must be an int 0..5"):
        cache.missing([(DIGEST, "cohort-a", "sub-000", "gamma", 6)])
    with pytest.raises(UserError, match="one vector"):
        cache.put_many([(a, np.ones((2, 3)))])


def test_the_newest_write_of_a_key_wins(tmp_path):
    cache = EmbeddingCache(tmp_path / "cache.zarr")
    key = keys_for(subjects=range(1))[0]
    cache.put_many([(key, np.zeros(4))])
    assert np.array_equal(cache.get_many([key])[key], np.zeros(4))
    cache.put_many([(key, np.full(4, 7.0))])
    assert np.array_equal(cache.get_many([key])[key], np.full(4, 7.0))
    assert np.array_equal(EmbeddingCache(tmp_path / "cache.zarr").get_many([key])[key], np.full(4, 7.0))


def test_cohort_names_with_slashes_and_dots_stay_inside_the_store(tmp_path):
    cache = EmbeddingCache(tmp_path / "cache.zarr")
    keys = keys_for(cohort="../data/site a.zarr", subjects=range(2))
    cache.put_many([(key, np.arange(3.0) + i) for i, key in enumerate(keys)])
    assert sorted(os.listdir(tmp_path)) == ["cache.zarr"]
    got = EmbeddingCache(tmp_path / "cache.zarr").get_many(keys)
    assert [got[key].tolist() for key in keys] == [(np.arange(3.0) + i).tolist() for i in range(len(keys))]
    assert cache.missing(keys_for(cohort="../data/site a", subjects=range(2))) != []  # a different cohort


def run_writer(cache_path, code):
    script = textwrap.dedent(f"""
        import os, sys
        import numpy as np
        from rafmedia.evaluate.cache import CacheKey, EmbeddingCache
        cache = EmbeddingCache({str(cache_path)!r})
    """) + textwrap.dedent(code)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_write_killed_after_the_data_but_before_publishing_reads_as_missing(tmp_path):
    # The writer process dies (os._exit, no cleanup) at the exact moment its batch's data is complete on disk
    # and only the publishing rename is left: the same state a SIGKILL at that instant leaves behind.
    path = tmp_path / "cache.zarr"
    process = run_writer(path, f"""
        first = CacheKey({DIGEST!r}, "c", "sub-1")
        cache.put_many([(first, np.arange(4.0))])
        os.rename = lambda *args: os._exit(9)
        cache.put_many([(CacheKey({DIGEST!r}, "c", "sub-2"), np.arange(4.0) * 3)])
    """)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 9, output
    staged = [entry for entry in (path / STAGING).iterdir() if entry.is_dir() and not entry.name.startswith(".")]
    assert len(staged) == 1 and np.array_equal(zarr.open_array(str(staged[0]), mode="r")[0], np.arange(4.0) * 3)

    cache = EmbeddingCache(path)
    first, second = CacheKey(DIGEST, "c", "sub-1"), CacheKey(DIGEST, "c", "sub-2")
    assert cache.missing([first, second]) == [second]
    assert list(cache.get_many([first, second])) == [first]
    compute = CountingCompute(dim=4)
    result = cached_embeddings(cache, [first, second], compute)
    assert compute.calls == [[second]]
    assert np.array_equal(result[0], np.arange(4.0))

    # the killed writer's leftover: kept while it could still be a live writer's, removed once stale
    assert staged[0].exists()  # the write above swept .staging/, but the leftover is seconds old
    past = time.time() - STALE_STAGING_S - 60
    os.utime(staged[0], (past, past))
    EmbeddingCache(path).put_many([(CacheKey(DIGEST, "c", "sub-3"), np.arange(4.0))])
    assert not staged[0].exists()
    assert [entry.name for entry in (path / STAGING).iterdir()] == ["zarr.json"]


def test_a_writer_killed_with_sigkill_at_a_random_moment_leaves_only_whole_valid_batches(tmp_path):
    path = tmp_path / "cache.zarr"
    batch = 25
    process = run_writer(path, f"""
        dim = 256
        for step in range(100000):
            keys = [CacheKey({DIGEST!r}, "c", f"sub-{{step * {batch} + i}}") for i in range({batch})]
            vectors = np.random.default_rng(step).normal(size=({batch}, dim)).astype(np.float32)
            cache.put_many(list(zip(keys, vectors)))
            print(step, flush=True)
    """)
    done = 0
    deadline = time.time() + 60
    while done < 3 and time.time() < deadline:
        line = process.stdout.readline()
        done = int(line) + 1 if line.strip().isdigit() else done
    time.sleep(float(np.random.default_rng(1).uniform(0.0, 0.05)))
    os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=30)
    assert done >= 3

    cache = EmbeddingCache(path)
    keys = [CacheKey(DIGEST, "c", f"sub-{i}") for i in range(batch * (done + 200))]
    found = cache.get_many(keys)
    assert len(found) % batch == 0 and len(found) >= batch * done  # whole batches only, all reported ones there
    for step in range(len(found) // batch):
        expected = np.random.default_rng(step).normal(size=(batch, 256)).astype(np.float32)
        for i in range(batch):
            assert np.array_equal(found[keys[step * batch + i]], expected[i])
    assert set(cache.missing(keys)) == set(keys) - set(found)


def _write_at_the_barrier(path, barrier, index):
    cache = EmbeddingCache(path)
    barrier.wait()
    cache.put_many([(CacheKey(DIGEST, "c", f"sub-{index}"), np.full(3, float(index)))])


def test_writers_that_start_at_once_all_write(tmp_path):
    """Ranks sharing one cache write their first batches together: each creates `.staging/` if missing, and zarr's
    group creation is not atomic (one writer's ContainsGroupError was seen under torchrun). Real processes."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    for trial in range(4):  # without the fix, 2 of 3 runs of two trials failed
        path = tmp_path / f"cache{trial}.zarr"
        EmbeddingCache(path)  # the root exists, as when `raf evaluate` opens the cache before the ranks embed
        barrier = context.Barrier(6)
        writers = [context.Process(target=_write_at_the_barrier, args=(path, barrier, i)) for i in range(6)]
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join(timeout=120)
        assert [writer.exitcode for writer in writers] == [0] * 6
        found = EmbeddingCache(path).get_many([CacheKey(DIGEST, "c", f"sub-{i}") for i in range(6)])
        assert [vector.tolist() for vector in found.values()] == [[float(i)] * 3 for i in range(6)]


def test_a_folder_that_is_not_a_cache_is_refused(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="not an embedding cache"):
        EmbeddingCache(tmp_path / "other")
    zarr.open_group(str(tmp_path / "store.zarr"), mode="w", zarr_format=3).attrs["format"] = "rafmedia.cohort/1"
    with pytest.raises(UserError, match="not an embedding cache"):
        EmbeddingCache(tmp_path / "store.zarr")


def test_a_batch_stored_before_keys_had_a_seed_serves_its_clean_embeddings_only(tmp_path):
    """Caches written by older versions hold [subject, alteration, severity]: their clean embeddings are still read
    (seed 0), their altered ones were drawn with other seeds and must be embedded again."""
    cache = EmbeddingCache(tmp_path / "cache.zarr")
    group = tmp_path / "cache.zarr" / DIGEST / "cohort-a"
    zarr.open_group(str(group.parent), mode="w", zarr_format=3)
    zarr.open_group(str(group), mode="w", zarr_format=3)
    vectors = np.arange(6.0).reshape(2, 3)
    zarr.create_array(str(group / "old-batch"), data=vectors, zarr_format=3,
                      attributes={"keys": [["sub-000", "clean", 0], ["sub-000", "gamma", 2]], "created_ns": 1})
    clean, altered = CacheKey(DIGEST, "cohort-a", "sub-000"), CacheKey(DIGEST, "cohort-a", "sub-000", "gamma", 2, 7)
    assert cache.missing([clean, altered]) == [altered]
    np.testing.assert_array_equal(cache.get_many([clean])[clean], vectors[0])
    with pytest.raises(UserError, match="seed must be an int >= 0"):
        cache.missing([altered._replace(seed=-1)])
