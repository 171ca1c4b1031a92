"""`python -m smatch_jax.evaluate --workdir=W [--step=N]`: evaluate a training checkpoint.

Writes `W/eval_<step>.json` (every figure plus the protocol: split, n, decoding settings)
and `W/eval_<step>.md` (a short summary). Arithmetic: greedy exact match of the final answer
(after backspaces) with a bootstrap 95% interval, per number base, backspace statistics.
Text: samples from the validation prompts and their backspace statistics. Deterministic:
the same checkpoint gives the same file.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from flax import nnx

from smatch_jax import train
from smatch_jax.eval import accuracy


def evaluate_workdir(workdir: str, step: int | None = None) -> dict:
    t0 = time.time()
    run, state = train.load_trained(workdir, step)
    step = int(state.step)
    model = nnx.merge(run.graphdef, state.params, run.frozen)
    tok, ev = run.data.tokenizer, run.data.eval_split
    kw = dict(
        prompt_max=run.settings.prompt_max, max_new_tokens=run.settings.sampling.max_new_tokens
    )
    task = run.config.data.task
    if task == "arithmetic":
        res = accuracy.evaluate_arithmetic(model, ev, tok, **kw)
        decoding = "greedy"
    else:
        res = accuracy.sample_text(model, ev, tok, seed=run.config.seed, **kw)
        decoding = "temperature 1.0"
    report = {
        "step": step,
        "task": task,
        "metrics": res.scalars,
        "protocol": {
            "split": "test" if task == "arithmetic" else "validation",
            "n": len(ev["prompt_len"]),
            "decoding": decoding,
            "max_new_tokens": kw["max_new_tokens"],
            "final_text": "after backspaces",
        },
        "samples": res.samples.splitlines(),
        "wall_s": round(time.time() - t0, 1),
    }
    out = Path(workdir)
    (out / f"eval_{step}.json").write_text(json.dumps(report, indent=2))
    (out / f"eval_{step}.md").write_text(summary_markdown(report))
    return report


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
        "Protocol: " + ", ".join(f"{k} {v}" for k, v in report["protocol"].items()),
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
    args = ap.parse_args(argv)
    report = evaluate_workdir(args.workdir, args.step)
    print(summary_markdown(report))


if __name__ == "__main__":
    main()
