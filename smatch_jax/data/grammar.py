"""The grammar task: Dyck-2 words from a known probabilistic generator, errors checkable exactly.

    >  ([()])[]<eos>

A word is a balanced string over two bracket pairs, `()` and `[]`, with nesting depth at most
`max_depth` and at most `max_len` brackets. The generator (`GrammarSpec`) writes it left to
right: at depth 0 it stops (eos) with probability `p_end` (never before the first bracket), or
opens; at depth `0 < d < max_depth` it opens with probability `p_open`, else closes the bracket
on top of the stack; at `max_depth` it closes. An opened bracket is `(` or `[` with probability
1/2 each; a closing bracket is determined by the stack. Words longer than `max_len` are
rejected and redrawn: the data distribution is the generator's conditioned on the length bound,
p(w) = q(w) / Z, and everything about it is computed exactly by dynamic programming over
(length, depth) (`exact`): Z, the entropy H = E[-log p(w)], the length and maximum-depth
histograms. Nothing that can be computed is estimated.

Rows: prompt = `>` (the start symbol), completion = the word, then eos. A model generates a
word from the prompt; it is **valid** when it is in the support (balanced, depth and length
within the bounds). A prefix is **viable** when some valid word extends it.

The errors a model makes here are a wrong closing bracket, a closing bracket at depth 0, an
opening past the depth bound, and an early eos. `automaton` is the prefix automaton of the
depth-bounded language (states = stacks); noise kind `errors` (`noise.py`) draws each noise
token among the tokens it rejects at that state, so every injected error is an error. An early
eos ends the episode, so it cannot be deleted and is never used as noise (a model that makes it
produces an invalid word, counted by `classify`).

Splits (`generate_splits`): `train`, `validation` and `test`, each drawn from its own seed,
words not unique (the distribution has repeats; short words are frequent).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from smatch_jax.data.rows import make_row
from smatch_jax.data.tokenizers import CharTokenizer

OPEN, CLOSE = "([", ")]"
START = ">"
ALPHABET = "()>[]"  # sorted: the CharTokenizer's ids 0..4
SPECIALS = ("<eos>", "<pad>")
SPLIT_SEED_OFFSETS = {"train": 0, "validation": 1_000_003, "test": 2_000_003}


@dataclasses.dataclass(frozen=True)
class GrammarSpec:
    """The generator: depth and length bounds, stopping and opening probabilities."""

    max_depth: int = 6
    max_len: int = 40  # brackets per word (eos not counted)
    p_end: float = 0.3  # at depth 0 (after the first bracket): stop
    p_open: float = 0.5  # at 0 < depth < max_depth: open (else close)

    def __post_init__(self) -> None:
        if self.max_depth < 1 or self.max_len < 2:
            raise ValueError(f"need max_depth >= 1 and max_len >= 2, got {self}")
        if not (0 < self.p_end < 1 and 0 < self.p_open < 1):
            raise ValueError(f"p_end and p_open must be in (0, 1), got {self}")

    def moves(self, depth: int, n: int) -> list[tuple[str, float]]:
        """(kind, probability) of the generator's next move at `depth` after `n` brackets;
        kind is 'end', 'open' (either bracket, each with half the probability) or 'close'."""
        if depth == 0:
            return [("open", 1.0)] if n == 0 else [("end", self.p_end), ("open", 1 - self.p_end)]
        if depth == self.max_depth:
            return [("close", 1.0)]
        return [("open", self.p_open), ("close", 1 - self.p_open)]


def sample_word(spec: GrammarSpec, rng: np.random.Generator) -> str:
    """One word of the generator, redrawn until it fits `max_len`."""
    while True:
        stack: list[str] = []
        out: list[str] = []
        while len(out) <= spec.max_len:
            kinds, probs = zip(*spec.moves(len(stack), len(out)), strict=True)
            kind = kinds[rng.choice(len(kinds), p=probs)] if len(kinds) > 1 else kinds[0]
            if kind == "end":
                return "".join(out)
            if kind == "open":
                b = int(rng.integers(2))
                stack.append(CLOSE[b])
                out.append(OPEN[b])
            else:
                out.append(stack.pop())


def log_prob(spec: GrammarSpec, word: str, log_z: float | None = None) -> float:
    """log p(word) under the data distribution (-inf if it is not valid)."""
    if not is_valid(spec, word):
        return -math.inf
    stack: list[str] = []
    lp = 0.0
    for i, c in enumerate(word):
        probs = dict(spec.moves(len(stack), i))
        if c in OPEN:
            lp += math.log(probs["open"] / 2)
            stack.append(CLOSE[OPEN.index(c)])
        else:
            lp += math.log(probs["close"])
            stack.pop()
    lp += math.log(spec.p_end)
    return lp - (exact(spec)["log_z"] if log_z is None else log_z)


def scan(spec: GrammarSpec, word: str) -> tuple[str, int]:
    """('ok', max depth) for a viable prefix, else (the first error's kind, its position):
    'wrong_close', 'close_at_0', 'too_deep', 'too_long', 'bad_token'."""
    stack: list[str] = []
    deepest = 0
    for i, c in enumerate(word):
        if i >= spec.max_len:
            return "too_long", i
        if c in OPEN:
            if len(stack) == spec.max_depth:
                return "too_deep", i
            stack.append(CLOSE[OPEN.index(c)])
            deepest = max(deepest, len(stack))
            if len(stack) > spec.max_len - i - 1:  # cannot close within the length bound
                return "too_long", i
        elif c in CLOSE:
            if not stack:
                return "close_at_0", i
            if stack.pop() != c:
                return "wrong_close", i
        else:
            return "bad_token", i
    return "ok", deepest


def is_viable(spec: GrammarSpec, prefix: str) -> bool:
    """Some valid word starts with `prefix`."""
    return scan(spec, prefix)[0] == "ok"


def is_valid(spec: GrammarSpec, word: str) -> bool:
    """`word` is in the support: a viable prefix, balanced, and not empty."""
    return bool(word) and is_viable(spec, word) and depth_of(word) == 0


def depth_of(prefix: str) -> int:
    return sum(1 if c in OPEN else -1 if c in CLOSE else 0 for c in prefix)


def max_depth_of(word: str) -> int:
    d = best = 0
    for c in word:
        d += 1 if c in OPEN else -1
        best = max(best, d)
    return best


def classify(spec: GrammarSpec, word: str, ended: bool) -> str:
    """'valid', or why not: the first error of `scan`, 'early_eos' (ended with brackets open
    or empty) or 'no_eos' (ran out of tokens while viable)."""
    kind, _ = scan(spec, word)
    if kind != "ok":
        return kind
    if not ended:
        return "no_eos"
    return "valid" if word and depth_of(word) == 0 else "early_eos"


def exact(spec: GrammarSpec) -> dict[str, Any]:
    """The data distribution's exact figures: `log_z` (log of the probability that the
    generator's word fits `max_len`), `entropy` (nats per word), `length` [max_len + 1] and
    `depth` [max_depth + 1] (probability of each word length / maximum depth)."""
    L, D = spec.max_len, spec.max_depth
    # mass[n, d, m]: probability of a prefix of n brackets at depth d with maximum depth m;
    # plogp[n, d, m]: sum over such prefixes of q(prefix) * log q(prefix).
    mass = np.zeros((L + 1, D + 1, D + 1))
    plogp = np.zeros_like(mass)
    mass[0, 0, 0] = 1.0
    end_mass = np.zeros((L + 1, D + 1))
    end_plogp = np.zeros((L + 1, D + 1))
    for n in range(L + 1):
        for d in range(D + 1):
            for m in range(D + 1):
                q, g = mass[n, d, m], plogp[n, d, m]
                if q == 0.0:
                    continue
                for kind, p in spec.moves(d, n):
                    step = math.log(p / 2) if kind == "open" else math.log(p)
                    if kind == "end":
                        end_mass[n, m] += q * p
                        end_plogp[n, m] += p * g + q * p * step
                        continue
                    if n == L:
                        continue  # the word would be too long: rejected
                    d2 = d + 1 if kind == "open" else d - 1
                    mass[n + 1, d2, max(m, d2)] += q * p
                    plogp[n + 1, d2, max(m, d2)] += p * g + q * p * step
    z = end_mass.sum()
    log_z = math.log(z)
    # H = -sum p log p with p = q / Z: log Z - (1/Z) sum q log q.
    entropy = log_z - end_plogp.sum() / z
    return {
        "log_z": log_z,
        "entropy": float(entropy),
        "length": end_mass.sum(axis=1) / z,
        "depth": end_mass.sum(axis=0) / z,
        "mean_length": float((end_mass.sum(axis=1) / z) @ np.arange(L + 1)),
    }


def automaton(spec: GrammarSpec, tok: CharTokenizer) -> tuple[np.ndarray, int]:
    """The prefix automaton of a row (`>` then brackets) over the tokenizer's ids: a table
    `[S, V]` of next states (-1: the token makes the prefix non-viable, or is not an action
    of the language) and the start state. States: 0 = before the prompt, then one per stack
    of open brackets (depth <= max_depth). The length bound is not tracked: an opening that
    cannot close in time is not among the errors noise injects."""
    stacks: list[tuple[int, ...]] = [()]
    index = {(): 1}
    i = 0
    while i < len(stacks):
        s = stacks[i]
        if len(s) < spec.max_depth:
            for b in range(2):
                if (*s, b) not in index:
                    index[(*s, b)] = len(stacks) + 1
                    stacks.append((*s, b))
        i += 1
    table = np.full((len(stacks) + 1, tok.vocab_size), -1, np.int32)
    table[0, tok.encode(START)[0]] = 1
    for s, sid in index.items():
        for b in range(2):
            if len(s) < spec.max_depth:
                table[sid, tok.encode(OPEN[b])[0]] = index[(*s, b)]
            if s and s[-1] == b:
                table[sid, tok.encode(CLOSE[b])[0]] = index[s[:-1]]
    return table, 0


def tokenizer() -> CharTokenizer:
    """The task's tokenizer: `get_tokenizer("char:" + ALPHABET)` is the same one."""
    return CharTokenizer(ALPHABET, specials=SPECIALS)


def encode_example(word: str, tok: CharTokenizer, *, T: int) -> dict[str, Any]:
    row = make_row(tok.encode(START), tok.encode(word), T=T, eos_id=tok.eos_id, pad_id=tok.pad_id)
    return {**row, "word": word}


def generate_splits(spec: GrammarSpec, *, sizes: dict[str, int], seed: int) -> dict[str, list[str]]:
    """Words of each split, deterministic in (spec, sizes, seed); each split its own seed."""
    out = {}
    for name, n in sizes.items():
        if n < 1:
            raise ValueError(f"{name} needs at least one word, got {n}")
        rng = np.random.default_rng([seed, SPLIT_SEED_OFFSETS[name]])
        out[name] = [sample_word(spec, rng) for _ in range(n)]
    return out


def total_variation(p: Sequence[float], q: Sequence[float]) -> float:
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    return 0.5 * float(np.abs(p - q).sum())
