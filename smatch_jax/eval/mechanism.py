"""Does the model know its own errors? Diagnostics of the mechanism SequenceMatch relies on.

On tasks with a reference (arithmetic), every state of an answer is *still correct* (the answer
so far is a prefix of the reference) or *already wrong* (it is not). A model that can use
`<bkspc>` well deletes wrong tokens and keeps right ones, so:

* `deletion_stats`: of its decoded action rows, the **precision** of deletions (deleted tokens
  that were wrong / deletions) and their **recall** (wrong tokens later deleted / wrong tokens
  emitted). A token is wrong when the state ending in it is not a prefix of the reference.
* `separation`: on the model's own samples, pi(`<bkspc>` | s) and V(s) = logsumexp(logits) at
  every visited state, split into still-correct and already-wrong states, with the AUC with
  which each separates them: `auc_pi_bkspc` = P(pi(<bkspc>) is higher at a wrong state than at
  a correct one), `auc_neg_v` = P(V is lower at a wrong state); 0.5 is no separation. The
  paper's mechanism predicts SequenceMatch separates them better than BC.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from smatch_jax import masks, sharding


def _on_path(state: list[int], ref: Sequence[int]) -> bool:
    return len(state) <= len(ref) and list(ref[: len(state)]) == state


OnPath = Callable[[list[int], Sequence[int]], bool]  # (state, reference) -> still correct


def text_on_path(tokenizer) -> OnPath:
    """ "Still correct" on the decoded text: the state's text is a prefix of the reference's.
    With a subword tokenizer a right answer can be spelt in other tokens than the reference's
    ("13" or "1" "3"); with one id per character it is the token prefix test."""

    ref_text = functools.lru_cache(maxsize=4096)(lambda ref: tokenizer.decode(list(ref)))

    def on_path(state: list[int], ref: Sequence[int]) -> bool:
        if _on_path(state, ref):
            return True
        return ref_text(tuple(ref)).startswith(tokenizer.decode(state))  # one decode per row

    return on_path


def deletion_stats(
    actions: Sequence[Sequence[int]],
    prompt_len,
    references: Sequence[Sequence[int]],
    bkspc_id: int,
    on_path: OnPath = _on_path,
) -> dict[str, float]:
    """Precision and recall of deletions over action rows (prompt, then actions; each row cut
    to its length) against the reference rows (prompt ids then completion ids). `on_path`:
    whether a state (prompt ids then answer ids) is still correct given its reference; the
    default is "a prefix of the reference" (tasks without one, e.g. grammar, pass their own)."""
    n_del = n_del_wrong = n_wrong = n_wrong_deleted = 0
    for row, m, ref in zip(actions, prompt_len, references, strict=True):
        m = int(m)
        state, wrong = list(row[:m]), []  # wrong[i]: the i-th answer token is wrong
        for a in row[m:]:
            if a == bkspc_id:
                if len(state) == m:
                    continue  # a no-op at the prompt
                n_del += 1
                was_wrong = wrong.pop()
                n_del_wrong += was_wrong
                n_wrong_deleted += was_wrong
                state.pop()
            else:
                state.append(int(a))
                wrong.append(not on_path(state, ref))
                n_wrong += wrong[-1]
    return {
        "deletions": float(n_del),
        "deletion_precision": n_del_wrong / n_del if n_del else float("nan"),
        "wrong_emitted": float(n_wrong),
        "deletion_recall": n_wrong_deleted / n_wrong if n_wrong else float("nan"),
    }


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a positive scores above a negative) + 0.5 P(tie): the Mann-Whitney AUC."""
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    both = np.concatenate([pos, neg])
    order = both.argsort(kind="mergesort")
    ranks = np.empty(both.size)
    ranks[order] = np.arange(1, both.size + 1)
    for v in np.unique(both):  # average ranks of ties
        tie = both == v
        ranks[tie] = ranks[tie].mean()
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2
    return float(u / (pos.size * neg.size))


def state_scores(model, rows: np.ndarray, prompt_len, length, bkspc_id: int):
    """[B, T] pi(<bkspc> | s) and V(s) = logsumexp(logits) at every position's state, from one
    forward pass over the backspace layout of the action rows."""
    lay = masks.backspace_layout(
        jnp.asarray(rows), jnp.asarray(prompt_len), jnp.asarray(length), bkspc_id=bkspc_id
    )
    logits = model(lay.input_ids, lay.positions, lay.attn_mask).astype(jnp.float32)
    v = jax.nn.logsumexp(logits, axis=-1)
    return sharding.to_host((jnp.exp(logits[..., bkspc_id] - v), v))


def separation(
    model,
    actions: Sequence[Sequence[int]],
    prompt_len,
    references,
    bkspc_id: int,
    pad_id: int,
    on_path: OnPath = _on_path,
) -> dict[str, float]:
    """pi(<bkspc>) and V on still-correct vs already-wrong states of the given action rows (the
    model's own samples), and the AUC of each (see the module docstring). Every state from
    the prompt to the last one before the row ends counts once per visit. `on_path`: as in
    `deletion_stats`."""
    T = max(len(r) for r in actions)
    rows = np.full((len(actions), T), pad_id, np.int32)
    for b, r in enumerate(actions):
        rows[b, : len(r)] = r
    length = np.array([len(r) for r in actions], np.int32)
    pi, v = state_scores(model, rows, prompt_len, length, bkspc_id)
    scores = {"correct": ([], []), "wrong": ([], [])}
    for b, (row, m, ref) in enumerate(zip(actions, prompt_len, references, strict=True)):
        m = int(m)
        state = list(row[:m])
        for j in range(m - 1, len(row) - 1):  # the state at position j, before action j + 1
            if j >= m:
                a = row[j]
                if a == bkspc_id:
                    if len(state) > m:
                        state.pop()
                else:
                    state.append(int(a))
            side = "correct" if on_path(state, ref) else "wrong"
            scores[side][0].append(pi[b, j])
            scores[side][1].append(v[b, j])
    pc, vc = (np.asarray(x) for x in scores["correct"])
    pw, vw = (np.asarray(x) for x in scores["wrong"])
    mean = lambda x: float(x.mean()) if x.size else float("nan")
    return {
        "states_correct": float(pc.size),
        "states_wrong": float(pw.size),
        "pi_bkspc_correct": mean(pc),
        "pi_bkspc_wrong": mean(pw),
        "v_correct": mean(vc),
        "v_wrong": mean(vw),
        "auc_pi_bkspc": auc(pw, pc),
        "auc_neg_v": auc(-vw, -vc),
    }
