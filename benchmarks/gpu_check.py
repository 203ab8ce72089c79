"""The one-command GPU check (benchmarks/gpu_check.sh runs this): every figure issue 15 asks of a CUDA machine, with
its target and pass/fail, in one JSON file whose path is printed at the end.

GPU parts (each records its figures, its target and "pass"; a part that cannot run records "skipped" or "error"
and why, and the others still run):
  gpu_tests         every test marked `gpu` (pytest -m gpu over the test files that use the mark)
  vit_step          ViT-B 96^3 bf16 training step: ms/step, TFLOP/s, MFU (target >= 40%), and streamed batches
                    vs in memory (target <= 1.05x): benchmarks/train_step.py --preset vit --stream
  views             DALI GPU views vs torch CUDA views (the same TwoCropViews settings, 8 volumes of 128^3)
  alterations       our alterations on CUDA vs TorchIO on the CPU: geometric mean ratio (target >= 50x)
                    (benchmarks/alterations.py --device cuda)
  embed_bf16        embedding extraction (rafmedia.evaluate.embed.embed_subjects) in bf16 vs fp32 on a ViT-B:
                    subjects/s and the cosine agreement of the two (target >= 0.99)
CPU parts (always; seconds): the engine-vs-raw loop overhead (train_step --quick), the alteration benchmark on one
alteration (--quick), the scaling model's arithmetic on a hand-checked case. Without a GPU they use one torch thread.

Without an NVIDIA GPU it prints "no NVIDIA GPU found: <why>", records every GPU part as skipped with that reason,
and exits 0 after the CPU parts. Exit status 1 only when a part that ran failed its target or errored (--strict).

Run:  bash benchmarks/gpu_check.sh [--out gpu_check.json] [--quick] [--strict]
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from xml.etree import ElementTree

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
TARGETS = {"mfu": 0.40, "stream_over_memory": 1.05, "alterations_cuda_over_torchio_cpu": 50.0,
           "bf16_fp32_cosine": 0.99}
NEEDED = ("torch", "numpy", "zarr", "numcodecs", "monai", "einops", "timm", "safetensors", "webdataset", "nibabel",
          "yaml", "sklearn", "scipy", "tqdm", "pytest")
OPTIONAL = {"nvidia.dali": "DALI GPU views", "torchio": "the alteration peer (TorchIO)",
            "SimpleITK": "TorchIO's motion/elastic peers", "deepspeed": "the DeepSpeed bf16 GPU test"}


class Skip(Exception):
    """A part that cannot run here; the message says why."""


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def missing_modules(names) -> list[str]:
    return [name for name in names if importlib.util.find_spec(name.split(".")[0]) is None
            or (name == "nvidia.dali" and _find("nvidia.dali") is None)]


def _find(name: str):
    try:
        return importlib.util.find_spec(name)
    except ModuleNotFoundError:
        return None


def gpu_absent_reason() -> str | None:
    """None when torch sees a CUDA device; else why not (for the "no NVIDIA GPU found: ..." line)."""
    import torch

    if torch.cuda.is_available():
        return None
    smi = shutil.which("nvidia-smi")
    driver = "nvidia-smi not on PATH" if smi is None else "nvidia-smi present but torch sees no device"
    return f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'}) sees no CUDA device; {driver}"


def verdict(figure: float | None, target: float, higher_is_better: bool = True) -> bool | None:
    if figure is None or not math.isfinite(figure):
        return None
    return figure >= target if higher_is_better else figure <= target


# ---- CPU parts ------------------------------------------------------------------------------------------------------
def environment() -> dict:
    import torch

    return {"python": sys.version.split()[0], "executable": sys.executable, "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "platform": platform.platform(), "cpus": os.cpu_count(),
            "missing_required": missing_modules(NEEDED),
            "missing_optional": {name: OPTIONAL[name] for name in missing_modules(OPTIONAL)}}


def cpu_train_step() -> dict:
    result = load_benchmark("train_step").main(["--quick"])
    return {"ours_ms": 1e3 * result["ours_s"], "raw_ms": 1e3 * result["raw_s"],
            "ours_over_raw": result["ours_over_raw"], "flops_per_step": result["flops"]}


def cpu_alterations() -> dict:
    if missing_modules(["torchio"]):
        raise Skip("torchio is not installed (the peer): pip install -c constraints.txt -e \".[bench]\"")
    bench = load_benchmark("alterations")
    rows = bench.main(["--quick", "--only", "gaussian_noise", "--batch", "1", "--repeats", "1", "--threads", "1"])
    return {"ours_mvoxels_per_s": rows[0].ours / 1e6, "torchio_mvoxels_per_s": rows[0].peers["TorchIO"] / 1e6,
            "ours_over_torchio": bench.geometric_mean_ratio(rows, "TorchIO")}


def cpu_scaling_model() -> dict:
    """The model on a case checked by hand: 8 GPUs in one node, 1 GB of gradients at 100 GB/s:
    2 * 7/8 * 1e9 / 1e11 = 17.5 ms, fully hidden behind a 60 ms backward (90 ms compute)."""
    model = load_benchmark("scaling_model")
    reduce_s = model.allreduce_seconds(1e9, 8, gpus_per_node=8, intra_bytes_per_s=1e11, inter_bytes_per_s=1e10,
                                       intra_latency_s=0.0, inter_latency_s=0.0)
    step = model.step_seconds(load_s=0.05, compute_s=0.09, allreduce_s=reduce_s, overlap=1.0, workers=4)
    return {"allreduce_ms": 1e3 * reduce_s, "step_ms": 1e3 * step, "target_allreduce_ms": 17.5,
            "pass": abs(reduce_s - 0.0175) < 1e-12 and abs(step - 0.09) < 1e-12}


# ---- GPU parts ------------------------------------------------------------------------------------------------------
def gpu_tests(out_dir: Path) -> dict:
    files = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "tests").rglob("test_*.py")
                   if "mark.gpu" in path.read_text(encoding="utf-8"))
    report = out_dir / "gpu_tests.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={report}",
               *files]
    began = time.perf_counter()
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed = []
    if report.exists():
        root = ElementTree.parse(report).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        counts = {key: int(suite.get(key, 0)) for key in counts}
        failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
                  if case.find("failure") is not None or case.find("error") is not None]
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {"files": files, **counts, "failed": failed, "seconds": time.perf_counter() - began,
            "exit_code": run.returncode, "output_tail": run.stdout[-1500:],
            "target": "all gpu tests pass", "pass": run.returncode == 0 and counts["passed"] > 0}


def vit_step(quick: bool) -> dict:
    bench = load_benchmark("train_step")
    args = ["--preset", "vit", "--stream", "--rounds", "1" if quick else "3"] + (["--steps", "10"] if quick else [])
    result = bench.main(args)
    ratio = result["stream_s"] / result["ours_s"] if result.get("stream_s") else None
    return {"ms_per_step": 1e3 * result["ours_s"], "raw_ms_per_step": 1e3 * result["raw_s"],
            "tflops": result["tflops"], "mfu": result["mfu"], "stream_ms_per_step": 1e3 * result.get("stream_s", 0),
            "stream_over_memory": ratio, "target": {"mfu": f">= {TARGETS['mfu']}",
                                                     "stream_over_memory": f"<= {TARGETS['stream_over_memory']}"},
            "pass": {"mfu": verdict(result["mfu"], TARGETS["mfu"]),
                     "stream_over_memory": verdict(ratio, TARGETS["stream_over_memory"], higher_is_better=False)}}


def views(quick: bool) -> dict:
    import torch

    from rafmedia.engine.views import TwoCropViews

    settings = {"crop_size": 96, "max_shift": 12, "blur_sigma": 1.0, "rotate90": True}
    volumes = torch.randn(8, 1, 128, 128, 128, generator=torch.Generator().manual_seed(0))
    on_gpu = volumes.cuda()
    torch_views = TwoCropViews(**settings)
    repeats = 3 if quick else 10
    result = {"torch_cuda_ms": 1e3 * _cuda_seconds(lambda g: torch_views(on_gpu, g), repeats)}
    if missing_modules(["nvidia.dali"]):
        result.update(dali="skipped", why="nvidia-dali-cuda120 is not installed (a 424 MB wheel: pip install "
                      "-c constraints.txt -e \".[dali]\"; too large to carry to an offline device machine)")
        return result
    from rafmedia.engine.dali_views import DaliViews

    dali_views = DaliViews(device="gpu", **settings)
    result["dali_gpu_ms"] = 1e3 * _cuda_seconds(lambda g: dali_views(volumes, g), repeats)
    result["dali_over_torch"] = result["dali_gpu_ms"] / result["torch_cuda_ms"]
    result["note"] = "DALI takes CPU volumes (the patch stream's), torch here CUDA ones: DALI's time includes the copy"
    return result


def _cuda_seconds(call: Callable, repeats: int) -> float:
    import statistics

    import torch

    call(torch.Generator().manual_seed(0))  # warm-up: pipeline build, kernel selection
    times = []
    for repeat in range(repeats):
        torch.cuda.synchronize()
        began = time.perf_counter()
        call(torch.Generator().manual_seed(repeat))
        torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def alterations(quick: bool) -> dict:
    if missing_modules(["torchio"]):
        raise Skip("torchio is not installed (the CPU peer): carry its wheel (docs/scaling.md, 'GPU check')")
    bench = load_benchmark("alterations")
    args = ["--device", "cuda", "--threads", str(min(os.cpu_count() or 1, 16))]
    rows = bench.main(args + (["--size", "96", "--batch", "4", "--repeats", "1"] if quick else []))
    ratio = bench.geometric_mean_ratio(rows, "TorchIO")
    return {"geometric_mean_ratio_vs_torchio_cpu": ratio,
            "per_alteration": {f"{row.alteration}/b{row.batch}": row.ours / row.peers["TorchIO"]
                               for row in rows if "TorchIO" in row.peers},
            "target": f">= {TARGETS['alterations_cuda_over_torchio_cpu']}",
            "pass": verdict(ratio, TARGETS["alterations_cuda_over_torchio_cpu"])}


def embed_bf16(quick: bool) -> dict:
    import numpy as np
    import torch

    from rafmedia.engine.encoders import create_encoder
    from rafmedia.evaluate.embed import embed_subjects

    torch.manual_seed(0)
    encoder = create_encoder("vit_base_3d", img_size=96, patch_size=16)
    subjects = 32 if quick else 128
    volumes = torch.randn(subjects, 1, 96, 96, 96, generator=torch.Generator().manual_seed(0))
    result, embeddings = {}, {}
    for name, amp in (("bf16", True), ("fp32", False)):
        embed_subjects(encoder, volumes, range(8), batch_size=8, device="cuda", amp=amp)  # warm-up
        torch.cuda.synchronize()
        began = time.perf_counter()
        embeddings[name] = embed_subjects(encoder, volumes, range(subjects), batch_size=16, device="cuda", amp=amp)
        result[f"{name}_subjects_per_s"] = subjects / (time.perf_counter() - began)
    a, b = embeddings["bf16"], embeddings["fp32"]
    cosine = float(np.min(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))
    result.update(bf16_over_fp32_speed=result["bf16_subjects_per_s"] / result["fp32_subjects_per_s"],
                  min_cosine_bf16_vs_fp32=cosine, target=f"cosine >= {TARGETS['bf16_fp32_cosine']}",
                  **{"pass": verdict(cosine, TARGETS["bf16_fp32_cosine"])})
    return result


# ---- driver ---------------------------------------------------------------------------------------------------------
def run_part(name: str, call: Callable[[], dict], parts: dict) -> None:
    print(f"== {name}", flush=True)
    began = time.perf_counter()
    try:
        parts[name] = {"status": "ran", **call()}
    except Skip as why:
        parts[name] = {"status": "skipped", "why": str(why)}
    except Exception as error:  # noqa: BLE001 (a broken part is recorded and the others still run)
        parts[name] = {"status": "error", "why": f"{type(error).__name__}: {error}",
                       "traceback": traceback.format_exc()[-2000:]}
    parts[name]["seconds"] = round(time.perf_counter() - began, 2)
    print(f"   {parts[name]['status']} in {parts[name]['seconds']} s"
          + (f": {parts[name]['why']}" if "why" in parts[name] else ""), flush=True)


def summarise(parts: dict) -> dict:
    def passes(part):
        value = part.get("pass")
        return list(value.values()) if isinstance(value, dict) else [value]

    ran = {name: part for name, part in parts.items() if part["status"] == "ran"}
    verdicts = [v for part in ran.values() for v in passes(part) if v is not None]
    return {"ran": len(ran), "skipped": sum(p["status"] == "skipped" for p in parts.values()),
            "errors": sorted(name for name, p in parts.items() if p["status"] == "error"),
            "targets_met": sum(verdicts), "targets_missed": len(verdicts) - sum(verdicts)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="the JSON to write (default runs/gpu_check/gpu_check-<time>.json)")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and smaller inputs on the GPU parts")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed or a part errors")
    args = parser.parse_args(argv)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else ROOT / "runs" / "gpu_check" / f"gpu_check-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    parts: dict[str, dict] = {}
    run_part("environment", environment, parts)
    absent = gpu_absent_reason()
    import torch

    device = "none" if absent else torch.cuda.get_device_name()
    if absent:  # the CPU parts only check that things run: one thread is quick, and steady on a busy machine
        torch.set_num_threads(1)
    for name, call in (("cpu_train_step", cpu_train_step), ("cpu_alterations", cpu_alterations),
                       ("cpu_scaling_model", cpu_scaling_model)):
        run_part(name, call, parts)
    with tempfile.TemporaryDirectory() as scratch:
        gpu_parts = {"gpu_tests": lambda: gpu_tests(Path(scratch)), "vit_step": lambda: vit_step(args.quick),
                     "views": lambda: views(args.quick), "alterations": lambda: alterations(args.quick),
                     "embed_bf16": lambda: embed_bf16(args.quick)}
        for name, call in gpu_parts.items():
            if absent:
                parts[name] = {"status": "skipped", "why": f"no NVIDIA GPU found: {absent}"}
            else:
                run_part(name, call, parts)
    report = {"device": device, "gpu": absent is None, "no_gpu_reason": absent, "date": stamp, "quick": args.quick,
              "seconds": round(time.perf_counter() - began, 1), "targets": TARGETS, "parts": parts,
              "summary": summarise(parts)}
    from rafmedia.core.files import write_json

    write_json(out, report)
    if absent:
        print(f"no NVIDIA GPU found: {absent}; the CPU parts ran, every GPU part is recorded as skipped")
    print(f"summary: {json.dumps(report['summary'])}")
    print(f"gpu check written to {out}")
    failed = report["summary"]["errors"] or report["summary"]["targets_missed"]
    return 1 if args.strict and failed else 0


if __name__ == "__main__":
    sys.exit(main())
