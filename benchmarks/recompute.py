"""Reference sampler without a KV cache: a full forward pass over the current state each step.

The baseline of the sampling benchmark (what "no cache" costs). It follows
`smatch_jax.sampling.sample_traced` action for action: the same key split per step, the same
action choice (`sampling._choose`), the same stopping rules and the same output rows, so under
greedy decoding its rows equal the cached sampler's (checked by the benchmark and its test).
The state lives in a fixed [B, P + max_new_tokens] buffer (static shapes), so every step costs
one causal forward pass over the full buffer whatever the state length.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from smatch_jax import sampling


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "eos_id", "pad_id"))
def recompute_sample(graphdef, params, prompts, prompt_len, key, *, cfg, eos_id, pad_id):
    """`sampling.SampleOutput` (without step logits) by full recomputation at every step."""
    model = nnx.merge(graphdef, params)
    B, P = prompts.shape
    S, A = P + cfg.max_new_tokens, cfg.n_actions
    bkspc_id = model.config.vocab_size
    rows, slots = jnp.arange(B), jnp.arange(S)
    positions = jnp.broadcast_to(slots, (B, S))
    causal = jnp.tril(jnp.ones((1, S, S), bool))
    state = jnp.full((B, S), pad_id, jnp.int32).at[:, :P].set(prompts)
    state = jnp.where(slots < prompt_len[:, None], state, pad_id)
    carry = dict(
        step=jnp.int32(0),
        key=key,
        state=state,
        state_len=prompt_len,
        actions=jnp.full((B, P + A), pad_id, jnp.int32).at[:, :P].set(state[:, :P]),
        n_act=jnp.zeros(B, jnp.int32),
        n_bk=jnp.zeros(B, jnp.int32),
        done=jnp.zeros(B, bool),
        ended=jnp.zeros(B, bool),
    )

    def body(c):
        key, sub = jax.random.split(c["key"])
        live, L = ~c["done"], c["state_len"]
        logits = model(c["state"], positions, causal)[rows, L - 1]
        a = sampling._choose(sub, logits, L, prompt_len, cfg, (bkspc_id, eos_id), None)
        is_bk = live & (a == bkspc_id)
        is_tok = live & ~is_bk
        new_len = L + is_tok - is_bk
        state = c["state"].at[rows, jnp.where(is_tok, L, S)].set(a, mode="drop")
        state = jnp.where(slots < new_len[:, None], state, pad_id)
        ended = c["ended"] | (live & (a == eos_id))
        n_act = c["n_act"] + live
        done = c["done"] | ended | (n_act >= A) | (new_len >= prompt_len + cfg.max_new_tokens)
        write_at = jnp.where(live, prompt_len + c["n_act"], P + A)
        return dict(
            step=c["step"] + 1,
            key=key,
            state=state,
            state_len=new_len,
            actions=c["actions"].at[rows, write_at].set(a, mode="drop"),
            n_act=n_act,
            n_bk=c["n_bk"] + is_bk,
            done=done,
            ended=ended,
        )

    c = jax.lax.while_loop(lambda c: (c["step"] < A) & ~jnp.all(c["done"]), body, carry)
    return sampling.SampleOutput(
        actions=c["actions"],
        length=prompt_len + c["n_act"],
        final=c["state"],
        final_length=c["state_len"],
        n_bkspc=c["n_bk"],
        ended=c["ended"],
        step_logits=None,
    )
