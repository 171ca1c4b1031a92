"""One-pass backspace layout (method.md §3) and `apply_backspaces`.

A row `tokens[0..T)` is a prompt `tokens[0..m)`, actions `tokens[m..n)` and padding. An action
is a vocabulary token (appended to the state) or `<bkspc>` (deletes the state's last token;
a no-op while the state equals the prompt). The layout lets one ordinary causal forward pass
produce, at every position `k`, the logits of the state *after* action `k`:

* a token at `k` keeps its id, gets position `len(S)` and attends to `S ∪ {k}`; push `k`;
* a `<bkspc>` at `k` pops the deleted position, copies the id and position of the new top `t`
  and attends to `(S \\ {t}) ∪ {k}`; `k` replaces `t` on the stack;
* padding attends to itself only.

`S` is a stack of input positions making up the current state. Both functions walk it with a
`lax.scan` over positions, vmapped over rows, so they are jit-able and shared by training and
sampling (the sampler runs the same stack online).

`backspace_layout(..., method="parallel")` computes the same layout without a sequential loop:
every action writes stack slot `d_k - 1`, where `d_k` is the state length after action `k` (a
+1/-1 walk reflected at the prompt length: one cumulative sum and one cumulative min);
position `k'` stays in the state until the first later action `j` with `d_j <= d_k'`, and a
`<bkspc>` at `k` copies the id of the last token action `j < k` with `d_j = d_k`. Those are
[B, T, T] comparisons and reductions. On CPU the scan is faster (benchmarks/RESULTS.md); the
parallel form avoids T sequential steps on accelerators.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Layout(NamedTuple):
    """Inputs of one forward pass over rows that contain `<bkspc>` actions."""

    input_ids: jax.Array  # [B, T] int32: token ids fed to the model
    positions: jax.Array  # [B, T] int32: position ids (learned table or RoPE)
    attn_mask: jax.Array  # [B, T, T] bool: attn_mask[b, q, k] True when q may attend k


class _Walk(NamedTuple):
    input_ids: jax.Array  # [T]
    positions: jax.Array  # [T]
    leave: jax.Array  # [T] step at which each position left the state (T: never)
    stack: jax.Array  # [T] input positions of the final state, first `size` entries valid
    size: jax.Array  # [] final state length


def _walk_row(
    tokens_T: jax.Array, prompt_len: jax.Array, length: jax.Array, bkspc_id: int
) -> _Walk:
    """Runs the method.md §3 stack over one row.

    Each step only writes single entries (ids, positions, the stack, leave times), so the loop
    body is a handful of scalar updates; the [T, T] mask follows from the leave times
    (`_mask_from_leave`) outside the loop.
    """
    T = tokens_T.shape[0]

    def step(carry, k):
        ids_T, pos_T, leave_T, stack_T, size = carry
        tok = tokens_T[k]
        valid = k < length
        is_bk = valid & (k >= prompt_len) & (tok == bkspc_id)
        is_tok = valid & ~is_bk
        # A backspace pops unless the state is the prompt (then it is a no-op).
        pops = is_bk & (size > prompt_len)
        size_after_pop = size - pops.astype(jnp.int32)
        deleted = stack_T[size - 1]
        top = stack_T[size_after_pop - 1]  # last token of the state after the deletion

        new_id = jnp.where(is_bk, ids_T[top], tok)
        new_pos = jnp.where(is_bk, pos_T[top], jnp.where(is_tok, size, 0))
        ids_T = ids_T.at[k].set(jnp.where(valid, new_id, tok))
        pos_T = pos_T.at[k].set(new_pos)
        # A popped token leaves the state at k; a backspace also swaps `top` out for k.
        leave_T = leave_T.at[jnp.where(pops, deleted, T)].set(k, mode="drop")
        leave_T = leave_T.at[jnp.where(is_bk, top, T)].set(k, mode="drop")
        slot = jnp.where(is_tok, size, jnp.where(is_bk, size_after_pop - 1, T))
        stack_T = stack_T.at[slot].set(k, mode="drop")
        size = jnp.where(is_tok, size + 1, size_after_pop)
        return (ids_T, pos_T, leave_T, stack_T, size), None

    init = (
        jnp.zeros((T,), jnp.int32),
        jnp.zeros((T,), jnp.int32),
        jnp.full((T,), T, jnp.int32),
        jnp.zeros((T,), jnp.int32),
        jnp.zeros((), jnp.int32),
    )
    idx_T = jnp.arange(T, dtype=jnp.int32)
    (ids_T, pos_T, leave_T, stack_T, size), _ = jax.lax.scan(step, init, idx_T)
    return _Walk(ids_T, pos_T, leave_T, stack_T, size)


def _mask_from_leave(leave_BxT: jax.Array, length: jax.Array) -> jax.Array:
    """[B, T, T] mask: position k is in the state after action q iff k <= q < leave[k];
    padding queries (q >= n) attend to themselves only."""
    T = leave_BxT.shape[1]
    q_Tx1 = jnp.arange(T, dtype=jnp.int32)[:, None]
    k_1xT = q_Tx1.T
    in_state_BxQxK = (k_1xT <= q_Tx1)[None] & (q_Tx1[None] < leave_BxT[:, None, :])
    valid_Bx1x1 = q_Tx1[None] < length[:, None, None]
    return jnp.where(valid_Bx1x1, in_state_BxQxK, (k_1xT == q_Tx1)[None])


def _check_shapes(tokens: jax.Array, prompt_len: jax.Array, length: jax.Array) -> None:
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")
    B = tokens.shape[0]
    if prompt_len.shape != (B,) or length.shape != (B,):
        raise ValueError(
            f"prompt_len and length must be [B]=[{B}], got {prompt_len.shape} and {length.shape}"
        )


def backspace_layout(
    tokens: jax.Array,
    prompt_len: jax.Array,
    length: jax.Array,
    *,
    bkspc_id: int,
    method: str = "scan",
) -> Layout:
    """The one-pass layout of method.md §3 for rows `tokens` [B, T].

    Args:
      tokens: int32 [B, T], prompt then actions then padding (any pad id).
      prompt_len: int32 [B], `m >= 1`.
      length: int32 [B], `n` with `m <= n <= T`.
      bkspc_id: id of the `<bkspc>` action (the base vocabulary size `V`).
      method: "scan" (the stack walk) or "parallel" (no sequential loop); identical results.

    Returns:
      `Layout(input_ids, positions, attn_mask)`. Position `k < n` represents the state after
      action `k` (or the prompt prefix for `k < m`); padding positions attend to themselves,
      keep their token id and get position 0.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    prompt_len = jnp.asarray(prompt_len, jnp.int32)
    length = jnp.asarray(length, jnp.int32)
    _check_shapes(tokens, prompt_len, length)
    if method == "scan":
        walk = jax.vmap(lambda t, m, n: _walk_row(t, m, n, bkspc_id))(tokens, prompt_len, length)
        return Layout(walk.input_ids, walk.positions, _mask_from_leave(walk.leave, length))
    if method != "parallel":
        raise ValueError(f"method={method!r}; use 'scan' or 'parallel'")
    return _parallel_layout(tokens, prompt_len, length, bkspc_id)


def _parallel_layout(tokens, prompt_len, length, bkspc_id: int) -> Layout:
    """`backspace_layout` by [B, T, T] comparisons instead of a walk (module docstring)."""
    T = tokens.shape[1]
    k_1xT = jnp.arange(T, dtype=jnp.int32)[None, :]
    m_Bx1, n_Bx1 = prompt_len[:, None], length[:, None]
    valid_BxT = k_1xT < n_Bx1
    action_BxT = valid_BxT & (k_1xT >= m_Bx1)
    is_bk_BxT = action_BxT & (tokens == bkspc_id)
    is_tok_BxT = valid_BxT & ~is_bk_BxT
    depth_BxT = _state_lengths(is_bk_BxT, action_BxT, k_1xT, m_Bx1)

    # Position k' leaves the state at the first later action j (< n) with depth_j <= depth_k'.
    later_BxKxJ = (k_1xT[:, None, :] > k_1xT[:, :, None]) & valid_BxT[:, None, :]
    leaves_BxKxJ = later_BxKxJ & (depth_BxT[:, None, :] <= depth_BxT[:, :, None])
    end_BxT = jnp.min(jnp.where(leaves_BxKxJ, k_1xT[:, None, :], T), axis=-1)
    q_Tx1, kk_1xT = k_1xT[0][:, None], k_1xT[0][None, :]
    in_state_BxQxK = (kk_1xT <= q_Tx1)[None] & (q_Tx1[None] < end_BxT[:, None, :])
    mask_BxQxK = jnp.where(valid_BxT[:, :, None], in_state_BxQxK, (kk_1xT == q_Tx1)[None])

    # A <bkspc> at k feeds the id of the last token action j < k at its new depth.
    same_BxKxJ = (depth_BxT[:, None, :] == depth_BxT[:, :, None]) & is_tok_BxT[:, None, :]
    earlier_BxKxJ = same_BxKxJ & (k_1xT[:, None, :] < k_1xT[:, :, None])
    src_BxT = jnp.max(jnp.where(earlier_BxKxJ, k_1xT[:, None, :], 0), axis=-1)
    ids_BxT = jnp.where(is_bk_BxT, jnp.take_along_axis(tokens, src_BxT, axis=1), tokens)
    positions_BxT = jnp.where(valid_BxT, depth_BxT - 1, 0)
    return Layout(ids_BxT, positions_BxT, mask_BxQxK)


def _state_lengths(is_bk_BxT, action_BxT, k_1xT, m_Bx1):
    """[B, T] state length after each action: k + 1 in the prompt, then a +1 / -1 walk that
    stays at the prompt length when a `<bkspc>` meets the prompt (the walk reflected at m)."""
    step_BxT = jnp.where(action_BxT, jnp.where(is_bk_BxT, -1, 1), 0)
    free_BxT = m_Bx1 + jnp.cumsum(step_BxT, axis=1)  # without the floor at m
    below_BxT = jax.lax.cummin(free_BxT - m_Bx1, axis=1)
    return jnp.where(k_1xT < m_Bx1, k_1xT + 1, free_BxT - jnp.minimum(below_BxT, 0))


def apply_backspaces(
    tokens: jax.Array,
    prompt_len: jax.Array,
    length: jax.Array,
    *,
    bkspc_id: int,
    pad_id: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """Final text of each row after its backspaces (method.md §3), prompt included.

    Returns:
      `(final_tokens [B, T], final_length [B])`: each row left-aligned and padded with `pad_id`.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    prompt_len = jnp.asarray(prompt_len, jnp.int32)
    length = jnp.asarray(length, jnp.int32)
    _check_shapes(tokens, prompt_len, length)
    walk = jax.vmap(lambda t, m, n: _walk_row(t, m, n, bkspc_id))(tokens, prompt_len, length)
    T = tokens.shape[1]
    # The layout's input id at a stack entry is the id of that state token.
    final = jnp.take_along_axis(walk.input_ids, walk.stack, axis=1)
    keep = jnp.arange(T)[None, :] < walk.size[:, None]
    return jnp.where(keep, final, pad_id).astype(jnp.int32), walk.size


def check_rows(tokens, prompt_len, length, *, n_actions: int) -> None:
    """Host-side validation of a batch of rows; raises ValueError naming the fix.

    The jitted kernels cannot raise on traced values, so data pipelines call this on the
    concrete numpy arrays they build. `n_actions` is `V + 1` (base vocabulary plus `<bkspc>`).
    """
    tokens, prompt_len, length = (np.asarray(a) for a in (tokens, prompt_len, length))
    _check_shapes(tokens, prompt_len, length)
    T = tokens.shape[1]
    if (prompt_len < 1).any():
        raise ValueError(
            "every row needs a prompt of at least one token (use a bos/eos token as the prompt "
            f"of unconditional text); got prompt_len={prompt_len.tolist()}"
        )
    bad = (length < prompt_len) | (length > T)
    if bad.any():
        b = int(np.argmax(bad))
        raise ValueError(
            f"row {b}: need prompt_len <= length <= T={T}, got prompt_len={prompt_len[b]}, "
            f"length={length[b]}; raise the sequence length or truncate the row"
        )
    valid = np.arange(T)[None, :] < length[:, None]
    out = valid & ((tokens < 0) | (tokens >= n_actions))
    if out.any():
        b, t = (int(i) for i in np.argwhere(out)[0])
        raise ValueError(
            f"token id {tokens[b, t]} at row {b}, position {t} is outside [0, {n_actions}) "
            "(base vocabulary plus <bkspc>); check the tokenizer and the model's vocab_size"
        )
    in_prompt = np.arange(T)[None, :] < prompt_len[:, None]
    if (in_prompt & (tokens == n_actions - 1)).any():
        raise ValueError("a prompt contains the <bkspc> id; prompts must be plain text tokens")
