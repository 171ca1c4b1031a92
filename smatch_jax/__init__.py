"""smatch_jax: SequenceMatch (Cundy & Ermon, ICLR 2024) in JAX and Flax NNX."""

__version__ = "0.1.0"
