# The commands: `make run` (the main job), `make test` (fast) and `make test-slow`.
# Each creates .venv if missing and installs the pinned requirements (requirements-tpu.txt:
# the TPU compiler for `python -m smatch_jax.main.compile`); the install is skipped while
# requirements*.txt and pyproject.toml are unchanged (a stamp file records it).
# Commands run from the repository root, so the package is imported from the source tree
# (`pip install .` also works for use elsewhere).

# Python 3.12 or newer (jax 0.11 and later require it). `make PYTHON=/path/to/python ...`
# chooses one; otherwise the first that runs and is 3.12+ (with the GIL) of: python3.13,
# python3.12, pyenv's installed 3.13.x and 3.12.x (newest first; pyenv's shims answer only
# for the selected version, so its versions directory is read), python3.
PY_OK := import sys, sysconfig; ok = sys.version_info >= (3, 12) and not sysconfig.get_config_var("Py_GIL_DISABLED"); print(sys.executable if ok else ""); sys.exit(not ok)
FIND_PYTHON := for p in python3.13 python3.12 $$(r=$$(pyenv root 2>/dev/null || echo "$${PYENV_ROOT:-$$HOME/.pyenv}"); ls -d "$$r"/versions/3.1[23]*/bin/python 2>/dev/null | sort -rV) python3; do "$$p" -c '$(PY_OK)' 2>/dev/null && break; done
# Looked for once, and only when a venv is to be made.
FOUND_PYTHON = $(eval FOUND_PYTHON := $(shell $(FIND_PYTHON)))$(FOUND_PYTHON)
PYTHON ?= $(FOUND_PYTHON)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run full test test-slow lint format assets clean-venv

# A .venv whose Python is older than 3.12 (one made for jax 0.10 with 3.11) or no longer runs
# is made again, not reused.
ifeq ($(shell $(PY) -c '$(PY_OK)' 2>/dev/null),)
.PHONY: $(PY)
endif

$(PY):
	@test -n "$(PYTHON)" || { echo "error: no Python 3.12 or newer found (tried python3.13, python3.12, pyenv's 3.13.x/3.12.x, python3); install Python 3.12+ (e.g. pyenv install 3.12) or run 'make PYTHON=/path/to/python3.12 ...'"; exit 1; }
	@$(PYTHON) -c '$(PY_OK)' >/dev/null 2>&1 || { echo "error: PYTHON=$(PYTHON) is not a working Python 3.12 or newer; install Python 3.12+ or run 'make PYTHON=/path/to/python3.12 ...'"; exit 1; }
	@if [ -e $(VENV) ]; then echo "$(VENV): its Python is older than 3.12 or does not run; making it again"; rm -rf $(VENV); fi
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
