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

Attention (attention.py) never builds a causal mask: the caller passes ``attn_mask[b, q, k]``
(True when query q may attend key k), because the SequenceMatch backspace layout needs
non-causal-looking masks.

The output layer has V + 1 rows (the last is `<bkspc>`); logits are returned in float32.

Decoding is functional: `init_cache` builds a `KVCache` and `Transformer.decode` takes the
cache and returns an updated one without mutating the module. Param tree (nnx.state names)::

    tok_embed.embedding [V+1, d]            pos_embed.embedding [P, d]   (gpt2)
    blocks.{i}.attn_norm.{scale, bias}      blocks.{i}.mlp_norm.{scale, bias}
    blocks.{i}.attn.{q,k,v,o}_proj.{kernel, bias}
    blocks.{i}.mlp.{gate_proj (llama), up_proj, down_proj}.{kernel, bias}
    final_norm.{scale, bias}                lm_head.kernel [d, V+1]      (untied only)

Kernels are [in, out] (nnx.Linear); biases and LayerNorm biases exist only when `use_bias`.

Scanned layers (`ModelConfig.scan_layers`): `blocks` is ONE `Block` whose every weight has a
leading layer axis (`blocks.attn.q_proj.kernel [L, d, h]`), and the forward pass and the
cached decode run it under `jax.lax.scan`, so XLA traces and compiles one block instead of L
(MaxText's `scan_layers`). The weights are those of the unrolled model built from the same
seed, stacked (`stack_blocks`); `relayout` converts a model between the two layouts, and the
importers (`convert/`) and LoRA build either. Rematerialisation applies to the scanned body.

Activation sharding: the model names the axes of the arrays it constrains
(`activations.constrain`: the residual stream before every block, `("batch", "length",
"embed")`; q, k and v when decoding, `("batch", "length", "heads", "head_dim")`); the
`activations.axis_rules` in force when it is traced (the train step's, the sampler's) map the
names to mesh axes, and outside them nothing is constrained.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from smatch_jax import activations
from smatch_jax.models.attention import INIT_STD, Attention, KVCache, init_cache, linear
from smatch_jax.models.config import ModelConfig

__all__ = ["REMAT", "Block", "KVCache", "Transformer", "init_cache", "relayout"]

# Rematerialisation policies of a block's forward pass (Transformer.forward_embeddings): what
# the backward pass keeps ('none': everything, without a checkpoint).
REMAT = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,  # _full_remat: the input kept split
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_qkv": jax.checkpoint_policies.save_only_these_names("q_proj", "k_proj", "v_proj"),
}


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


class MLP(nnx.Module):
    """gpt2: down(gelu_tanh(up(x))); llama (SwiGLU): down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.gated = config.family == "llama"
        out_std = INIT_STD / math.sqrt(2 * config.n_layers)
        if self.gated:
            self.gate_proj = linear(config, config.d_model, config.d_ff, rngs, INIT_STD)
        self.up_proj = linear(config, config.d_model, config.d_ff, rngs, INIT_STD)
        self.down_proj = linear(config, config.d_ff, config.d_model, rngs, out_std)

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
        layer: int | jax.Array = 0,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        attn_BxTxD, new_cache_kv = self.attn(
            self.attn_norm(x_BxTxD), positions_BxT, mask_BxTxS, cache_kv, cache_index_B, layer
        )
        x_BxTxD = x_BxTxD + attn_BxTxD
        x_BxTxD = x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD))
        return x_BxTxD, new_cache_kv


def _full_remat(apply, positions_BxT, attn_mask_BxTxT):
    """`apply(weights, x, positions, mask, graphdef)` (one block) under full
    rematerialisation (remat 'full'): the backward pass keeps the block's input only,
    constrained as `("batch", "length", "kept_embed")` (TRAIN_RULES split its features over
    `tensor`: each chip keeps its 1/tensor of it), gathers it back and recomputes the block.
    `jax.checkpoint` keeps the input as the block reads it, whole on every `tensor` shard
    (0.38 GiB a chip for the 7B step; benchmarks/RESULTS.md, issue 35). Returns
    `run(weights, x, graphdef)`."""
    keep = activations.placer(("batch", "length", "kept_embed"))
    whole = activations.placer(("batch", "length", "embed"))

    @functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
    def run(weights, x_BxTxD, pos, mask, graphdef):
        return apply(weights, x_BxTxD, pos, mask, graphdef)

    def forward(weights, x_BxTxD, pos, mask, graphdef):
        # The copy kept is split; the stream itself stays whole (split it instead, and XLA
        # carries the split back into the embedding look-up).
        x_BxTxD = whole(x_BxTxD)
        return apply(weights, x_BxTxD, pos, mask, graphdef), (weights, keep(x_BxTxD), pos, mask)

    def backward(graphdef, kept, g_BxTxD):
        weights, x_BxTxD, pos, mask = kept
        # Under jax.checkpoint, XLA gathers a layer's weights once for the recomputation and
        # the backward pass (with a plain jax.vjp it gathered q, k and v twice).
        again = jax.checkpoint(lambda w, x: apply(w, x, pos, mask, graphdef))
        _, vjp = jax.vjp(again, weights, whole(x_BxTxD))
        no_grad = lambda a: np.zeros(a.shape, jax.dtypes.float0)  # positions, mask
        return (*vjp(g_BxTxD), no_grad(pos), no_grad(mask))

    run.defvjp(forward, backward)
    return lambda weights, x_BxTxD, graphdef: run(
        weights, x_BxTxD, positions_BxT, attn_mask_BxTxT, graphdef
    )


def _scan_blocks(step, carry, xs):
    """`carry` through `step(carry, one layer's slice of xs) -> carry` for every layer, under
    `jax.lax.scan`: one block traced and compiled."""
    return jax.lax.scan(lambda c, x: (step(c, x), None), carry, xs)[0]


def stack_blocks(blocks: list[Block]) -> Block:
    """One `Block` holding the weights of `blocks` stacked on a leading layer axis (the
    scanned layout; works on abstract blocks under `nnx.eval_shape` too)."""
    graphdef, _ = nnx.split(blocks[0])
    states = [nnx.state(b) for b in blocks]
    return nnx.merge(graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *states))


def unstack_blocks(stacked: Block, n_layers: int) -> list[Block]:
    """The `n_layers` blocks of a stacked `Block` (copies: change them, then `stack_blocks`)."""
    graphdef, state = nnx.split(stacked)
    return [nnx.merge(graphdef, jax.tree.map(lambda x, i=i: x[i], state)) for i in range(n_layers)]


def layer_list(model: Transformer) -> list[Block]:
    """The model's blocks in order, in either layout (copies when scanned)."""
    if model.config.scan_layers:
        return unstack_blocks(model.blocks, model.config.n_layers)
    return list(model.blocks)


def set_layers(model: Transformer, blocks: list[Block]) -> Transformer:
    """Puts `blocks` into `model` in its layout; returns the model."""
    model.blocks = stack_blocks(blocks) if model.config.scan_layers else nnx.List(blocks)
    return model


def relayout(model: Transformer, scan_layers: bool) -> Transformer:
    """`model` with its blocks in the scanned (True) or unrolled (False) layout: the same
    function and weights (the model itself when it is in that layout already)."""
    if model.config.scan_layers == scan_layers:
        return model
    blocks = layer_list(model)
    model.config = dataclasses.replace(model.config, scan_layers=scan_layers)
    for block in blocks:  # the same graph as a model built in this layout
        block.attn.config = model.config
    return set_layers(model, blocks)


class Transformer(nnx.Module):
    """Decoder-only transformer returning float32 logits over V + 1 actions."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        embed_init = nnx.initializers.normal(INIT_STD)
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
        blocks = [Block(config, rngs=rngs) for _ in range(config.n_layers)]
        self.blocks = stack_blocks(blocks) if config.scan_layers else nnx.List(blocks)
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
                kernel_init=nnx.initializers.normal(INIT_STD),
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
    ) -> jax.Array:
        """Logits [B, T, V+1] float32 from input embeddings (as returned by `embed`).

        `remat` (`REMAT`): what a gradient keeps of each block's forward pass. 'none' keeps
        every activation; 'full' only the block's input (split over the mesh axes of
        "kept_embed": `_full_remat`), recomputing the rest in the backward pass; 'save_dots'
        also the outputs of its matmuls that have no batch dimension (the projections, not
        the attention's scores), so only cheap elementwise work is redone; 'save_qkv' the
        block's input and its query, key and value projections."""
        if remat not in REMAT:
            raise ValueError(f"remat={remat!r}; use one of {sorted(REMAT)}")
        x_BxTxD = self.hidden(x_BxTxD, positions_BxT, attn_mask_BxTxT, remat)
        return self.head(x_BxTxD)

    def hidden(
        self,
        x_BxTxD: jax.Array,
        positions_BxT: jax.Array,
        attn_mask_BxTxT: jax.Array,
        remat: str = "none",
    ) -> jax.Array:
        """The residual stream [B, T, d] after the last block (before `final_norm`), its rows
        constrained before every block (module docstring; the output layer's input is the
        caller's: `hidden`, then `head`); `remat`: see `forward_embeddings`."""

        def apply(weights, x_BxTxD, pos, mask, graphdef):  # a pure function of its weights
            x_BxTxD = activations.constrain(x_BxTxD, ("batch", "length", "embed"))
            return nnx.merge(graphdef, weights)(x_BxTxD, pos, mask)[0]

        # Weights may come from several traces (LoRA: trainable adapters under the gradient,
        # the frozen base outside it): rematerialise a pure function.
        if remat == "full":
            run = _full_remat(apply, positions_BxT, attn_mask_BxTxT)
        else:
            run = lambda w, x, graphdef: apply(w, x, positions_BxT, attn_mask_BxTxT, graphdef)
            if remat != "none":
                run = jax.checkpoint(run, policy=REMAT[remat], static_argnums=(2,))
        if self.config.scan_layers:
            graphdef, weights = nnx.split(self.blocks)
            step = lambda x, w: run(w, x, graphdef)
            return _scan_blocks(step, x_BxTxD, weights)
        for block in self.blocks:
            graphdef, weights = nnx.split(block)
            x_BxTxD = run(weights, x_BxTxD, graphdef)
        return x_BxTxD

    def __call__(
        self,
        input_ids_BxT: jax.Array,
        positions_BxT: jax.Array,
        attn_mask_BxTxT: jax.Array,
        remat: str = "none",
    ) -> jax.Array:
        """Full pass: logits [B, T, V+1] float32; attn_mask[b, q, k] True if q may see k.
        `remat`: see `forward_embeddings`."""
        x_BxTxD = self.embed(input_ids_BxT, positions_BxT)
        return self.forward_embeddings(x_BxTxD, positions_BxT, attn_mask_BxTxT, remat)

    def decode(
        self,
        input_ids_BxK: jax.Array,
        positions_BxK: jax.Array,
        attn_mask_BxKxS: jax.Array,
        cache: KVCache,
        cache_index_B: jax.Array,
    ) -> tuple[jax.Array, KVCache]:
        """Cached pass over K new tokens per row; returns (logits [B, K, V+1], new cache).

        The K/V of the new tokens of row b are written into slots
        [cache_index[b], cache_index[b] + K) (the caller must keep this within S slots:
        `dynamic_update_slice` clamps out-of-range starts), overwriting whatever was there.
        The K queries then attend over all S slots of the updated cache as allowed by
        `attn_mask[b, k, s]`; the caller marks which slots are valid (including the new
        tokens' own slots). The module is not mutated.
        """
        x_BxKxD = self.embed(input_ids_BxK, positions_BxK)
        kv = (cache.k, cache.v)
        args = (positions_BxK, attn_mask_BxKxS)
        if self.config.scan_layers:  # the cache rides in the carry, written at a traced layer
            graphdef, weights = nnx.split(self.blocks)

            def step(carry, weights_and_layer):
                x_BxKxD, kv = carry
                weights, layer = weights_and_layer
                block = nnx.merge(graphdef, weights)
                return block(x_BxKxD, *args, kv, cache_index_B, layer)

            layers = jnp.arange(self.config.n_layers, dtype=jnp.int32)
            x_BxKxD, kv = _scan_blocks(step, (x_BxKxD, kv), (weights, layers))
        else:
            for layer, block in enumerate(self.blocks):
                x_BxKxD, kv = block(x_BxKxD, *args, kv, cache_index_B, layer)
        return self.head(x_BxKxD), KVCache(k=kv[0], v=kv[1])

    def head(self, x_BxTxD: jax.Array) -> jax.Array:
        """The output layer: logits [B, T, V+1] float32 of the residual stream after the last
        block (final norm, then the untied `lm_head` or the token table)."""
        h_BxTxD = self.final_norm(x_BxTxD)
        if self.lm_head is not None:
            w_DxA = self.lm_head.kernel[...]
        else:
            w_DxA = self.tok_embed.embedding[...].T
        w_DxA = w_DxA.astype(self.config.compute_dtype)
        A = w_DxA.shape[1]
        split = activations.split("vocab")
        if split > 1:
            # V + 1 is odd, so the actions split only once padded (to a multiple of 128 and of
            # the split; the padding's logits are cut off below). The weight, stored with its
            # features split (sharding.RULES), moves that split to its columns (an all-to-all)
            # and is gathered over "head_in"'s axes: each chip computes its columns of its
            # rows' logits. Gathering the stored weight whole instead (and splitting the
            # positions) held the whole weight and its f32 gradient on every chip: on the 7B
            # step, XLA's peak 2.49 -> 2.00 GiB a chip, collectives 11.4 -> 6.7 GB
            # (benchmarks/RESULTS.md).
            w_DxA = jnp.pad(w_DxA, ((0, 0), (0, -A % math.lcm(128, split))))
            w_DxA = activations.constrain(w_DxA, ("head_in", "vocab"))
            w_DxA = activations.constrain(w_DxA, (None, "vocab"))
        logits = jnp.einsum("btd,da->bta", h_BxTxD, w_DxA, preferred_element_type=jnp.float32)
        if split > 1:
            logits = activations.constrain(logits, ("batch", "length", "vocab"))[..., :A]
        return logits
