"""Slow, obviously-correct pure-Python references for the kernels.

Each follows method.md wording line by line on Python lists; the tests compare the jitted kernels
against them on random and hand-picked rows.
"""

from __future__ import annotations

import math

import numpy as np


def layout_row(tokens, m, n, bkspc):
    """method.md §3 on one row: returns (input_ids, positions, mask rows as sets)."""
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


def _episode(tokens, m, n, eos):
    """The token indices of a row's actions: m .. n-1, up to and including the first eos."""
    acts = []
    for t in range(m, n):
        acts.append(t)
        if tokens[t] == eos:
            break
    return acts


def sm_loss(
    logits,
    tokens,
    m,
    n,
    is_model,
    *,
    eos,
    div,
    gamma,
    c,
    value_on,
    aw,
    rw,
    clamp,
    temperature=1.0,
    terminal="zero",
    masked_actions="unrewarded",
    normalize="token",
    truncated_weight=1.0,
):
    """method.md §2.4 with the options of 2.7, written as loops over rows and actions (float64).

    Under masked_actions='environment' an action of weight 0 is skipped entirely; the agent
    action before it looks further along the row for the state it leads to.
    """
    logits = np.asarray(logits, np.float64)
    alpha = temperature
    sums = {
        g: {"phi": 0.0, "val": 0.0, "r2": 0.0, "n": 0.0, "rows": 0.0} for g in ("data", "model")
    }
    for b in range(len(tokens)):
        g = "model" if is_model[b] else "data"
        acts = _episode(tokens[b], m[b], n[b], eos)
        weight_b = rw[b]
        if is_model[b] and not (acts and tokens[b][acts[-1]] == eos):
            weight_b *= truncated_weight
        if weight_b == 0:
            continue

        env = {t for t in acts if masked_actions == "environment" and aw[b][t] == 0}

        k = 0  # agent actions so far (all actions under 'unrewarded')
        counted = False
        for t in acts:
            if t in env:
                continue
            j = t - 1
            a = tokens[b][t]
            q = alpha * logits[b, j, a]
            v = alpha * _lse(logits[b, j])
            p = t  # the position of the state this action leads to ...
            while p + 1 in env:  # ... after the environment's actions
                p += 1
            v_next = 0.0 if a == eos and terminal == "zero" else alpha * _lse(logits[b, p])
            r = q - gamma * v_next
            lo = {"js": -math.log(2.0) + clamp, "hellinger": -1.0 + clamp}.get(div)
            rc = max(r, lo) if lo is not None else r
            w = gamma**k
            a_w = aw[b][t]
            sums[g]["phi"] += weight_b * w * a_w * _phi(div, rc)
            sums[g]["val"] += weight_b * w * (v - gamma * v_next)
            sums[g]["r2"] += weight_b * w * a_w * r * r
            sums[g]["n"] += weight_b
            k += 1
            counted = True
        if counted:
            sums[g]["rows"] += weight_b

    den = "rows" if normalize == "row" else "n"

    def e(g, key):
        return sums[g][key] / sums[g][den] if sums[g][den] > 0 else 0.0

    def e_mix(key):
        if sums["model"][den] == 0:
            return e("data", key)
        return 0.5 * e("data", key) + 0.5 * e("model", key)

    value = e_mix("val") if value_on == "mix" else e("data", "val")
    if div == "chi2_mix":
        reg = c * e_mix("r2")
    elif div == "chi2":
        reg = c * e("data", "r2")
    else:
        reg = 0.0
    return (-e("data", "phi") + value + reg) / alpha


def bc_loss(logits, tokens, m, n, is_model, *, eos, aw, rw, masked_actions="unrewarded"):
    """method.md §2.5: -sum aw * log pi(a|s) / N_data over data rows (float64); under
    masked_actions='environment' the actions of weight 0 are not counted."""
    logits = np.asarray(logits, np.float64)
    total, count = 0.0, 0.0
    for b in range(len(tokens)):
        if is_model[b]:
            continue
        for t in _episode(tokens[b], m[b], n[b], eos):
            if masked_actions == "environment" and aw[b][t] == 0:
                continue
            j = t - 1
            logp = logits[b, j, tokens[b][t]] - _lse(logits[b, j])
            total += rw[b] * aw[b][t] * logp
            count += rw[b]
    return -total / count if count > 0 else 0.0
