"""SequenceMatch and behavioural-cloning losses (SPEC 2): pure functions of logits and tokens.

The logits are soft Q-values: at the position `j` representing state `s`, `Q(s, a) = l_j[a]`,
`V(s) = logsumexp(l_j)` and `pi = softmax(l_j)`. Action `t` of a row (`m <= t < n`, `a =
tokens[t]`) moves the state represented at `j = t - 1` to the one represented at `t`, so

    r = l_{t-1}[a] - gamma * V(s_t),   V(s_t) = 0 when a == eos (terminal),

with discount `w = gamma ** (t - m)`. Expectations are global token means per group (`data`
rows vs `model` rows), never per-row means. Everything here is model-agnostic: `logits` are
whatever the model produced on the backspace layout of `tokens` (masks.py).

All per-action arrays use the *state* frame: index `j` in `[0, T-1)` stands for the action
`tokens[:, j + 1]` taken from the state at position `j`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

DIVERGENCES = ("chi2_mix", "chi2", "kl", "js", "hellinger")
VALUE_ON = ("mix", "data")


class Actions(NamedTuple):
    """Per-action quantities of SPEC 2.2, in the state frame ([B, T-1] each)."""

    valid: jax.Array  # bool: tokens[:, j+1] is an action of the episode
    q: jax.Array  # Q(s, a)
    v: jax.Array  # V(s) = logsumexp(l_j)
    v_next: jax.Array  # V(s') or 0 after eos
    log_pi: jax.Array  # log pi(a | s)
    pi_bkspc: jax.Array  # pi(<bkspc> | s)
    discount: jax.Array  # gamma ** (i - 1)
    weight: jax.Array  # action weight aw (0 for masked noise actions)


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


def per_action(
    logits: jax.Array,
    tokens: jax.Array,
    prompt_len: jax.Array,
    length: jax.Array,
    *,
    eos_id: int,
    gamma: float,
    action_weight: jax.Array | None = None,
) -> Actions:
    """SPEC 2.2 for every action of every row. Gradients flow through q, v and v_next."""
    logits = logits.astype(jnp.float32)
    tokens = tokens.astype(jnp.int32)
    prompt_len = prompt_len.astype(jnp.int32)
    length = length.astype(jnp.int32)
    a_BxJ = tokens[:, 1:]
    valid = action_valid(tokens, prompt_len, length, eos_id)
    lse_BxT = jax.nn.logsumexp(logits, axis=-1)
    # Zero every quantity outside the episode *before* any nonlinearity: garbage logits at
    # padding (-inf, or huge) would otherwise give 0 * inf = NaN in the backward pass.
    q = jnp.take_along_axis(logits[:, :-1], a_BxJ[..., None], axis=-1)[..., 0]
    q = jnp.where(valid, q, 0.0)
    v = jnp.where(valid, lse_BxT[:, :-1], 0.0)
    v_next = jnp.where(valid & (a_BxJ != eos_id), lse_BxT[:, 1:], 0.0)
    steps = jnp.arange(1, tokens.shape[1])[None, :] - prompt_len[:, None]  # i - 1
    discount = jnp.where(valid, jnp.float32(gamma) ** jnp.maximum(steps, 0), 0.0)
    pi_bkspc = jnp.where(valid, jnp.exp(logits[:, :-1, -1] - v), 0.0)
    weight = jnp.ones_like(q) if action_weight is None else action_weight[:, 1:].astype(jnp.float32)
    return Actions(valid, q, v, v_next, q - v, pi_bkspc, discount, weight)


def _phi(divergence: str, r: jax.Array, clamp_margin: float) -> tuple[jax.Array, jax.Array]:
    """phi(r) of SPEC 2.4 and a bool array of where r was clamped into phi's domain."""
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
    action_weight: jax.Array | None = None,
    row_weight: jax.Array | None = None,
    clamp_margin: float = 1e-3,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The SequenceMatch objective of SPEC 2.4 (to be minimised) and its diagnostics.

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
      action_weight: optional float [B, T] aligned with `tokens`: weight of action
        `tokens[b, t]` (0 for masked noise tokens) in the data and `r^2` terms.
      row_weight: optional float [B]: a row of weight k counts as k copies of it (default 1).
      clamp_margin: js / hellinger clamp `r` to `lower bound + clamp_margin` [ours].

    Returns:
      `(loss, metrics)`; metrics hold the SPEC 2.6 diagnostics under `sm/...`.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {DIVERGENCES}")
    if value_on not in VALUE_ON:
        raise ValueError(f"unknown value_on {value_on!r}; choose one of {VALUE_ON}")
    act = per_action(
        logits,
        tokens,
        prompt_len,
        length,
        eos_id=eos_id,
        gamma=gamma,
        action_weight=action_weight,
    )
    rw = jnp.ones(tokens.shape[0]) if row_weight is None else row_weight.astype(jnp.float32)
    model_row = jnp.asarray(is_model, bool)[:, None]
    data_g = act.valid & ~model_row
    model_g = act.valid & model_row
    cnt = rw[:, None] * act.valid
    n_data = jnp.sum(jnp.where(data_g, cnt, 0.0))
    n_model = jnp.sum(jnp.where(model_g, cnt, 0.0))
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

    r = act.q - gamma * act.v_next
    phi, clamped = _phi(divergence, r, clamp_margin)
    data_term = e_data(phi, True)
    telescoped = act.v - gamma * act.v_next
    value_term = e_mix(telescoped, False) if value_on == "mix" else e_data(telescoped, False)
    if divergence == "chi2_mix":
        r2_term = e_mix(r * r, True)
    elif divergence == "chi2":
        r2_term = e_data(r * r, True)
    else:
        r2_term = jnp.float32(0.0)
    coef = chi2_coef if divergence in ("chi2_mix", "chi2") else 0.0
    loss = -data_term + value_term + coef * r2_term

    def plain_mean(f, group):
        return jnp.sum(jnp.where(group, f, 0.0)) / jnp.maximum(jnp.sum(group), 1)

    metrics = {
        "sm/loss": loss,
        "sm/data_term": data_term,
        "sm/value_term": value_term,
        "sm/r2_term": r2_term,
        "sm/r_data": plain_mean(r, data_g),
        "sm/r_model": plain_mean(r, model_g),
        "sm/v_mean": plain_mean(act.v, act.valid),
        "sm/clamp_frac": plain_mean(clamped.astype(jnp.float32), act.valid),
        "sm/pi_bkspc_data": plain_mean(act.pi_bkspc, data_g),
        "sm/pi_bkspc_model": plain_mean(act.pi_bkspc, model_g),
        "sm/n_data_actions": jnp.sum(data_g),
        "sm/n_model_actions": jnp.sum(model_g),
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
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Behavioural cloning (SPEC 2.5): `-sum aw * log pi(a|s) / N_data` over data rows.

    Undiscounted, a global token mean, backspace actions included. On data without noise this
    is maximum likelihood. Model rows (`is_model`) are ignored.
    """
    act = per_action(
        logits, tokens, prompt_len, length, eos_id=eos_id, gamma=1.0, action_weight=action_weight
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


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The loss fields of an experiment config (`config.loss`); see configs/ for comments."""

    bc_weight: float = 1.0  # weight of L_BC in the total
    sm_weight: float = 1.0  # weight of L_SM in the total (after the warm-up)
    bc_warmup_steps: int = 0  # steps of pure BC (sm_weight = 0) before the mix [ours]
    divergence: str = "chi2_mix"  # one of DIVERGENCES
    gamma: float = 0.998  # discount
    chi2_coef: float = 0.25  # c, weight of the r^2 term
    value_on: str = "mix"  # 'mix' (needs sampling) or 'data' (offline)
    clamp_margin: float = 1e-3  # js/hellinger: clamp r to its domain bound + margin [ours]
    unlikelihood_weight: float = 0.0  # weight of token-level unlikelihood (MLE + UL baseline)

    def __post_init__(self):
        if self.divergence not in DIVERGENCES:
            raise ValueError(
                f"loss.divergence={self.divergence!r} is unknown; choose one of {DIVERGENCES}"
            )
        if self.value_on not in VALUE_ON:
            raise ValueError(
                f"loss.value_on={self.value_on!r} is unknown; choose one of {VALUE_ON}"
            )
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"loss.gamma={self.gamma} must be in (0, 1]")
        if min(self.bc_weight, self.sm_weight, self.chi2_coef, self.unlikelihood_weight) < 0:
            raise ValueError(
                "loss.bc_weight, sm_weight, chi2_coef and unlikelihood_weight must be >= 0"
            )
        if self.bc_warmup_steps < 0:
            raise ValueError("loss.bc_warmup_steps must be >= 0")

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> LossConfig:
        """Builds from a dict or ConfigDict, rejecting unknown keys with the list of known ones."""
        items = dict(cfg.items())
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(items) - known)
        if unknown:
            raise ValueError(f"unknown loss config keys {unknown}; known keys: {sorted(known)}")
        return cls(**items)


class Batch(NamedTuple):
    """A training batch of rows (data and model rows together)."""

    tokens: jax.Array  # int32 [B, T]
    prompt_len: jax.Array  # int32 [B]
    length: jax.Array  # int32 [B]
    is_model: jax.Array  # bool [B]
    action_weight: jax.Array  # float32 [B, T]


LossFn = Callable[[jax.Array, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def make_loss_fn(cfg: LossConfig | Mapping[str, Any], *, eos_id: int) -> LossFn:
    """`loss_fn(logits, batch, step) -> (loss, metrics)`.

    The total is `bc_weight * L_BC + sm_weight * L_SM + unlikelihood_weight * L_UL`.

    During the first `bc_warmup_steps` steps the SequenceMatch weight is 0 (pure BC). `step`
    may be traced, so the same compiled step serves both phases.
    """
    cfg = cfg if isinstance(cfg, LossConfig) else LossConfig.from_mapping(cfg)

    def loss_fn(logits, batch: Batch, step):
        args = (logits, batch.tokens, batch.prompt_len, batch.length, batch.is_model)
        metrics: dict[str, jax.Array] = {}
        total = jnp.float32(0.0)
        if cfg.bc_weight > 0:
            bc, m = bc_loss(*args, eos_id=eos_id, action_weight=batch.action_weight)
            total += cfg.bc_weight * bc
            metrics.update(m)
        if cfg.unlikelihood_weight > 0:
            ul, m = unlikelihood_loss(*args, eos_id=eos_id)
            total += cfg.unlikelihood_weight * ul
            metrics.update(m)
        if cfg.sm_weight > 0:
            sm, m = sequence_match_loss(
                *args,
                eos_id=eos_id,
                divergence=cfg.divergence,
                gamma=cfg.gamma,
                chi2_coef=cfg.chi2_coef,
                value_on=cfg.value_on,
                action_weight=batch.action_weight,
                clamp_margin=cfg.clamp_margin,
            )
            sm_w = jnp.where(step < cfg.bc_warmup_steps, 0.0, cfg.sm_weight)
            total += sm_w * sm
            metrics.update(m)
            metrics["sm/weight"] = sm_w
        metrics["loss"] = total
        return total, metrics

    return loss_fn
