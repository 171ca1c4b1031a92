"""Evaluating a run: during training (`evaluate_in_training`) and afterwards from a workdir's
checkpoint (`evaluate_workdir`, which `python -m smatch_jax.main.evaluate` runs).

`evaluate_workdir` writes `W/eval_<step>.json` (every figure plus the protocol) and
`W/eval_<step>.md` (a short summary). Deterministic: the same checkpoint and options give the
same file.

* Arithmetic: exact match of the final answer (after backspaces) under each decoding
  (greedy, greedy_no_repeat, sample; the headline `accuracy` is greedy_no_repeat) with a
  bootstrap 95% interval, per number base, backspace statistics, and recovery from a corrupted
  answer prefix (the paper's Table 2); `questions`: your own JSONL of question/answer pairs.
* Grammar: `grammar.evaluate_grammar` (valid-sample rate at T = 1, likelihood of the valid
  words under the generator against its entropy, length and depth histograms, recovery).
* Text: `text_report.text_report` (samples, n-gram statistics, perplexity, MAUVE).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from smatch_jax import metrics, noise, storage
from smatch_jax import run as run_lib
from smatch_jax.data import arithmetic
from smatch_jax.data.rows import RowTooLongError
from smatch_jax.data.train_data import grammar_spec
from smatch_jax.errors import UserError
from smatch_jax.eval import accuracy, decoding
from smatch_jax.eval import grammar as grammar_eval
from smatch_jax.eval.text_report import (
    MAUVE_SEEDS,
    SELF,
    CachedFeaturizer,
    make_featurizer,
    text_report,
)

log = logging.getLogger(__name__)


def load_model(workdir: str, step: int | None = None, split: str | None = None):
    """(run, step, model) of a training workdir at `step` (default: latest); `split`: the
    evaluation split `run.data.eval_split` holds (default: the run's own)."""
    run, state = run_lib.load_trained(workdir, step, eval_split=split)
    return run, int(state.step), nnx.merge(run.graphdef, state.params, run.frozen)


_load_ref_model = functools.lru_cache(maxsize=2)(load_model)  # one load per process


def _eval_options(run, overrides: dict, **task_opts) -> dict:
    """Evaluation keywords from the run's `config.eval` (samples, temperature, and recovery,
    which uses the ground-truth noise of the training rows), then `overrides`."""
    e = run.typed.eval
    opts = dict(num_samples=e.num_samples, temperature=e.temperature, recovery=e.recovery)
    opts.update(task_opts)
    opts.update(overrides)
    probs = noise.noise_probs("ground_truth", run.data.train_rows, run.data.tokenizer)
    opts["noise_probs"] = probs if opts.pop("recovery") else None
    return opts


def arithmetic_eval_options(run, **overrides) -> dict:
    """`accuracy.evaluate_arithmetic` keywords from the run's `config.eval` (decodings,
    samples, temperature, recovery)."""
    decodings = decoding.parse_decodings(run.typed.eval.decodings)
    return _eval_options(run, overrides, decodings=decodings)


def grammar_eval_options(run, **overrides) -> dict:
    """`grammar_eval.evaluate_grammar` keywords from the run's `config.eval` and data."""
    return {"spec": grammar_spec(run.typed.data), **_eval_options(run, overrides)}


def evaluate_in_training(run, state, writer, step: int) -> dict[str, float]:
    """The training loop's evaluation: arithmetic accuracy under each decoding and recovery
    (`config.eval`); text samples and backspace statistics. Writes scalars and texts."""
    ev = run.data.eval_split
    model = nnx.merge(run.graphdef, state.params, run.frozen)
    tok = run.data.tokenizer
    kw = dict(
        prompt_max=run.settings.prompt_max, max_new_tokens=run.settings.sampling.max_new_tokens
    )
    if run.typed.data.task == "arithmetic":
        res = accuracy.evaluate_arithmetic(model, ev, tok, **kw, **arithmetic_eval_options(run))
    elif run.typed.data.task == "grammar":
        res = grammar_eval.evaluate_grammar(model, ev, tok, **kw, **grammar_eval_options(run))
    else:
        res = accuracy.sample_text(model, ev, tok, seed=run.typed.seed + step, **kw)
    scalars = {f"eval/{k}": float(v) for k, v in res.scalars.items()}
    writer.write_scalars(step, scalars)
    texts = {"samples": res.samples}
    if res.recovery_examples:
        texts["recovery"] = "\n".join(res.recovery_examples)
    writer.write_texts(step, texts)
    return scalars


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
    out: str | None = None,
    write: bool = True,
) -> dict:
    """Evaluates `workdir` at `step` (default: the latest readable) and writes
    eval_<step>.{json,md} (`eval_<split>_<step>` when `split` names a split other than the
    run's own, `eval_questions_<file stem>-<hash of its path>_<step>` for `questions`, or
    `out` and its `.md` sibling; `report_paths`). `write=False`: the caller writes
    (`write_report`).

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
    task = run.typed.data.task
    if questions is not None and task != "arithmetic":
        raise UserError(f"--questions is for arithmetic runs; {workdir} is a {task} run")
    if task == "arithmetic":
        if questions is not None:
            d = run.typed.data
            fmt = arithmetic.resolve_format(d.prompt_format, d.tokenizer)
            ev = read_questions(questions, tok, d.seq_len, fmt)
            split_name = f"questions:{Path(questions).resolve()}"
            kw["prompt_max"] = max(kw["prompt_max"], int(ev["prompt_len"].max()))
        given = dict(decodings=decodings, temperature=temperature, num_samples=num_samples)
        opts = arithmetic_eval_options(run, **{k: v for k, v in given.items() if v is not None})
        res = accuracy.evaluate_arithmetic(model, ev, tok, **kw, **opts)
        protocol = {
            "split": split_name,
            "n": len(ev["prompt_len"]),
            **({"skipped_too_long": len(ev["skipped_too_long"])} if questions else {}),
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
    elif task == "grammar":
        given = dict(temperature=temperature, num_samples=num_samples)
        opts = grammar_eval_options(run, **{k: v for k, v in given.items() if v is not None})
        res = grammar_eval.evaluate_grammar(model, ev, tok, **kw, **opts)
        protocol = {
            "split": split_name,
            "n": len(ev["prompt_len"]),
            "sample": f"{len(ev['prompt_len'])} words from the prompt per seed, temperature "
            f"{opts['temperature']}, {opts['num_samples']} seeds (valid: mean, 95% t-interval "
            "over seeds; the other figures pool the seeds)",
            "recovery": "each word cut after j brackets (j uniform) + one error bracket, "
            "deletable; recovered = the final word is valid"
            if opts["noise_probs"] is not None
            else "off",
            "max_new_tokens": kw["max_new_tokens"],
            "final_text": "after backspaces",
        }
    if task in ("arithmetic", "grammar"):
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
            if not ref_run.data.tokenizer.same_as(tok):
                raise UserError(f"--ref_workdir {ref_workdir}: another tokenizer than {workdir}'s")
            ref_name = f"{ref_workdir} (step {ref_step})"
        if isinstance(featurizer, str):
            featurizer = make_featurizer(featurizer, ref_model or model, tok)
        body = text_report(
            model,
            ev,
            tok,
            seed=run.typed.seed,
            ref_model=ref_model,
            ref_name=ref_name,
            featurizer=featurizer,
            mauve_seeds=mauve_seeds,
            split_name=run.data.eval_name,
            **kw,
        )
    # A figure with nothing to measure (deletion precision of a model that never deletes) is
    # None here and null in the JSON, never NaN (not JSON, and NaN != NaN).
    body["metrics"] = {k: metrics.to_json_number(v) for k, v in body["metrics"].items()}
    report = {"step": step, "task": task, **body, "wall_s": round(time.time() - t0, 1)}
    if write:
        write_report(report, report_paths(workdir, step, split, questions, out)[0])
    return report


def report_paths(
    workdir: str, step: int, split: str | None = None, questions: str | None = None, out=None
) -> tuple[Path, Path]:
    """(json, md) paths of an evaluation: `out` (and its `.md` sibling), else in `workdir`:
    eval_<step> for the run's own split, eval_<split>_<step> for another split, and
    eval_questions_<stem>-<6 hex digits of the file's absolute path>_<step> for a questions
    file, so that neither a split nor another file of the same name is overwritten."""
    if out is not None:
        return storage.path(out), storage.path(out).with_suffix(".md")
    if questions is not None:
        digest = hashlib.sha256(str(Path(questions).resolve()).encode()).hexdigest()[:6]
        name = f"eval_questions_{Path(questions).stem}-{digest}_{step}"
    else:
        name = f"eval_{step}" if split is None else f"eval_{split}_{step}"
    return storage.path(workdir) / f"{name}.json", storage.path(workdir) / f"{name}.md"


def write_report(report: dict, json_path: str | Path) -> None:
    """The report as JSON at `json_path` and its summary as markdown beside it (`.md`)."""
    json_path = storage.path(json_path)
    json_path.write_text(json.dumps(report, indent=2, allow_nan=False))
    json_path.with_suffix(".md").write_text(summary_markdown(report))


QUESTION_FORM = (
    'each line is {"question": "In base N, what is A + B?", "answer": "C"} (or A - B; N from 2 '
    "to 16, A, B and C written in base N with the digits 0-9a-f, in the run's alphabet)"
)


def read_questions(
    path: str, tokenizer, seq_len: int, prompt_format: str = "compact"
) -> dict[str, Any]:
    """A JSONL file of {"question": str, "answer": str} as an arithmetic split, in the run's
    row format (`prompt_format`, resolved). A malformed line stops with an error naming it; a
    question whose row does not fit the run's `seq_len` tokens is skipped, and the split's
    `skipped_too_long` lists their line numbers."""
    examples, too_long = [], []
    try:
        lines = Path(path).read_bytes().splitlines()
    except OSError as e:
        raise UserError(f"--questions {path}: {e.strerror or e}") from None
    for i, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(
                f"{path}:{i}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                "save the file as UTF-8"
            ) from None
        if not line.strip():
            continue
        try:
            ex = json.loads(line)
            if not isinstance(ex, dict) or set(ex) != {"question", "answer"}:
                raise ValueError('want an object with exactly "question" and "answer"')
            if not all(isinstance(ex[k], str) for k in ex):
                raise ValueError("question and answer must be strings")
            examples.append(
                arithmetic.encode_example(
                    ex["question"], ex["answer"], tokenizer, T=seq_len, prompt_format=prompt_format
                )
            )
        except RowTooLongError:
            too_long.append(i)
        except ValueError as e:  # json.JSONDecodeError and encoding errors too
            raise UserError(f"{path}:{i}: {e}; {QUESTION_FORM}") from None
    if too_long:
        log.warning(
            "%s: skipped %d question(s) longer than the run's rows (data.seq_len=%d), lines %s",
            path, len(too_long), seq_len, too_long[:10],
        )  # fmt: skip
    if not examples:
        raise UserError(
            f"{path} has no questions"
            + (f" that fit data.seq_len={seq_len} ({len(too_long)} too long)" if too_long else "")
        )
    out: dict[str, Any] = {k: [e[k] for e in examples] for k in ("question", "answer")}
    for k in ("tokens", "prompt_len", "length", "base"):
        out[k] = np.stack([e[k] for e in examples]).astype(np.int32)
    out["skipped_too_long"] = too_long
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
    lines += [f"| {k} | {'-' if v is None else f'{v:.4g}'} |" for k, v in report["metrics"].items()]
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
