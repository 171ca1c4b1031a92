# The commands: `make run` (the main job), `make test` (fast) and `make test-slow`.
# Each creates .venv if missing and installs the pinned requirements (requirements-tpu.txt:
# the TPU compiler for `python -m smatch_jax.main.compile`); the install is skipped while
# requirements*.txt and pyproject.toml are unchanged (a stamp file records it).
# Commands run from the repository root, so the package is imported from the source tree
# (`pip install .` also works for use elsewhere).

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run full test test-slow lint format assets clean-venv

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=/path/to/python3.11 ...'"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) requirements.txt requirements-dev.txt requirements-tpu.txt pyproject.toml
	$(PY) -m pip install --quiet -r requirements-dev.txt -r requirements-tpu.txt
	@touch $(STAMP)

# The arithmetic comparison (MLE vs BC vs SequenceMatch, noise 0.1, one seed): ~10 min on 2 cores.
run: $(STAMP)
	$(PY) -m experiments.arithmetic --quick

# The whole arithmetic sweep (4 noise levels, 3 seeds, ablations); resumable.
full: $(STAMP)
	$(PY) -m experiments.arithmetic

# CPU only: with libtpu installed, jax would otherwise probe for a TPU in every process.
# TEST_WORKERS pytest processes (pytest-xdist), each test file in one of them (its fixtures
# are built once), the longest files first (tests/conftest.py).
# `make test`: lint, then the exactness and contract tests (everything not marked `slow`).
# `make test-slow`: the end-to-end tests (programs in subprocesses, training runs with faults,
# pod compiles, several processes, GCS). CI runs both (.ci/run).
TEST_WORKERS ?= 2
PYTEST := JAX_PLATFORMS=cpu $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PYTEST) -m "not slow"

test-slow: $(STAMP)
	$(PYTEST) -m slow

assets: $(STAMP)
	$(PY) -m smatch_jax.main.assets fetch all

lint: $(STAMP)
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff format .

clean-venv:
	rm -rf $(VENV)
