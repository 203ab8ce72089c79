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

# Two pytest processes share the 2 cores of CI, split at a seam: the tests that start servers and launchers
# (tests/portal: the portal, PostgreSQL, bubblewrap; tests/launch: torchrun, mpirun, DeepSpeed, the one-node SLURM,
# which the portal's cluster tests use too) and the rest. Each writes its log to .test-logs/; both are shown.
TEST_SERVERS = tests/portal tests/launch

test: venv
	@rm -rf .test-logs && mkdir -p .test-logs
	@echo "pytest: $(TEST_SERVERS) | the rest, in two processes (logs: .test-logs/servers.log, .test-logs/rest.log)"
	@$(VENV)/bin/python -m pytest -q -p no:cacheprovider --basetemp=/tmp/rafmedia-tests-servers $(TEST_SERVERS) \
		> .test-logs/servers.log 2>&1 & servers=$$!; \
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider --basetemp=/tmp/rafmedia-tests-rest tests \
		$(addprefix --ignore=,$(TEST_SERVERS)) > .test-logs/rest.log 2>&1 && rest=0 || rest=$$?; \
	wait $$servers && servers=0 || servers=$$?; \
	echo "=== $(TEST_SERVERS)"; cat .test-logs/servers.log; echo "=== the rest"; cat .test-logs/rest.log; \
	echo "exit codes: servers $$servers, rest $$rest"; test $$servers -eq 0 && test $$rest -eq 0

benchmarks: venv
	@$(PIP_INSTALL) -e ".[bench]" 2>&1 | sed '/is ignored: it is neither/d'
	$(VENV)/bin/python benchmarks/foundation.py
	$(VENV)/bin/python benchmarks/train_step.py
	$(VENV)/bin/python benchmarks/evaluate.py --parts 1

clean:
	rm -rf runs .pytest_cache
