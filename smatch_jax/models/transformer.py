"""Decoder-only transformer in Flax NNX for the 'gpt2' and 'llama' families (one code path).

* gpt2: token + learned absolute position embeddings (`pos_embed`, indexed by the explicit
  `positions`), pre-LayerNorm blocks, GELU (tanh approximation) MLP, biases, final LayerNorm,
  output tied to the token table.
* llama: RoPE applied to q and k from the explicit `positions`, RMSNorm, SwiGLU MLP,
  grouped-query attention, no biases, optionally untied output (`lm_head`).

RoPE uses the Hugging Face "rotate_half" convention: the head dimension is split into two
halves, and dimension i (i < D/2) is rotated together with dimension i + D/2 at frequency
``theta ** (-2i / D)``. (Meta / GGUF checkpoints interleave pairs (2i, 2i+1) instead; their
q/k projection weights must be permuted on import.)

Attention never builds a causal mask: the caller passes ``attn_mask[b, q, k]`` (True when query
q may attend key k), because the SequenceMatch backspace layout needs non-causal-looking masks.
Scores and softmax are in float32 with scale 1/sqrt(head_dim). A fully-masked query row gets
all-zero attention weights, so its attention output is zero (no NaN, in values or gradients).

The output layer has V + 1 rows (the last is `<bkspc>`); logits are returned in float32.

Decoding is functional: `init_cache` builds a `KVCache` and `Transformer.decode` takes the
cache and returns an updated one without mutating the module. Param tree (nnx.state names)::

    tok_embed.embedding [V+1, d]            pos_embed.embedding [P, d]   (gpt2)
    blocks.{i}.attn_norm.{scale, bias}      blocks.{i}.mlp_norm.{scale, bias}
    blocks.{i}.attn.{q,k,v,o}_proj.{kernel, bias}
    blocks.{i}.mlp.{gate_proj (llama), up_proj, down_proj}.{kernel, bias}
    final_norm.{scale, bias}                lm_head.kernel [d, V+1]      (untied only)

Kernels are [in, out] (nnx.Linear); biases and LayerNorm biases exist only when `use_bias`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from smatch_jax.models.config import ModelConfig

# Rematerialisation policies of a block's forward pass (Transformer.forward_embeddings): what
# the backward pass keeps ('none': everything, without a checkpoint).
REMAT = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

_INIT_STD = 0.02  # GPT-2 initialiser: normal(0, 0.02); residual outputs get 0.02 / sqrt(2 L)


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
    layer: int,
    new_BxNxKxD: jax.Array,
    index_B: jax.Array,
    by_select: bool = False,
) -> jax.Array:
    """Writes row b of `new` into slots [index[b], index[b] + N) of row b of cache layer `layer`.

    One scatter of the new slots into the stacked cache of all layers, so that inside the
    sampler's while_loop XLA updates the buffer in place (no per-step copy or transpose of the
    cache). Starts are clamped to [0, S - N] like `lax.dynamic_update_slice`.
    `by_select` (one new token, decoding on a mesh): a select over the layer's slots instead
    of a scatter, which XLA's partitioner split over the idle `fsdp` chips and then gathered
    the whole cache back, every token.
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


def _linear(config: ModelConfig, d_in: int, d_out: int, rngs: nnx.Rngs, std: float) -> nnx.Linear:
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=config.use_bias,
        dtype=config.compute_dtype,
        param_dtype=config.params_dtype,
        kernel_init=nnx.initializers.normal(std),
        rngs=rngs,
    )


def _norm(config: ModelConfig, rngs: nnx.Rngs) -> nnx.LayerNorm | nnx.RMSNorm:
    kwargs = dict(
        epsilon=config.norm_eps,
        dtype=config.compute_dtype,
        param_dtype=config.params_dtype,
        rngs=rngs,
    )
    if config.family == "gpt2":
        return nnx.LayerNorm(config.d_model, use_bias=config.use_bias, **kwargs)
    return nnx.RMSNorm(config.d_model, **kwargs)


class Attention(nnx.Module):
    """Multi-head / grouped-query self-attention with an explicit mask and optional cache."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, hd = config.d_model, config.head_dim
        out_std = _INIT_STD / math.sqrt(2 * config.n_layers)
        self.q_proj = _linear(config, d, config.n_heads * hd, rngs, _INIT_STD)
        self.k_proj = _linear(config, d, config.n_kv_heads * hd, rngs, _INIT_STD)
        self.v_proj = _linear(config, d, config.n_kv_heads * hd, rngs, _INIT_STD)
        self.o_proj = _linear(config, config.n_heads * hd, d, rngs, out_std)

    def __call__(
        self,
        x_BxTxD: jax.Array,
        positions_BxT: jax.Array,
        mask_BxTxS: jax.Array,
        cache_kv: tuple[jax.Array, jax.Array] | None = None,
        cache_index_B: jax.Array | None = None,
        layer: int = 0,
        place_heads: Callable[[jax.Array], jax.Array] | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """Without a cache S = T (self-attention over x); with one, writes K/V then attends.

        `cache_kv` is the (k, v) pair of the whole stacked cache [L, B, S, K, D]; this block's
        K/V go to `layer`, and the updated pair is returned. `place_heads` (decoding on a mesh)
        puts q, k and v [B, T, heads, D] where the cache keeps its heads, so that attention
        is local to each chip's heads (sharding.DecodeLayout).
        """
        cfg = self.config
        B, T, _ = x_BxTxD.shape
        q_BxTxHxD = self.q_proj(x_BxTxD).reshape(B, T, cfg.n_heads, cfg.head_dim)
        k_BxTxKxD = self.k_proj(x_BxTxD).reshape(B, T, cfg.n_kv_heads, cfg.head_dim)
        v_BxTxKxD = self.v_proj(x_BxTxD).reshape(B, T, cfg.n_kv_heads, cfg.head_dim)
        if cfg.family == "llama":
            q_BxTxHxD = rope_rotate(q_BxTxHxD, positions_BxT, cfg.rope_theta)
            k_BxTxKxD = rope_rotate(k_BxTxKxD, positions_BxT, cfg.rope_theta)
        if place_heads is not None:
            q_BxTxHxD, k_BxTxKxD, v_BxTxKxD = map(place_heads, (q_BxTxHxD, k_BxTxKxD, v_BxTxKxD))
        new_cache_kv = None
        if cache_kv is not None:
            new_cache_kv = tuple(
                _write_rows(c, layer, new, cache_index_B, place_heads is not None)
                for c, new in zip(cache_kv, (k_BxTxKxD, v_BxTxKxD), strict=True)
            )
            k_BxTxKxD, v_BxTxKxD = new_cache_kv[0][layer], new_cache_kv[1][layer]  # [B, S, K, D]
        out_BxTxHxD = masked_attention(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, mask_BxTxS)
        out_BxTxD = self.o_proj(out_BxTxHxD.reshape(B, T, cfg.n_heads * cfg.head_dim))
        return out_BxTxD, new_cache_kv


class MLP(nnx.Module):
    """gpt2: down(gelu_tanh(up(x))); llama (SwiGLU): down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.gated = config.family == "llama"
        out_std = _INIT_STD / math.sqrt(2 * config.n_layers)
        if self.gated:
            self.gate_proj = _linear(config, config.d_model, config.d_ff, rngs, _INIT_STD)
        self.up_proj = _linear(config, config.d_model, config.d_ff, rngs, _INIT_STD)
        self.down_proj = _linear(config, config.d_ff, config.d_model, rngs, out_std)

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        if self.gated:
            h_BxTxF = jax.nn.silu(self.gate_proj(x_BxTxD)) * self.up_proj(x_BxTxD)
        else:
            h_BxTxF = jax.nn.gelu(self.up_proj(x_BxTxD), approximate=True)
        return self.down_proj(h_BxTxF)


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = _norm(config, rngs)
        self.attn = Attention(config, rngs=rngs)
        self.mlp_norm = _norm(config, rngs)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(
        self,
        x_BxTxD: jax.Array,
        positions_BxT: jax.Array,
        mask_BxTxS: jax.Array,
        cache_kv: tuple[jax.Array, jax.Array] | None = None,
        cache_index_B: jax.Array | None = None,
        layer: int = 0,
        place_heads: Callable[[jax.Array], jax.Array] | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        attn_BxTxD, new_cache_kv = self.attn(
            self.attn_norm(x_BxTxD),
            positions_BxT,
            mask_BxTxS,
            cache_kv,
            cache_index_B,
            layer,
            place_heads,
        )
        x_BxTxD = x_BxTxD + attn_BxTxD
        x_BxTxD = x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD))
        return x_BxTxD, new_cache_kv


class Transformer(nnx.Module):
    """Decoder-only transformer returning float32 logits over V + 1 actions."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        embed_init = nnx.initializers.normal(_INIT_STD)
        embed_kwargs = dict(
            dtype=config.compute_dtype,
            param_dtype=config.params_dtype,
            embedding_init=embed_init,
            rngs=rngs,
        )
        self.tok_embed = nnx.Embed(config.n_actions, config.d_model, **embed_kwargs)
        self.pos_embed = (
            nnx.Embed(config.max_positions, config.d_model, **embed_kwargs)
            if config.family == "gpt2"
            else None
        )
        self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.n_layers)])
        self.final_norm = _norm(config, rngs)
        self.lm_head = (
            None
            if config.tie_embeddings
            else nnx.Linear(
                config.d_model,
                config.n_actions,
                use_bias=False,
                dtype=config.compute_dtype,
                param_dtype=config.params_dtype,
                kernel_init=nnx.initializers.normal(_INIT_STD),
                rngs=rngs,
            )
        )

    def embed(self, input_ids_BxT: jax.Array, positions_BxT: jax.Array) -> jax.Array:
        """Input embeddings [B, T, d]: token (+ learned position for gpt2)."""
        x_BxTxD = self.tok_embed(input_ids_BxT)
        if self.pos_embed is not None:
            x_BxTxD = x_BxTxD + self.pos_embed(positions_BxT)
        return x_BxTxD

    def forward_embeddings(
        self,
        x_BxTxD: jax.Array,
        positions_BxT: jax.Array,
        attn_mask_BxTxT: jax.Array,
        remat: str = "none",
        place: Callable[[jax.Array], jax.Array] | None = None,
    ) -> jax.Array:
        """Logits [B, T, V+1] float32 from input embeddings (as returned by `embed`).

        `place` (on a mesh): a sharding constraint for the residual stream [B, T, d], applied
        before every block and the output layer (the training step keeps rows split over the
        batch's mesh axes there; left alone, XLA followed the embedding table's feature split
        and gathered the whole batch's activations on every chip).

        `remat` (`REMAT`): what a gradient keeps of each block's forward pass. 'none' keeps
        every activation; 'full' only the block's input, recomputing the rest in the backward
        pass; 'save_dots' also the outputs of its matmuls that have no batch dimension (the
        projections, not the attention's scores), so only cheap elementwise work is redone."""
        if remat not in REMAT:
            raise ValueError(f"remat={remat!r}; use one of {sorted(REMAT)}")
        place = place or (lambda x: x)
        for block in self.blocks:
            x_BxTxD = place(x_BxTxD)
            if remat == "none":
                x_BxTxD, _ = block(x_BxTxD, positions_BxT, attn_mask_BxTxT)
            else:  # a pure function of the block's weights: they may come from several traces
                # (LoRA: trainable adapters under the gradient, the frozen base outside it)
                graphdef, weights = nnx.split(block)
                run = lambda w, x, p, m, g=graphdef: nnx.merge(g, w)(x, p, m)[0]
                run = jax.checkpoint(run, policy=REMAT[remat])
                x_BxTxD = run(weights, x_BxTxD, positions_BxT, attn_mask_BxTxT)
        return self._logits(place(x_BxTxD))

    def __call__(
        self,
        input_ids_BxT: jax.Array,
        positions_BxT: jax.Array,
        attn_mask_BxTxT: jax.Array,
        remat: str = "none",
        place: Callable[[jax.Array], jax.Array] | None = None,
    ) -> jax.Array:
        """Full pass: logits [B, T, V+1] float32; attn_mask[b, q, k] True if q may see k.
        `remat`, `place`: see `forward_embeddings`."""
        x_BxTxD = self.embed(input_ids_BxT, positions_BxT)
        return self.forward_embeddings(x_BxTxD, positions_BxT, attn_mask_BxTxT, remat, place)

    def decode(
        self,
        input_ids_BxK: jax.Array,
        positions_BxK: jax.Array,
        attn_mask_BxKxS: jax.Array,
        cache: KVCache,
        cache_index_B: jax.Array,
        place_heads: Callable[[jax.Array], jax.Array] | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """Cached pass over K new tokens per row; returns (logits [B, K, V+1], new cache).

        The K/V of the new tokens of row b are written into slots
        [cache_index[b], cache_index[b] + K) (the caller must keep this within S slots:
        `dynamic_update_slice` clamps out-of-range starts), overwriting whatever was there.
        The K queries then attend over all S slots of the updated cache as allowed by
        `attn_mask[b, k, s]`; the caller marks which slots are valid (including the new
        tokens' own slots). The module is not mutated. `place_heads`: see `Attention`.
        """
        x_BxKxD = self.embed(input_ids_BxK, positions_BxK)
        kv = (cache.k, cache.v)
        for layer, block in enumerate(self.blocks):
            x_BxKxD, kv = block(
                x_BxKxD, positions_BxK, attn_mask_BxKxS, kv, cache_index_B, layer, place_heads
            )
        return self._logits(x_BxKxD), KVCache(k=kv[0], v=kv[1])

    def _logits(self, x_BxTxD: jax.Array) -> jax.Array:
        h_BxTxD = self.final_norm(x_BxTxD)
        if self.lm_head is not None:
            w_DxA = self.lm_head.kernel[...]
        else:
            w_DxA = self.tok_embed.embedding[...].T
        w_DxA = w_DxA.astype(self.config.compute_dtype)
        return jnp.einsum("btd,da->bta", h_BxTxD, w_DxA, preferred_element_type=jnp.float32)
