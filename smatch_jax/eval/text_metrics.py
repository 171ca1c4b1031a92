"""Corpus statistics of generated text: n-gram entropy, repetition, diversity, length, and the
backspace statistics of SequenceMatch action rows. Pure numpy / python.

A *sequence* is a list (or array) of token ids, or a string; a string is split on whitespace
into words (so text metrics on decoded strings are word-level). Empty corpora and sequences too
short to hold an n-gram contribute nothing; a statistic with nothing to average is 0.0.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

Seq = Sequence[Any] | str


def _tokens(seq: Seq) -> list:
    if isinstance(seq, str):
        return seq.split()
    return [int(t) if isinstance(t, (int, np.integer)) else t for t in seq]


def _ngrams(seq: Seq, n: int) -> list[tuple]:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    t = _tokens(seq)
    return [tuple(t[i : i + n]) for i in range(len(t) - n + 1)]


def ngram_entropy(seqs: Sequence[Seq], n: int) -> float:
    """Shannon entropy (natural log, nats) of the n-gram distribution pooled over all sequences.

    Counts c(g) of every n-gram g in every sequence (n-grams never cross sequence boundaries),
    p(g) = c(g) / sum c, H = -sum_g p(g) log p(g). 0.0 when there is no n-gram at all.
    """
    counts = Counter(g for s in seqs for g in _ngrams(s, n))
    total = sum(counts.values())
    if total == 0:
        return 0.0
    p = np.array(list(counts.values()), np.float64) / total
    return float(-(p * np.log(p)).sum())


def rep_n(seq: Seq, n: int) -> float:
    """1 - |unique n-grams| / |n-grams| of one sequence (0.0 if it has no n-gram)."""
    grams = _ngrams(seq, n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def mean_rep_n(seqs: Sequence[Seq], n: int) -> float:
    """Mean of `rep_n` over the sequences that have at least one n-gram (0.0 if none has)."""
    reps = [rep_n(s, n) for s in seqs if len(_tokens(s)) >= n]
    return float(np.mean(reps)) if reps else 0.0


def diversity(seqs: Sequence[Seq]) -> float:
    """prod_{n=2..4} (1 - mean_rep_n(seqs, n)) (Su et al. 2022, in [0, 1], 1 = no repeats)."""
    return float(math.prod(1.0 - mean_rep_n(seqs, n) for n in (2, 3, 4)))


def repetition_rate(seqs: Sequence[Seq], window: int | None = None) -> float:
    """Fraction of next-token predictions that repeat a token of the previous context.

    Welleck et al. (2020) `rep/l`: over every position t >= 1 of every sequence, the indicator
    that x_t occurs among the previous `window` tokens x_{max(0, t-window)} .. x_{t-1} (all of
    them when `window` is None), pooled over all sequences. 0.0 with no position t >= 1.
    """
    hits = total = 0
    for s in seqs:
        t = _tokens(s)
        for i in range(1, len(t)):
            lo = 0 if window is None else max(0, i - window)
            hits += t[i] in t[lo:i]
            total += 1
    return hits / total if total else 0.0


def mean_length(seqs: Sequence[Seq]) -> float:
    """Mean number of tokens (words for strings) per sequence; 0.0 for an empty corpus."""
    return float(np.mean([len(_tokens(s)) for s in seqs])) if len(seqs) else 0.0


def backspace_stats(
    actions: Sequence[Sequence[int]] | np.ndarray,
    prompt_len: Sequence[int] | np.ndarray | int,
    length: Sequence[int] | np.ndarray,
    bkspc_id: int,
    reference: Sequence[Sequence[int]] | None = None,
) -> dict[str, Any]:
    """Backspace statistics of action rows (the sampler's `actions`, `length` layout).

    Row b holds the prompt `actions[b, :prompt_len[b]]`, then its actions
    `actions[b, prompt_len[b]:length[b]]`; entries past `length[b]` are ignored. Replaying the
    actions, a token appends to the state and `<bkspc>` pops the state's last token, except
    at the prompt (state length == prompt_len), where it is a no-op (method.md §1).

    Returns
      n_bkspc            int array [B]: <bkspc> actions per row (no-ops included);
      bkspc_per_sample   mean of n_bkspc;
      bkspc_sample_frac  fraction of rows with at least one <bkspc>;
      n_noop             total no-op backspaces (at the prompt);
      run_hist           {run length: count} over all rows, a run being a maximal stretch of
                         consecutive <bkspc> actions (its length counts no-ops too);
      mean_run_length    mean run length (0.0 without runs).
    With `reference` (row b: the correct full state, prompt ids then completion ids, e.g.
    `tokens[b, :length[b]]` of an arithmetic split), for every token actually deleted -- the
    state's last token, at 0-based state position p (prompt included) -- also
      n_deleted              number of deleted tokens;
      deleted_wrong_frac     fraction of them with p >= len(reference[b]) or
                             token != reference[b][p] (the deleted token itself was wrong);
      deleted_off_path_frac  fraction where the state up to and including p differs from
                             reference[b][:p+1] (some token at or before p was wrong, so
                             deleting made sense; a deletion with a correct prefix is "on path").
    Fractions are 0.0 when nothing was deleted.
    """
    B = len(length)
    prompt = np.broadcast_to(np.asarray(prompt_len, np.int64), (B,))
    n_bk, n_noop, runs = np.zeros(B, np.int64), 0, Counter()
    n_del = n_wrong = n_off = 0
    for b in range(B):
        row = [int(a) for a in actions[b][: int(length[b])]]
        m = int(prompt[b])
        state, run = row[:m], 0
        ref = None if reference is None else [int(t) for t in reference[b]]
        for a in [*row[m:], None]:  # sentinel closes a trailing run
            if a == bkspc_id:
                run += 1
                n_bk[b] += 1
                if len(state) == m:
                    n_noop += 1
                    continue
                if ref is not None:
                    p = len(state) - 1
                    n_del += 1
                    n_wrong += p >= len(ref) or state[p] != ref[p]
                    n_off += state != ref[: p + 1]
                state.pop()
                continue
            if run:
                runs[run] += 1
                run = 0
            if a is not None:
                state.append(a)
    total_runs = sum(runs.values())
    out: dict[str, Any] = {
        "n_bkspc": n_bk,
        "bkspc_per_sample": float(n_bk.mean()) if B else 0.0,
        "bkspc_sample_frac": float((n_bk > 0).mean()) if B else 0.0,
        "n_noop": n_noop,
        "run_hist": dict(sorted(runs.items())),
        "mean_run_length": sum(k * c for k, c in runs.items()) / total_runs if total_runs else 0.0,
    }
    if reference is not None:
        out["n_deleted"] = n_del
        out["deleted_wrong_frac"] = n_wrong / n_del if n_del else 0.0
        out["deleted_off_path_frac"] = n_off / n_del if n_del else 0.0
    return out
