"""The paper's experiments as code (one module per table); see the README's Results.

On a host without TPU chips they run on the CPU (`JAX_PLATFORMS=cpu` unless set): with the
TPU compiler installed (requirements-tpu.txt) jax would otherwise probe for a TPU in every
process and log errors. This runs before any experiment imports jax.
"""

from smatch_jax.topologies import pin_cpu_without_tpu

pin_cpu_without_tpu()
