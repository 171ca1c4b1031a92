# The two commands: `make run` (the main job) and `make test`.
# Each creates .venv if missing and installs the pinned requirements (requirements-tpu.txt:
# the TPU compiler for `python -m smatch_jax.main.compile`); the install is skipped while
# requirements*.txt and pyproject.toml are unchanged (a stamp file records it).
# Commands run from the repository root, so the package is imported from the source tree
# (`pip install .` also works for use elsewhere).

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run full test lint format assets clean-venv

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
# are built once), the longest files first (tests/conftest.py): 16 min on 2 cores (a clean
# clone, 2026-12-06; when first measured, 13 min against 19 in one process: compilation is
# mostly single-threaded).
TEST_WORKERS ?= 2
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

assets: $(STAMP)
	$(PY) -m smatch_jax.main.assets fetch all

lint: $(STAMP)
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff format .

clean-venv:
	rm -rf $(VENV)
