"""`python -m smatch_jax.main.evaluate --workdir=W [--step=N]`: evaluate a training checkpoint.

Prints a summary, then writes `W/eval_<step>.json` (every figure plus the protocol) and
`W/eval_<step>.md` (the summary); another `--split` writes `eval_<split>_<step>`, a
`--questions` file `eval_questions_<stem>-<hash of its path>_<step>`, and `--out F.json` writes
there instead. Deterministic: the same checkpoint and flags give the same file. The default
checkpoint is the latest readable one (an unreadable newer one is named and skipped); `--step`
chooses another, and one that does not exist is refused with the list of those that do.

* Arithmetic: exact match of the final answer (after backspaces) under each decoding
  (`--decoding greedy|greedy_no_repeat|sample|all`, `--temperature`, `--num_samples`; the
  headline `accuracy` is greedy_no_repeat) with a bootstrap 95% interval, per number base,
  backspace statistics, and recovery from a corrupted answer prefix (the paper's Table 2).
  `--questions FILE.jsonl` evaluates your own questions, one JSON object a line:
  {"question": "In base 7, what is 12 + 3?", "answer": "15"} (or A - B; base N from 2 to 16,
  numbers in base N with the digits 0-9a-f, characters of the run's alphabet). A question too
  long for the run's rows (data.seq_len) is skipped and counted.
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

import os
from pathlib import Path

from smatch_jax import storage
from smatch_jax.errors import FailureError, UserError
from smatch_jax.eval import decoding, report, text_report
from smatch_jax.main import cli


def main(argv: list[str] | None = None) -> None:
    ap = cli.ArgumentParser(
        prog="python -m smatch_jax.main.evaluate",
        description=__doc__,
        config_note="it evaluates with the config saved in --workdir; --decoding, "
        "--temperature and --num_samples choose the decoding",
    )
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--step", type=int, default=None, help="default: the latest checkpoint")
    ap.add_argument(
        "--split", default=None, help="split to evaluate (default: the run's own eval split)"
    )
    ap.add_argument("--mauve", action="store_true", help="text: also MAUVE (slower)")
    ap.add_argument("--featurizer", choices=("minilm", "model"), default="minilm")
    ap.add_argument(
        "--mauve_seeds", type=int, default=len(text_report.MAUVE_SEEDS), help="k-means seeds"
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
        "--questions",
        default=None,
        type=cli.existing_file("--questions"),
        help='arithmetic: JSONL of {"question", "answer"} to evaluate (form above)',
    )
    ap.add_argument("--out", default=None, help="write the JSON here (and .md beside it)")
    args = ap.parse_args(argv)
    try:
        decodings = None if args.decoding is None else decoding.parse_decodings(args.decoding)
    except ValueError as e:
        raise UserError(f"--decoding={args.decoding}: {e}") from None
    if args.out is not None and not args.out.endswith(".json"):
        raise UserError(f"--out={args.out}: name a .json file (the summary goes beside it, .md)")
    # Before the evaluation: where it will be written must be writable.
    run_step = args.step if args.step is not None else 0
    paths = report.report_paths(args.workdir, run_step, args.split, args.questions, args.out)
    target = paths[0].parent
    if not storage.is_remote(target) and target.is_dir() and not os.access(target, os.W_OK):
        raise UserError(f"{target} is not writable: pass --out=<a writable path>.json")
    result = report.evaluate_workdir(
        args.workdir,
        args.step,
        featurizer=args.featurizer if args.mauve else None,
        ref_workdir=args.ref_workdir,
        mauve_seeds=tuple(range(args.mauve_seeds)),
        split=args.split,
        decodings=decodings,
        temperature=args.temperature,
        num_samples=args.num_samples,
        questions=args.questions,
        write=False,
    )
    print(report.summary_markdown(result), flush=True)  # first: a failed write loses nothing
    json_path = report.report_paths(
        args.workdir, result["step"], args.split, args.questions, args.out
    )[0]
    try:
        report.write_report(result, json_path)
    except OSError as e:
        raise FailureError(
            f"could not write {json_path} ({e.strerror or e}); the results are printed above: "
            "pass --out=<a writable path>.json to keep them as files"
        ) from None
    print(f"wrote {json_path} and {Path(json_path).with_suffix('.md').name}")


if __name__ == "__main__":
    cli.run(main)
