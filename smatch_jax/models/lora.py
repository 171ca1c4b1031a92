"""LoRA adapters for fine-tuning a large pretrained model with SequenceMatch, as in the paper.

`apply_lora` wraps the attention and MLP projections of every block with a low-rank update
`y = base(x) + (alpha / rank) * x @ A @ B` (flax `nnx.LoRA`, `B = 0` at init, so the wrapped
model computes exactly what it did before). What trains:

* the LoRA factors (`nnx.LoRAParam`), and
* the `<bkspc>` rows only of the token embedding and (if untied) the output layer: the new
  action must be learnt, while the pretrained vocabulary rows stay frozen.

`trainable_filter` selects the variables to differentiate (`nnx.split(model, filter, ...)`),
and `update_mask` gives the 0/1 multipliers that freeze every embedding row but `<bkspc>`;
apply them to the optimiser *updates* (`masked_updates`) so that weight decay cannot move a
frozen row either. `merge_lora` folds the adapters into the base kernels for export or faster
sampling.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from smatch_jax.models.transformer import Transformer, layer_list, set_layers

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EMBEDDING_PATHS = ("tok_embed", "lm_head")


class LoRALinear(nnx.Module):
    """`base(x) + scale * lora(x)`: a frozen `nnx.Linear` plus a trainable low-rank update."""

    def __init__(self, base: nnx.Linear, *, rank: int, alpha: float, rngs: nnx.Rngs):
        self.base = base
        self.lora = nnx.LoRA(
            base.in_features,
            rank,
            base.out_features,
            dtype=base.dtype,
            param_dtype=base.param_dtype,
            rngs=rngs,
        )
        self.scale = alpha / rank

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.base(x) + self.scale * self.lora(x)


def apply_lora(
    model: Transformer,
    *,
    rank: int,
    alpha: float | None = None,
    targets: Sequence[str] = DEFAULT_TARGETS,
    rngs: nnx.Rngs,
) -> Transformer:
    """Wraps the `targets` projections of every block in place; returns the model.

    `alpha` defaults to `rank` (scale 1). Unknown target names raise with the valid ones.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank={rank} must be >= 1")
    unknown = sorted(set(targets) - set(DEFAULT_TARGETS))
    if unknown:
        raise ValueError(f"unknown LoRA targets {unknown}; choose from {DEFAULT_TARGETS}")
    alpha = float(rank if alpha is None else alpha)
    blocks = layer_list(model)  # scanned layers: wrapped one by one, then stacked again,
    for block in blocks:  # so that both layouts draw the same adapters from `rngs`
        for parent in (block.attn, block.mlp):
            for name in targets:
                base = getattr(parent, name, None)
                if isinstance(base, nnx.Linear):
                    setattr(parent, name, LoRALinear(base, rank=rank, alpha=alpha, rngs=rngs))
    return set_layers(model, blocks)


def trainable_filter(lora: bool) -> nnx.filterlib.Filter:
    """Variables to differentiate: all params, or LoRA factors + the embedding tables."""
    if not lora:
        return nnx.Param
    return nnx.Any(nnx.LoRAParam, *(nnx.PathContains(p) for p in EMBEDDING_PATHS))


def update_mask(trainable: nnx.State, bkspc_id: int) -> nnx.State:
    """0/1 multipliers for the updates of `trainable` (a state from `trainable_filter(True)`).

    LoRA factors get 1; embedding tables get 1 on the `<bkspc>` row only. Token embeddings
    are `[V+1, d]` (row `bkspc_id`); the untied output kernel is `[d, V+1]` (column).
    """

    def mask(path, x):
        keys = [str(getattr(k, "key", k)) for k in path]
        if "tok_embed" in keys:
            return (jnp.arange(x.shape[0]) == bkspc_id)[:, None].astype(x.dtype)
        if "lm_head" in keys:
            return (jnp.arange(x.shape[1]) == bkspc_id)[None, :].astype(x.dtype)
        return jnp.ones((), x.dtype)

    return jax.tree_util.tree_map_with_path(mask, trainable)


def masked_updates(mask) -> optax.GradientTransformation:
    """Multiplies updates by `mask` (broadcasting): chain it after the optimiser."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, m: u * m, updates, mask), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def merge_lora(model: Transformer) -> Transformer:
    """Folds every adapter into its base kernel and unwraps it, in place; returns the model."""
    blocks = layer_list(model)
    for block in blocks:
        for parent in (block.attn, block.mlp):
            for name in DEFAULT_TARGETS:
                mod = getattr(parent, name, None)
                if isinstance(mod, LoRALinear):
                    a, b = mod.lora.lora_a[...], mod.lora.lora_b[...]
                    k = mod.base.kernel
                    k[...] = (k[...] + mod.scale * (a @ b)).astype(k[...].dtype)
                    setattr(parent, name, mod.base)
    return set_layers(model, blocks)
