"""Slow, obviously-correct pure-Python references for the kernels.

Each follows SPEC wording line by line on Python lists; the tests compare the jitted kernels
against them on random and hand-picked rows.
"""

from __future__ import annotations

import math

import numpy as np


def layout_row(tokens, m, n, bkspc):
    """SPEC 3 on one row: returns (input_ids, positions, mask rows as sets)."""
    T = len(tokens)
    ids, pos, rows = list(tokens), [0] * T, [{k} for k in range(T)]
    stack = []
    for k in range(n):
        tok = tokens[k]
        if k >= m and tok == bkspc:
            if len(stack) > m:  # a backspace at the prompt is a no-op
                stack.pop()
            t = stack[-1]
            ids[k], pos[k] = ids[t], pos[t]
            stack[-1] = k
        else:
            pos[k] = len(stack)
            stack.append(k)
        rows[k] = set(stack)
    return ids, pos, rows


def final_row(tokens, m, n, bkspc):
    """The state after all actions of a row: a list of token ids, prompt included."""
    state = list(tokens[:m])
    for tok in tokens[m:n]:
        if tok == bkspc:
            if len(state) > m:
                state.pop()
        else:
            state.append(tok)
    return state


def states_row(tokens, m, n, bkspc):
    """For each position k < n, the token list of the state that position represents."""
    out = []
    for k in range(n):
        if k < m:
            out.append(list(tokens[: k + 1]))
        else:
            out.append(final_row(tokens, m, k + 1, bkspc))
    return out


def _lse(x):
    mx = max(x)
    return mx + math.log(sum(math.exp(v - mx) for v in x))


def _phi(div, r):
    if div in ("chi2", "chi2_mix"):
        return r
    if div == "kl":
        return -math.exp(-(r + 1.0))
    if div == "js":
        return math.log(2.0 - math.exp(-r))
    if div == "hellinger":
        return r / (1.0 + r)
    raise ValueError(div)


def sm_loss(logits, tokens, m, n, is_model, *, eos, div, gamma, c, value_on, aw, rw, clamp):
    """SPEC 2.4 loss, written as loops over rows and actions (float64)."""
    logits = np.asarray(logits, np.float64)
    sums = {g: {"phi": 0.0, "val": 0.0, "r2": 0.0, "n": 0.0} for g in ("data", "model")}
    for b in range(len(tokens)):
        g = "model" if is_model[b] else "data"
        for t in range(m[b], n[b]):
            if any(tokens[b][u] == eos for u in range(m[b], t)):
                break  # actions after a terminal eos are not part of the episode
            j = t - 1
            a = tokens[b][t]
            q = logits[b, j, a]
            v = _lse(logits[b, j])
            v_next = 0.0 if a == eos else _lse(logits[b, j + 1])
            r = q - gamma * v_next
            lo = {"js": -math.log(2.0) + clamp, "hellinger": -1.0 + clamp}.get(div)
            rc = max(r, lo) if lo is not None else r
            w = gamma ** (t - m[b])
            sums[g]["phi"] += rw[b] * w * aw[b][t] * _phi(div, rc)
            sums[g]["val"] += rw[b] * w * (v - gamma * v_next)
            sums[g]["r2"] += rw[b] * w * aw[b][t] * r * r
            sums[g]["n"] += rw[b]

    def e(g, key):
        return sums[g][key] / max(sums[g]["n"], 1e-30) if sums[g]["n"] > 0 else 0.0

    def e_mix(key):
        if sums["model"]["n"] == 0:
            return e("data", key)
        return 0.5 * e("data", key) + 0.5 * e("model", key)

    value = e_mix("val") if value_on == "mix" else e("data", "val")
    if div == "chi2_mix":
        reg = c * e_mix("r2")
    elif div == "chi2":
        reg = c * e("data", "r2")
    else:
        reg = 0.0
    return -e("data", "phi") + value + reg


def bc_loss(logits, tokens, m, n, is_model, *, eos, aw, rw):
    """SPEC 2.5: -sum aw * log pi(a|s) / N_data over data rows (float64)."""
    logits = np.asarray(logits, np.float64)
    total, count = 0.0, 0.0
    for b in range(len(tokens)):
        if is_model[b]:
            continue
        for t in range(m[b], n[b]):
            if any(tokens[b][u] == eos for u in range(m[b], t)):
                break
            j = t - 1
            logp = logits[b, j, tokens[b][t]] - _lse(logits[b, j])
            total += rw[b] * aw[b][t] * logp
            count += rw[b]
    return -total / count if count > 0 else 0.0
