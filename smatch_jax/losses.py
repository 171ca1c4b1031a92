"""SequenceMatch and behavioural-cloning losses (method.md §2): pure functions of
logits and tokens.

The logits are soft Q-values at temperature `alpha` (method.md §2.7): at the position `j`
representing state `s`, `Q(s, a) = alpha * l_j[a]`, `V(s) = alpha * logsumexp(l_j)` and
`pi = softmax(l_j)`. Action `t` of a row (`m <= t < n`, `a = tokens[t]`) moves the state
represented at `j = t - 1` to the one represented at `t`, so

    r = Q(s, a) - gamma * V(s'),   V(s') = 0 after eos unless terminal='bootstrap',

with discount `w = gamma ** k` (`k`: the actions of the episode before this one). The options
of revision 2 (`temperature`, `terminal`, `masked_actions`, `normalize`, and
`truncated_weight` for model rows cut off before eos) each keep their revision-1 value as the
keyword default. Expectations are per group (`data` rows vs `model` rows): global token means
(`normalize='token'`) or per-episode means (`'row'`), never per-row means. Everything here is
model-agnostic: `logits` are whatever the model produced on the backspace layout of `tokens`
(masks.py).

All per-action arrays use the *state* frame: index `j` in `[0, T-1)` stands for the action
`tokens[:, j + 1]` taken from the state at position `j`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

DIVERGENCES = ("chi2_mix", "chi2", "kl", "js", "hellinger")
VALUE_ON = ("mix", "data")
TERMINAL = ("zero", "bootstrap")
MASKED_ACTIONS = ("unrewarded", "environment")
NORMALIZE = ("token", "row")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"loss.{name}={value!r} is unknown; choose one of {list(choices)}")


class Actions(NamedTuple):
    """Per-action quantities of method.md §2.2, in the state frame ([B, T-1] each)."""

    valid: jax.Array  # bool: tokens[:, j+1] is an agent action of the episode
    q: jax.Array  # Q(s, a) = alpha * l[a]
    v: jax.Array  # V(s) = alpha * logsumexp(l_j)
    v_next: jax.Array  # V(s'), 0 after eos under terminal='zero'
    log_pi: jax.Array  # log pi(a | s) (independent of alpha)
    pi_bkspc: jax.Array  # pi(<bkspc> | s)
    discount: jax.Array  # gamma ** (agent actions before this one)
    weight: jax.Array  # action weight aw (0 for masked noise actions)
    ended: jax.Array  # bool [B]: the episode ends with an eos action


def action_valid(tokens: jax.Array, prompt_len: jax.Array, length: jax.Array, eos_id: int):
    """[B, T-1] bool: `tokens[:, j+1]` is an action (`m <= j+1 < n`, no earlier eos action).

    An `eos` action ends the episode, so anything after the first `eos` *action* (eos in the
    prompt is ordinary context) is not part of it.
    """
    T = tokens.shape[1]
    t = jnp.arange(1, T)[None, :]
    in_range = (t >= prompt_len[:, None]) & (t < length[:, None])
    eos_act = in_range & (tokens[:, 1:] == eos_id)
    eos_before = jnp.cumsum(eos_act, axis=1) - eos_act  # eos actions strictly before t
    return in_range & (eos_before == 0)


def _after_environment(env: jax.Array) -> jax.Array:
    """[B, T-1] int: for the action in state frame `j`, the position whose state follows it
    once the environment's actions right after it have run (`env`: [B, T-1] bool, state frame).

    Without environment actions that is `j + 1`; with a run of them at `j + 2 ..`, the last
    position of the run. Position `u` is "not environment" when `u == 0` or `~env[:, u-1]`;
    the answer is (first such `u > j + 1`) - 1, with `T` standing in when there is none.
    """
    B, J = env.shape
    T = J + 1
    pos = jnp.broadcast_to(jnp.arange(T + 1), (B, T + 1))
    is_env = jnp.pad(env, ((0, 0), (1, 1)))  # position u (0..T), False at 0 and at T
    first_free = jax.lax.cummin(jnp.where(is_env, T, pos), axis=1, reverse=True)
    return first_free[:, 2:] - 1


def per_action(
    logits: jax.Array,
    tokens: jax.Array,
    prompt_len: jax.Array,
    length: jax.Array,
    *,
    eos_id: int,
    gamma: float,
    action_weight: jax.Array | None = None,
    temperature: float = 1.0,
    terminal: str = "zero",
    masked_actions: str = "unrewarded",
) -> Actions:
    """Section 2.2 (with the options of 2.7) for every action of every row.

    Under `masked_actions='environment'` an action of weight 0 is the environment's: it is not
    `valid` (enters no term), the agent action before a run of them reads `v_next` at the end
    of the run, and the discount counts agent actions only. Gradients flow through q, v and
    v_next.
    """
    _check_choice("terminal", terminal, TERMINAL)
    _check_choice("masked_actions", masked_actions, MASKED_ACTIONS)
    logits = logits.astype(jnp.float32)
    tokens = tokens.astype(jnp.int32)
    prompt_len = prompt_len.astype(jnp.int32)
    length = length.astype(jnp.int32)
    a_BxJ = tokens[:, 1:]
    in_episode = action_valid(tokens, prompt_len, length, eos_id)
    is_eos = in_episode & (a_BxJ == eos_id)
    ended = jnp.any(is_eos, axis=1)
    if action_weight is None:
        weight = jnp.ones(a_BxJ.shape, jnp.float32)
    else:
        weight = action_weight[:, 1:].astype(jnp.float32)
    if masked_actions == "environment":
        env = in_episode & (weight == 0)
        valid = in_episode & ~env
        steps = jnp.cumsum(valid, axis=1) - valid  # agent actions before this one
        nxt = _after_environment(env)
    else:
        valid = in_episode
        steps = jnp.arange(1, tokens.shape[1])[None, :] - prompt_len[:, None]
        nxt = None
    lse_BxT = jax.nn.logsumexp(logits, axis=-1)
    # Zero every quantity outside the episode *before* any nonlinearity: garbage logits at
    # padding (-inf, or huge) would otherwise give 0 * inf = NaN in the backward pass.
    q = jnp.take_along_axis(logits[:, :-1], a_BxJ[..., None], axis=-1)[..., 0]
    q = jnp.where(valid, q, 0.0)
    v = jnp.where(valid, lse_BxT[:, :-1], 0.0)
    lse_next = lse_BxT[:, 1:] if nxt is None else jnp.take_along_axis(lse_BxT, nxt, axis=1)
    reads_next = valid if terminal == "bootstrap" else valid & (a_BxJ != eos_id)
    v_next = jnp.where(reads_next, lse_next, 0.0)
    discount = jnp.where(valid, jnp.float32(gamma) ** jnp.maximum(steps, 0), 0.0)
    pi_bkspc = jnp.where(valid, jnp.exp(logits[:, :-1, -1] - v), 0.0)
    alpha = jnp.float32(temperature)
    return Actions(
        valid, alpha * q, alpha * v, alpha * v_next, q - v, pi_bkspc, discount, weight, ended
    )


def _phi(divergence: str, r: jax.Array, clamp_margin: float) -> tuple[jax.Array, jax.Array]:
    """phi(r) of method.md §2.4 and a bool array of where r was clamped into phi's domain."""
    if divergence in ("chi2_mix", "chi2"):
        return r, jnp.zeros(r.shape, bool)
    if divergence == "kl":
        return -jnp.exp(-(r + 1.0)), jnp.zeros(r.shape, bool)
    lo = {"js": -math.log(2.0), "hellinger": -1.0}[divergence] + clamp_margin
    clamped = r < lo
    rc = jnp.maximum(r, lo)
    if divergence == "js":
        return jnp.log(2.0 - jnp.exp(-rc)), clamped
    return rc / (1.0 + rc), clamped


def _group_mean(f, weight, group, n_group):
    return jnp.sum(jnp.where(group, weight * f, 0.0)) / jnp.maximum(n_group, 1e-9)


def _group_count(rw, group, normalize: str):
    """N_G: the group's (row-weighted) action count, or its count of rows with an action."""
    if normalize == "row":
        return jnp.sum(jnp.where(jnp.any(group, axis=1), rw, 0.0))
    return jnp.sum(jnp.where(group, rw[:, None], 0.0))


def sequence_match_loss(
    logits: jax.Array,
    tokens: jax.Array,
    prompt_len: jax.Array,
    length: jax.Array,
    is_model: jax.Array,
    *,
    eos_id: int,
    divergence: str = "chi2_mix",
    gamma: float = 0.998,
    chi2_coef: float = 0.25,
    value_on: str = "mix",
    temperature: float = 1.0,
    terminal: str = "zero",
    masked_actions: str = "unrewarded",
    normalize: str = "token",
    truncated_weight: float = 1.0,
    action_weight: jax.Array | None = None,
    row_weight: jax.Array | None = None,
    clamp_margin: float = 1e-3,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The SequenceMatch objective of method.md §2.4 (to be minimised) and its diagnostics.

    Args:
      logits: [B, T, V+1] model outputs at the backspace-layout positions of `tokens`.
      tokens: int32 [B, T] rows (prompt, actions, padding).
      prompt_len, length: int32 [B].
      is_model: bool [B], True for rows generated by the policy.
      eos_id: the terminal token.
      divergence: one of `DIVERGENCES`.
      gamma: discount.
      chi2_coef: `c`, weight of the `r^2` term (chi2 variants only).
      value_on: `mix` (needs model rows; falls back to data when a batch has none) or `data`.
      temperature: alpha > 0. Q and V are alpha times the logits' values and the objective is
        divided by alpha: the linear terms keep their scale, the r^2 term is
        `c * alpha * (l[a] - gamma * lse(l'))^2` (2.7). 1 is revision 1.
      terminal: `zero` (V after eos is 0) or `bootstrap` (read at the eos position).
      masked_actions: `unrewarded` (an action of weight 0 keeps its value term) or
        `environment` (it is a transition of the environment and enters no term).
      normalize: `token` (divide by the group's action count) or `row` (by its row count).
      truncated_weight: row weight of a model row whose episode does not end with eos (cut off
        by the action budget or the row length) [ours]; 1 keeps it, 0 drops it.
      action_weight: optional float [B, T] aligned with `tokens`: weight of action
        `tokens[b, t]` (0 for masked noise tokens) in the data and `r^2` terms.
      row_weight: optional float [B]: a row of weight k counts as k copies of it (default 1).
      clamp_margin: js / hellinger clamp `r` to `lower bound + clamp_margin` [ours].

    Returns:
      `(loss, metrics)`; metrics hold the method.md §2.6 diagnostics under `sm/...`. The terms
      are reported divided by alpha (their contribution to the loss), r and V at scale alpha.
    """
    _check_choice("divergence", divergence, DIVERGENCES)
    _check_choice("value_on", value_on, VALUE_ON)
    _check_choice("normalize", normalize, NORMALIZE)
    act = per_action(
        logits,
        tokens,
        prompt_len,
        length,
        eos_id=eos_id,
        gamma=gamma,
        action_weight=action_weight,
        temperature=temperature,
        terminal=terminal,
        masked_actions=masked_actions,
    )
    rw = jnp.ones(tokens.shape[0]) if row_weight is None else row_weight.astype(jnp.float32)
    is_model = jnp.asarray(is_model, bool)
    cut = is_model & ~act.ended
    rw = jnp.where(cut, rw * truncated_weight, rw)
    kept = rw > 0
    data_g = act.valid & (~is_model & kept)[:, None]
    model_g = act.valid & (is_model & kept)[:, None]
    n_data = _group_count(rw, data_g, normalize)
    n_model = _group_count(rw, model_g, normalize)
    has_model = n_model > 0

    def e_data(f, weighted):
        wt = rw[:, None] * act.discount * (act.weight if weighted else 1.0)
        return _group_mean(f, wt, data_g, n_data)

    def e_model(f, weighted):
        wt = rw[:, None] * act.discount * (act.weight if weighted else 1.0)
        return _group_mean(f, wt, model_g, n_model)

    def e_mix(f, weighted):
        mixed = 0.5 * e_data(f, weighted) + 0.5 * e_model(f, weighted)
        return jnp.where(has_model, mixed, e_data(f, weighted))

    alpha = jnp.float32(temperature)
    r = act.q - gamma * act.v_next
    phi, clamped = _phi(divergence, r, clamp_margin)
    data_term = e_data(phi, True) / alpha
    telescoped = act.v - gamma * act.v_next
    value_term = (e_mix if value_on == "mix" else e_data)(telescoped, False) / alpha
    if divergence == "chi2_mix":
        r2_term = e_mix(r * r, True) / alpha
    elif divergence == "chi2":
        r2_term = e_data(r * r, True) / alpha
    else:
        r2_term = jnp.float32(0.0)
    coef = chi2_coef if divergence in ("chi2_mix", "chi2") else 0.0
    loss = -data_term + value_term + coef * r2_term

    def plain_mean(f, group):
        return jnp.sum(jnp.where(group, f, 0.0)) / jnp.maximum(jnp.sum(group), 1)

    n_model_rows = jnp.sum(is_model)
    metrics = {
        "sm/loss": loss,
        "sm/data_term": data_term,
        "sm/value_term": value_term,
        "sm/r2_term": r2_term,
        "sm/r_data": plain_mean(r, data_g),
        "sm/r_model": plain_mean(r, model_g),
        "sm/v_mean": plain_mean(act.v, data_g | model_g),
        "sm/clamp_frac": plain_mean(clamped.astype(jnp.float32), data_g | model_g),
        "sm/pi_bkspc_data": plain_mean(act.pi_bkspc, data_g),
        "sm/pi_bkspc_model": plain_mean(act.pi_bkspc, model_g),
        "sm/n_data_actions": jnp.sum(data_g),
        "sm/n_model_actions": jnp.sum(model_g),
        # Model rows whose episode ends with eos (the rest were cut off; truncated_weight).
        "sm/model_ended_frac": jnp.sum(is_model & act.ended) / jnp.maximum(n_model_rows, 1),
    }
    return loss, metrics


def bc_loss(
    logits: jax.Array,
    tokens: jax.Array,
    prompt_len: jax.Array,
    length: jax.Array,
    is_model: jax.Array | None = None,
    *,
    eos_id: int,
    action_weight: jax.Array | None = None,
    row_weight: jax.Array | None = None,
    masked_actions: str = "unrewarded",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Behavioural cloning (method.md §2.5): `-sum aw * log pi(a|s) / N_data` over data rows.

    Undiscounted, a global token mean, backspace actions included. On data without noise this
    is maximum likelihood. Model rows (`is_model`) are ignored. Under
    `masked_actions='environment'` actions of weight 0 are not counted in `N_data` either.
    """
    act = per_action(
        logits,
        tokens,
        prompt_len,
        length,
        eos_id=eos_id,
        gamma=1.0,
        action_weight=action_weight,
        masked_actions=masked_actions,
    )
    B = tokens.shape[0]
    rw = jnp.ones(B) if row_weight is None else row_weight.astype(jnp.float32)
    data_row = jnp.ones(B, bool) if is_model is None else ~jnp.asarray(is_model, bool)
    g = act.valid & data_row[:, None]
    n = jnp.sum(jnp.where(g, rw[:, None], 0.0))
    loss = -jnp.sum(jnp.where(g, rw[:, None] * act.weight * act.log_pi, 0.0)) / jnp.maximum(n, 1e-9)
    argmax_ok = jnp.argmax(logits[:, :-1], axis=-1) == tokens[:, 1:]
    acc = jnp.sum(g & argmax_ok) / jnp.maximum(jnp.sum(g), 1)
    return loss, {"bc/loss": loss, "bc/token_accuracy": acc}


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
