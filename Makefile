SHELL := bash
.SHELLFLAGS := -eo pipefail -c

# Every install path goes through $(PIP_INSTALL), which applies constraints.txt (the torch pins) and DS_BUILD_OPS=0
# (DeepSpeed installs without compiling its ops; on CPU none are needed).
PYTHON ?= python3
VENV ?= .venv
PIP_INSTALL = DS_BUILD_OPS=0 $(VENV)/bin/pip install --quiet --disable-pip-version-check -c constraints.txt
STAMP = $(VENV)/.installed

.PHONY: venv quickstart test benchmarks clean

venv: $(STAMP)

$(STAMP): setup.py constraints.txt
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	@echo "Installing rafmedia and its dependencies into $(VENV) (first time: about a minute)..."
	@$(PIP_INSTALL) --upgrade pip setuptools wheel 2>&1 | sed '/is ignored: it is neither/d'
	@$(PIP_INSTALL) -e ".[dev]" 2>&1 | sed '/is ignored: it is neither/d'
	@$(VENV)/bin/python -c "import rafmedia.launch.cli" && touch $(STAMP)

quickstart: venv
	$(VENV)/bin/raf quickstart --out runs/quickstart

# Two pytest workers (pytest-xdist) share the 2 cores of CI; tests/conftest.py keeps the tests that share one
# server (the portal's, the one-node SLURM) in one worker.
test: venv
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadgroup tests

benchmarks: venv
	@$(PIP_INSTALL) -e ".[bench]" 2>&1 | sed '/is ignored: it is neither/d'
	$(VENV)/bin/python benchmarks/foundation.py
	$(VENV)/bin/python benchmarks/train_step.py
	$(VENV)/bin/python benchmarks/evaluate.py --parts 1

clean:
	rm -rf runs .pytest_cache
