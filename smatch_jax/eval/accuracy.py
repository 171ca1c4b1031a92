"""Arithmetic accuracy (method.md §7) and text generation statistics, on the
final text.

The model decodes each held-out question with the KV-cache sampler under each decoding mode
(`decoding.py`: greedy, greedy without repeating a deleted token, sampling); the final text
(never the raw action stream) is compared with the reference answer. Reported with a bootstrap
95% confidence interval, the backspace statistics of the generations, and the recovery from a
corrupted answer prefix (the paper's Table 2).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from smatch_jax import sampling, sharding
from smatch_jax.data.tokenizer_base import Tokenizer
from smatch_jax.eval import decoding, mechanism, text_metrics


@dataclasses.dataclass
class AccuracyResult:
    scalars: dict[str, float]  # accuracy, ci_low, ci_high, bkspc_per_sample, ...
    correct: np.ndarray  # bool [N]
    samples: str  # a few decoded generations, for the sample dump
    generations: list[str] = dataclasses.field(default_factory=list)  # text: every generation
    generation_ids: list[list[int]] = dataclasses.field(default_factory=list)  # text, no eos
    recovery_examples: list[str] = dataclasses.field(default_factory=list)  # arithmetic


def bootstrap_ci(correct: np.ndarray, *, n_boot: int = 2000, seed: int = 0, level: float = 0.95):
    """Percentile bootstrap interval of the mean of a 0/1 array."""
    correct = np.asarray(correct, np.float64)
    if correct.size == 0:
        raise ValueError("no evaluation examples: the evaluation split is empty")
    rng = np.random.default_rng(seed)
    means = rng.choice(correct, (n_boot, correct.size)).mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (0 with one value): over seeds."""
    v = np.asarray(values, np.float64)
    if v.size < 2:
        return float(v.mean()), 0.0
    t95 = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 8: 2.36, 10: 2.26}
    t = t95.get(v.size, 1.96 if v.size > 10 else 2.45)
    return float(v.mean()), float(t * v.std(ddof=1) / np.sqrt(v.size))


def exact_match(dec: decoding.Decoded, prompt_len, answers, tokenizer) -> np.ndarray:
    """bool [N]: the final text after each prompt (backspaces applied) equals the answer."""
    texts = [
        tokenizer.decode(f[int(m) :]).strip() for f, m in zip(dec.final, prompt_len, strict=True)
    ]
    return np.array([t == a.strip() for t, a in zip(texts, answers, strict=True)])


def _by_mode(model, prompts, floor, answers, tokenizer, modes, *, width, temperature, k, **kw):
    """{mode: (scalars, Decoded of the first seed, correct of the first seed)}."""
    out = {}
    for mode in modes:
        cfg = decoding.decoding_config(mode, kw["max_new_tokens"], temperature)
        accs, first = [], None
        for s in range(k if mode == "sample" else 1):
            dec = decoding.decode(
                model,
                prompts,
                tokenizer,
                cfg,
                width=width,
                key=jax.random.key(s),
                floor_len=floor,
                batch_size=kw["batch_size"],
            )
            correct = exact_match(dec, floor, answers, tokenizer)
            accs.append(float(correct.mean()))
            first = first or (dec, correct)
        mean, half = mean_ci(accs)
        sc = {"": mean, "_bkspc_per_sample": float(first[0].n_bkspc.mean())}
        if mode == "sample":
            sc.update({"_ci_low": mean - half, "_ci_high": mean + half, "_k": float(k)})
        out[mode] = (sc, *first)
    return out


def evaluate_arithmetic(
    model,
    split: dict,
    tokenizer: Tokenizer,
    *,
    prompt_max: int,
    max_new_tokens: int,
    decodings: Sequence[str] = decoding.DECODINGS,
    temperature: float = 1.0,
    num_samples: int = 4,
    noise_probs: np.ndarray | None = None,
    batch_size: int = 256,
    n_show: int = 8,
) -> AccuracyResult:
    """Exact match of the final answer under each decoding mode, and recovery.

    `split` has tokens, prompt_len, length (arrays) and answer (str). Scalars per mode:
    `accuracy_<mode>` (for `sample`: the mean over `num_samples` sampling seeds, with the 95%
    t-interval over them) and `bkspc_per_sample_<mode>`; the headline `accuracy` (bootstrap
    interval over questions, backspace statistics, per-base breakdown) is `greedy_no_repeat`
    when it is among `decodings`, else the first mode. With `noise_probs` (the ground-truth
    noise distribution) also the recovery evaluation (`recovery_<mode>`, `recovery`,
    `recovery_deletions`, `recovery_exact_delete_frac`; see `recovery`). `mech_*`: precision
    and recall of the headline decoding's deletions and, with `sample` among `decodings`, how
    well pi(<bkspc>) and V separate still-correct from already-wrong states of the model's own
    samples (`mechanism.py`).
    """
    tokens, prompt_len = np.asarray(split["tokens"]), np.asarray(split["prompt_len"])
    length, answers = np.asarray(split["length"]), split["answer"]
    N = len(prompt_len)
    if N == 0:
        raise ValueError("no evaluation examples: the evaluation split is empty")
    modes = tuple(decodings)
    head = decoding.HEADLINE if decoding.HEADLINE in modes else modes[0]
    kw = dict(max_new_tokens=max_new_tokens, batch_size=batch_size)
    prompts = [tokens[b, : prompt_len[b]].tolist() for b in range(N)]
    res = _by_mode(
        model, prompts, prompt_len, answers, tokenizer, modes,
        width=prompt_max, temperature=temperature, k=num_samples, **kw,
    )  # fmt: skip
    scalars = {f"accuracy_{m}{k}": v for m, (sc, _, _) in res.items() for k, v in sc.items()}
    _, dec, correct = res[head]
    lo, hi = bootstrap_ci(correct)
    if head == "sample":
        lo, hi = scalars["accuracy_sample_ci_low"], scalars["accuracy_sample_ci_high"]
    scalars.update(
        accuracy=scalars[f"accuracy_{head}"],
        accuracy_ci_low=lo,
        accuracy_ci_high=hi,
        bkspc_per_sample=float(dec.n_bkspc.mean()),
        bkspc_sample_frac=float((dec.n_bkspc > 0).mean()),
        n=float(N),
    )
    ref = [tokens[b, : length[b]].tolist() for b in range(N)]
    rows = dec.actions
    bk = text_metrics.backspace_stats(
        rows, prompt_len, [len(r) for r in rows], tokenizer.bkspc_id, reference=ref
    )
    for k in ("mean_run_length", "deleted_wrong_frac", "deleted_off_path_frac"):
        if k in bk:
            scalars[f"bkspc_{k}"] = float(bk[k])
    if "base" in split:  # breakdown by number base (harder in large bases)
        base = np.asarray(split["base"])
        for b in np.unique(base):
            scalars[f"accuracy_base{int(b)}"] = float(correct[base == b].mean())
    lines = [
        f"{tokenizer.decode(prompts[b])!r} -> "
        f"{tokenizer.render_actions(rows[b][prompt_len[b] :])!r} -> "
        f"{tokenizer.decode(dec.final[b][prompt_len[b] :]).strip()!r} (ref {answers[b]!r})"
        for b in range(min(n_show, N))
    ]
    on_path = mechanism.text_on_path(tokenizer)  # on the decoded text (any tokenizer)
    dels = mechanism.deletion_stats(rows, prompt_len, ref, tokenizer.bkspc_id, on_path)
    scalars.update({f"mech_{k}": v for k, v in dels.items()})
    if "sample" in res:  # the model's own samples: does it know where it went wrong?
        own = res["sample"][1].actions
        sep = mechanism.separation(
            model, own, prompt_len, ref, tokenizer.bkspc_id, tokenizer.pad_id, on_path
        )
        scalars.update({f"mech_{k}": v for k, v in sep.items()})
    result = AccuracyResult(scalars, correct, "\n".join(lines))
    if noise_probs is not None:
        rec, result.recovery_examples = recovery(
            model, split, tokenizer, noise_probs, modes=modes, head=head,
            width=prompt_max + max_new_tokens, temperature=temperature, k=num_samples, **kw,
        )  # fmt: skip
        scalars.update(rec)
    return result


def recovery(model, split, tokenizer, noise_probs, *, modes, head, width, temperature, k, **kw):
    """The paper's Table 2: each question with its answer prefix corrupted (`decoding.corrupt`:
    `j` reference tokens, then one wrong token), placed after the prompt as actions the model
    may delete. Returns scalars and the first four examples as text:
      recovery_<mode>             the final answer after backspaces equals the reference;
      recovery                    of the headline mode;
      recovery_deletions          mean backspaces per question (headline mode);
      recovery_exact_delete_frac  the model deleted the wrong token and nothing else (its one
                                  backspace was its first action).
    A model that cannot delete keeps the wrong token: its recovery is what continuing after an
    error gives (the baseline). An example is one tab-separated line: question, the given
    answer prefix with its wrong token, the model's actions, its final answer, the reference,
    right / wrong."""
    tokens, m = np.asarray(split["tokens"]), np.asarray(split["prompt_len"])
    prompts = decoding.corrupt(
        tokens, m, np.asarray(split["length"]), noise_probs, eos_id=tokenizer.eos_id
    )[0]
    if max(map(len, prompts)) > width:
        raise ValueError(f"a corrupted prompt is longer than the sampler width {width}")
    res = _by_mode(
        model, prompts, m, split["answer"], tokenizer, modes,
        width=width, temperature=temperature, k=k, **kw,
    )  # fmt: skip
    out = {f"recovery_{mo}{key}": v for mo, (sc, _, _) in res.items() for key, v in sc.items()}
    _, dec, correct = res[head]
    out["recovery"] = out[f"recovery_{head}"]
    out.update(decoding.recovery_deletions(dec, prompts, tokenizer.bkspc_id))
    examples = []
    for b in range(min(4, len(prompts))):
        q = tokenizer.decode(prompts[b][: m[b]])
        given = tokenizer.render_actions(prompts[b][m[b] :])
        acts = tokenizer.render_actions(dec.actions[b][len(prompts[b]) :])
        final = tokenizer.decode(dec.final[b][m[b] :]).strip()
        mark = "right" if correct[b] else "wrong"
        fields = [q, given, acts, final, split["answer"][b], mark]
        # one line per example, whatever the prompt format ("Question: ...\nAnswer:")
        examples.append("\t".join(f.replace("\t", " ").replace("\n", "\\n") for f in fields))
    return out, examples


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
    no_repeat_deleted: bool = False,
) -> AccuracyResult:
    """Samples continuations (temperature 1; `no_repeat_deleted`: never a token deleted from
    the same state, `decoding.py`) of the split's prompts: backspace statistics,
    lengths, token-level n-gram entropy / diversity / repetition of the final continuations
    (after backspaces, eos removed) and a text dump. MAUVE and perplexity: `evaluate`."""
    tokens, prompt_len = np.asarray(split["tokens"]), np.asarray(split["prompt_len"])
    N = len(prompt_len)
    cfg = sampling.SamplingConfig(
        max_new_tokens=max_new_tokens, no_repeat_deleted=no_repeat_deleted
    )
    n_bk, lens, ended, lines = np.zeros(N), np.zeros(N), np.zeros(N, bool), []
    gen, rows, row_len = [], [], []
    for start in range(0, N, batch_size):
        sl = slice(start, min(start + batch_size, N))
        m = prompt_len[sl]
        prompts = np.where(
            np.arange(prompt_max)[None] < m[:, None], tokens[sl, :prompt_max], tokenizer.pad_id
        )
        key = jax.random.fold_in(jax.random.key(seed), start)
        out = sharding.to_host(
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
