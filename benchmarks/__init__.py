"""Benchmarks of smatch_jax: side-by-side ratios (`python -m benchmarks.run`); see RESULTS.md."""

from smatch_jax.topologies import pin_cpu_without_tpu

pin_cpu_without_tpu()  # with libtpu installed, run on the CPU unless this host has a TPU
