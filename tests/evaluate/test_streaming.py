"""The evaluator streams subjects from the store: the streamed embeddings are the in-memory ones bit for bit, a cached
subject is never read, the volumes held stay bounded as the cohort grows, and the stage clock counts the work."""
import numpy as np
import pytest
import torch

from rafmedia.core.profiling import StageClock
from rafmedia.engine.encoders import create_encoder
from rafmedia.engine.export import export_encoder
from rafmedia.evaluate import cohort_data
from rafmedia.evaluate.cache import EmbeddingCache
from rafmedia.evaluate.config import EvaluateConfig
from rafmedia.evaluate.embed import Embedder, embed_subjects, extract_embeddings
from rafmedia.evaluate.runner import run_evaluation
from rafmedia.shards.alterations import create_alteration
from rafmedia.shards.store import StoreConfig
from rafmedia.shards.synth import generate_cohort
from rafmedia.shards.volumes import StoreVolumes, load_volumes
from tests.conftest import small_cohort_config

SUBJECTS = [3, 0, 7, 11, 12, 5, 30, 21, 9, 14, 2, 33, 18]  # 13 of 36, out of order: batches of 5 leave a remainder


def tiny_encoder(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_encoder("cnn3d_small", width=4, num_stages=2).eval()


@pytest.fixture(scope="module")
def cohort(small_cohort):
    store, _ = small_cohort
    ids = store.subject_ids()
    return store, ids, load_volumes(store, ids, normalize=False, progress=False)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_streamed_embeddings_are_the_in_memory_ones_bit_for_bit(cohort, num_workers):
    store, ids, volumes = cohort
    encoder, noise = tiny_encoder(), create_alteration("gaussian_noise", severity=3)
    source = StoreVolumes(store.path, ids, num_workers=num_workers)
    alterations = (None, noise) if num_workers == 0 else (noise,)
    for alteration in alterations:
        streamed = embed_subjects(encoder, source, SUBJECTS, batch_size=5, alteration=alteration, seed=4)
        in_memory = embed_subjects(encoder, volumes, SUBJECTS, batch_size=5, alteration=alteration, seed=4)
        np.testing.assert_array_equal(streamed, in_memory)
    assert source.num_read == len(alterations) * len(SUBJECTS)
    if num_workers:
        return
    # against the batch path on contiguous subjects: clean with batches of 5 (11 = 2 x 5 + 1), altered one by one
    # (extract_embeddings seeds an alteration per batch start, i.e. per subject only with batch_size=1)
    np.testing.assert_array_equal(embed_subjects(encoder, source, range(11), batch_size=5),
                                  extract_embeddings(encoder, volumes[:11], batch_size=5))
    np.testing.assert_array_equal(embed_subjects(encoder, source, range(4), batch_size=1, alteration=noise, seed=4),
                                  extract_embeddings(encoder, volumes[:4], batch_size=1, alteration=noise, seed=4))


def test_a_cached_subject_is_not_read_again(cohort, tmp_path):
    store, ids, volumes = cohort
    encoder, source = tiny_encoder(), StoreVolumes(store.path, ids, num_workers=0)
    embed = Embedder(source, ids, "cohort", batch_size=4, cache=EmbeddingCache(tmp_path / "cache.zarr"))
    first = embed(encoder, "enc", np.array(SUBJECTS[:8]))
    assert source.num_read == 8
    both = embed(encoder, "enc", np.array(SUBJECTS))  # 5 new subjects, 8 cached
    assert source.num_read == 8 + 5
    np.testing.assert_array_equal(both[:8], first)  # served from the cache
    np.testing.assert_array_equal(both[8:], embed_subjects(encoder, volumes, SUBJECTS[8:], batch_size=4))
    embed(encoder, "enc", np.array(SUBJECTS), alteration="gaussian_noise", severity=2)
    assert source.num_read == 13 + 13  # altered embeddings are other keys: read again, once
    embed(encoder, "enc", np.array(SUBJECTS), alteration="gaussian_noise", severity=2)
    assert source.num_read == 26


@pytest.fixture(scope="module")
def two_cohorts(small_cohort, tmp_path_factory):
    """The 36-subject cohort and a 12-subject one of the same recipe, and an exported encoder."""
    store, _ = small_cohort
    small = generate_cohort(small_cohort_config(num_subjects=12), store_config=StoreConfig(chunk_size=16),
                            out=tmp_path_factory.mktemp("c12") / "cohort.zarr", progress=False)
    weights = export_encoder(tiny_encoder(), tmp_path_factory.mktemp("enc") / "encoder.safetensors",
                             architecture="cnn3d_small", options={"width": 4, "num_stages": 2}, card={"name": "tiny"})
    return {12: small, 36: store}, weights


def test_the_volumes_held_stay_bounded_and_the_clock_counts_the_work(two_cohorts, monkeypatch):
    stores, weights = two_cohorts
    readers = []

    class RecordedStoreVolumes(StoreVolumes):  # the real reader, remembered so its counters can be read after
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            readers.append(self)

    monkeypatch.setattr(cohort_data, "StoreVolumes", RecordedStoreVolumes)
    peaks = {}
    for num_subjects, store in stores.items():
        readers.clear()
        clock = StageClock()
        config = EvaluateConfig(cohort=str(store.path), encoders=[str(weights)], random_baseline=False, seeds=[0],
                                alterations=["gaussian_noise"], severities=[2], bootstrap_resamples=10,
                                permutations=5, min_group_size=2, few_shot=[1.0], batch_size=4, num_workers=1,
                                targets=["disease"], group_by=["sex"], intersections=False, c_grid=[1.0])
        result = run_evaluation(config, progress=False, clock=clock)
        (reader,) = readers
        assert "tiny" in result["encoders"]
        num_test = int(np.ceil(0.5 * num_subjects))  # sklearn's test size: ceil(test_fraction * N)
        stages = {row["name"]: row for row in clock.stages()}
        assert {"read", "alter", "embed", "probe", "bootstrap", "latent"} <= set(stages)
        voxels = 32 ** 3
        assert stages["read"]["volumes"] == reader.num_read == num_subjects + num_test  # clean pass, one alteration
        assert stages["read"]["bytes"] == reader.bytes_read == (num_subjects + num_test) * voxels * 4
        assert stages["embed"]["volumes"] == num_subjects + num_test
        assert stages["alter"]["volumes"] == num_test and stages["alter"]["voxels"] == num_test * voxels
        assert stages["bootstrap"]["calls"] == 2 and stages["probe"]["calls"] == 1  # fairness + RAF; one cell
        assert all(row["seconds"] >= 0 for row in stages.values())
        peaks[num_subjects] = reader.peak_held
    # one batch of 4 delivered at a time, whatever the cohort: the evaluator keeps no volume past its batch
    assert peaks == {12: 4, 36: 4}
