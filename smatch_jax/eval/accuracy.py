"""Arithmetic accuracy (SPEC 7) and text generation statistics, on the final text.

The model decodes greedily with the KV-cache sampler from each held-out question; the final
text (never the raw action stream) is compared with the reference answer. Reported with a
bootstrap 95% confidence interval and the backspace statistics of the generations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from smatch_jax import sampling
from smatch_jax.data.tokenizer_base import Tokenizer
from smatch_jax.eval import text_metrics


@dataclasses.dataclass
class AccuracyResult:
    scalars: dict[str, float]  # accuracy, ci_low, ci_high, bkspc_per_sample, ...
    correct: np.ndarray  # bool [N]
    samples: str  # a few decoded generations, for the sample dump
    generations: list[str] = dataclasses.field(default_factory=list)  # text: every generation
    generation_ids: list[list[int]] = dataclasses.field(default_factory=list)  # text, no eos


def bootstrap_ci(correct: np.ndarray, *, n_boot: int = 2000, seed: int = 0, level: float = 0.95):
    """Percentile bootstrap interval of the mean of a 0/1 array."""
    correct = np.asarray(correct, np.float64)
    if correct.size == 0:
        raise ValueError("no evaluation examples: the evaluation split is empty")
    rng = np.random.default_rng(seed)
    means = rng.choice(correct, (n_boot, correct.size)).mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def evaluate_arithmetic(
    model,
    split: dict,
    tokenizer: Tokenizer,
    *,
    prompt_max: int,
    max_new_tokens: int,
    batch_size: int = 256,
    n_show: int = 8,
) -> AccuracyResult:
    """Greedy exact-match accuracy; `split` has tokens, prompt_len (arrays) and answer (str)."""
    tokens, prompt_len = np.asarray(split["tokens"]), np.asarray(split["prompt_len"])
    answers: Sequence[str] = split["answer"]
    N = len(prompt_len)
    cfg = sampling.SamplingConfig(max_new_tokens=max_new_tokens, greedy=True)
    correct, n_bk, lines = np.zeros(N, bool), np.zeros(N, np.int64), []
    rows, row_len = [], []
    for start in range(0, N, batch_size):
        sl = slice(start, min(start + batch_size, N))
        m = prompt_len[sl]
        prompts = np.where(
            np.arange(prompt_max)[None] < m[:, None], tokens[sl, :prompt_max], tokenizer.pad_id
        )
        if len(m) < batch_size:  # pad the batch so one compiled sampler serves every call
            extra = batch_size - len(m)
            prompts = np.concatenate([prompts, np.repeat(prompts[:1], extra, 0)])
            m = np.concatenate([m, np.repeat(m[:1], extra)])
        out = jax.device_get(
            sampling.sample(
                model,
                prompts,
                m,
                jax.random.key(0),
                eos_id=tokenizer.eos_id,
                pad_id=tokenizer.pad_id,
                cfg=cfg,
            )
        )
        for i, b in enumerate(range(sl.start, sl.stop)):
            final = out.final[i, m[i] : out.final_length[i]].tolist()
            if out.ended[i]:
                final = final[:-1]
            text = tokenizer.decode(final).strip()
            correct[b] = text == answers[b].strip()
            n_bk[b] = out.n_bkspc[i]
            rows.append(out.actions[i, : out.length[i]].tolist())
            row_len.append(int(out.length[i]))
            if len(lines) < n_show:
                q = tokenizer.decode(prompts[i, : m[i]].tolist())
                acts = tokenizer.render_actions(out.actions[i, m[i] : out.length[i]].tolist())
                lines.append(f"{q!r} -> {acts!r} -> {text!r} (ref {answers[b]!r})")
    lo, hi = bootstrap_ci(correct)
    scalars = {
        "accuracy": float(correct.mean()),
        "accuracy_ci_low": lo,
        "accuracy_ci_high": hi,
        "bkspc_per_sample": float(n_bk.mean()),
        "bkspc_sample_frac": float((n_bk > 0).mean()),
        "n": float(N),
    }
    length = np.asarray(split["length"])
    ref = [tokens[b, : length[b]].tolist() for b in range(N)]
    bk = text_metrics.backspace_stats(rows, prompt_len, row_len, tokenizer.bkspc_id, reference=ref)
    for k in ("mean_run_length", "deleted_wrong_frac", "deleted_off_path_frac"):
        if k in bk:
            scalars[f"bkspc_{k}"] = float(bk[k])
    if "base" in split:  # breakdown by number base (harder in large bases)
        base = np.asarray(split["base"])
        for b in np.unique(base):
            scalars[f"accuracy_base{int(b)}"] = float(correct[base == b].mean())
    return AccuracyResult(scalars, correct, "\n".join(lines))


def sample_text(
    model,
    split: dict,
    tokenizer: Tokenizer,
    *,
    prompt_max: int,
    max_new_tokens: int,
    seed: int = 0,
    batch_size: int = 64,
    n_show: int = 8,
) -> AccuracyResult:
    """Samples continuations (temperature 1) of the split's prompts: backspace statistics,
    lengths, token-level n-gram entropy / diversity / repetition of the final continuations
    (after backspaces, eos removed) and a text dump. MAUVE and perplexity: `evaluate`."""
    tokens, prompt_len = np.asarray(split["tokens"]), np.asarray(split["prompt_len"])
    N = len(prompt_len)
    cfg = sampling.SamplingConfig(max_new_tokens=max_new_tokens)
    n_bk, lens, ended, lines = np.zeros(N), np.zeros(N), np.zeros(N, bool), []
    gen, rows, row_len = [], [], []
    for start in range(0, N, batch_size):
        sl = slice(start, min(start + batch_size, N))
        m = prompt_len[sl]
        prompts = np.where(
            np.arange(prompt_max)[None] < m[:, None], tokens[sl, :prompt_max], tokenizer.pad_id
        )
        key = jax.random.fold_in(jax.random.key(seed), start)
        out = jax.device_get(
            sampling.sample(
                model, prompts, m, key, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, cfg=cfg
            )
        )
        for i, b in enumerate(range(sl.start, sl.stop)):
            n_bk[b] = out.n_bkspc[i]
            cont = out.final[i, m[i] : out.final_length[i]].tolist()
            gen.append(cont[:-1] if out.ended[i] else cont)
            lens[b], ended[b] = len(gen[-1]), out.ended[i]
            rows.append(out.actions[i, : out.length[i]].tolist())
            row_len.append(int(out.length[i]))
            if len(lines) < n_show:
                q = tokenizer.decode(prompts[i, : m[i]].tolist())
                cont = tokenizer.decode(out.final[i, m[i] : out.final_length[i]].tolist())
                lines.append(f"{q!r} -> {cont!r} ({int(out.n_bkspc[i])} backspaces)")
    bk = text_metrics.backspace_stats(rows, prompt_len, row_len, tokenizer.bkspc_id)
    n_actions = sum(row_len) - int(prompt_len.sum())
    scalars = {
        "bkspc_per_sample": float(n_bk.mean()),
        "bkspc_sample_frac": float((n_bk > 0).mean()),
        "bkspc_action_frac": float(n_bk.sum() / max(n_actions, 1)),  # of all actions taken
        "deletions_per_sample": float((n_bk.sum() - bk["n_noop"]) / N),  # no-ops excluded
        "bkspc_mean_run_length": float(bk["mean_run_length"]),
        "mean_new_tokens": float(lens.mean()),  # final continuation, eos not counted
        "eos_frac": float(ended.mean()),  # continuations that ended with eos
        "n": float(N),
    }
    for n in (1, 2, 3):
        scalars[f"ngram_entropy_{n}"] = float(text_metrics.ngram_entropy(gen, n))
    scalars["diversity"] = float(text_metrics.diversity(gen))
    scalars["repetition_rate"] = float(text_metrics.repetition_rate(gen))
    result = AccuracyResult(scalars, np.zeros(0, bool), "\n".join(lines))
    result.generations = [tokenizer.decode(g) for g in gen]  # final text, for MAUVE
    result.generation_ids = gen
    return result
