#!/usr/bin/env bash
# The one-command GPU check of issue 15 (benchmarks/gpu_check.py holds the parts; docs/scaling.md, "GPU check").
#
#   bash benchmarks/gpu_check.sh [--out FILE.json] [--quick] [--strict]   # on the GPU machine, from the repo root
#   bash benchmarks/gpu_check.sh --download-wheels [peers]                 # on a machine with pip access
#
# It finds or builds its Python environment, then runs the check and prints the JSON's path:
#   1. $RAF_PYTHON if set; else the repo's .venv/bin/python if it imports torch; else the first python3 on PATH (or
#      /opt/torch/.venv/bin/python3) that imports torch: a GPU image's own CUDA torch is kept, never reinstalled.
#   2. If that Python cannot import rafmedia, a site folder ${RAF_GPU_SITE:-/tmp/rafmedia-gpu-site} is put on its
#      PYTHONPATH with rafmedia's folders linked in and the wheels in .whl/ (if any) installed there offline; the
#      Python's own packages (its CUDA torch, numpy, scipy...) stay as they are.
#   3. It names every required package still missing, and how to bring it, before running what can run.
# Machines without network access (a lent device machine) get the missing packages as wheels: on a machine with pip,
# `--download-wheels` writes them to .whl/ for CPython 3.12 manylinux x86-64 (the GPU image's Python); carry .whl
# with the working tree. `--download-wheels peers` adds TorchIO and SimpleITK (52 MB) for the alterations part.
# Without a GPU the script says "no NVIDIA GPU found: ..." and exits 0 after the CPU parts.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# What rafmedia needs beyond a CUDA PyTorch image (its torch, numpy, scipy, scikit-learn, timm, einops, safetensors,
# tensorboard, pyyaml, tqdm, pytest), pinned to the versions CI tests.
CORE_WHEELS=(zarr==3.1.6 donfig==0.8.1.post1 google-crc32c==1.9.0 numcodecs==0.16.6 monai==1.6.1 webdataset==1.0.2
             braceexpand==0.1.7 nibabel==5.4.2)
PEER_WHEELS=(torchio==1.2.1 Deprecated==1.3.1 SimpleITK==2.5.7)

if [[ "${1:-}" == "--download-wheels" ]]; then
    wheels=("${CORE_WHEELS[@]}")
    [[ "${2:-}" == "peers" ]] && wheels+=("${PEER_WHEELS[@]}")
    mkdir -p .whl
    for wheel in "${wheels[@]}"; do
        python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            --platform any -d .whl "$wheel" || { echo "could not download $wheel" >&2; exit 1; }
    done
    echo "wheels in .whl/ ($(du -sh .whl | cut -f1)); carry the folder with the tree (it must stay under 64 MiB):"
    ls .whl
    exit 0
fi

has_module() { "$1" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$2') is None)" >/dev/null 2>&1; }

find_python() {
    if [[ -n "${RAF_PYTHON:-}" ]]; then echo "$RAF_PYTHON"; return; fi
    local candidate
    for candidate in "$ROOT/.venv/bin/python" "$(command -v python3 || true)" /opt/torch/.venv/bin/python3; do
        if [[ -n "$candidate" && -x "$candidate" ]] && has_module "$candidate" torch; then echo "$candidate"; return; fi
    done
}

PYTHON="$(find_python)"
if [[ -z "$PYTHON" ]]; then
    echo "no Python with torch found: set RAF_PYTHON, or make the repo's environment (make venv)" >&2
    exit 1
fi

if ! has_module "$PYTHON" rafmedia.engine; then
    # rafmedia's packages are the repository's folders (setup.py maps rafmedia.<folder> to <folder>): links in a
    # site folder on PYTHONPATH make them importable without pip; the wheels in .whl/ install there too, offline.
    SITE="${RAF_GPU_SITE:-/tmp/rafmedia-gpu-site}"
    echo "rafmedia is not installed for $PYTHON: linking it into $SITE (offline)"
    mkdir -p "$SITE/rafmedia"
    for folder in core shards engine evaluate portal launch configs; do ln -sfn "$ROOT/$folder" "$SITE/rafmedia/$folder"; done
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-compile --upgrade \
            --target "$SITE" .whl/*.whl || echo "warning: some wheels in .whl/ did not install" >&2
    fi
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

# one probe: the interpreter, its torch, and the required packages it lacks
probe="$("$PYTHON" - <<'EOF'
import importlib.util, sys
import torch
needed = ["zarr", "numcodecs", "google_crc32c", "monai", "einops", "timm", "safetensors", "webdataset", "nibabel",
          "yaml", "sklearn", "scipy", "tqdm", "pytest", "rafmedia"]
print(sys.version.split()[0], "torch", torch.__version__)
print(" ".join(name for name in needed if importlib.util.find_spec(name) is None))
EOF
)"
echo "python: $PYTHON ($(head -n 1 <<<"$probe"))"
missing="$(tail -n +2 <<<"$probe")"
if [[ -n "$missing" ]]; then
    echo "missing Python packages: $missing"
    echo "  with network: pip install -c constraints.txt -e \".[bench]\" (keeps an installed torch)"
    echo "  offline (a device machine): run 'bash benchmarks/gpu_check.sh --download-wheels' where pip works, carry .whl/"
    echo "  the parts that need them are recorded as errors with the import that failed"
fi

export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
exec "$PYTHON" benchmarks/gpu_check.py "$@"
