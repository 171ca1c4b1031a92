"""The arithmetic task: additions and subtractions in bases 2-16 (the paper's arithmetic).

Rows: `data/arithmetic.py` (generation, rendering, tokenisation) in the TFDS builder
`data/builders.py:SmatchArithmetic`. Evaluation: exact match of the final answer (after
backspaces) under each decoding of `config.eval.decodings` with a bootstrap 95% interval, per
number base, backspace statistics, and recovery from a corrupted answer prefix (the paper's
Table 2; `eval/accuracy.py`). `questions`: a JSONL file of question/answer pairs evaluated
instead of a split.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from smatch_jax.data import arithmetic, builders
from smatch_jax.data.rows import RowTooLongError
from smatch_jax.errors import UserError
from smatch_jax.sections import Section
from smatch_jax.tasks import base

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ArithmeticData(Section):
    """`config.data.arithmetic`: the arithmetic task's own fields."""

    NAME: ClassVar[str] = "data.arithmetic"
    difficulty: str = "all"  # entropy of the train split: easy | medium | hard | all
    test_difficulty: str = ""  # of the test split ('': interpolate)
    prompt_format: str = "auto"  # 'compact' ("q a"), 'qa' ("Question: q\nAnswer: a"), 'auto'
    # (compact for the task's own characters, qa for a pretrained LM's tokenizer)

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "difficulty": arithmetic.DIFFICULTIES,
        "test_difficulty": (*arithmetic.DIFFICULTIES, ""),
        "prompt_format": arithmetic.PROMPT_FORMATS,
    }


def size_problems(data: dict[str, Any]) -> list[str]:
    """Generated splits cannot be empty (arithmetic and grammar generate all three)."""
    return [
        f"data.{k}={data[k]} would make an empty split; set it >= 1"
        for k in ("train_size", "test_size", "validation_size")
        if data[k] < 1
    ]


class Arithmetic(base.Task):
    name = "arithmetic"
    Config = ArithmeticData
    eval_splits = ("test", "validation", "test_large")
    report_options = ("decodings", "temperature", "num_samples", "questions")

    def problems(self, data, own) -> list[str]:
        problems = size_problems(data)
        try:
            arithmetic.check_tokenizer_name(data["tokenizer"])
        except ValueError as e:
            problems.append(f"data.tokenizer: {e}")
        return problems

    def load(self, data, *, seed, eval_split):
        own = data.task_config
        b = builders.build(
            "arithmetic",
            data_dir=data.data_dir or None,
            T=data.seq_len,
            seed=seed,
            train_size=data.train_size,
            test_size=data.test_size,
            validation_size=data.validation_size,
            difficulty=own.difficulty,
            test_difficulty=own.test_difficulty or "interpolate",
            tokenizer=data.tokenizer,
            prompt_format=own.prompt_format,
        )
        return base.tfds_rows(b, eval_split)

    def options(self, run, **given) -> dict[str, Any]:
        """`accuracy.evaluate_arithmetic` keywords from the run's `config.eval` (decodings,
        samples, temperature, recovery), then `given`."""
        from smatch_jax.eval import decoding

        decodings = decoding.parse_decodings(run.typed.eval.decodings)
        return base.recovery_options(run, given, decodings=decodings)

    def evaluate(self, run, model, *, step):
        from smatch_jax.eval import accuracy

        del step  # greedy decodings and seeded samples: the same figures at every step
        ev, tok = run.data.eval_split, run.data.tokenizer
        opts = self.options(run)
        return accuracy.evaluate_arithmetic(model, ev, tok, **base.decode_options(run), **opts)

    def report(self, run, model, options):
        from smatch_jax.eval import accuracy

        tok, ev, split_name = run.data.tokenizer, run.data.eval_split, run.data.eval_name
        kw = base.decode_options(run)
        questions = options.pop("questions", None)
        if questions is not None:
            d = run.typed.data
            fmt = arithmetic.resolve_format(d.task_config.prompt_format, d.tokenizer)
            ev = read_questions(questions, tok, d.seq_len, fmt)
            split_name = f"questions:{Path(questions).resolve()}"
            kw["prompt_max"] = max(kw["prompt_max"], int(ev["prompt_len"].max()))
        opts = self.options(run, **options)
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
        return base.report_body(res, protocol)


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


TASK = Arithmetic()
