"""Patch-grid, mixed-precision and distributed embedding extraction, against plain embeddings, patches cut by
hand, and a one-process run."""
import warnings
from itertools import product

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rafmedia.core.errors import UserError
from rafmedia.engine.distributed import free_port
from rafmedia.engine.encoders import create_encoder
from rafmedia.evaluate.embed import extract_embeddings, extract_embeddings_distributed, extract_patch_embeddings
from rafmedia.shards.alterations import create_alteration
from rafmedia.shards.volumes import normalize_intensity

NUM_SUBJECTS = 7  # odd, so the two ranks get unequal shares


def build_encoder():
    torch.manual_seed(0)
    return create_encoder("cnn3d_small", width=4, num_stages=2).eval()


def raw_volumes(shape=(NUM_SUBJECTS, 1, 16, 16, 16), seed=0):
    rng = np.random.default_rng(seed)
    return torch.from_numpy((100.0 + 20.0 * rng.normal(size=shape)).astype(np.float32))  # un-normalised, like MR


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference runs as the ranks do, so the float sums are ordered alike
    yield
    torch.set_num_threads(threads)


def grid_starts(size, patch, overlap):
    """Patch starts along one axis, worked out from the definition: a step of patch * (1 - overlap) from 0,
    with the axis padded at its far end to the least length >= max(size, patch) the steps end on exactly."""
    step = round(patch * (1 - overlap))
    padded = max(size, patch)
    while (padded - patch) % step:
        padded += 1
    return list(range(0, padded - patch + 1, step)), padded


def manual_patch_pool(encoder, raw_1CDHW, patch, overlap, pooling):
    x = normalize_intensity(raw_1CDHW)
    axes = [grid_starts(size, patch, overlap) for size in x.shape[2:]]
    padded = torch.zeros(1, x.shape[1], *(length for _, length in axes))
    padded[:, :, :x.shape[2], :x.shape[3], :x.shape[4]] = x
    embeddings = []
    with torch.no_grad():
        for d, h, w in product(*(starts for starts, _ in axes)):
            embeddings.append(encoder(padded[:, :, d:d + patch, h:h + patch, w:w + patch]).double()[0])
    stacked = torch.stack(embeddings)
    return (stacked.mean(dim=0) if pooling == "mean" else stacked.amax(dim=0)).numpy(), len(embeddings)


def test_a_volume_of_exactly_one_patch_embeds_like_the_whole_volume():
    encoder, volumes = build_encoder(), raw_volumes()
    plain = extract_embeddings(encoder, volumes, batch_size=4)
    patched = extract_patch_embeddings(encoder, volumes, patch_size=16, batch_size=4)
    assert patched.dtype == np.float64 and patched.shape == plain.shape
    np.testing.assert_allclose(patched, plain, rtol=1e-6, atol=1e-9)


def test_under_an_alteration_each_subject_draws_as_a_batch_of_one():
    encoder, volumes = build_encoder(), raw_volumes()
    noise = create_alteration("gaussian_noise", severity=4)
    reference = extract_embeddings(encoder, volumes, batch_size=1, alteration=noise, seed=5)
    patched = extract_patch_embeddings(encoder, volumes, patch_size=16, batch_size=3, alteration=noise, seed=5)
    np.testing.assert_allclose(patched, reference, rtol=1e-6, atol=1e-9)
    clean = extract_embeddings(encoder, volumes, batch_size=1)
    assert np.abs(reference - clean).max() > 1e-3  # the alteration did change the embeddings


@pytest.mark.parametrize("shape, patch, overlap, expected_patches", [
    ((24, 20, 16), 8, 0.5, 5 * 4 * 3),  # overlapping grid that ends exactly on every far edge
    ((20, 12, 8), 8, 0.0, 3 * 2 * 1),   # 20 -> padded to 24, 12 -> padded to 16
    ((10, 9, 8), 8, 0.25, 2 * 2 * 1),   # step 6: 10 -> 14, 9 -> 14
    ((6, 8, 8), 8, 0.0, 1),             # smaller than a patch: padded up to one patch
])
@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_pooling_equals_the_patches_cut_by_hand(shape, patch, overlap, expected_patches, pooling):
    encoder, volumes = build_encoder(), raw_volumes((2, 1, *shape), seed=1)
    result = extract_patch_embeddings(encoder, volumes, patch_size=patch, overlap=overlap, pooling=pooling,
                                      batch_size=5)
    for i in range(len(volumes)):
        expected, num_patches = manual_patch_pool(encoder, volumes[i:i + 1], patch, overlap, pooling)
        assert num_patches == expected_patches
        np.testing.assert_allclose(result[i], expected, rtol=1e-5, atol=1e-7)


def test_patch_options_are_checked():
    encoder, volumes = build_encoder(), raw_volumes((1, 1, 8, 8, 8))
    with pytest.raises(UserError, match="unknown patch pooling 'median'"):
        extract_patch_embeddings(encoder, volumes, patch_size=8, pooling="median")
    with pytest.raises(UserError, match=r"overlap must be a fraction in \[0, 1\)"):
        extract_patch_embeddings(encoder, volumes, patch_size=8, overlap=1.0)
    with pytest.raises(UserError, match="patch_size"):
        extract_patch_embeddings(encoder, volumes, patch_size=(8, 8))


def test_amp_is_off_on_the_cpu_and_asking_for_it_warns():
    encoder, volumes = build_encoder(), raw_volumes((3, 1, 16, 16, 16))
    automatic = extract_patch_embeddings(encoder, volumes, patch_size=8, batch_size=8)
    with pytest.warns(UserWarning, match="amp=True is ignored on cpu"):
        forced = extract_patch_embeddings(encoder, volumes, patch_size=8, batch_size=8, amp=True)
    assert np.array_equal(forced, automatic)  # bf16 would have changed the values


@pytest.mark.gpu
def test_bf16_autocast_on_cuda_is_close_to_float32_and_returns_float64():
    encoder, volumes = build_encoder(), raw_volumes((3, 1, 32, 32, 32))
    full = extract_patch_embeddings(encoder, volumes, patch_size=16, overlap=0.5, batch_size=8, device="cuda",
                                    amp=False)
    mixed = extract_patch_embeddings(encoder, volumes, patch_size=16, overlap=0.5, batch_size=8, device="cuda")
    reference = extract_patch_embeddings(build_encoder(), volumes, patch_size=16, overlap=0.5, batch_size=8)
    assert mixed.dtype == np.float64
    np.testing.assert_allclose(full, reference, rtol=1e-3, atol=1e-4)  # TF32 at most
    assert not np.array_equal(mixed, full)  # autocast did run in bf16
    relative = np.linalg.norm(mixed - full, axis=1) / np.linalg.norm(full, axis=1)
    assert relative.max() < 3e-2  # bf16 keeps 8 bits of mantissa


def run_rank(rank, world_size, port, out_dir):
    """One rank of the two-process gloo run (started by torch.multiprocessing.spawn)."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        encoder, volumes = build_encoder(), raw_volumes()
        noise = create_alteration("gaussian_noise", severity=3)
        whole = extract_embeddings_distributed(encoder, volumes, batch_size=1, alteration=noise, seed=7)
        patched = extract_embeddings_distributed(encoder, volumes, batch_size=2, patch_size=8, overlap=0.5)
        np.save(f"{out_dir}/whole_rank{rank}.npy", whole)
        np.save(f"{out_dir}/patched_rank{rank}.npy", patched)
    finally:
        dist.destroy_process_group()


def test_dist_two_gloo_ranks_return_exactly_the_one_process_embeddings_in_subject_order(tmp_path, one_thread):
    mp.spawn(run_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    encoder, volumes = build_encoder(), raw_volumes()
    noise = create_alteration("gaussian_noise", severity=3)
    whole_reference = extract_embeddings(encoder, volumes, batch_size=1, alteration=noise, seed=7)
    patched_reference = extract_patch_embeddings(encoder, volumes, batch_size=2, patch_size=8, overlap=0.5)
    for rank in (0, 1):  # every rank holds the whole result
        assert np.array_equal(np.load(tmp_path / f"whole_rank{rank}.npy"), whole_reference)
        assert np.array_equal(np.load(tmp_path / f"patched_rank{rank}.npy"), patched_reference)
    assert len(np.unique(whole_reference.round(6), axis=0)) == NUM_SUBJECTS  # distinct rows: order is tested


def test_without_a_process_group_distributed_extraction_is_the_one_process_result():
    encoder, volumes = build_encoder(), raw_volumes()
    np.testing.assert_array_equal(extract_embeddings_distributed(encoder, volumes, batch_size=1),
                                  extract_embeddings(encoder, volumes, batch_size=1))
