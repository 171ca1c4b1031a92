"""The one-pass layout is exact on real models (method.md §3).

For random rows with backspaces, the logits at every valid position of one forward pass under
`backspace_layout` equal the logits of a plain causal forward pass over that position's
post-backspace state; and no gradient reaches a position's input from outside its state.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from smatch_jax import masks, models
from tests import reference

T = 12
FAMILIES = ("gpt2", "llama")


@functools.cache
def _model(family):
    cfg = models.tiny(family)
    model = models.Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, ids, pos, mask):
        return nnx.merge(graphdef, state)(ids, pos, mask)

    @jax.jit
    def input_jacobian_support(state, ids, pos, mask):
        """[B, T(query), T(input)] bool: d logits[b, q] / d x[b, k] is non-zero."""
        m = nnx.merge(graphdef, state)
        x = m.embed(ids, pos)
        probe = jax.random.normal(jax.random.key(1), (cfg.n_actions,))

        def out_q(x, q):
            return m.forward_embeddings(x, pos, mask)[:, q] @ probe  # [B]

        def grad_q(q):
            g = jax.grad(lambda x: out_q(x, q).sum())(x)  # [B, T, D]
            return jnp.any(g != 0, axis=-1)

        return jnp.moveaxis(jax.vmap(grad_q)(jnp.arange(ids.shape[1])), 0, 1)

    return cfg, state, forward, input_jacobian_support


def random_rows(seed, vocab, n_rows=4, p_bk=0.35):
    rng = np.random.default_rng(seed)
    bk = vocab
    tokens = np.zeros((n_rows, T), np.int32)
    m = rng.integers(1, 4, n_rows).astype(np.int32)
    n = np.array([rng.integers(m[b], T + 1) for b in range(n_rows)], np.int32)
    n[0] = T  # one full row
    for b in range(n_rows):
        tokens[b, : n[b]] = rng.integers(0, vocab, n[b])
        acts = rng.random(n[b]) < p_bk
        acts[: m[b]] = False
        tokens[b, : n[b]][acts] = bk
    tokens[1, m[1] : m[1] + 3] = bk  # backspaces straight at the prompt boundary (no-ops)
    return tokens, m, n


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("seed", [0, 1])
def test_layout_logits_equal_naive_per_state_passes(family, seed):
    cfg, state, forward, _ = _model(family)
    tokens, m, n = random_rows(seed, cfg.vocab_size)
    lay = masks.backspace_layout(tokens, m, n, bkspc_id=cfg.vocab_size)
    got = np.asarray(forward(state, lay.input_ids, lay.positions, lay.attn_mask))

    # Naive: every post-backspace state as its own causal row, all in one padded batch.
    states, where = [], []
    for b in range(len(tokens)):
        for k, s in enumerate(reference.states_row(tokens[b].tolist(), m[b], n[b], cfg.vocab_size)):
            states.append(s)
            where.append((b, k))
    ids = np.zeros((len(states), T), np.int32)
    lens = np.array([len(s) for s in states])
    for i, s in enumerate(states):
        ids[i, : len(s)] = s
    pos = np.broadcast_to(np.arange(T), ids.shape).astype(np.int32)
    causal = np.broadcast_to(np.tril(np.ones((T, T), bool)), (len(states), T, T))
    naive = np.asarray(forward(state, ids, pos, causal))
    want = naive[np.arange(len(states)), lens - 1]
    have = np.stack([got[b, k] for b, k in where])
    np.testing.assert_allclose(have, want, atol=2e-5, rtol=1e-5)
    assert (tokens == cfg.vocab_size).sum() > 4, "the rows must exercise backspaces"


@pytest.mark.parametrize("family", FAMILIES)
def test_no_gradient_from_outside_the_state(family):
    """d logits[q] / d input[k] is non-zero exactly for the k in the state of q."""
    cfg, state, _, support_fn = _model(family)
    tokens, m, n = random_rows(5, cfg.vocab_size)
    lay = masks.backspace_layout(tokens, m, n, bkspc_id=cfg.vocab_size)
    support = np.asarray(support_fn(state, lay.input_ids, lay.positions, lay.attn_mask))
    np.testing.assert_array_equal(support, np.asarray(lay.attn_mask))
    # In particular: a deleted token's input never influences positions after its deletion.
    for b in range(len(tokens)):
        _, _, sets = reference.layout_row(tokens[b].tolist(), m[b], n[b], cfg.vocab_size)
        for q in range(n[b]):
            for k in range(q):
                if k not in sets[q]:
                    assert not support[b, q, k]
