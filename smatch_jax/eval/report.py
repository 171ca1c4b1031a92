"""Evaluating a run: during training (`evaluate_in_training`) and afterwards from a workdir's
checkpoint (`evaluate_workdir`, which `python -m smatch_jax.main.evaluate` runs).

`evaluate_workdir` writes `W/eval_<step>.json` (every figure plus the protocol) and
`W/eval_<step>.md` (a short summary). Deterministic: the same checkpoint and options give the
same file. What is measured is the run's task's (`tasks.Task.evaluate` in training,
`tasks.Task.report` here; the built-in tasks' modules say what each measures).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from flax import nnx

from smatch_jax import metrics, storage, tasks
from smatch_jax import run as run_lib
from smatch_jax.errors import UserError
from smatch_jax.eval.text_report import CachedFeaturizer

log = logging.getLogger(__name__)


def load_model(workdir: str, step: int | None = None, split: str | None = None):
    """(run, step, model) of a training workdir at `step` (default: latest); `split`: the
    evaluation split `run.data.eval_split` holds (default: the run's own)."""
    run, state = run_lib.load_trained(workdir, step, eval_split=split)
    return run, int(state.step), nnx.merge(run.graphdef, state.params, run.frozen)


load_reference = functools.lru_cache(maxsize=2)(load_model)  # one load per process


def evaluate_in_training(run, state, writer, step: int) -> dict[str, float]:
    """The training loop's evaluation (the run's task's `evaluate`): writes its scalars as
    eval/<name> and its samples (and recovery examples) as texts."""
    model = nnx.merge(run.graphdef, state.params, run.frozen)
    res = tasks.get(run.typed.data.task).evaluate(run, model, step=step)
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
    mauve_seeds: Sequence[int] | None = None,
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
    The other options are the task's (`Task.report_options`; one given to another task's run
    is refused), None: not given:
    arithmetic: `decodings`, `temperature`, `num_samples` (default: the run's `config.eval`),
    `questions` (a JSONL file of {"question": ..., "answer": ...} evaluated instead of a split);
    grammar: `temperature`, `num_samples`;
    text: `featurizer` ('minilm', 'model' or a `CachedFeaturizer`; None: no MAUVE),
    `mauve_seeds` (default `text_report.MAUVE_SEEDS`), `ref_workdir` (the perplexity model;
    None: the evaluated model)."""
    t0 = time.time()
    run, step, model = load_model(str(workdir), step, split)
    task = tasks.get(run.typed.data.task)
    given = dict(
        decodings=decodings,
        temperature=temperature,
        num_samples=num_samples,
        questions=questions,
        featurizer=featurizer,
        ref_workdir=ref_workdir,
        mauve_seeds=None if featurizer is None else mauve_seeds,  # they only configure MAUVE
    )
    options = {k: v for k, v in given.items() if v is not None}
    for name in options:
        if name not in task.report_options:
            takers = [n for n in tasks.names() if name in tasks.get(n).report_options]
            flag = {"decodings": "decoding", "featurizer": "mauve"}.get(name, name)
            raise UserError(
                f"--{flag} is for {' / '.join(takers)} runs; {workdir} is a {task.name} run"
            )
    body = task.report(run, model, options)
    # A figure with nothing to measure (deletion precision of a model that never deletes) is
    # None here and null in the JSON, never NaN (not JSON, and NaN != NaN).
    body["metrics"] = {k: metrics.to_json_number(v) for k, v in body["metrics"].items()}
    report = {"step": step, "task": task.name, **body, "wall_s": round(time.time() - t0, 1)}
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
