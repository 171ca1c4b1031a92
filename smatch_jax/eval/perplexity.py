"""Perplexity of token rows under a smatch_jax `Transformer` (e.g. a reference LM).

`perplexity(model, token_rows, lengths, score_from=...)` runs the model's ordinary causal
forward (`model(ids, positions, causal mask)`) over right-padded rows and scores every token
at positions `score_from[b] <= t < lengths[b]` given the tokens before it: the prompt is
context, the continuation is scored. Probabilities are renormalised over the text vocabulary
(the first `vocab_size` logits; the `<bkspc>` row is dropped), since the scored rows are final
text without backspaces. Perplexity = exp(total NLL / total scored tokens), pooled over rows
(the corpus-level convention of language-model evaluation); per-row NLLs are returned too.

Rows are processed in batches padded to a fixed row count and length, so the forward compiles
once per call shape.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from smatch_jax import sharding


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    perplexity: float  # exp(nll_per_token)
    nll_per_token: float  # total NLL / n_tokens (nats)
    n_tokens: int  # scored tokens
    row_nll: np.ndarray  # float64 [N]: summed NLL of each row's scored tokens
    row_tokens: np.ndarray  # int64 [N]: scored tokens per row


@functools.partial(jax.jit, static_argnums=0)
def _token_nll(graphdef, state, ids_BxT: jax.Array, lens_B: jax.Array) -> jax.Array:
    """NLL [B, T-1] of token t+1 given tokens 0..t (text vocabulary only)."""
    model = nnx.merge(graphdef, state)
    B, T = ids_BxT.shape
    positions_BxT = jnp.broadcast_to(jnp.arange(T), (B, T))
    valid_BxT = jnp.arange(T)[None] < lens_B[:, None]
    mask_BxTxT = jnp.tril(jnp.ones((T, T), bool))[None] & valid_BxT[:, None, :]
    logits = model(ids_BxT, positions_BxT, mask_BxTxT)[..., : model.config.vocab_size]
    logp_BxTxV = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    target_BxT1 = ids_BxT[:, 1:]
    return -jnp.take_along_axis(logp_BxTxV, target_BxT1[..., None], axis=-1)[..., 0]


def perplexity(
    model,
    token_rows: Sequence[Sequence[int]] | np.ndarray,
    lengths: Sequence[int] | np.ndarray,
    *,
    score_from: Sequence[int] | np.ndarray | int = 1,
    batch_size: int = 64,
) -> PerplexityResult:
    """Perplexity of `token_rows[b][score_from[b]:lengths[b]]` given the tokens before them.

    `token_rows`: [N, >= max(lengths)] ids (an array or a list of lists; entries past
    `lengths[b]` are ignored). `score_from[b] >= 1` (the first token has no context).
    """
    lens = np.asarray(lengths, np.int64)
    N = len(lens)
    start = np.broadcast_to(np.asarray(score_from, np.int64), (N,))
    if N == 0:
        raise ValueError("no rows to score")
    if (start < 1).any() or (start > lens).any():
        raise ValueError("need 1 <= score_from <= lengths for every row")
    if int(lens.max()) > model.config.max_positions:
        raise ValueError(f"a row is longer than the model's {model.config.max_positions} positions")
    vocab = model.config.vocab_size
    T = int(lens.max())
    ids = np.zeros((N, T), np.int32)
    for b in range(N):
        row = np.asarray(token_rows[b][: lens[b]], np.int64)
        if (row < 0).any() or (row >= vocab).any():
            raise ValueError(f"row {b} has ids outside the text vocabulary [0, {vocab})")
        ids[b, : lens[b]] = row
    graphdef, state = nnx.split(model)
    B = min(batch_size, N)
    nll = np.zeros((N, T - 1), np.float64) if T > 1 else np.zeros((N, 0))
    for s in range(0, N, B):
        chunk, clen = ids[s : s + B], lens[s : s + B]
        n = len(chunk)
        if n < B:  # pad the batch so every call has one shape
            chunk = np.concatenate([chunk, np.zeros((B - n, T), np.int32)])
            clen = np.concatenate([clen, np.ones(B - n, np.int64)])
        out = _token_nll(graphdef, state, jnp.asarray(chunk), jnp.asarray(clen, jnp.int32))
        nll[s : s + n] = np.asarray(sharding.to_host(out), np.float64)[:n]
    # nll[b, t - 1] scores token t; keep score_from <= t < length.
    t = np.arange(1, T)[None]
    keep = (t >= start[:, None]) & (t < lens[:, None])
    row_nll = (nll * keep).sum(1)
    row_tokens = keep.sum(1).astype(np.int64)
    total = int(row_tokens.sum())
    mean = float(row_nll.sum() / total) if total else float("nan")
    return PerplexityResult(
        perplexity=math.exp(mean) if total else float("nan"),
        nll_per_token=mean,
        n_tokens=total,
        row_nll=row_nll,
        row_tokens=row_tokens,
    )
