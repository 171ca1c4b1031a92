"""Noise + `<bkspc>` augmentation of data rows (method.md §4): teaching the model to backtrack.

Data rows contain no backspaces, so a model trained on them never sees one used. Before each
data action, with probability `noise_rate`, we insert a burst of `k` noise tokens followed by
`k` `<bkspc>` actions (`k` uniform in `1..max_burst`; `k = 1` by default). After the burst the
state is exactly what it was, so `apply_backspaces` of an augmented row returns the original.

* `random` noise draws from the uniform distribution over the vocabulary minus special tokens;
* `ground_truth` noise draws from the empirical distribution of action tokens in the training
  completions (for arithmetic: digits, letters, signs), so errors look like real errors.

* `errors` draws from the ground-truth distribution restricted, at each position, to the
  tokens the task's prefix automaton rejects there (the grammar task: a wrong closing bracket,
  a closing bracket at depth 0, an opening past the depth bound), so every noise token is an
  error a model could make at that state. Only tasks with an automaton have it.
* `model` [ours] draws the noise before data token `t` from the current policy at the state
  `tokens[:t]` (teacher forcing on the clean row), without the data token: the first token of
  a sample that leaves the reference, i.e. the model's own mistakes (one extra forward pass of
  the data rows per step, without gradient). Special tokens are never noise. On a task with an
  automaton the draw is also restricted to the tokens it rejects: the policy's own errors.

Each is a probability vector over the base vocabulary (`random_noise_probs`,
`ground_truth_noise_probs`), passed to `add_noise` (with the automaton for `errors`, and the
policy's `position_logits` for `model`). With
`exclude_target` [ours] a noise token never equals the data token it stands in front of (an
error must be an error).
With `mask_noise_actions` [ours, default] the noise tokens get action weight 0 (the model
learns to recover from errors, not to make them); the `<bkspc>` actions keep weight 1.

Rows that would exceed `T` are cut after the last source token that still fits (never in the
middle of a burst) and flagged in `Noised.truncated`; they become truncated episodes (method.md §1).
`add_noise` is pure jnp, seeded by a PRNG key, vmapped over rows and jit-able.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from smatch_jax.sections import Section

NOISE_KINDS = ("random", "ground_truth", "errors", "model")


@dataclasses.dataclass(frozen=True)
class NoiseConfig(Section):
    """`config.noise`: noise + `<bkspc>` augmentation of data rows (method.md §4)."""

    NAME: ClassVar[str] = "noise"
    rate: float = 0.1  # probability of a noise burst before each data action
    kind: str = "ground_truth"  # 'ground_truth', 'random', 'errors' (tasks with an automaton)
    # or 'model' (the policy's own mistakes)
    max_burst: int = 1  # bursts of 1..max_burst noise tokens, then as many <bkspc>
    mask_noise_actions: bool = True  # noise tokens get action weight 0 [ours]
    exclude_target: bool = True  # a noise token never equals the next data token [ours]

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"kind": NOISE_KINDS}
    RANGES: ClassVar[tuple[tuple[str, Any, Any, bool], ...]] = (
        ("rate", 0.0, 1.0, True),
        ("max_burst", 1, None, True),
    )


def noise_probs(kind: str, train_rows, tokenizer) -> np.ndarray:
    """The noise distribution of `kind` over the base vocabulary: ground truth from the
    training rows `(tokens, prompt_len, length)`, or uniform; special tokens excluded."""
    if kind == "model":  # weighted per position by the policy (add_noise's position_logits)
        return random_noise_probs(tokenizer.vocab_size, tokenizer.special_ids)
    if kind in ("ground_truth", "errors"):  # errors: restricted per position by add_noise
        return ground_truth_noise_probs(
            *train_rows, vocab_size=tokenizer.vocab_size, special_ids=tokenizer.special_ids
        )
    if kind == "random":
        return random_noise_probs(tokenizer.vocab_size, tokenizer.special_ids)
    raise ValueError(f"noise.kind={kind!r} is unknown; choose one of {list(NOISE_KINDS)}")


class Noised(NamedTuple):
    """Augmented rows; `prompt_len` is unchanged (noise never touches the prompt)."""

    tokens: jax.Array  # int32 [B, T]
    length: jax.Array  # int32 [B]
    action_weight: jax.Array  # float32 [B, T]: 0 for masked noise tokens and padding
    is_noise: jax.Array  # bool [B, T]: inserted noise tokens (not their backspaces)
    n_noise: jax.Array  # int32 [B]: noise tokens kept in the row
    truncated: jax.Array  # bool [B]: the row was cut to fit T


def random_noise_probs(vocab_size: int, special_ids: Iterable[int]) -> np.ndarray:
    """Uniform over the base vocabulary minus `special_ids` (eos, pad, bos, ...)."""
    probs = np.ones(vocab_size, np.float64)
    probs[list(special_ids)] = 0.0
    if probs.sum() == 0:
        raise ValueError("every token is special: no token left to draw random noise from")
    return (probs / probs.sum()).astype(np.float32)


def ground_truth_noise_probs(
    tokens: np.ndarray,
    prompt_len: np.ndarray,
    length: np.ndarray,
    *,
    vocab_size: int,
    special_ids: Iterable[int],
) -> np.ndarray:
    """Empirical distribution of the action tokens (completions) of `tokens`, minus specials."""
    tokens, prompt_len, length = np.asarray(tokens), np.asarray(prompt_len), np.asarray(length)
    t = np.arange(tokens.shape[1])[None, :]
    acts = tokens[(t >= prompt_len[:, None]) & (t < length[:, None])]
    counts = np.bincount(acts[(acts >= 0) & (acts < vocab_size)], minlength=vocab_size)
    counts = counts.astype(np.float64)
    counts[list(special_ids)] = 0.0
    if counts.sum() == 0:
        raise ValueError(
            "the completions contain no non-special tokens: cannot build ground-truth noise; "
            "check the dataset or use noise kind 'random'"
        )
    return (counts / counts.sum()).astype(np.float32)


def _noise_row(
    key,
    tokens_T,
    m,
    n,
    log_probs_V,
    extra_TxV=None,
    *,
    bkspc_id,
    noise_rate,
    max_burst,
    mask_noise_actions,
    exclude_target,
    pad_id,
):
    T = tokens_T.shape[0]
    t = jnp.arange(T)
    k_fire, k_size, k_tok = jax.random.split(key, 3)
    is_act = (t >= m) & (t < n)
    fire = is_act & jax.random.bernoulli(k_fire, noise_rate, (T,))
    burst_T = jnp.where(fire, jax.random.randint(k_size, (T,), 1, max_burst + 1), 0)
    # Source token t lands at out_T[t]; its burst occupies the 2 * burst_T[t] slots before it.
    out_T = t + jnp.cumsum(2 * burst_T)
    out_T = jnp.where(t < n, out_T, jnp.iinfo(jnp.int32).max)
    fits = out_T < T
    new_len = jnp.max(jnp.where(fits, out_T + 1, 0))  # cut after the last source that fits
    full_len = n + 2 * jnp.sum(burst_T)
    truncated = full_len > T

    o = jnp.arange(T)
    src = jnp.clip(jnp.searchsorted(out_T, o, side="left"), 0, T - 1)  # first source at >= o
    at_src = out_T[src] == o
    burst_pos = o - (out_T[src] - 2 * burst_T[src])  # index inside the burst before src
    valid = o < new_len
    noise_slot = valid & ~at_src & (burst_pos < burst_T[src])  # the rest of a burst: <bkspc>

    target = tokens_T[src]
    if extra_TxV is None:  # one distribution for every slot: no [T, V] table
        noise_tok = draw_excluding(k_tok, jnp.exp(log_probs_V), target, exclude_target)
    else:  # per state (the one before src): errors, or the model's own
        logits_TxV = jnp.broadcast_to(log_probs_V, (T, log_probs_V.shape[0]))
        per = logits_TxV + extra_TxV[src]
        logits_TxV = jnp.where(jnp.isfinite(per).any(axis=-1, keepdims=True), per, logits_TxV)
        if exclude_target:
            masked = logits_TxV.at[o, target].set(-jnp.inf)
            ok = jnp.isfinite(masked).any(axis=-1, keepdims=True)  # target was the only option
            logits_TxV = jnp.where(ok, masked, logits_TxV)
        noise_tok = jax.random.categorical(k_tok, logits_TxV, axis=-1)

    out = jnp.where(at_src, target, jnp.where(noise_slot, noise_tok, bkspc_id))
    out = jnp.where(valid, out, pad_id).astype(jnp.int32)
    weight = jnp.where(valid, 1.0, 0.0).astype(jnp.float32)
    if mask_noise_actions:
        weight = jnp.where(noise_slot, 0.0, weight)
    n_noise = jnp.sum(noise_slot).astype(jnp.int32)
    return Noised(out, new_len.astype(jnp.int32), weight, noise_slot, n_noise, truncated)


def draw_excluding(key: jax.Array, probs_V: jax.Array, target_T: jax.Array, exclude: bool):
    """int32 [T]: one token per slot drawn from `probs_V` (zero for tokens never drawn), and
    with `exclude` from `probs_V` without `target_T[t]`, renormalised (the target itself when
    it holds all the mass). By the inverse of the cumulative distribution: a uniform draw on
    the mass left, stepped over the target's interval, then a binary search; O(T log V), where
    a categorical over a [T, V] table of masked logits held 0.37 GiB a chip on the 7B step
    (benchmarks/RESULTS.md)."""
    cdf = jnp.cumsum(probs_V)
    p_t = probs_V[target_T]
    skip = exclude & (p_t < cdf[-1])
    lo = cdf[target_T] - p_t  # where the target's interval starts
    u = jax.random.uniform(key, target_T.shape) * jnp.where(skip, cdf[-1] - p_t, cdf[-1])
    u = jnp.where(skip & (u >= lo), u + p_t, u)
    V = probs_V.shape[0]
    ids = jnp.arange(V)
    has = probs_V > 0
    before = jax.lax.cummax(jnp.where(has, ids, -1))  # the last token with mass at or before i
    after = jax.lax.cummin(jnp.where(has, ids, V), reverse=True)  # ... at or after i
    tok = jnp.minimum(jnp.searchsorted(cdf, u, side="right"), before[-1])
    # Rounding can leave `u + p_t` an ulp short of the target's end: then the next token with
    # mass (after the target, else before it).
    nxt = jnp.where(target_T + 1 < V, after[jnp.minimum(target_T + 1, V - 1)], V)
    other = jnp.where(nxt < V, nxt, before[jnp.maximum(target_T - 1, 0)])
    return jnp.where(skip & (tok == target_T), other, tok).astype(jnp.int32)


def add_noise(
    key: jax.Array,
    tokens: jax.Array,
    prompt_len: jax.Array,
    length: jax.Array,
    *,
    noise_probs: jax.Array,
    bkspc_id: int,
    noise_rate: float,
    max_burst: int = 1,
    mask_noise_actions: bool = True,
    exclude_target: bool = True,
    pad_id: int = 0,
    automaton: tuple[Any, int] | None = None,
    position_logits: jax.Array | None = None,
) -> Noised:
    """Inserts noise bursts and their backspaces into data rows (method.md §4).

    Args:
      key: PRNG key; the result is a pure function of it and the inputs.
      tokens: int32 [B, T]; prompt_len, length: int32 [B].
      noise_probs: float [V] over the base vocabulary (see `random_noise_probs`,
        `ground_truth_noise_probs`); zero for tokens that must never be noise.
      bkspc_id: the `<bkspc>` id (`V`).
      noise_rate: probability of a burst before each data action.
      max_burst: bursts have `k ~ Uniform{1..max_burst}` noise tokens then `k` backspaces.
      mask_noise_actions: give noise tokens action weight 0.
      exclude_target: never draw the data token that follows the burst.
      pad_id: id written to padding.
      automaton: (table [S, V] of next states, -1 = rejected; start state) of the task's
        prefix language: noise before token `t` is drawn only among the tokens rejected at
        the state after `tokens[:t]` (noise kind `errors`); None: anywhere.
      position_logits: float [B, T, V] added to `log(noise_probs)` for the noise before token
        `t` (noise kind `model`: the policy's log-probabilities of token `t` given `tokens[:t]`);
        a position with no finite entry falls back to `noise_probs`.
    """
    if not 0.0 <= noise_rate <= 1.0:
        raise ValueError(f"noise_rate={noise_rate} must be in [0, 1]")
    if max_burst < 1:
        raise ValueError(f"max_burst={max_burst} must be >= 1")
    noise_probs = jnp.asarray(noise_probs, jnp.float32)
    if noise_probs.shape != (bkspc_id,):
        raise ValueError(
            f"noise_probs has shape {noise_probs.shape}, expected ({bkspc_id},): one entry per "
            "base-vocabulary token (the <bkspc> id is the base vocabulary size)"
        )
    B = tokens.shape[0]
    row = functools.partial(
        _noise_row,
        bkspc_id=bkspc_id,
        noise_rate=noise_rate,
        max_burst=max_burst,
        mask_noise_actions=mask_noise_actions,
        exclude_target=exclude_target,
        pad_id=pad_id,
    )
    log_probs = jnp.log(noise_probs)
    tokens = jnp.asarray(tokens, jnp.int32)
    args = [
        jax.random.split(key, B),
        tokens,
        jnp.asarray(prompt_len, jnp.int32),
        jnp.asarray(length, jnp.int32),
        log_probs,
    ]
    extra = None if position_logits is None else jnp.asarray(position_logits, jnp.float32)
    if automaton is not None:
        errs = jnp.where(rejected_tokens(tokens, *automaton), 0.0, -jnp.inf)
        extra = errs if extra is None else extra + errs
    if extra is not None:
        if extra.shape != (*tokens.shape, bkspc_id):
            raise ValueError(f"position_logits must be [B, T, V]: {extra.shape} vs {tokens.shape}")
        args.append(extra)
    return jax.vmap(row, in_axes=(0, 0, 0, 0, None, 0)[: len(args)])(*args)


def policy_logits(logits: jax.Array) -> jax.Array:
    """Noise kind `model`: float [B, T, V] log-probabilities of the data token at `t` under the
    policy given `tokens[:t]`, from the [B, T, V + 1] logits of a forward pass over the clean
    rows (the policy's `<bkspc>` probability is dropped: noise is never a backspace)."""
    lp = jax.nn.log_softmax(logits[..., :-1].astype(jnp.float32), axis=-1)
    return jnp.concatenate([jnp.full_like(lp[:, :1], -jnp.inf), lp[:, :-1]], axis=1)


def rejected_tokens(tokens: jax.Array, table: Any, start: int) -> jax.Array:
    """bool [B, T, V]: the tokens the automaton rejects at the state before each position
    (after `tokens[:, :t]`; every token once the row has left the language)."""
    table = jnp.asarray(table, jnp.int32)

    def states(row):
        def step(s, tok):
            nxt = jnp.where(s >= 0, table[jnp.maximum(s, 0), tok], -1)
            return nxt, s

        return jax.lax.scan(step, jnp.int32(start), row)[1]

    before = jax.vmap(states)(tokens)  # [B, T]
    return (table[jnp.maximum(before, 0)] < 0) | (before < 0)[..., None]
