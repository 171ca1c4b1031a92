"""Test-session setup: the tests run on the CPU.

With the TPU compiler installed (requirements-tpu.txt), jax would otherwise initialise the TPU
plugin in every process (and in the subprocesses the tests start, which inherit this
environment), take libtpu's lock file and log errors before falling back to the CPU. The
compile test (tests/test_compile.py) uses libtpu's compile-only devices, which need no TPU
platform. This runs before any test module imports jax.
"""

import os

os.environ["JAX_PLATFORMS"] = "cpu"
