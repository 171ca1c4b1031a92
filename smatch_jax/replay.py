"""Replay buffer of model rows (method.md §6): fixed capacity, FIFO, a pytree of device arrays.

The sampler's action rows (prompt + actions, possibly with `<bkspc>`) are pushed here and
drawn uniformly for the `model` half of each SequenceMatch batch. Stale rows are allowed:
the value term telescopes along any trajectory (method.md §2.4). Being a plain pytree, the buffer
is saved in checkpoints with the train state, so a resumed run draws the same rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from smatch_jax.sections import Section


@dataclasses.dataclass(frozen=True)
class ReplayConfig(Section):
    """`config.replay`: the buffer of model rows."""

    NAME: ClassVar[str] = "replay"
    capacity: int = 512  # rows kept (FIFO)

    RANGES: ClassVar[tuple[tuple[str, Any, Any, bool], ...]] = (("capacity", 1, None, True),)


class Replay(NamedTuple):
    tokens: jax.Array  # int32 [C, T]
    prompt_len: jax.Array  # int32 [C]
    length: jax.Array  # int32 [C]
    size: jax.Array  # int32 []: rows filled (<= C)
    next: jax.Array  # int32 []: slot the next row goes to (FIFO)


def init(capacity: int, seq_len: int, pad_id: int) -> Replay:
    if capacity < 1:
        raise ValueError(f"replay capacity={capacity} must be >= 1")
    return Replay(
        tokens=jnp.full((capacity, seq_len), pad_id, jnp.int32),
        prompt_len=jnp.ones((capacity,), jnp.int32),
        length=jnp.ones((capacity,), jnp.int32),
        size=jnp.zeros((), jnp.int32),
        next=jnp.zeros((), jnp.int32),
    )


def push(buf: Replay, tokens: jax.Array, prompt_len: jax.Array, length: jax.Array) -> Replay:
    """Appends rows [B, T], overwriting the oldest once full."""
    C = buf.tokens.shape[0]
    B = tokens.shape[0]
    if tokens.shape[1] != buf.tokens.shape[1]:
        raise ValueError(f"rows have T={tokens.shape[1]}, the buffer T={buf.tokens.shape[1]}")
    slots = (buf.next + jnp.arange(B)) % C
    if B > C:  # only the newest C rows survive
        tokens, prompt_len, length, slots = tokens[-C:], prompt_len[-C:], length[-C:], slots[-C:]
    return Replay(
        tokens=buf.tokens.at[slots].set(tokens.astype(jnp.int32)),
        prompt_len=buf.prompt_len.at[slots].set(prompt_len.astype(jnp.int32)),
        length=buf.length.at[slots].set(length.astype(jnp.int32)),
        size=jnp.minimum(buf.size + B, C),
        next=(buf.next + B) % C,
    )


def sample(buf: Replay, key: jax.Array, n: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`n` rows drawn uniformly with replacement from the filled part (buffer must be non-empty)."""
    idx = jax.random.randint(key, (n,), 0, jnp.maximum(buf.size, 1))
    return buf.tokens[idx], buf.prompt_len[idx], buf.length[idx]
