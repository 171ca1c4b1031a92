"""GGUF (llama.cpp) llama checkpoints, e.g. the SmolLM2-135M asset.

GGUF (llama.cpp) q/k rows. llama.cpp's converter permutes the rows of the q and k projections of
each head from the HF rotate_half layout (dims i and i + D/2 are a RoPE pair) into the
interleaved layout (dims 2i and 2i + 1 are a pair); `unpermute_rope_rows` undoes that, since our
model uses rotate_half. GGUF tensors list their dims reversed (``tensor.shape`` = [in, out]); the
dequantised arrays are [out, in] like torch Linear weights.
"""

from __future__ import annotations

import os

import numpy as np

from smatch_jax.models.config import ModelConfig
from smatch_jax.models.convert.common import (
    Params,
    apply_specs,
    llama_block_specs,
    model_from_params,
    vocab_specs,
    with_dtypes,
)
from smatch_jax.models.transformer import Transformer


def permute_rope_rows(w_OxI: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate_half -> GGUF interleaved row order (llama.cpp convert_hf_to_gguf `permute`).

    Per head of D rows, GGUF row 2j + c is HF row c * D/2 + j (c in {0, 1}, j < D/2).
    """
    w = np.asarray(w_OxI)
    head_dim = _head_rows(w, n_heads)
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rope_rows(w_OxI: np.ndarray, n_heads: int) -> np.ndarray:
    """GGUF interleaved -> HF rotate_half row order: the inverse of `permute_rope_rows`."""
    w = np.asarray(w_OxI)
    head_dim = _head_rows(w, n_heads)
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _head_rows(w: np.ndarray, n_heads: int) -> int:
    if w.shape[0] % n_heads or (w.shape[0] // n_heads) % 2:
        raise ValueError(f"{w.shape[0]} rows do not split into {n_heads} heads of even size")
    return w.shape[0] // n_heads


def load_gguf_llama(
    path: str | os.PathLike, *, bkspc_init: str = "mean"
) -> tuple[ModelConfig, Params]:
    """Reads a llama-architecture GGUF file: (config, float32 params with the `<bkspc>` row).

    Quantised tensors are dequantised to float32; q/k rows are un-permuted to HF order.
    """
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = reader.fields

    def meta(key: str, default: object = ...) -> object:
        if key in fields:
            return fields[key].contents()
        if default is ...:
            raise ValueError(f"GGUF {path} lacks metadata field {key!r}")
        return default

    arch = meta("general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF {path}: architecture {arch!r} is not supported (only 'llama')")
    scaling = meta("llama.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise ValueError(f"GGUF {path}: RoPE scaling {scaling!r} is not supported")
    tensors: Params = {}
    for t in reader.tensors:
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        if w.shape != tuple(int(n) for n in reversed(t.shape)):  # GGUF lists dims reversed
            raise ValueError(f"GGUF tensor {t.name}: dequantised {w.shape}, header {t.shape}")
        tensors[t.name] = w
    if "token_embd.weight" not in tensors:
        raise ValueError(f"GGUF {path} is missing tensor 'token_embd.weight'")
    V = tensors["token_embd.weight"].shape[0]
    n_vocab = len(meta("tokenizer.ggml.tokens", [])) or int(meta("llama.vocab_size", V))
    if n_vocab != V:
        raise ValueError(f"GGUF {path}: vocabulary has {n_vocab} tokens, token_embd {V} rows")
    d = int(meta("llama.embedding_length"))
    n_heads = int(meta("llama.attention.head_count"))
    n_kv = int(meta("llama.attention.head_count_kv", n_heads))
    rope_dim = int(meta("llama.rope.dimension_count", d // n_heads))
    if rope_dim != d // n_heads:
        raise ValueError(f"GGUF {path}: partial RoPE ({rope_dim} of {d // n_heads}) unsupported")
    tied = "output.weight" not in tensors
    config = ModelConfig(
        family="llama",
        vocab_size=V,
        d_model=d,
        n_layers=int(meta("llama.block_count")),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        d_ff=int(meta("llama.feed_forward_length")),
        max_positions=int(meta("llama.context_length", 2048)),
        rope_theta=float(meta("llama.rope.freq_base", 10_000.0)),
        norm_eps=float(f"{meta('llama.attention.layer_norm_rms_epsilon'):.7g}"),  # stored as f32
        tie_embeddings=tied,
        use_bias=False,
    )
    specs = llama_block_specs(config, gguf_qk_rows=unpermute_rope_rows)
    specs += vocab_specs("token_embd.weight", None if tied else "output.weight", bkspc_init)
    specs.append(("final_norm.scale", ("output_norm.weight",), np.asarray))
    return config, apply_specs(tensors, specs, lambda n: False, f"GGUF {path}")


def smollm2(
    path: str | os.PathLike | None = None,
    *,
    dtype: str = "float32",
    param_dtype: str | None = None,
    bkspc_init: str = "mean",
    scan_layers: bool = False,
) -> Transformer:
    """SmolLM2-135M-Instruct from the `smollm2` asset GGUF (or `path`), with a `<bkspc>` row.

    `dtype` is the compute dtype; `param_dtype` defaults to `dtype`; `scan_layers`: the
    blocks' layout (`ModelConfig.scan_layers`).
    """
    from smatch_jax import assets

    config, params = load_gguf_llama(path or assets.path("smollm2"), bkspc_init=bkspc_init)
    return model_from_params(with_dtypes(config, dtype, param_dtype, scan_layers), params)
