"""Token-level unlikelihood (Welleck et al., 2019): the kernel of the paper's MLE + UL baseline
(`loss.unlikelihood_weight`; `objective.make_loss_fn` adds it)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from smatch_jax.losses import action_valid


def unlikelihood_loss(
    logits: jax.Array,
    tokens: jax.Array,
    prompt_len: jax.Array,
    length: jax.Array,
    is_model: jax.Array | None = None,
    *,
    eos_id: int,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Token-level unlikelihood (Welleck et al., 2019), the paper's MLE + UL baseline.

    At the state before action `t`, the candidates are the tokens of the preceding context
    (`tokens[:t]`, prompt included) other than the target `tokens[t]`; the loss is
    `-sum_c log(1 - pi(c|s)) / N_data` over data actions. Meant for rows without `<bkspc>`
    (the baseline trains on clean data). Memory: a [B, T, V+1] candidate mask.
    """
    logits = logits.astype(jnp.float32)
    A = logits.shape[-1]
    B = tokens.shape[0]
    valid = action_valid(tokens, prompt_len, length, eos_id)
    seen_BxTxA = jax.lax.cummax(jax.nn.one_hot(tokens, A, dtype=jnp.float32), axis=1) > 0
    cand = seen_BxTxA[:, :-1] & ~jax.nn.one_hot(tokens[:, 1:], A, dtype=bool)
    data_row = jnp.ones(B, bool) if is_model is None else ~jnp.asarray(is_model, bool)
    g = valid & data_row[:, None]
    p = jax.nn.softmax(logits[:, :-1], axis=-1)
    log_not = jnp.log(jnp.clip(1.0 - p, 1e-6, 1.0))
    per_state = jnp.sum(jnp.where(cand, log_not, 0.0), axis=-1)
    loss = -jnp.sum(jnp.where(g, per_state, 0.0)) / jnp.maximum(jnp.sum(g), 1)
    return loss, {"ul/loss": loss}
