"""Batched sampling with `<bkspc>` over a functional KV cache (method.md §5): one jitted while_loop.

The cache holds the current state's tokens only; a row's cache length is its state length.

* a token `a`: its K/V are written at slot `len` (position `len`), `len += 1`;
* `<bkspc>`: `len -= 1`, then the new last token is re-fed at its position, overwriting an
  identical cache slot, to get the next logits: one forward step, the online twin of the
  layout in masks.py (a copy of the top token at the top's position).

With `no_repeat_deleted`, a token deleted from a state is not chosen again at that state (a
state is identified by its length while nothing below it changes: deleting `x` appended at
length `L` bans `x` at length `L` until a token is appended at length `L - 1`); a row whose
every action is banned ends with eos. Without it, greedy decoding after `x <bkspc>` is back in
the same state with the same logits and picks `x` again.

`<bkspc>` is masked while the state equals the prompt; `eos` ends a row; a row also stops after
`max_actions` actions (bounding write/delete loops) or when its state holds `max_new_tokens`
new tokens (a truncated episode). Rows are ragged: each has its own prompt length.

Outputs are the action rows (prompt + actions, directly usable by `backspace_layout` and the
losses, e.g. for the replay buffer) and the final rows after backspaces.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from smatch_jax import sharding
from smatch_jax.errors import UserError
from smatch_jax.models import init_cache
from smatch_jax.sections import Section


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Decoding controls. Hashable: it is a static argument of the compiled sampler."""

    max_new_tokens: int = 64  # most new tokens a state may hold (cache = prompt + this)
    max_actions: int | None = None  # most actions per row; default 2 * max_new_tokens
    temperature: float = 1.0  # logits are divided by it (ignored when greedy)
    top_k: int = 0  # keep the k most likely actions (0: all)
    top_p: float = 1.0  # nucleus: smallest set with probability >= top_p (1: all)
    greedy: bool = False  # argmax instead of sampling
    bkspc_logit_bias: float = 0.0  # added to the <bkspc> logit before sampling
    allow_bkspc: bool = True  # False: <bkspc> is never emitted (plain sampling)
    no_repeat_deleted: bool = False  # a token deleted from a state is not chosen there again
    # > 0: <bkspc> is forced when V(s) = logsumexp(logits(s)) is more than this below V of the
    # state before the last token (value-guided deletion [ours]; 0: off)
    value_drop_bkspc: float = 0.0
    return_logits: bool = False  # also return the raw model logits of every step

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.max_actions is not None and self.max_actions < 1:
            raise ValueError(f"max_actions={self.max_actions} must be >= 1")
        if self.temperature <= 0 and not self.greedy:
            raise ValueError("temperature must be > 0; use greedy=True for argmax decoding")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0")
        if self.value_drop_bkspc < 0:
            raise ValueError(f"value_drop_bkspc={self.value_drop_bkspc} must be >= 0 (0: off)")

    @property
    def n_actions(self) -> int:
        return self.max_actions if self.max_actions is not None else 2 * self.max_new_tokens


@dataclasses.dataclass(frozen=True)
class PolicySamplingConfig(Section):
    """`config.sampling`: how the policy samples the model rows of SequenceMatch (method.md §6)."""

    NAME: ClassVar[str] = "sampling"
    sample_every: int = 10  # refill the replay buffer every N SequenceMatch steps
    temperature: float = 1.0  # sampler temperature for model rows
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    bkspc_logit_bias: float = 0.0  # added to the <bkspc> logit when sampling
    allow_bkspc: bool = True  # False: the sampler never backspaces

    RANGES: ClassVar[tuple[tuple[str, Any, Any, bool], ...]] = (
        ("sample_every", 1, None, True),
        ("temperature", 0.0, None, False),
        ("top_k", 0, None, True),
        ("top_p", 0.0, 1.0, False),
    )

    def decoding(self, budget: int) -> SamplingConfig:
        """The sampler's controls, with `budget` actions and new tokens per row (the room the
        row length leaves after the prompt)."""
        return SamplingConfig(
            max_new_tokens=budget,
            max_actions=budget,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            bkspc_logit_bias=self.bkspc_logit_bias,
            allow_bkspc=self.allow_bkspc,
        )


class SampleOutput(NamedTuple):
    actions: jax.Array  # int32 [B, P + max_actions]: prompt then actions, padded
    length: jax.Array  # int32 [B]: prompt_len + number of actions
    final: jax.Array  # int32 [B, P + max_new_tokens]: the state after backspaces, padded
    final_length: jax.Array  # int32 [B]
    n_bkspc: jax.Array  # int32 [B]: backspaces emitted
    ended: jax.Array  # bool [B]: the row emitted eos (else truncated)
    step_logits: jax.Array | None  # float32 [B, max_actions, V+1] raw logits of each step


def _filter_logits(logits_BxA: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Temperature, top-k and top-p; removed actions get -inf."""
    x = logits_BxA / cfg.temperature
    if cfg.top_k and cfg.top_k < x.shape[-1]:
        kth = jax.lax.top_k(x, cfg.top_k)[0][:, -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    if cfg.top_p < 1.0:
        order = jnp.argsort(-x, axis=-1)
        sorted_x = jnp.take_along_axis(x, order, axis=-1)
        cum = jnp.cumsum(jax.nn.softmax(sorted_x, axis=-1), axis=-1)
        keep_sorted = (cum - jax.nn.softmax(sorted_x, axis=-1)) < cfg.top_p  # top-1 always kept
        keep = (
            jnp.zeros_like(keep_sorted).at[jnp.arange(x.shape[0])[:, None], order].set(keep_sorted)
        )
        x = jnp.where(keep, x, -jnp.inf)
    return x


def _choose(key, logits_BxA, state_len, floor_len, cfg: SamplingConfig, ids, banned):
    """The next action of every row; `banned` [B, V+1] bool (or None): actions not allowed.
    A row with every action removed ends with eos."""
    bkspc_id, eos_id = ids
    bk_ok = cfg.allow_bkspc & (state_len > floor_len)
    x = logits_BxA.at[:, bkspc_id].add(cfg.bkspc_logit_bias)
    x = x.at[:, bkspc_id].set(jnp.where(bk_ok, x[:, bkspc_id], -jnp.inf))
    if banned is not None:
        x = jnp.where(banned, -jnp.inf, x)
    if cfg.greedy:
        a = jnp.argmax(x, axis=-1).astype(jnp.int32)
    else:
        a = jax.random.categorical(key, _filter_logits(x, cfg), axis=-1).astype(jnp.int32)
    if banned is None:
        return a
    return jnp.where(jnp.isneginf(x).all(axis=-1), jnp.int32(eos_id), a)


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "eos_id", "pad_id", "layout"))
def sample_jit(
    graphdef, params, prompts, prompt_len, key, floor_len, *, cfg, eos_id, pad_id, layout
):
    """The jitted sampler `sample` calls (the pod plan lowers it with the same arguments)."""
    model = nnx.merge(graphdef, params)
    return sample_traced(
        model,
        prompts,
        prompt_len,
        key,
        cfg=cfg,
        eos_id=eos_id,
        pad_id=pad_id,
        floor_len=floor_len,
        layout=layout,
    )


def layout_of(graphdef: Any, params: Any, batch_size: int) -> sharding.DecodeLayout | None:
    """The decode layout of the mesh the weights live on (None on one device)."""
    sh = getattr(jax.tree.leaves(params)[0], "sharding", None)
    if not isinstance(sh, jax.sharding.NamedSharding) or sh.mesh.size == 1:
        return None
    n_kv = nnx.merge(graphdef, params).config.n_kv_heads
    weights = sharding.decode_weight_specs(params)
    return sharding.decode_layout(sh.mesh, batch_size, n_kv, weights)


class PositionLimitError(UserError, ValueError):
    """Decoding would run past the positions a model has (GPT-2's learned table)."""


def check_positions(model_config, longest_prompt: int, max_new_tokens: int) -> None:
    """Refuse decoding that could reach past a GPT-2-family model's position table: there the
    logits are NaN, and greedy decoding emitted id 0 without a word."""
    need, have = longest_prompt + max_new_tokens, model_config.position_limit
    if have is not None and need > have:
        raise PositionLimitError(
            f"decoding needs {need} positions (prompt {longest_prompt} tokens + max_new_tokens "
            f"{max_new_tokens}) but this gpt2-family model has {have}: shorten the prompt or "
            f"lower max_new_tokens so that they sum to at most {have}"
        )


def sample_traced(
    model, prompts, prompt_len, key, *, cfg, eos_id, pad_id, floor_len=None, layout=None
) -> SampleOutput:
    """The sampler body, for callers already inside a jitted function (e.g. training).

    `floor_len` [B] (default `prompt_len`): `<bkspc>` is allowed while the state is longer, so
    the prompt's tokens past it are actions the model may delete (the recovery evaluation).
    `layout` (`sharding.DecodeLayout`): weights, rows and KV cache are kept there, so that on
    a mesh a decode step moves activations, not weights (sharding.py); None leaves placement
    to XLA."""
    floor_len = prompt_len if floor_len is None else floor_len
    if layout is not None and layout.weights:  # gathered over fsdp here, once per call
        graphdef, weights = nnx.split(model)
        model = nnx.merge(graphdef, layout.put_weights(weights))
    rows_at = layout.put_rows if layout is not None else lambda x: x
    cache_at = layout.put_cache if layout is not None else lambda x: x
    decode = sharding.layout_decode(model, layout)  # q, k and v where the cache has its heads
    prompts, prompt_len, floor_len = rows_at(prompts), rows_at(prompt_len), rows_at(floor_len)
    B, P = prompts.shape
    stop_ids = (eos_id,) if isinstance(eos_id, int) else tuple(eos_id)  # a chat model's too
    S = P + cfg.max_new_tokens  # cache slots; a state never holds more
    A = cfg.n_actions
    bkspc_id = model.config.vocab_size
    rows = jnp.arange(B)
    slots = jnp.arange(S)

    # Prefill: the prompts, causal over their own tokens.
    cache = cache_at(init_cache(model.config, B, S))
    pos_BxP = jnp.broadcast_to(jnp.arange(P), (B, P))
    mask = (slots[None, None, :] <= pos_BxP[:, :, None]) & (slots < prompt_len[:, None])[:, None]
    logits, cache = decode(prompts, pos_BxP, mask, cache, jnp.zeros(B, jnp.int32))
    cache, next_logits = cache_at(cache), rows_at(logits[rows, prompt_len - 1])
    state = jnp.zeros((B, S), jnp.int32).at[:, :P].set(prompts)
    state = jnp.where(slots < prompt_len[:, None], state, pad_id)

    def place(**c):
        """The loop's carry in the decode layout: every [B, ...] array on `rows`, the cache
        on `cache` (left to itself, XLA re-split the carried rows inside the loop: the
        v5e-32 plan, benchmarks/RESULTS.md)."""
        if layout is None:
            return c
        per_row = lambda v: v.ndim and v.shape[0] == B
        return {
            k: cache_at(v) if k == "cache" else rows_at(v) if per_row(v) else v
            for k, v in c.items()
        }

    carry = place(
        step=jnp.int32(0),
        key=key,
        cache=cache,
        logits=next_logits,
        state=state,
        state_len=prompt_len,
        actions=jnp.full((B, P + A), pad_id, jnp.int32).at[:, :P].set(state[:, :P]),
        n_act=jnp.zeros(B, jnp.int32),
        n_bk=jnp.zeros(B, jnp.int32),
        done=jnp.zeros(B, bool),
        ended=jnp.zeros(B, bool),
        step_logits=jnp.zeros((B, A, next_logits.shape[-1]) if cfg.return_logits else (0,)),
        # no_repeat_deleted: one event per backspace, "token ev_tok was deleted from the state
        # of length ev_len", live (ev_ok) until a token is appended to the state of length
        # ev_len - 1 (a new state of length ev_len). O(B * max_actions), any vocabulary size.
        ev_tok=jnp.zeros((B, A) if cfg.no_repeat_deleted else (0,), jnp.int32),
        ev_len=jnp.zeros((B, A) if cfg.no_repeat_deleted else (0,), jnp.int32),
        ev_ok=jnp.zeros((B, A) if cfg.no_repeat_deleted else (0,), bool),
        # value_drop_bkspc: v_hist[b, j] = V of the state of length j + 1 (the prompt's from
        # the prefill); a state's parent is the state one token shorter.
        v_hist=jnp.zeros((B, S)).at[:, :P].set(jax.nn.logsumexp(logits.astype(jnp.float32), -1))
        if cfg.value_drop_bkspc
        else jnp.zeros((0,)),
    )

    def cond(c):
        return (c["step"] < A) & ~jnp.all(c["done"])

    def body(c):
        key, sub = jax.random.split(c["key"])
        live, L = ~c["done"], c["state_len"]
        banned, events = None, {}
        if cfg.no_repeat_deleted:
            hit = c["ev_ok"] & (c["ev_len"] == L[:, None])
            banned = jnp.zeros(c["logits"].shape, jnp.int32)
            banned = banned.at[rows[:, None], c["ev_tok"]].max(hit.astype(jnp.int32)) > 0
        a = _choose(sub, c["logits"], L, floor_len, cfg, (bkspc_id, stop_ids[0]), banned)
        v_hist = c["v_hist"]
        if cfg.value_drop_bkspc:
            v_now = jax.nn.logsumexp(c["logits"].astype(jnp.float32), axis=-1)
            v_hist = v_hist.at[rows, L - 1].set(v_now)
            drop = v_now - v_hist[rows, jnp.maximum(L - 2, 0)]
            force = cfg.allow_bkspc & (floor_len < L) & (drop < -cfg.value_drop_bkspc)
            a = jnp.where(force, jnp.int32(bkspc_id), a)
        is_bk = live & (a == bkspc_id)
        is_tok = live & ~is_bk
        if cfg.no_repeat_deleted:
            fresh = is_tok[:, None] & (c["ev_len"] == (L + 1)[:, None])  # a new state at L + 1
            at = jnp.where(is_bk, c["n_bk"], A)  # a deletion adds event n_bk
            events = dict(
                ev_tok=c["ev_tok"].at[rows, at].set(c["state"][rows, L - 1], mode="drop"),
                ev_len=c["ev_len"].at[rows, at].set(L - 1, mode="drop"),
                ev_ok=(c["ev_ok"] & ~fresh).at[rows, at].set(True, mode="drop"),
            )
        # What to feed: the new token at slot L; after <bkspc>, the new top again at L - 2;
        # a finished row re-feeds its own top (an identical rewrite).
        feed_at = jnp.where(is_tok, L, jnp.where(is_bk, L - 2, L - 1))
        top = c["state"][rows, feed_at]
        feed_tok = jnp.where(is_tok, a, top)
        new_len = L + is_tok - is_bk
        state = c["state"].at[rows, jnp.where(is_tok, L, S)].set(a, mode="drop")
        state = jnp.where(slots < new_len[:, None], state, pad_id)
        mask = (slots < new_len[:, None])[:, None, :]
        logits, cache = decode(feed_tok[:, None], feed_at[:, None], mask, c["cache"], feed_at)
        logits, cache = rows_at(logits), cache_at(cache)
        step_logits = c["step_logits"]
        if cfg.return_logits:
            step_logits = step_logits.at[rows, c["step"]].set(c["logits"])
        write_at = jnp.where(live, prompt_len + c["n_act"], P + A)
        ended = c["ended"] | (live & jnp.isin(a, jnp.asarray(stop_ids, jnp.int32)))
        n_act = c["n_act"] + live
        done = c["done"] | ended | (n_act >= A) | (new_len >= prompt_len + cfg.max_new_tokens)
        return place(
            step=c["step"] + 1,
            key=key,
            cache=cache,
            logits=logits[:, 0],
            state=state,
            state_len=new_len,
            actions=c["actions"].at[rows, write_at].set(a, mode="drop"),
            n_act=n_act,
            n_bk=c["n_bk"] + is_bk,
            done=done,
            ended=ended,
            step_logits=step_logits,
            **{k: events.get(k, c[k]) for k in ("ev_tok", "ev_len", "ev_ok")},
            v_hist=v_hist,
        )

    c = jax.lax.while_loop(cond, body, carry)
    return SampleOutput(
        actions=c["actions"],
        length=prompt_len + c["n_act"],
        final=c["state"],
        final_length=c["state_len"],
        n_bkspc=c["n_bk"],
        ended=c["ended"],
        step_logits=c["step_logits"] if cfg.return_logits else None,
    )


def sample(
    model: Any,
    prompts: jax.Array,
    prompt_len: jax.Array,
    key: jax.Array,
    *,
    eos_id: int | tuple[int, ...],
    pad_id: int,
    cfg: SamplingConfig,
    params: Any = None,
    floor_len: jax.Array | None = None,
) -> SampleOutput:
    """Samples continuations of left-aligned `prompts` [B, P] with lengths `prompt_len` [B].

    `model` is a `Transformer`, or its `nnx.split` graphdef with `params` the matching state
    (the form used inside jitted training code). Compiled once per graphdef, shapes and `cfg`.
    `floor_len` [B] (default `prompt_len`): the state length `<bkspc>` cannot go below.
    `eos_id`: the id that ends a row, or a tuple of them (a chat model's end of turn too).
    Weights sharded over a mesh are decoded in its decode layout (`layout_of`). A GPT-2-family
    model refuses a prompt width + `cfg.max_new_tokens` past its positions (`check_positions`).
    """
    if params is None:
        model, params = nnx.split(model)
    prompts = jnp.asarray(prompts, jnp.int32)
    prompt_len = jnp.asarray(prompt_len, jnp.int32)
    if prompts.ndim != 2 or prompt_len.shape != (prompts.shape[0],):
        raise ValueError(
            f"prompts must be [B, P] and prompt_len [B]; got {prompts.shape}, {prompt_len.shape}"
        )
    floor_len = prompt_len if floor_len is None else jnp.asarray(floor_len, jnp.int32)
    if floor_len.shape != prompt_len.shape or bool(jnp.any(floor_len > prompt_len)):
        raise ValueError("floor_len must be [B] with floor_len <= prompt_len")
    config = model.config if hasattr(model, "config") else nnx.merge(model, params).config
    if config.position_limit is not None:  # the longest prompt: a host value
        check_positions(config, int(np.max(jax.device_get(prompt_len))), cfg.max_new_tokens)
    layout = layout_of(model, params, prompts.shape[0])
    return sample_jit(
        model,
        params,
        prompts,
        prompt_len,
        key,
        floor_len,
        cfg=cfg,
        eos_id=eos_id,
        pad_id=pad_id,
        layout=layout,
    )
