"""`python -m smatch_jax.evaluate --workdir=W [--step=N]`: evaluate a training checkpoint.

Writes `W/eval_<step>.json` (every figure plus the protocol) and `W/eval_<step>.md` (a short
summary). Deterministic: the same checkpoint and flags give the same file.

* Arithmetic: greedy exact match of the final answer (after backspaces) with a bootstrap 95%
  interval, per number base, backspace statistics.
* Text: one sampled continuation (temperature 1, `<bkspc>` allowed) of every validation prompt;
  backspace statistics (rate, deletions per sample), token-level n-gram entropy, diversity,
  repetition and length of the final continuations (after backspaces), the same statistics of
  the reference continuations, and the perplexity of generated and reference continuations
  given their prompt under a reference model (`--ref_workdir`, default: the evaluated model
  itself). `--mauve` adds MAUVE between the generated and the reference continuations (prompts
  excluded), mean ± std over k-means seeds, with features from `--featurizer minilm`
  (all-MiniLM-L6-v2 sentence embeddings) or `model` (the reference model's last hidden state).
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from smatch_jax import train
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


def load_model(workdir: str, step: int | None = None, split: str | None = None):
    """(run, step, model) of a training workdir at `step` (default: latest); `split`: the
    evaluation split `run.data.eval_split` holds (default: the run's own)."""
    run, state = train.load_trained(workdir, step, eval_split=split)
    return run, int(state.step), nnx.merge(run.graphdef, state.params, run.frozen)


_load_ref_model = functools.lru_cache(maxsize=2)(load_model)  # one load per process


def _same_tokenizer(a, b) -> bool:
    ids = range(a.vocab_size)
    return a.vocab_size == b.vocab_size and all(a.decode([i]) == b.decode([i]) for i in ids)


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
    """Metrics, protocol and samples of the text evaluation (see the module docstring)."""
    res = accuracy.sample_text(
        model, split, tokenizer, prompt_max=prompt_max, max_new_tokens=max_new_tokens, seed=seed
    )
    prompt_len, ref_conts = _continuations(split, tokenizer.eos_id)
    metrics = dict(res.scalars)
    metrics.update({f"ref_{k}": v for k, v in _stats(ref_conts).items()})
    scorer = model if ref_model is None else ref_model
    gen_ppl = _perplexity(scorer, split, res.generation_ids)
    ref_ppl = _perplexity(scorer, split, ref_conts)
    metrics.update(ppl_generated=gen_ppl.perplexity, ppl_reference=ref_ppl.perplexity)
    protocol: dict[str, Any] = {
        "split": split_name,
        "n": len(prompt_len),
        "prompt_tokens": f"{int(prompt_len.min())}-{int(prompt_len.max())}",
        "reference_continuation_tokens": f"{min(map(len, ref_conts))}-{max(map(len, ref_conts))}",
        "max_new_tokens": max_new_tokens,
        "decoding": "ancestral sampling, temperature 1.0, no top-k / top-p, <bkspc> allowed",
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
    if featurizer is not None:
        refs = [tokenizer.decode(c) for c in ref_conts]
        spread = mauve_lib.mauve_with_spread(
            featurizer(refs), featurizer(res.generations), seeds=tuple(mauve_seeds)
        )
        metrics.update(mauve=spread["mean"], mauve_std=spread["std"])
        protocol["mauve"] = {
            "featurizer": featurizer.name,
            "texts": "generated vs reference continuations of the same prompts (no prompt)",
            "n_generated": len(res.generations),
            "n_reference": len(refs),
            "kmeans_seeds": list(mauve_seeds),
            "per_seed": spread["values"],
            "std": "over k-means seeds (ddof 0)",
            "settings": "num_buckets n/10, PCA 0.9 explained variance, 5 k-means restarts, "
            "scaling factor 5 (mauve-text 0.4.0 defaults)",
        }
    return {"metrics": metrics, "protocol": protocol, "samples": res.samples.splitlines()}


def evaluate_workdir(
    workdir: str,
    step: int | None = None,
    *,
    featurizer: str | CachedFeaturizer | None = None,
    ref_workdir: str | None = None,
    mauve_seeds: Sequence[int] = MAUVE_SEEDS,
    split: str | None = None,
) -> dict:
    """Evaluates `workdir` at `step` (default: latest) and writes eval_<step>.{json,md}
    (`eval_<split>_<step>` when `split` names a split other than the run's own).

    `split`: the split to evaluate (default: the one the run evaluated during training).
    Text only: `featurizer` ('minilm', 'model' or a `CachedFeaturizer`; None: no MAUVE),
    `ref_workdir` (the perplexity model; None: the evaluated model)."""
    t0 = time.time()
    run, step, model = load_model(str(workdir), step, split)
    tok, ev = run.data.tokenizer, run.data.eval_split
    kw = dict(
        prompt_max=run.settings.prompt_max, max_new_tokens=run.settings.sampling.max_new_tokens
    )
    task = run.config.data.task
    if task == "arithmetic":
        res = accuracy.evaluate_arithmetic(model, ev, tok, **kw)
        protocol = {
            "split": run.data.eval_name,
            "n": len(ev["prompt_len"]),
            "decoding": "greedy",
            "max_new_tokens": kw["max_new_tokens"],
            "final_text": "after backspaces",
        }
        body = {"metrics": res.scalars, "protocol": protocol, "samples": res.samples.splitlines()}
    else:
        ref_model, ref_name = None, SELF
        if ref_workdir:
            ref_run, ref_step, ref_model = _load_ref_model(str(ref_workdir))
            if not _same_tokenizer(ref_run.data.tokenizer, tok):
                raise ValueError(f"{ref_workdir} uses another tokenizer than {workdir}")
            ref_name = f"{ref_workdir} (step {ref_step})"
        if isinstance(featurizer, str):
            featurizer = make_featurizer(featurizer, ref_model or model, tok)
        body = text_report(
            model,
            ev,
            tok,
            seed=run.config.seed,
            ref_model=ref_model,
            ref_name=ref_name,
            featurizer=featurizer,
            mauve_seeds=mauve_seeds,
            split_name=run.data.eval_name,
            **kw,
        )
    report = {"step": step, "task": task, **body, "wall_s": round(time.time() - t0, 1)}
    out = Path(workdir)
    name = f"eval_{step}" if split is None else f"eval_{run.data.eval_name}_{step}"
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))
    (out / f"{name}.md").write_text(summary_markdown(report))
    return report


def _protocol_lines(protocol: dict, indent: str = "") -> list[str]:
    lines = []
    for k, v in protocol.items():
        if isinstance(v, dict):
            lines += [f"{indent}- {k}:", *_protocol_lines(v, indent + "  ")]
        else:
            lines.append(f"{indent}- {k}: {v}")
    return lines


def summary_markdown(report: dict) -> str:
    lines = [
        f"# Evaluation at step {report['step']} ({report['task']})",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.4g} |" for k, v in report["metrics"].items()]
    lines += [
        "",
        "Protocol:",
        "",
        *_protocol_lines(report["protocol"]),
        "",
        "Samples:",
        "",
        *(f"- `{s}`" for s in report["samples"]),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--step", type=int, default=None, help="default: the latest checkpoint")
    ap.add_argument(
        "--split", default=None, help="split to evaluate (default: the run's own eval split)"
    )
    ap.add_argument("--mauve", action="store_true", help="text: also MAUVE (slower)")
    ap.add_argument("--featurizer", choices=("minilm", "model"), default="minilm")
    ap.add_argument("--mauve_seeds", type=int, default=len(MAUVE_SEEDS), help="k-means seeds")
    ap.add_argument("--ref_workdir", default=None, help="text: perplexity model (default: self)")
    args = ap.parse_args(argv)
    report = evaluate_workdir(
        args.workdir,
        args.step,
        featurizer=args.featurizer if args.mauve else None,
        ref_workdir=args.ref_workdir,
        mauve_seeds=tuple(range(args.mauve_seeds)),
        split=args.split,
    )
    print(summary_markdown(report))


if __name__ == "__main__":
    main()
