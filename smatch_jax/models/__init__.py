"""Decoder-only transformer (GPT-2 and Llama families) in Flax NNX, with a functional KV cache."""

from smatch_jax.models.config import (
    FAMILIES,
    PRESETS,
    ModelConfig,
    gpt2_124m,
    smollm2_135m,
    tiny,
)
from smatch_jax.models.transformer import KVCache, Transformer, init_cache

__all__ = [
    "FAMILIES",
    "PRESETS",
    "KVCache",
    "ModelConfig",
    "Transformer",
    "gpt2_124m",
    "init_cache",
    "smollm2_135m",
    "tiny",
]
