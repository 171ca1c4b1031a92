"""Test-session setup: the tests run on the CPU.

With the TPU compiler installed (requirements-tpu.txt), jax would otherwise initialise the TPU
plugin in every process (and in the subprocesses the tests start, which inherit this
environment), take libtpu's lock file and log errors before falling back to the CPU. The
compile test (tests/test_compile.py) uses libtpu's compile-only devices, which need no TPU
platform. This runs before any test module imports jax.
"""

import atexit
import os
import shutil
import tempfile

import pytest

os.environ["JAX_PLATFORMS"] = "cpu"
# One compilation cache for the session's workers and the programs they start (not the user's
# ~/.cache): a program compiled by one test is loaded by the next. Removed at the end.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="smatch_jax_xla_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

# The longest test files first: `make test` hands whole files to its workers in collection
# order (pytest-xdist --dist loadfile), so a long file collected late runs alone at the end.
# Seconds per file on 2 cores (2026-12-06), the rest after them in their usual order.
LONGEST_FIRST = (
    "test_bad_inputs.py",  # ~230
    "test_faults.py",  # ~200
    "test_reshard_restore.py",  # ~150
    "test_train.py",
    "test_long_run.py",
    "test_gcs.py",
    "test_compile.py",
    "test_scan_layers.py",
    "test_benchmarks.py",
    "test_multihost.py",
    "test_arithmetic_tokenizers.py",
    "test_shard_load.py",
)


# Files that are end to end as a whole (programs in subprocesses, pod compiles, several
# processes, faults injected into training runs): every test in them is `slow`, like the
# tests marked @pytest.mark.slow one by one elsewhere. `make test` runs the rest (the
# exactness and contract tests), `make test-slow` these.
END_TO_END = (
    "test_bad_inputs.py",
    "test_faults.py",
    "test_reshard_restore.py",
    "test_long_run.py",
    "test_gcs.py",
    "test_multihost.py",
    "test_shard_load.py",
    "test_benchmarks.py",
)


@pytest.hookimpl(tryfirst=True)  # before `-m "not slow"` deselects
def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable
    for item in items:
        if item.path.name in END_TO_END:
            item.add_marker(pytest.mark.slow)
