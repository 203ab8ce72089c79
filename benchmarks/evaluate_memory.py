"""Evaluation memory benchmark: peak RSS and subjects/s of `run_evaluation` as the cohort grows, before and after
streaming (the evaluator used to load every volume before embedding; it now streams batches of subjects).

Each run is a fresh Python process (`python benchmarks/evaluate_memory.py --child ...`) that imports rafmedia from
one code tree, runs `run_evaluation(config, progress=False)` once and prints its wall seconds and its peak RSS
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`, the main process; its DataLoader workers' peak,
`RUSAGE_CHILDREN`, is printed beside it). "before" imports the code of another tree (`--before`, e.g. a git
worktree of HEAD: `git worktree add /tmp/eval-before HEAD`) through a folder of links named `rafmedia/<folder>`
put first on PYTHONPATH (ahead of the editable install's finder); "after" is this working tree.

Settings, chosen so that reading and embedding dominate: the default `raf synth` cohort (64^3, three sites) with
N subjects, one freshly exported cnn3d_small (width 16), no random baseline, one seed, one alteration
(gaussian_noise) at one severity (3), 20 bootstrap resamples, 19 permutations, few-shot [1.0], batch size 16,
`evaluate.num_workers` 2 (after only). Cohorts are generated once under `--cohorts` and reused.

Run:  python benchmarks/evaluate_memory.py --before /tmp/eval-before --subjects 200 800 3200
      python benchmarks/evaluate_memory.py --quick      # N = 12 and 24 at 32^3, after only: seconds (the test)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

CODE_FOLDERS = ("core", "shards", "engine", "evaluate", "portal", "launch", "configs")
TREE = Path(__file__).resolve().parents[1]


def make_cohort(path: Path, *, num_subjects: int, shape: int, env: dict[str, str]) -> Path:
    """The default `raf synth` cohort with `num_subjects` subjects at shape^3, made once at `path`."""
    if not (path / "manifest.csv").is_file():
        code = ("import sys; from rafmedia.launch.config import load_config; "
                "from rafmedia.shards.synth import generate_cohort; "
                f"c = load_config(overrides=['cohort.num_subjects={num_subjects}', 'cohort.workers=2', "
                f"'cohort.shape=[{shape},{shape},{shape}]']); "
                f"generate_cohort(c.cohort, store_config=c.store, out=sys.argv[1], progress=False, overwrite=False)")
        subprocess.run([sys.executable, "-c", code, str(path)], check=True, env=env)
    return path


def code_env(tree: Path, folder: Path) -> dict[str, str]:
    """An environment whose `import rafmedia` reads the code of `tree` (links under `folder`)."""
    env = dict(os.environ)
    if tree.resolve() == TREE:
        return env
    package = folder / "rafmedia"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").touch()
    for name in CODE_FOLDERS:
        link = package / name
        if not link.is_symlink():
            link.symlink_to(tree / name)
    env["PYTHONPATH"] = os.pathsep.join([str(folder), env.get("PYTHONPATH", "")])
    return env


def child(store: str, encoder: str) -> dict[str, Any]:
    """One evaluation in this process: wall seconds and peak RSS (MB)."""
    import inspect
    import resource
    import time
    import warnings

    warnings.filterwarnings("ignore")
    from rafmedia.evaluate.config import EvaluateConfig
    from rafmedia.evaluate.runner import run_evaluation

    options = {"cohort": store, "encoders": [encoder], "random_baseline": False, "seeds": [0],
               "alterations": ["gaussian_noise"], "severities": [3], "bootstrap_resamples": 20, "permutations": 19,
               "few_shot": [1.0], "batch_size": 16, "min_group_size": 2}
    if "num_workers" in inspect.signature(EvaluateConfig).parameters:
        options["num_workers"] = 2
    began = time.perf_counter()
    report = run_evaluation(EvaluateConfig(**options), progress=False)
    seconds = time.perf_counter() - began
    return {"seconds": seconds, "subjects": report["cohort"]["num_subjects"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "workers_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def measure(tree: Path, store: Path, encoder: Path, folder: Path) -> dict[str, Any]:
    env = code_env(tree, folder)
    out = subprocess.run([sys.executable, __file__, "--child", str(store), str(encoder)], check=True, env=env,
                         capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["subjects_per_s"] = result["subjects"] / result["seconds"]
    return result


def export(path: Path, env: dict[str, str]) -> Path:
    if not path.is_file():
        code = ("import sys, torch; from rafmedia.engine.encoders import create_encoder; "
                "from rafmedia.engine.export import export_encoder; torch.manual_seed(0); "
                "export_encoder(create_encoder('cnn3d_small', width=16), sys.argv[1], architecture='cnn3d_small', "
                "options={'width': 16}, card={'name': 'cnn3d_small w16'})")
        subprocess.run([sys.executable, "-c", code, str(path)], check=True, env=env)
    return path


def table(results: dict[tuple[str, int], dict[str, Any]]) -> str:
    lines = ["| code | subjects | peak RSS (MB) | workers' peak RSS (MB) | s | subjects / s |", "|---|---|---|---|---|---|"]
    for (code, n), r in results.items():
        lines.append(f"| {code} | {n} | {r['peak_rss_mb']:.0f} | {r['workers_peak_rss_mb']:.0f} | {r['seconds']:.1f} | "
                     f"{r['subjects_per_s']:.2f} |")
    return "\n".join(lines)


def ratios(results: dict[tuple[str, int], dict[str, Any]]) -> list[str]:
    lines = []
    for code in dict.fromkeys(code for code, _ in results):
        sizes = sorted(n for c, n in results if c == code)
        if len(sizes) > 1:
            first, last = results[(code, sizes[0])], results[(code, sizes[-1])]
            lines.append(f"{code}: peak RSS at {sizes[-1]} / at {sizes[0]} subjects = "
                         f"{last['peak_rss_mb'] / first['peak_rss_mb']:.2f}")
    for n in sorted({n for _, n in results}):
        if ("before", n) in results and ("after", n) in results:
            before, after = results[("before", n)], results[("after", n)]
            lines.append(f"N={n}: after / before: peak RSS {after['peak_rss_mb'] / before['peak_rss_mb']:.2f}, "
                         f"subjects/s {after['subjects_per_s'] / before['subjects_per_s']:.2f}")
    return lines


def main(argv: list[str] | None = None) -> dict[tuple[str, int], dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, nargs="+", default=[200, 800, 3200])
    parser.add_argument("--before", type=Path, help="a tree of the old code (git worktree of HEAD); none: after only")
    parser.add_argument("--cohorts", type=Path, default=Path(tempfile.gettempdir()) / "evaluate_memory",
                        help="where the cohorts and the encoder are made once and reused")
    parser.add_argument("--quick", action="store_true", help="N = 12 and 24 at 32^3, after only (seconds)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return {}
    shape, sizes = (32, [12, 24]) if args.quick else (64, args.subjects)
    folder = args.cohorts if not args.quick else Path(tempfile.mkdtemp(prefix="evaluate_memory_"))
    folder.mkdir(parents=True, exist_ok=True)
    trees = {"after": TREE, **({"before": args.before.resolve()} if args.before and not args.quick else {})}
    env = code_env(TREE, folder)
    encoder = export(folder / "encoder.safetensors", env)
    print(f"# evaluate_memory: {platform.node()}, {os.cpu_count()} CPUs, load average {os.getloadavg()}")
    results = {}
    for n in sizes:
        store = make_cohort(folder / f"cohort{n}_{shape}.zarr", num_subjects=n, shape=shape, env=env)
        for code, tree in trees.items():
            results[(code, n)] = measure(tree, store, encoder, folder / f"site-{code}")
            print(f"{code} N={n}: {results[(code, n)]}", flush=True)
    print(table(results))
    print("\n".join(ratios(results)))
    print(f"# load average at the end {os.getloadavg()}")
    return results


if __name__ == "__main__":
    main()
