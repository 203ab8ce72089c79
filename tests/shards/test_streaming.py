"""Patch streams over real zarr stores and real webdataset tars, with real DataLoader workers."""
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from rafmedia.core.errors import UserError
from rafmedia.shards.chunks import ChunkedArray
from rafmedia.shards.sampling import create_sampler
from rafmedia.shards.sources import StoreSubject, WebDatasetSource, ZarrSource
from rafmedia.shards.store import CohortStore, CorruptChunkError, StoreConfig
from rafmedia.shards.streaming import (PatchStream, ShuffleKeys, SplitByNode, SplitByWorker, StreamConfig,
                                       StreamContext, StreamLoader, build_stream_loader, worker_offsets)
from rafmedia.shards.wds_export import ExportConfig, export_webdataset


def _stream(store, *, sampler="uniform", subject_ids=None, **options):
    values = dict(patches_per_subject=2, seed=0)
    values.update(options)
    return PatchStream(ZarrSource(store.path, subject_ids=subject_ids), create_sampler(sampler, patch_size=8), **values)


def _take(iterable, count):
    items = []
    for item in iterable:
        items.append(item)
        if len(items) == count:
            break
    return items


def _same(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a["subject_id"] == b["subject_id"]
        assert torch.equal(a["origin"], b["origin"]) and torch.equal(a["image"], b["image"])


def test_direct_chunk_reads_equal_zarr_reads_at_edges_in_empty_chunks_and_for_labels(tmp_path):
    store = CohortStore.create(tmp_path / "s.zarr", config=StoreConfig(chunk_size=16), name="t")
    rng = np.random.default_rng(0)
    image = rng.normal(size=(37, 30, 41)).astype(np.float32)
    image[:16, :16, :16] = 0.0  # a chunk of fill values only: zarr does not write it
    label = rng.integers(0, 3, size=image.shape).astype(np.uint8)
    store.write_subject("sub-1", channels={"image": image}, label=label, attrs={})
    assert not (store.path / "subjects/sub-1/image/c/0/0/0").exists()
    reader = StoreSubject(store, "sub-1", ["image"])
    assert ChunkedArray.open(store.path / "subjects/sub-1/image") is not None  # the direct path is the one tested
    regions = [None, (slice(0, 20), slice(3, 30), slice(35, 41)), (slice(15, 17), slice(0, 1), slice(16, 32))]
    for corner in rng.integers(0, 20, size=(10, 3)):
        regions.append(tuple(slice(int(c), int(c) + 17) for c in corner))
    for region in regions:
        assert np.array_equal(reader.read("image", region), store.read("sub-1", "image", region))
        assert np.array_equal(reader.read_label(region), store.read_label("sub-1", region))


def test_a_corrupt_chunk_is_reported_with_its_subject(tmp_path):
    store = CohortStore.create(tmp_path / "s.zarr", config=StoreConfig(chunk_size=8), name="t")
    store.write_subject("sub-1", channels={"image": np.random.default_rng(0).normal(size=(16, 16, 16)).astype(np.float32)},
                        label=None, attrs={})
    chunk = store.path / "subjects/sub-1/image/c/1/0/0"
    data = bytearray(chunk.read_bytes())
    data[10] ^= 0xFF
    chunk.write_bytes(bytes(data))
    reader = StoreSubject(store, "sub-1", ["image"])
    assert reader.read("image", (slice(0, 8),) * 3).shape == (8, 8, 8)  # the intact chunk still reads
    with pytest.raises(CorruptChunkError, match=r"subject 'sub-1' channel 'image' .* checksums differ"):
        reader.read("image", (slice(8, 16), slice(0, 8), slice(0, 8)))


def test_two_workers_times_two_ranks_see_disjoint_complete_partitions_of_an_epoch(small_cohort):
    store, _ = small_cohort
    seen = {}
    for rank in (0, 1):
        stream = _stream(store, epochs=1, rank=rank, world_size=2)
        items = list(DataLoader(stream, batch_size=None, num_workers=2))
        seen[rank] = Counter(item["subject_id"] for item in items)
    assert set(seen[0]).isdisjoint(seen[1])
    assert len(seen[0]) == len(seen[1]) == 18
    merged = seen[0] + seen[1]
    assert set(merged) == set(store.subject_ids()) and set(merged.values()) == {2}  # each subject once, 2 patches


def test_a_multi_rank_stream_without_a_node_splitter_is_refused(small_cohort):
    store, _ = small_cohort
    with pytest.raises(UserError, match=r"world size is 2 but .* no node splitter, so every node would read the same subjects; add SplitByNode\(\)"):
        _stream(store, rank=0, world_size=2, key_stages=(ShuffleKeys(), SplitByWorker()))
    no_worker_split = _stream(store, epochs=1, key_stages=(ShuffleKeys(), SplitByNode()))
    with pytest.raises(UserError, match="the DataLoader has 2 workers but .* no worker splitter"):
        list(StreamLoader(no_worker_split, num_workers=2))
    with pytest.raises(UserError, match="pass both rank and world_size"):
        _stream(store, rank=1)


def test_rank_and_world_size_come_from_torchrun_variables(small_cohort, monkeypatch):
    store, _ = small_cohort
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    stream = _stream(store, epochs=1)
    assert (stream.rank, stream.world_size) == (1, 3)
    assert {item["subject_id"] for item in stream} == set(stream.keys(stream_context(stream)))
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(UserError, match="only one of RANK and WORLD_SIZE"):
        _stream(store)


def stream_context(stream, epoch=0):
    return StreamContext(stream.seed, epoch, stream.rank, stream.world_size)


def test_each_epoch_visits_every_subject_once_in_a_new_order(small_cohort):
    store, _ = small_cohort
    items = list(_stream(store, epochs=2, patches_per_subject=3))
    epochs = [[item["subject_id"] for item in items[start:start + 36 * 3:3]] for start in (0, 36 * 3)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == store.subject_ids()
    assert epochs[0] != epochs[1]


def test_same_seed_same_patches_different_seed_different_patches(small_cohort):
    store, _ = small_cohort
    first = list(_stream(store, epochs=1, seed=7))
    _same(first, list(_stream(store, epochs=1, seed=7)))
    other = list(_stream(store, epochs=1, seed=8))
    assert [a["subject_id"] for a in first] != [b["subject_id"] for b in other]
    by_subject = {item["subject_id"]: item["origin"] for item in other}
    assert sum(torch.equal(item["origin"], by_subject[item["subject_id"]]) for item in first) <= 2


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("epochs, subjects, consumed", [(None, None, 5), (2, 7, 3), (2, 7, 9)])
def test_resuming_gives_exactly_the_batches_an_uninterrupted_run_gives(small_cohort, num_workers, epochs, subjects,
                                                                       consumed):
    store, _ = small_cohort
    subject_ids = store.subject_ids()[:subjects] if subjects else None
    # 7 subjects over 2 workers: 4 and 3 subjects, 6 and 4 batches over 2 epochs; item 9 is past the second's end
    build = lambda: _stream(store, subject_ids=subject_ids, epochs=epochs, batch_size=3)
    loader = StreamLoader(build(), num_workers=num_workers)
    reference = _take(loader, consumed + 6 if epochs is None else 100)
    saved = StreamLoader(build(), num_workers=num_workers)
    _take(saved, consumed)
    state = saved.state_dict()
    assert state["consumed"] == consumed
    resumed = StreamLoader(build(), num_workers=num_workers)
    resumed.load_state_dict(state)
    rest = _take(resumed, len(reference) - consumed)
    assert len(rest) == len(reference) - consumed > 0
    _same(reference[consumed:], rest)
    assert resumed.state_dict()["consumed"] == len(reference)


class CountingSource(ZarrSource):
    """A real zarr source that records which subjects it opened."""

    opened: list

    def open(self, key):
        self.opened.append(key)
        return super().open(key)


def test_resuming_skips_whole_subjects_without_reading_them(small_cohort):
    store, _ = small_cohort
    source = CountingSource(store.path)
    source.opened = []
    stream = PatchStream(source, create_sampler("uniform", patch_size=8), patches_per_subject=4, epochs=1, seed=0)
    full = list(stream)
    source.opened = []
    stream.load_state_dict({**stream.state_dict(), "consumed": 4 * 30 + 2})  # 30 subjects and 2 patches done
    rest = list(stream)
    _same(full[122:], rest)
    assert len(source.opened) == 6  # the half-consumed subject and the 5 after it; the first 30 were never opened


def test_a_state_from_another_stream_is_refused(small_cohort):
    store, _ = small_cohort
    state = StreamLoader(_stream(store, batch_size=3), num_workers=2).state_dict()
    with pytest.raises(UserError, match="the stream state has seed=0 but this stream has seed=1"):
        _stream(store, batch_size=3, seed=1).load_state_dict(state)
    with pytest.raises(UserError, match="saved with num_workers=2, this loader has 0"):
        StreamLoader(_stream(store, batch_size=3), num_workers=0).load_state_dict(state)
    with pytest.raises(UserError, match="not a patch stream state"):
        _stream(store).load_state_dict({"consumed": 3})


def test_worker_offsets_follow_the_dataloader_round_robin():
    assert worker_offsets(5, [None, None]) == ([3, 2], 1)
    # worker 1 holds 2 items; after it is exhausted the loader asks worker 0 only
    assert worker_offsets(6, [5, 2]) == ([4, 2], 0)
    assert worker_offsets(4, [1, 3, 3]) == ([1, 2, 1], 2)  # 0 1 2 1: worker 0 is done, 2 is due
    with pytest.raises(UserError, match="more than the stream holds"):
        worker_offsets(8, [5, 2])


def test_zarr_and_webdataset_sources_give_the_same_patches(small_cohort, tmp_path):
    store, _ = small_cohort
    export_webdataset(store, tmp_path / "wds", config=ExportConfig(shard_size_mb=0.3), progress=False)
    sampler = create_sampler("label_balanced", patch_size=10, foreground_probability=0.5)
    wds_source = WebDatasetSource(tmp_path / "wds")
    assert len(wds_source.keys()) > 2  # several shards, split as keys
    patches = {}
    for source in (ZarrSource(store.path), wds_source):
        stream = PatchStream(source, sampler, patches_per_subject=3, epochs=1, seed=5)
        patches[type(source).__name__] = sorted(((p["subject_id"], p["origin"].tolist(), p["image"], p["label"])
                                                 for p in DataLoader(stream, batch_size=None, num_workers=2)),
                                                key=lambda item: (item[0], item[1]))
    zarr_patches, wds_patches = patches["ZarrSource"], patches["WebDatasetSource"]
    assert len(zarr_patches) == len(wds_patches) == 3 * 36
    for a, b in zip(zarr_patches, wds_patches):
        assert a[:2] == b[:2] and torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])


def test_webdataset_patch_exports_and_missing_indexes_are_user_errors(small_cohort, tmp_path):
    store, _ = small_cohort
    export_webdataset(store, tmp_path / "p", config=ExportConfig(mode="patches", patch_size=8), progress=False)
    with pytest.raises(UserError, match="is a 'patches' export; .* --mode volumes"):
        WebDatasetSource(tmp_path / "p")
    with pytest.raises(UserError, match="nothing not found .no webdataset index there.: pass a webdataset export folder"):
        WebDatasetSource(tmp_path / "nothing")


def test_stream_config_builds_a_batching_loader(small_cohort):
    store, _ = small_cohort
    config = StreamConfig(sampler="paired", sampler_options={"patch_size": 8, "max_shift": 2}, patches_per_subject=2,
                          batch_size=4, num_workers=0)
    batch = next(iter(build_stream_loader(config, store.path)))
    assert batch["view_a"].shape == batch["view_b"].shape == (4, 1, 8, 8, 8) and batch["view_a"].dtype == torch.float32
    assert len(batch["subject_id"]) == 4 and (batch["origin_a"] - batch["origin_b"]).abs().max() <= 2
