"""Attention of the decoder (transformer.py): RoPE, grouped-query attention under an explicit
mask, and the functional KV cache it writes when decoding.

Attention never builds a causal mask: the caller passes ``attn_mask[b, q, k]`` (True when query
q may attend key k), because the SequenceMatch backspace layout needs non-causal-looking masks.
Scores and softmax are in float32 with scale 1/sqrt(head_dim). A fully-masked query row gets
all-zero attention weights, so its attention output is zero (no NaN, in values or gradients).

RoPE uses the Hugging Face "rotate_half" convention (see transformer.py).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from smatch_jax import activations
from smatch_jax.models.config import ModelConfig

INIT_STD = 0.02  # GPT-2 initialiser: normal(0, 0.02); residual outputs get 0.02 / sqrt(2 L)


class KVCache(NamedTuple):
    """Per-layer keys and values of all cache slots, stacked over layers."""

    k: jax.Array  # [L, B, S, Hkv, D] keys (RoPE already applied for llama)
    v: jax.Array  # [L, B, S, Hkv, D] values


def init_cache(
    config: ModelConfig, batch_size: int, max_len: int, dtype: jnp.dtype | str | None = None
) -> KVCache:
    """An all-zero cache of `max_len` slots per row; `dtype` defaults to the compute dtype."""
    dtype = config.compute_dtype if dtype is None else jnp.dtype(dtype)
    shape = (config.n_layers, batch_size, max_len, config.n_kv_heads, config.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


def rope_rotate(x_BxTxHxD: jax.Array, positions_BxT: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, HF rotate_half convention (dims i and i + D/2 form a pair)."""
    half = x_BxTxHxD.shape[-1] // 2
    inv_freq_F = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
    angle_BxTxF = positions_BxT.astype(jnp.float32)[..., None] * inv_freq_F
    cos_BxTx1xF = jnp.cos(angle_BxTxF)[:, :, None, :]
    sin_BxTx1xF = jnp.sin(angle_BxTxF)[:, :, None, :]
    x1 = x_BxTxHxD[..., :half].astype(jnp.float32)
    x2 = x_BxTxHxD[..., half:].astype(jnp.float32)
    out = jnp.concatenate(
        [x1 * cos_BxTx1xF - x2 * sin_BxTx1xF, x2 * cos_BxTx1xF + x1 * sin_BxTx1xF], axis=-1
    )
    return out.astype(x_BxTxHxD.dtype)


def masked_attention(
    q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, mask_BxTxS: jax.Array
) -> jax.Array:
    """Grouped-query attention with an explicit boolean mask; returns [B, T, H, D].

    Query head h uses kv head h // (H // K) (HF `repeat_kv` order). Masked scores are set to
    float32 min before the softmax and their weights are then zeroed, so a fully-masked row
    yields zero weights and a zero output.
    """
    B, T, H, D = q_BxTxHxD.shape
    K = k_BxSxKxD.shape[2]
    q_BxTxKxGxD = q_BxTxHxD.reshape(B, T, K, H // K, D)
    scores_BxKxGxTxS = jnp.einsum(
        "btkgd,bskd->bkgts", q_BxTxKxGxD, k_BxSxKxD, preferred_element_type=jnp.float32
    ) / math.sqrt(D)
    mask_Bx1x1xTxS = mask_BxTxS[:, None, None, :, :]
    scores_BxKxGxTxS = jnp.where(mask_Bx1x1xTxS, scores_BxKxGxTxS, jnp.finfo(jnp.float32).min)
    probs_BxKxGxTxS = jax.nn.softmax(scores_BxKxGxTxS, axis=-1)
    probs_BxKxGxTxS = jnp.where(mask_Bx1x1xTxS, probs_BxKxGxTxS, 0.0).astype(v_BxSxKxD.dtype)
    out_BxTxKxGxD = jnp.einsum("bkgts,bskd->btkgd", probs_BxKxGxTxS, v_BxSxKxD)
    return out_BxTxKxGxD.reshape(B, T, H, D)


def _write_rows(
    cache_LxBxSxKxD: jax.Array,
    layer: int | jax.Array,
    new_BxNxKxD: jax.Array,
    index_B: jax.Array,
    by_select: bool = False,
) -> jax.Array:
    """Writes row b of `new` into slots [index[b], index[b] + N) of row b of cache layer `layer`.

    One scatter of the new slots into the stacked cache of all layers, so that inside the
    sampler's while_loop XLA updates the buffer in place (no per-step copy or transpose of the
    cache). Starts are clamped to [0, S - N] like `lax.dynamic_update_slice`. `layer` may be
    traced (the scanned layers' loop index). `by_select` (one new token, decoding on a
    mesh): a select over the layer's slots instead of a scatter, which XLA's partitioner
    split over the idle `fsdp` chips and then gathered the whole cache back, every token.
    """
    B, S = cache_LxBxSxKxD.shape[1:3]
    N = new_BxNxKxD.shape[1]
    if by_select and N == 1:
        hit_Bx1xS = jnp.arange(S) == jnp.clip(index_B, 0, S - 1)[:, None, None]
        new = new_BxNxKxD.astype(cache_LxBxSxKxD.dtype)  # [B, 1, K, D]: broadcast over slots
        layer_BxSxKxD = jnp.where(hit_Bx1xS[:, 0, :, None, None], new, cache_LxBxSxKxD[layer])
        return cache_LxBxSxKxD.at[layer].set(layer_BxSxKxD)
    slots_BxN = jnp.clip(index_B, 0, S - N)[:, None] + jnp.arange(N)
    return cache_LxBxSxKxD.at[layer, jnp.arange(B)[:, None], slots_BxN].set(
        new_BxNxKxD.astype(cache_LxBxSxKxD.dtype), indices_are_sorted=True, unique_indices=True
    )


def linear(config: ModelConfig, d_in: int, d_out: int, rngs: nnx.Rngs, std: float) -> nnx.Linear:
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=config.use_bias,
        dtype=config.compute_dtype,
        param_dtype=config.params_dtype,
        kernel_init=nnx.initializers.normal(std),
        rngs=rngs,
    )


class Attention(nnx.Module):
    """Multi-head / grouped-query self-attention with an explicit mask and optional cache."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, hd = config.d_model, config.head_dim
        out_std = INIT_STD / math.sqrt(2 * config.n_layers)
        self.q_proj = linear(config, d, config.n_heads * hd, rngs, INIT_STD)
        self.k_proj = linear(config, d, config.n_kv_heads * hd, rngs, INIT_STD)
        self.v_proj = linear(config, d, config.n_kv_heads * hd, rngs, INIT_STD)
        self.o_proj = linear(config, config.n_heads * hd, d, rngs, out_std)

    def __call__(
        self,
        x_BxTxD: jax.Array,
        positions_BxT: jax.Array,
        mask_BxTxS: jax.Array,
        cache_kv: tuple[jax.Array, jax.Array] | None = None,
        cache_index_B: jax.Array | None = None,
        layer: int | jax.Array = 0,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """Without a cache S = T (self-attention over x); with one, writes K/V then attends.

        `cache_kv` is the (k, v) pair of the whole stacked cache [L, B, S, K, D]; this block's
        K/V go to `layer`, and the updated pair is returned. Decoding on a mesh (the
        sampler's `sharding.DecodeLayout.axis_rules()` in force), q, k and v [B, T, heads, D]
        are put where the cache keeps its heads, so that attention is local to each chip's
        heads.
        """
        cfg = self.config
        B, T, _ = x_BxTxD.shape
        # Named for the remat policies that keep them (transformer.REMAT: 'save_qkv').
        q_BxTxHxD = checkpoint_name(self.q_proj(x_BxTxD), "q_proj")
        k_BxTxKxD = checkpoint_name(self.k_proj(x_BxTxD), "k_proj")
        v_BxTxKxD = checkpoint_name(self.v_proj(x_BxTxD), "v_proj")
        q_BxTxHxD = q_BxTxHxD.reshape(B, T, cfg.n_heads, cfg.head_dim)
        k_BxTxKxD = k_BxTxKxD.reshape(B, T, cfg.n_kv_heads, cfg.head_dim)
        v_BxTxKxD = v_BxTxKxD.reshape(B, T, cfg.n_kv_heads, cfg.head_dim)
        if cfg.family == "llama":
            q_BxTxHxD = rope_rotate(q_BxTxHxD, positions_BxT, cfg.rope_theta)
            k_BxTxKxD = rope_rotate(k_BxTxKxD, positions_BxT, cfg.rope_theta)
        new_cache_kv = None
        if cache_kv is not None:
            names = ("batch", "length", "heads", "head_dim")
            q_BxTxHxD, k_BxTxKxD, v_BxTxKxD = (
                activations.constrain(x, names) for x in (q_BxTxHxD, k_BxTxKxD, v_BxTxKxD)
            )
            by_select = activations.constraining()
            new_cache_kv = tuple(
                _write_rows(c, layer, new, cache_index_B, by_select)
                for c, new in zip(cache_kv, (k_BxTxKxD, v_BxTxKxD), strict=True)
            )
            k_BxTxKxD, v_BxTxKxD = new_cache_kv[0][layer], new_cache_kv[1][layer]  # [B, S, K, D]
        out_BxTxHxD = masked_attention(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, mask_BxTxS)
        out_BxTxD = self.o_proj(out_BxTxHxD.reshape(B, T, cfg.n_heads * cfg.head_dim))
        return out_BxTxD, new_cache_kv
