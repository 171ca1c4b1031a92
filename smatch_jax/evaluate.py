"""`python -m smatch_jax.evaluate --workdir=W [--step=N]`: evaluate a training checkpoint.

Writes `W/eval_<step>.json` (every figure plus the protocol) and `W/eval_<step>.md` (a short
summary). Deterministic: the same checkpoint and flags give the same file.

* Arithmetic: exact match of the final answer (after backspaces) under each decoding
  (`--decoding greedy|greedy_no_repeat|sample|all`, `--temperature`, `--num_samples`; the
  headline `accuracy` is greedy_no_repeat) with a bootstrap 95% interval, per number base,
  backspace statistics, and recovery from a corrupted answer prefix (the paper's Table 2).
  `--questions FILE.jsonl` evaluates your own {"question": ..., "answer": ...} lines.
* Text: one sampled continuation (temperature 1, `<bkspc>` allowed; and again with
  `no_repeat_deleted`, metrics suffixed `_no_repeat`) of every validation prompt;
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
from smatch_jax.eval import accuracy, decoding, text_metrics
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


def evaluate_workdir(
    workdir: str,
    step: int | None = None,
    *,
    featurizer: str | CachedFeaturizer | None = None,
    ref_workdir: str | None = None,
    mauve_seeds: Sequence[int] = MAUVE_SEEDS,
    split: str | None = None,
    decodings: Sequence[str] | None = None,
    temperature: float | None = None,
    num_samples: int | None = None,
    questions: str | None = None,
) -> dict:
    """Evaluates `workdir` at `step` (default: latest) and writes eval_<step>.{json,md}
    (`eval_<split>_<step>` when `split` names a split other than the run's own, and
    `eval_<file stem>_<step>` for `questions`).

    `split`: the split to evaluate (default: the one the run evaluated during training).
    Arithmetic: `decodings`, `temperature`, `num_samples` (default: the run's `config.eval`);
    `questions`: a JSONL file of {"question": ..., "answer": ...} evaluated instead of a split.
    Text only: `featurizer` ('minilm', 'model' or a `CachedFeaturizer`; None: no MAUVE),
    `ref_workdir` (the perplexity model; None: the evaluated model)."""
    t0 = time.time()
    run, step, model = load_model(str(workdir), step, split)
    tok, ev, split_name = run.data.tokenizer, run.data.eval_split, run.data.eval_name
    kw = dict(
        prompt_max=run.settings.prompt_max, max_new_tokens=run.settings.sampling.max_new_tokens
    )
    task = run.config.data.task
    if questions is not None and task != "arithmetic":
        raise ValueError("--questions is for arithmetic runs (question/answer pairs)")
    if task == "arithmetic":
        if questions is not None:
            ev = read_questions(questions, tok, run.config.data.seq_len)
            split_name = Path(questions).stem
            kw["prompt_max"] = max(kw["prompt_max"], int(ev["prompt_len"].max()))
        given = dict(decodings=decodings, temperature=temperature, num_samples=num_samples)
        opts = train.arithmetic_eval_options(
            run, **{k: v for k, v in given.items() if v is not None}
        )
        res = accuracy.evaluate_arithmetic(model, ev, tok, **kw, **opts)
        protocol = {
            "split": split_name,
            "n": len(ev["prompt_len"]),
            "decodings": list(opts["decodings"]),
            "headline": "accuracy = greedy_no_repeat when evaluated, else the first decoding",
            "sample": f"temperature {opts['temperature']}, {opts['num_samples']} seeds (mean, "
            "95% t-interval over seeds)",
            "recovery": "answer prefix of j reference tokens (j uniform) + one ground-truth "
            "noise token, deletable; the final answer after backspaces equals the reference"
            if opts["noise_probs"] is not None
            else "off",
            "max_new_tokens": kw["max_new_tokens"],
            "final_text": "after backspaces",
        }
        body = {
            "metrics": res.scalars,
            "protocol": protocol,
            "samples": res.samples.splitlines(),
            "recovery_examples": res.recovery_examples,
        }
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
    own = split is None and questions is None
    name = f"eval_{step}" if own else f"eval_{split_name}_{step}"
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))
    (out / f"{name}.md").write_text(summary_markdown(report))
    return report


def read_questions(path: str, tokenizer, seq_len: int) -> dict[str, Any]:
    """A JSONL file of {"question": str, "answer": str} as an arithmetic split (the task's row
    format: question + " ", then the answer and eos). Errors name the line."""
    from smatch_jax.data import arithmetic

    examples = []
    lines = Path(path).read_text().splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            ex = json.loads(line)
            if not isinstance(ex, dict) or set(ex) != {"question", "answer"}:
                raise ValueError('want an object with exactly "question" and "answer"')
            if not all(isinstance(ex[k], str) for k in ex):
                raise ValueError("question and answer must be strings")
            examples.append(
                arithmetic.encode_example(ex["question"], ex["answer"], tokenizer, T=seq_len)
            )
        except ValueError as e:  # json.JSONDecodeError, encoding and row-length errors too
            raise ValueError(f"{path}:{i}: {e}") from None
    if not examples:
        raise ValueError(f"{path} has no questions")
    out: dict[str, Any] = {k: [e[k] for e in examples] for k in ("question", "answer")}
    for k in ("tokens", "prompt_len", "length", "base"):
        out[k] = np.stack([e[k] for e in examples]).astype(np.int32)
    return out


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
    ap.add_argument(
        "--decoding",
        default=None,
        help="arithmetic: greedy|greedy_no_repeat|sample, a comma list, or all "
        "(default: the run's eval.decodings)",
    )
    ap.add_argument("--temperature", type=float, default=None, help="of --decoding sample")
    ap.add_argument("--num_samples", type=int, default=None, help="sampling seeds (sample)")
    ap.add_argument(
        "--questions", default=None, help='arithmetic: JSONL of {"question", "answer"} to evaluate'
    )
    args = ap.parse_args(argv)
    report = evaluate_workdir(
        args.workdir,
        args.step,
        featurizer=args.featurizer if args.mauve else None,
        ref_workdir=args.ref_workdir,
        mauve_seeds=tuple(range(args.mauve_seeds)),
        split=args.split,
        decodings=None if args.decoding is None else decoding.parse_decodings(args.decoding),
        temperature=args.temperature,
        num_samples=args.num_samples,
        questions=args.questions,
    )
    print(summary_markdown(report))


if __name__ == "__main__":
    main()
