"""`python -m smatch_jax.main.evaluate --workdir=W [--step=N]`: evaluate a training checkpoint.

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

from smatch_jax.eval import decoding, report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--step", type=int, default=None, help="default: the latest checkpoint")
    ap.add_argument(
        "--split", default=None, help="split to evaluate (default: the run's own eval split)"
    )
    ap.add_argument("--mauve", action="store_true", help="text: also MAUVE (slower)")
    ap.add_argument("--featurizer", choices=("minilm", "model"), default="minilm")
    ap.add_argument(
        "--mauve_seeds", type=int, default=len(report.MAUVE_SEEDS), help="k-means seeds"
    )
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
    result = report.evaluate_workdir(
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
    print(report.summary_markdown(result))


if __name__ == "__main__":
    main()
