"""The text evaluation (method.md §7): sampled continuations of the validation prompts against
the reference continuations.

One continuation per prompt by ancestral sampling at temperature 1 (the headline; and again
with `no_repeat_deleted`, metrics suffixed `_no_repeat`): backspace statistics (rate, deletions
per sample), token-level n-gram entropy, diversity, repetition and length of the final
continuations (after backspaces), the same statistics of the reference continuations, the
perplexity of generated and reference continuations given their prompt under a reference
model, and optionally MAUVE between generated and reference continuations (prompts excluded),
mean ± std over k-means seeds, on features of a `CachedFeaturizer` (`make_featurizer`:
all-MiniLM-L6-v2 sentence embeddings, or the reference model's last hidden state).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from smatch_jax.eval import accuracy, text_metrics
from smatch_jax.eval import mauve as mauve_lib
from smatch_jax.eval import perplexity as ppl_lib

MAUVE_SEEDS = (0, 1, 2, 3, 4)
SELF = "the evaluated model itself"


class CachedFeaturizer:
    """A featurizer `fn(texts) -> [N, d]` that remembers every text's features (the reference
    continuations are embedded once when several models are evaluated in one process)."""

    def __init__(self, fn: Callable[[Sequence[str]], np.ndarray], name: str) -> None:
        self.fn, self.name = fn, name
        self._cache: dict[str, np.ndarray] = {}

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            for t, f in zip(missing, self.fn(missing), strict=True):
                self._cache[t] = np.asarray(f, np.float32)
        return np.stack([self._cache[t] for t in texts])


def make_featurizer(name: str, ref_model=None, tokenizer=None) -> CachedFeaturizer:
    """'minilm' (all-MiniLM-L6-v2) or 'model' (last-token hidden state of `ref_model`)."""
    from smatch_jax.eval import featurizers

    if name == "minilm":
        return CachedFeaturizer(featurizers.MiniLMFeaturizer(), "all-MiniLM-L6-v2 (mean-pooled)")
    if name == "model":  # an empty continuation is featurised as the lone eos token
        model_fn = featurizers.ModelFeaturizer(ref_model, tokenizer, prepend_bos=False)
        fn = lambda texts: model_fn([tokenizer.encode(t) or [tokenizer.eos_id] for t in texts])
        return CachedFeaturizer(fn, "reference model, last-token final hidden state")
    raise ValueError(f"unknown featurizer {name!r}; use 'minilm' or 'model'")


def _continuations(split: dict, eos_id: int) -> tuple[np.ndarray, list[list[int]]]:
    """Prompt lengths and the reference continuation ids (eos removed) of a text split."""
    tokens, m, n = (np.asarray(split[k]) for k in ("tokens", "prompt_len", "length"))
    conts = []
    for b in range(len(m)):
        c = tokens[b, m[b] : n[b]].tolist()
        conts.append(c[:-1] if c and c[-1] == eos_id else c)
    return m, conts


def _stats(seqs: list[list[int]]) -> dict[str, float]:
    out = {f"ngram_entropy_{n}": text_metrics.ngram_entropy(seqs, n) for n in (1, 2, 3)}
    out["diversity"] = text_metrics.diversity(seqs)
    out["repetition_rate"] = text_metrics.repetition_rate(seqs)
    out["mean_new_tokens"] = text_metrics.mean_length(seqs)
    return out


def _perplexity(model, split: dict, conts: list[list[int]]) -> ppl_lib.PerplexityResult:
    tokens, m = np.asarray(split["tokens"]), np.asarray(split["prompt_len"])
    rows = [tokens[b, : m[b]].tolist() + c for b, c in enumerate(conts)]
    return ppl_lib.perplexity(model, rows, [len(r) for r in rows], score_from=m)


def text_report(
    model,
    split: dict,
    tokenizer,
    *,
    prompt_max: int,
    max_new_tokens: int,
    seed: int,
    ref_model=None,
    ref_name: str = SELF,
    featurizer: CachedFeaturizer | None = None,
    mauve_seeds: Sequence[int] = MAUVE_SEEDS,
    split_name: str = "validation",
) -> dict[str, Any]:
    """Metrics, protocol and samples of the text evaluation (see the module docstring).

    The headline is ancestral sampling at temperature 1; the same metrics of sampling with
    `no_repeat_deleted` (no token chosen again at a state it was deleted from) carry the
    suffix `_no_repeat`."""
    prompt_len, ref_conts = _continuations(split, tokenizer.eos_id)
    scorer = model if ref_model is None else ref_model
    refs = [tokenizer.decode(c) for c in ref_conts]

    def generate_and_score(no_repeat: bool):
        res = accuracy.sample_text(
            model,
            split,
            tokenizer,
            prompt_max=prompt_max,
            max_new_tokens=max_new_tokens,
            seed=seed,
            no_repeat_deleted=no_repeat,
        )
        gen_ppl = _perplexity(scorer, split, res.generation_ids)
        scores, spread = {**res.scalars, "ppl_generated": gen_ppl.perplexity}, None
        if featurizer is not None:
            spread = mauve_lib.mauve_with_spread(
                featurizer(refs), featurizer(res.generations), seeds=tuple(mauve_seeds)
            )
            scores.update(mauve=spread["mean"], mauve_std=spread["std"])
        return res, gen_ppl, scores, spread

    res, gen_ppl, metrics, spread = generate_and_score(False)
    metrics.update({f"{k}_no_repeat": v for k, v in generate_and_score(True)[2].items()})
    ref_ppl = _perplexity(scorer, split, ref_conts)
    metrics.update({f"ref_{k}": v for k, v in _stats(ref_conts).items()})
    metrics["ppl_reference"] = ref_ppl.perplexity
    protocol: dict[str, Any] = {
        "split": split_name,
        "n": len(prompt_len),
        "prompt_tokens": f"{int(prompt_len.min())}-{int(prompt_len.max())}",
        "reference_continuation_tokens": f"{min(map(len, ref_conts))}-{max(map(len, ref_conts))}",
        "max_new_tokens": max_new_tokens,
        "decoding": "ancestral sampling, temperature 1.0, no top-k / top-p, <bkspc> allowed; "
        "*_no_repeat: the same with no_repeat_deleted",
        "sampling_seed": seed,
        "final_text": "after backspaces, eos removed; n-gram statistics on token ids",
        "perplexity": {
            "reference_model": ref_name if ref_model is not None else SELF,
            "scored": "continuation tokens given the prompt (eos not scored), probabilities "
            "renormalised over the text vocabulary (no <bkspc>)",
            "tokens_generated": gen_ppl.n_tokens,
            "tokens_reference": ref_ppl.n_tokens,
        },
    }
    if spread is not None:
        protocol["mauve"] = {
            "featurizer": featurizer.name,
            "texts": "generated vs reference continuations of the same prompts (no prompt)",
            "n_generated": len(res.generations),
            "n_reference": len(ref_conts),
            "kmeans_seeds": list(mauve_seeds),
            "per_seed": spread["values"],
            "std": "over k-means seeds (ddof 0)",
            "settings": "num_buckets n/10, PCA 0.9 explained variance, 5 k-means restarts, "
            "scaling factor 5 (mauve-text 0.4.0 defaults)",
        }
    return {"metrics": metrics, "protocol": protocol, "samples": res.samples.splitlines()}
