"""Loads a script of benchmarks/ as a module (they are scripts, not a package), for the tests that run them: the
loader is the one benchmarks/gpu_check.py uses for the same purpose, imported from the scripts' folder."""
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.append(str(BENCHMARKS))  # appended: a script never shadows an installed package
from gpu_check import load_benchmark  # a script of benchmarks/, importable once its folder is on the path

__all__ = ["BENCHMARKS", "load_benchmark"]
