"""SequenceMatch and behavioural-cloning losses (method.md §2): pure functions of
logits and tokens.

The logits are soft Q-values at temperature `alpha` (method.md §2.7): at the position `j`
representing state `s`, `Q(s, a) = alpha * l_j[a]`, `V(s) = alpha * logsumexp(l_j)` and
`pi = softmax(l_j)`. Action `t` of a row (`m <= t < n`, `a = tokens[t]`) moves the state
represented at `j = t - 1` to the one represented at `t`, so

    r = Q(s, a) - gamma * V(s'),   V(s') = 0 after eos unless terminal='bootstrap',

with discount `w = gamma ** k` (`k`: the actions of the episode before this one). The
divergence is a row of the table `DIVERGENCES` (`phi`, its domain, where its
`r^2` term is taken); `register_divergence` adds one. The kernels take their options (the
divergence's name, `gamma`, and the revision-2 options `temperature`, `terminal`,
`masked_actions`, `normalize`, `truncated_weight`) as keyword arguments without defaults, named
as the fields of `objective.LossConfig`, which holds the defaults (`LossConfig.REVISION_1` the
revision-1 values) and checks the choices. Expectations are per group (`data` rows vs `model`
rows): global token means (`normalize='token'`) or per-episode means (`'row'`), never per-row
means. Everything here is model-agnostic: `logits` are whatever the model produced on the
backspace layout of `tokens` (masks.py).

All per-action arrays use the *state* frame: index `j` in `[0, T-1)` stands for the action
`tokens[:, j + 1]` taken from the state at position `j`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

VALUE_ON = ("mix", "data")  # the groups a value term (and an r^2 term) may be taken on
TERMINAL = ("zero", "bootstrap")
MASKED_ACTIONS = ("unrewarded", "environment")
NORMALIZE = ("token", "row")


@dataclasses.dataclass(frozen=True)
class Divergence:
    """A row of the divergence table (method.md §2.4): the data term is `E_data[aw * phi(r)]`.

    `phi` is elementwise on float32 arrays (traced; it needs a gradient) and defined for
    `r > lower`; with a `lower` bound, r is clamped to `lower + clamp_margin` first and the
    clamped fraction reported (`sm/clamp_frac`). `r2_on` is the group of the `chi2_coef * r^2`
    term: 'mix', 'data', or None for no such term.
    """

    name: str
    phi: Callable[[jax.Array], jax.Array]
    lower: float | None = None
    r2_on: str | None = None

    def __post_init__(self) -> None:
        if self.r2_on is not None and self.r2_on not in VALUE_ON:
            raise ValueError(
                f"divergence {self.name!r}: r2_on={self.r2_on!r}; choose one of {[*VALUE_ON, None]}"
            )


# name -> Divergence. `loss.divergence` chooses among the registered names (LossConfig.CHOICES
# reads this dict), so a divergence registered at run time is a valid config value.
DIVERGENCES: dict[str, Divergence] = {}


def register_divergence(divergence: Divergence) -> Divergence:
    """Adds `divergence` to the table under its name (raises if the name is taken)."""
    if divergence.name in DIVERGENCES:
        raise ValueError(f"divergence {divergence.name!r} is already registered")
    DIVERGENCES[divergence.name] = divergence
    return divergence


def unregister_divergence(name: str) -> None:
    """Removes a registered divergence (e.g. one a test registered for itself)."""
    del DIVERGENCES[name]


def get_divergence(name: str) -> Divergence:
    """The registered divergence `name`; raises naming the registered ones."""
    try:
        return DIVERGENCES[name]
    except KeyError:
        raise ValueError(
            f"loss.divergence={name!r} is not registered; choose one of {list(DIVERGENCES)} "
            "(losses.register_divergence adds one)"
        ) from None


register_divergence(Divergence("chi2_mix", lambda r: r, r2_on="mix"))
register_divergence(Divergence("chi2", lambda r: r, r2_on="data"))
register_divergence(Divergence("kl", lambda r: -jnp.exp(-(r + 1.0))))
register_divergence(Divergence("js", lambda r: jnp.log(2.0 - jnp.exp(-r)), lower=-math.log(2.0)))
register_divergence(Divergence("hellinger", lambda r: r / (1.0 + r), lower=-1.0))


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
    action_weight: jax.Array | None,
    temperature: float,
    terminal: str,
    masked_actions: str,
) -> Actions:
    """Section 2.2 (with the options of 2.7) for every action of every row.

    Under `masked_actions='environment'` an action of weight 0 is the environment's: it is not
    `valid` (enters no term), the agent action before a run of them reads `v_next` at the end
    of the run, and the discount counts agent actions only. Gradients flow through q, v and
    v_next.
    """
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


def _phi(div: Divergence, r: jax.Array, clamp_margin: float) -> tuple[jax.Array, jax.Array]:
    """phi(r) of method.md §2.4 and a bool array of where r was clamped into phi's domain."""
    if div.lower is None:
        return div.phi(r), jnp.zeros(r.shape, bool)
    lo = div.lower + clamp_margin
    return div.phi(jnp.maximum(r, lo)), r < lo


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
    divergence: str,
    gamma: float,
    chi2_coef: float,
    value_on: str,
    temperature: float,
    terminal: str,
    masked_actions: str,
    normalize: str,
    truncated_weight: float,
    clamp_margin: float,
    action_weight: jax.Array | None = None,
    row_weight: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The SequenceMatch objective of method.md §2.4 (to be minimised) and its diagnostics.

    The options are the `objective.LossConfig` fields of the same names, without defaults
    (`LossConfig(**LossConfig.REVISION_1)` is revision 1); the section checked the choices.

    Args:
      logits: [B, T, V+1] model outputs at the backspace-layout positions of `tokens`.
      tokens: int32 [B, T] rows (prompt, actions, padding).
      prompt_len, length: int32 [B].
      is_model: bool [B], True for rows generated by the policy.
      eos_id: the terminal token.
      divergence: the name of a registered divergence (`DIVERGENCES`).
      gamma: discount.
      chi2_coef: `c`, weight of the `r^2` term (divergences with `r2_on`: chi2_mix, chi2).
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
      clamp_margin: a divergence with a `lower` bound (js, hellinger) clamps `r` to
        `lower + clamp_margin` [ours].

    Returns:
      `(loss, metrics)`; metrics hold the method.md §2.6 diagnostics under `sm/...`. The terms
      are reported divided by alpha (their contribution to the loss), r and V at scale alpha.
    """
    div = get_divergence(divergence)
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
    phi, clamped = _phi(div, r, clamp_margin)
    data_term = e_data(phi, True) / alpha
    telescoped = act.v - gamma * act.v_next
    expect = {"mix": e_mix, "data": e_data}
    value_term = expect[value_on](telescoped, False) / alpha
    if div.r2_on is None:
        r2_term, coef = jnp.float32(0.0), 0.0
    else:
        r2_term, coef = expect[div.r2_on](r * r, True) / alpha, chi2_coef
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
    masked_actions: str,
    action_weight: jax.Array | None = None,
    row_weight: jax.Array | None = None,
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
        action_weight=action_weight,
        masked_actions=masked_actions,
        # BC reads log pi and the weights only: the discount, alpha and V(s') do not enter.
        gamma=1.0,
        temperature=1.0,
        terminal="zero",
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
