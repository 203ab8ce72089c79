"""Adaptors beyond the linear probe, under one protocol: every adaptor x label budget x seed, pretrained vs random.

A synthetic cohort (default 120 subjects of 32^3, three sites) is split once by subject (stratified by disease, half
test). Encoders:

- "pretrained": a cnn3d_small pretrained with contrastive_two_crop (`--encoder PATH`, by default the quickstart's
  runs/quickstart/pretrain/encoder.safetensors when it exists; otherwise pretrained here for `--pretrain-steps`);
- "random": the same architecture, randomly initialised (seed 0);
- "vit random": a vit_tiny_3d (patch 16), randomly initialised: the encoder LoRA applies to.

Each encoder's clean embeddings are computed once (`Embedder` through an `EmbeddingCache`; the encoder's forward
passes are counted, a second pass over the protocol must embed nothing) and the protocol
(`rafmedia.evaluate.adaptors.adaptor_results`) runs every adaptor of `evaluate.adaptors` x label budget x seed:
logistic, knn and mlp on the cached embeddings; finetune_partial, finetune_full and lora on the volumes under one
compute budget (`--steps` AdamW steps x `--batch-size` volumes, flips, one torch thread). Each seed draws its own
label subset (the same for every encoder) and initialisation, so pretrained - random differences are paired by seed:
their mean and 95% Student-t interval are printed next to the two sides.

Run:  python benchmarks/adaptors.py [--subjects 120] [--size 48] [--seeds 0,1,2,3,4] [--steps 30] [--out DIR] [--quick]
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rafmedia.engine.batches import DataConfig
from rafmedia.engine.encoders import EncoderConfig, create_encoder
from rafmedia.engine.export import load_encoder
from rafmedia.engine.pretrain import pretrain_encoder
from rafmedia.engine.tasks import TaskConfig
from rafmedia.engine.train import TrainConfig
from rafmedia.evaluate.adaptors import adaptor_results, t_interval
from rafmedia.evaluate.cache import EmbeddingCache
from rafmedia.evaluate.cohort_data import binary_labels, split_indices
from rafmedia.evaluate.config import AdaptorsConfig
from rafmedia.evaluate.embed import Embedder
from rafmedia.shards.store import CohortStore, StoreConfig
from rafmedia.shards.synth import CohortConfig, generate_cohort
from rafmedia.shards.volumes import StoreVolumes

warnings.filterwarnings("ignore")

QUICKSTART_ENCODER = Path(__file__).resolve().parents[1] / "runs/quickstart/pretrain/encoder.safetensors"
ADAPTORS = ["logistic", "knn", "mlp", "finetune_partial", "finetune_full", "lora"]
VIT = ("vit_tiny_3d", {})  # timm's ViT-Ti sizes (192 wide, 12 blocks, 3 heads)
QUICK_VIT = ("vit_3d", {"hidden_size": 48, "num_layers": 2, "num_heads": 3})  # the same contract, small enough for --quick
QUICK = {"subjects": 24, "size": 24, "seeds": "0,1", "budgets": "0.1,1.0", "steps": 3, "batch_size": 4,
         "pretrain_steps": 4, "vit_patch": 8}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=120)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--budgets", default="0.01,0.1,1.0")
    parser.add_argument("--steps", type=int, default=20, help="AdamW steps per volume-adaptor fit")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--encoder", default=None, help="a pretrained cnn export (default: the quickstart's)")
    parser.add_argument("--pretrain-steps", type=int, default=300, help="when no encoder is given or found")
    parser.add_argument("--vit-patch", type=int, default=16)
    parser.add_argument("--no-vit", action="store_true", help="leave the ViT (and so LoRA) out")
    parser.add_argument("--out", default=None, help="folder for the cohort, cache and adaptors.json (default: temp)")
    parser.add_argument("--quick", action="store_true", help="a tiny run (about 30 s) that checks the script")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
        args.encoder = None
    return args


def make_cohort(root: Path, *, subjects: int, size: int) -> CohortStore:
    config = CohortConfig(num_subjects=subjects, shape=[size] * 3, seed=11, workers=1)
    return generate_cohort(config, store_config=StoreConfig(chunk_size=min(32, size)), out=root / "cohort.zarr",
                           progress=False)


def pretrained_cnn(args: argparse.Namespace, store: CohortStore, root: Path) -> tuple[torch.nn.Module, dict, str]:
    """The pretrained encoder: `--encoder`, else the quickstart's, else contrastive_two_crop pretrained here."""
    path = args.encoder or (str(QUICKSTART_ENCODER) if QUICKSTART_ENCODER.is_file() and not args.quick else None)
    if path is None:
        crop = max(16, args.size * 3 // 4 // 8 * 8)
        options = {"temperature": 0.1, "crop_size": crop, "max_shift": args.size // 4, "noise_std": 0.5,
                   "blur_sigma": 1.0, "gamma": 0.4}
        width = 4 if args.quick else 16
        path = str(pretrain_encoder(data=DataConfig(cohort=str(store.path)),
                                    encoder=EncoderConfig(name="cnn3d_small", options={"width": width}),
                                    task=TaskConfig(name="contrastive_two_crop", options=options),
                                    train_config=TrainConfig(steps=args.pretrain_steps, batch_size=8, lr=2e-3,
                                                             warmup_steps=min(30, args.pretrain_steps // 4),
                                                             log_every=max(1, args.pretrain_steps), seed=0,
                                                             tensorboard=False, checkpoint_every=0),
                                    out_dir=root / "pretrain", progress=False))
    model, card = load_encoder(path)
    return model.eval(), card, path


def encoders(args: argparse.Namespace, store: CohortStore, root: Path) -> dict[str, tuple[torch.nn.Module, str]]:
    pretrained, card, path = pretrained_cnn(args, store, root)
    torch.manual_seed(0)
    models = {"pretrained cnn": (pretrained, f"{card.get('name')} ({path})"),
              "random cnn": (create_encoder(card["architecture"], **card.get("options", {})).eval(),
                             f"random-init {card['architecture']} {card.get('options', {})}")}
    if not args.no_vit:
        spec, options = QUICK_VIT if args.quick else VIT
        torch.manual_seed(0)
        described = ", ".join([f"patch {args.vit_patch}", *[f"{key} {value}" for key, value in options.items()]])
        models["random vit"] = (create_encoder(spec, img_size=args.size, patch_size=args.vit_patch, **options).eval(),
                                f"random-init {spec} ({described})")
    return models


def counted(model: torch.nn.Module) -> list[int]:
    """Subjects of every forward pass on `model` itself (the adaptors train copies, which are not counted)."""
    calls: list[int] = []
    model.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])) if module is model else None)
    return calls


def run_encoder(name: str, model: torch.nn.Module, *, embed: Embedder, volumes: StoreVolumes, labels_N: np.ndarray,
                split, config: AdaptorsConfig) -> dict[str, Any]:
    calls = counted(model)
    began = time.perf_counter()
    emb_ND = embed(model, name.replace(" ", "-"), np.arange(len(labels_N)))
    embed_s = time.perf_counter() - began
    embedded = sum(calls)
    block = adaptor_results(model, emb_ND, volumes, labels_N, split, config=config, c_grid=(0.01, 0.1, 1.0, 10.0))
    again = embed(model, name.replace(" ", "-"), np.arange(len(labels_N)))  # the protocol's re-run: from the cache
    assert np.array_equal(again, emb_ND)
    model._forward_hooks.clear()
    return {"block": block, "embed_s": embed_s, "subjects_embedded": embedded,
            "subjects_embedded_on_rerun": sum(calls) - embedded, "seconds": time.perf_counter() - began}


def paired_difference(block_a: dict, block_b: dict, adaptor: str, budget: str) -> dict[str, Any] | None:
    """Per-seed AUROC of a minus b (same seeds, same label subsets): mean and 95% t interval."""
    results = [block["results"].get(adaptor) for block in (block_a, block_b)]
    if not all(result and result["applicable"] for result in results):
        return None
    a, b = ([s["auroc"] for s in result["budgets"][budget]["per_seed"]] for result in results)
    return t_interval(np.subtract(a, b).tolist())


def cell(summary: dict[str, Any]) -> str:
    low, high = summary["ci95"]
    return f"{summary['mean']:.3f} [{low:.3f}, {high:.3f}]"


def print_table(results: dict[str, dict[str, Any]], budgets: list[str]) -> None:
    names = list(results)
    print("\nAUROC (disease) mean [95% t interval over seeds]; s = seconds per fit (mean)")
    header = ["adaptor", "budget", *[f"{name} AUROC | s" for name in names]]
    if {"pretrained cnn", "random cnn"} <= set(names):
        header.append("pretrained - random cnn (paired)")
    print(" | ".join(header))
    for adaptor in ADAPTORS:
        for budget in budgets:
            row = [adaptor, budget]
            for name in names:
                result = results[name]["block"]["results"].get(adaptor)
                if result is None:
                    row.append("-")
                elif not result["applicable"]:
                    row.append("not applicable")
                else:
                    at = result["budgets"][budget]
                    row.append(f"{cell(at['auroc'])} | {at['seconds']['mean']:.2f}")
            if {"pretrained cnn", "random cnn"} <= set(names):
                difference = paired_difference(results["pretrained cnn"]["block"], results["random cnn"]["block"],
                                               adaptor, budget)
                row.append("n/a" if difference is None else cell(difference))
            print(" | ".join(row))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    torch.set_num_threads(1)  # a shared 2-core box: one thread per process is the fast setting for small fits
    began = time.perf_counter()
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="adaptors-"))
    root.mkdir(parents=True, exist_ok=True)
    store = make_cohort(root, subjects=args.subjects, size=args.size) if not (root / "cohort.zarr").exists() \
        else CohortStore(root / "cohort.zarr")
    rows = store.read_manifest()
    labels_N = binary_labels(rows, "disease")
    split = split_indices(labels_N, test_fraction=0.5, seed=0)
    volumes = StoreVolumes(store.path, [row["subject_id"] for row in rows], num_workers=0)
    embed = Embedder(volumes, [row["subject_id"] for row in rows], store.path.name, batch_size=8,
                     cache=EmbeddingCache(root / "cache.zarr"))
    config = AdaptorsConfig(enabled=True, adaptors=ADAPTORS, budgets=[float(b) for b in args.budgets.split(",")],
                            seeds=[int(s) for s in args.seeds.split(",")], steps=args.steps, batch_size=args.batch_size)
    config.validate()
    results, sources = {}, {}
    summary = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "torch_threads": 1,
               "subjects": args.subjects, "size": args.size, "num_train": len(split[0]), "num_test": len(split[1]),
               "config": vars(args), "sources": sources, "results": results}
    for name, (model, source) in encoders(args, store, root).items():
        print(f"{name}: {source}", flush=True)
        results[name] = run_encoder(name, model, embed=embed, volumes=volumes, labels_N=labels_N, split=split,
                                    config=config)
        sources[name] = source
        print(f"  {results[name]['seconds']:.0f} s; subjects embedded {results[name]['subjects_embedded']}, on the "
              f"re-run {results[name]['subjects_embedded_on_rerun']}", flush=True)
        summary["wall_s"] = time.perf_counter() - began
        (root / "adaptors.json").write_text(json.dumps(summary, indent=1, default=str))  # each encoder as it ends
    print_table(results, [str(budget) for budget in config.budgets])
    print(f"\nwall time {summary['wall_s']:.0f} s; every number: {root / 'adaptors.json'}")
    return summary


if __name__ == "__main__":
    main()
