"""The zarr cohort store on disk: round trips, atomic subjects, chunk-local patch reads."""
import logging

import numpy as np
import pytest
import zarr
from zarr.storage import LocalStore, LoggingStore

from rafmedia.core.errors import UserError
from rafmedia.shards.store import CohortStore, StoreConfig


def _store(tmp_path, chunk=16):
    return CohortStore.create(tmp_path / "s.zarr", config=StoreConfig(chunk_size=chunk), name="t")


def test_round_trip_of_channels_label_attributes_and_manifest(tmp_path):
    store = _store(tmp_path)
    rng = np.random.default_rng(0)
    image = rng.normal(size=(20, 24, 28)).astype(np.float32)
    label = rng.integers(0, 4, size=(20, 24, 28)).astype(np.uint8)
    store.write_subject("sub-1", channels={"t1": image, "t2": image * 2}, label=label, attrs={"metadata": {"sex": "F"}})
    assert np.array_equal(store.read("sub-1", "t1"), image)
    assert np.array_equal(store.read("sub-1", "t2"), image * 2)
    assert np.array_equal(store.read_label("sub-1"), label)
    attrs = store.subject_attrs("sub-1")
    assert attrs["channels"] == ["t1", "t2"] and attrs["metadata"] == {"sex": "F"} and attrs["shape"] == [20, 24, 28]
    store.write_manifest([{"subject_id": "sub-1", "age": 41.5, "severity": 2, "site": "a"}])
    assert store.read_manifest() == [{"subject_id": "sub-1", "age": 41.5, "severity": 2, "site": "a"}]
    group = zarr.open_group(str(tmp_path / "s.zarr" / "subjects" / "sub-1"), mode="r")
    assert group["t1"].chunks == (16, 16, 16) and group["t1"].metadata.zarr_format == 3


def test_a_subject_is_invisible_until_completely_written(tmp_path):
    store = _store(tmp_path)
    good = np.zeros((8, 8, 8), np.float32)
    with pytest.raises(UserError, match="one shape"):
        store.write_subject("sub-bad", channels={"image": good}, label=np.zeros((8, 8, 9), np.uint8), attrs={})
    assert store.subject_ids() == []
    # A writer killed mid-way leaves only a staging folder, which is never listed as a subject.
    (store.path / ".staging" / "sub-2.999.dead").mkdir(parents=True)
    store.write_subject("sub-1", channels={"image": good}, label=None, attrs={})
    assert store.subject_ids() == ["sub-1"]
    assert not store.has_subject("sub-2")


def test_overwriting_a_subject_replaces_it_whole(tmp_path):
    store = _store(tmp_path)
    store.write_subject("sub-1", channels={"image": np.zeros((8, 8, 8), np.float32)}, label=None, attrs={"v": 1})
    store.write_subject("sub-1", channels={"image": np.ones((8, 8, 8), np.float32)}, label=None, attrs={"v": 2})
    fresh = CohortStore(store.path)
    assert fresh.read("sub-1").min() == 1 and fresh.subject_attrs("sub-1")["v"] == 2
    assert sorted(p.name for p in (store.path / "subjects").iterdir()) == ["sub-1", "zarr.json"]  # no leftovers


def test_random_patch_reads_touch_only_the_chunks_they_overlap(tmp_path, caplog):
    store = _store(tmp_path, chunk=16)
    volume = np.random.default_rng(1).normal(size=(64, 64, 64)).astype(np.float32)
    store.write_subject("sub-1", channels={"image": volume}, label=None, attrs={})
    logged = LoggingStore(LocalStore(str(store.path / "subjects" / "sub-1"), read_only=True), log_level="INFO")
    array = zarr.open_group(logged, mode="r")["image"]
    caplog.set_level(logging.INFO)
    caplog.clear()
    patch = array[20:30, 0:16, 40:56]  # overlaps chunks d in {1}, h in {0}, w in {2, 3}
    assert np.array_equal(patch, volume[20:30, 0:16, 40:56])
    chunk_keys = {message.split("(")[1].split(",")[0].strip("')") for message in caplog.messages
                  if "Calling LocalStore.get(" in message and "/c/" in message}
    assert chunk_keys == {"image/c/1/0/2", "image/c/1/0/3"}


def test_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(UserError, match="not a rafmedia cohort store"):
        CohortStore(tmp_path)
    store = _store(tmp_path)
    with pytest.raises(UserError, match="may only contain"):
        store.write_subject("../escape", channels={"image": np.zeros((4, 4, 4))}, label=None, attrs={})
    store.write_subject("sub-1", channels={"image": np.zeros((4, 4, 4), np.float32)}, label=None, attrs={})
    with pytest.raises(UserError, match="has no channel 'pet' \\(it has: image\\)"):
        store.read("sub-1", "pet")
    with pytest.raises(UserError, match="subject 'sub-9' is not in"):
        store.read("sub-9")


def test_a_chunk_corrupted_on_disk_is_detected_on_read_and_names_the_subject(tmp_path):
    from rafmedia.shards.store import CorruptChunkError

    store = _store(tmp_path)
    image = np.random.default_rng(1).normal(size=(32, 32, 32)).astype(np.float32)
    store.write_subject("sub-7", channels={"image": image}, label=None, attrs={})
    chunk_files = sorted((tmp_path / "s.zarr" / "subjects" / "sub-7" / "image" / "c").rglob("*"))
    chunk_files = [path for path in chunk_files if path.is_file()]
    assert len(chunk_files) == 8  # 32^3 in 16^3 chunks
    corrupt = chunk_files[-1]  # chunk (1, 1, 1)
    data = bytearray(corrupt.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit, as a failing disk would leave
    corrupt.write_bytes(bytes(data))
    fresh = CohortStore(tmp_path / "s.zarr")
    assert np.array_equal(fresh.read("sub-7", region=(slice(0, 16),) * 3), image[:16, :16, :16])  # other chunks fine
    with pytest.raises(CorruptChunkError, match=r"subject 'sub-7' channel 'image' region \[8:24, 8:24, 8:24\].*corrupt"):
        fresh.read("sub-7", region=(slice(8, 24),) * 3)
