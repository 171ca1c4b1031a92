"""Grammar evaluation (method.md §7): the model's words against the known generator, exactly.

The model samples `N` words from the prompt `>` (ancestral sampling at temperature T, default
1: the distribution it has learned, not its mode), `k` times with different seeds. On the final
words (after backspaces):

* `valid`: the fraction in the support (balanced Dyck-2 within the depth and length bounds,
  ended with eos), mean over the `k` seeds with its 95% t-interval; `invalid_<kind>`: why the
  others are not (`grammar.classify`: wrong_close, close_at_0, too_deep, too_long, early_eos,
  no_eos).
* `nll_valid`: the mean of -log p(w) under the data distribution over the valid words, and
  `entropy`, the data's own H = E_p[-log p(w)] (exact). A model that matches the data has
  nll_valid = H in expectation; below H it favours likely words (less diverse), above it
  unlikely ones.
* `tv_length`, `tv_depth`: total variation between the histogram of the words' lengths (max
  depths) and the data's exact one, with every invalid word in a bin of its own (the data has
  none there), over all `N * k` words. A finite sample of the data itself is not at distance
  0: `tv_*_floor` is the same figure for `N * k` words drawn from the generator (seeded).
* backspace statistics, and the mechanism figures of `mechanism.py` with "still correct" =
  viable (some valid word extends the prefix).
* recovery: each test word cut after `j` brackets (`j` uniform) and followed by one error (a
  bracket the automaton rejects there, drawn like the noise kind `errors`), given as actions the
  model may delete; recovered = the final word is valid. A model that cannot delete never
  recovers (every error here is final): `recovery` is 0 for MLE by construction.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import jax
import numpy as np

from smatch_jax.data import grammar
from smatch_jax.data.tokenizer_base import Tokenizer
from smatch_jax.eval import decoding, mechanism, text_metrics
from smatch_jax.eval.accuracy import AccuracyResult, mean_ci

KINDS = ("wrong_close", "close_at_0", "too_deep", "too_long", "early_eos", "no_eos", "bad_token")


def _words(dec: decoding.Decoded, floor: Sequence[int], tok: Tokenizer) -> list[str]:
    return [tok.decode(f[int(m) :]) for f, m in zip(dec.final, floor, strict=True)]


def _hist(values: Sequence[int | None], size: int) -> np.ndarray:
    """Histogram over 0..size-1 plus a last bin for None (invalid words)."""
    h = np.zeros(size + 1)
    for v in values:
        h[size if v is None else v] += 1
    return h / max(len(values), 1)


def corrupt(
    words: Sequence[str], spec: grammar.GrammarSpec, noise_probs: np.ndarray, tok, *, seed=0
) -> list[list[int]]:
    """Recovery prompts: `>`, the first `j` brackets of each word (`j` uniform over its
    positions), then one bracket that makes the prefix non-viable, drawn from `noise_probs`
    restricted to those (the noise kind `errors`). Deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    start = tok.encode(grammar.START)
    out = []
    for w in words:
        j = int(rng.integers(0, len(w)))
        p = np.zeros(len(noise_probs))
        for c in grammar.OPEN + grammar.CLOSE:
            if not grammar.is_viable(spec, w[:j] + c):
                p[tok.encode(c)[0]] = noise_probs[tok.encode(c)[0]]
        if p.sum() <= 0:
            raise ValueError(f"no error token after {w[:j]!r}: the noise distribution is empty")
        wrong = int(rng.choice(len(p), p=p / p.sum()))
        out.append(start + tok.encode(w[:j]) + [wrong])
    return out


def evaluate_grammar(
    model,
    split: dict,
    tokenizer: Tokenizer,
    spec: grammar.GrammarSpec,
    *,
    prompt_max: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    num_samples: int = 4,
    noise_probs: np.ndarray | None = None,
    batch_size: int = 256,
    n_show: int = 8,
) -> AccuracyResult:
    """The figures of the module docstring; `split` has tokens, prompt_len, length and word:
    its size is the number of words `N` sampled per seed, its words give the recovery prompts
    (with `noise_probs`, the ground-truth distribution of the training rows)."""
    tok, words = tokenizer, split["word"]
    N = len(words)
    if N == 0:
        raise ValueError("no evaluation examples: the evaluation split is empty")
    ex = grammar.exact(spec)
    start = tok.encode(grammar.START)
    prompts = [start] * N
    floor = [len(start)] * N
    cfg = decoding.decoding_config("sample", max_new_tokens, temperature)
    valid_rates, pooled, kinds, first = [], [], Counter(), None
    for s in range(num_samples):
        dec = decoding.decode(
            model, prompts, tok, cfg, width=prompt_max, key=jax.random.key(s), floor_len=floor,
            batch_size=batch_size,
        )  # fmt: skip
        ws = _words(dec, floor, tok)
        verdicts = [grammar.classify(spec, w, bool(e)) for w, e in zip(ws, dec.ended, strict=True)]
        kinds.update(verdicts)
        valid_rates.append(float(np.mean([v == "valid" for v in verdicts])))
        pooled += [(w if v == "valid" else None) for w, v in zip(ws, verdicts, strict=True)]
        first = first or (dec, ws, verdicts)
    valid, half = mean_ci(valid_rates)
    good = [w for w in pooled if w is not None]
    nll = [-grammar.log_prob(spec, w, ex["log_z"]) for w in good]
    scalars = {
        "valid": valid,
        "valid_ci_low": valid - half,
        "valid_ci_high": valid + half,
        "valid_k": float(num_samples),
        "nll_valid": float(np.mean(nll)) if nll else float("nan"),
        "entropy": ex["entropy"],
        "n": float(N),
    }
    scalars["nll_gap"] = scalars["nll_valid"] - ex["entropy"]
    L, D = spec.max_len, spec.max_depth
    lengths = [None if w is None else len(w) for w in pooled]
    depths = [None if w is None else grammar.max_depth_of(w) for w in pooled]
    scalars["tv_length"] = grammar.total_variation(_hist(lengths, L + 1), [*ex["length"], 0])
    scalars["tv_depth"] = grammar.total_variation(_hist(depths, D + 1), [*ex["depth"], 0])
    rng = np.random.default_rng(12345)
    ref = [grammar.sample_word(spec, rng) for _ in range(len(pooled))]
    scalars["tv_length_floor"] = grammar.total_variation(
        _hist([len(w) for w in ref], L + 1), [*ex["length"], 0]
    )
    scalars["tv_depth_floor"] = grammar.total_variation(
        _hist([grammar.max_depth_of(w) for w in ref], D + 1), [*ex["depth"], 0]
    )
    scalars["mean_length_valid"] = float(np.mean([len(w) for w in good])) if good else 0.0
    scalars["data_mean_length"] = ex["mean_length"]
    total = sum(kinds.values())
    scalars.update({f"invalid_{k}": kinds.get(k, 0) / total for k in KINDS})

    dec, ws, verdicts = first
    rows = dec.actions
    scalars["bkspc_per_sample"] = float(dec.n_bkspc.mean())
    scalars["bkspc_sample_frac"] = float((dec.n_bkspc > 0).mean())
    bk = text_metrics.backspace_stats(rows, floor, [len(r) for r in rows], tok.bkspc_id)
    if "mean_run_length" in bk:
        scalars["bkspc_mean_run_length"] = float(bk["mean_run_length"])
    m = len(start)
    viable = lambda state, _ref: grammar.is_viable(spec, tok.decode(state[m:]))
    refs = [None] * N
    dels = mechanism.deletion_stats(rows, floor, refs, tok.bkspc_id, on_path=viable)
    sep = mechanism.separation(model, rows, floor, refs, tok.bkspc_id, tok.pad_id, on_path=viable)
    scalars.update({f"mech_{k}": v for k, v in {**dels, **sep}.items()})
    lines = [
        f"{tok.render_actions(rows[b][m:])!r} -> {ws[b]!r} ({verdicts[b]})"
        for b in range(min(n_show, N))
    ]
    result = AccuracyResult(scalars, np.array([v == "valid" for v in verdicts]), "\n".join(lines))
    if noise_probs is not None:
        rec, result.recovery_examples = recovery(
            model, words, tok, spec, noise_probs, width=prompt_max + max_new_tokens,
            max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size,
        )  # fmt: skip
        scalars.update(rec)
    return result


def recovery(
    model, words, tok, spec, noise_probs, *, width, max_new_tokens, temperature, batch_size
):
    """Recovery from a corrupted prefix (`corrupt`), greedy_no_repeat (the headline) and one
    sampling seed: `recovery[_sample]` = the final word is valid; `recovery_deletions`,
    `recovery_exact_delete_frac` (deleted the error and nothing else) of the headline; and the
    first four examples as tab-separated lines (given prefix, actions, final word, verdict)."""
    prompts = corrupt(words, spec, noise_probs, tok)
    if max(map(len, prompts)) > width:
        raise ValueError(f"a corrupted prompt is longer than the sampler width {width}")
    floor = [len(grammar.START)] * len(prompts)
    out, head = {}, None
    for mode, suffix in (("greedy_no_repeat", ""), ("sample", "_sample")):
        cfg = decoding.decoding_config(mode, max_new_tokens, temperature)
        dec = decoding.decode(
            model, prompts, tok, cfg, width=width, key=jax.random.key(0), floor_len=floor,
            batch_size=batch_size,
        )  # fmt: skip
        ws = _words(dec, floor, tok)
        verdicts = [grammar.classify(spec, w, bool(e)) for w, e in zip(ws, dec.ended, strict=True)]
        ok = np.array([v == "valid" for v in verdicts])
        out[f"recovery{suffix}"] = float(ok.mean())
        head = head or (dec, ws, ok)
    dec, ws, ok = head
    out.update(decoding.recovery_deletions(dec, prompts, tok.bkspc_id))
    examples = [
        "\t".join(
            [
                tok.render_actions(prompts[b][1:]),
                tok.render_actions(dec.actions[b][len(prompts[b]) :]),
                ws[b],
                "valid" if ok[b] else "invalid",
            ]
        )
        for b in range(min(4, len(prompts)))
    ]
    return out, examples
