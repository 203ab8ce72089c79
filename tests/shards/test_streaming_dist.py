"""A real two-process gloo run: each rank learns its place from torch.distributed, not from arguments."""
import json

import torch.distributed as dist
import torch.multiprocessing as mp

from rafmedia.shards.sampling import create_sampler
from rafmedia.shards.sources import ZarrSource
from rafmedia.shards.streaming import PatchStream, StreamLoader


def _rank_main(rank: int, world_size: int, store_path: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world_size)
    try:
        stream = PatchStream(ZarrSource(store_path), create_sampler("uniform", patch_size=8), patches_per_subject=2,
                             epochs=1, seed=3)  # no rank given: resolved from the process group
        # fork, as in a torchrun rank: a process started by mp.spawn would otherwise spawn its workers too (slow)
        loader = StreamLoader(stream, num_workers=2, multiprocessing_context="fork")
        subjects = [item["subject_id"] for item in loader]
        gathered = [None] * world_size
        dist.all_gather_object(gathered, subjects)  # the collective proves both ranks joined one group
        with open(f"{out}/rank{rank}.json", "w") as handle:
            json.dump({"rank": stream.rank, "world_size": stream.world_size, "subjects": subjects,
                       "gathered": gathered}, handle)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_with_two_workers_each_partition_an_epoch_dist(small_cohort, tmp_path):
    store, _ = small_cohort
    mp.spawn(_rank_main, args=(2, str(store.path), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [(r["rank"], r["world_size"]) for r in results] == [(0, 2), (1, 2)]
    first, second = results[0]["subjects"], results[1]["subjects"]
    assert set(first).isdisjoint(second) and len(set(first)) == len(set(second)) == 18
    assert sorted(first + second) == sorted(store.subject_ids() * 2)  # every subject once, two patches each
    assert results[0]["gathered"] == results[1]["gathered"] == [first, second]
