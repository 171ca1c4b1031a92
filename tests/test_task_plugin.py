"""A task added from outside the package: string reversal, defined and registered here only.

It trains (SequenceMatch), evaluates and plans through the public entry points, and its own
config subsection `config.data.reverse` is checked like the built-in tasks' are.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any, ClassVar

import jax
import numpy as np
import pytest

from configs import arithmetic
from smatch_jax import tasks, train, validate
from smatch_jax.data.rows import make_row
from smatch_jax.data.tokenizers import CharTokenizer
from smatch_jax.eval import accuracy, decoding, report
from smatch_jax.sections import Section
from smatch_jax.tasks import base

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="libtpu (requirements-tpu.txt)"
)


@dataclasses.dataclass(frozen=True)
class ReverseData(Section):
    """`config.data.reverse`: strings of `alphabet` of min_len..max_len letters."""

    NAME: ClassVar[str] = "data.reverse"
    alphabet: str = "abcd"
    min_len: int = 2
    max_len: int = 4

    RANGES: ClassVar[tuple[tuple[str, Any, Any, bool], ...]] = (("min_len", 1, None, True),)

    @classmethod
    def cross_problems(cls, values):
        if values["max_len"] < values["min_len"]:
            return ["data.reverse.max_len must be >= data.reverse.min_len"]
        return []


class Reverse(base.Task):
    name = "reverse"
    Config = ReverseData
    eval_splits = ("test",)

    def problems(self, data, own):
        need = 2 * own.max_len + 2  # the string, '=', its reverse, eos
        if need > data["seq_len"]:
            return [f"data.seq_len={data['seq_len']} < {need}: raise it"]
        return []

    def load(self, data, *, seed, eval_split):
        own = data.task_config
        tok = CharTokenizer(own.alphabet + "=")

        def split(n, offset):
            rng = np.random.default_rng(seed * 2 + offset)
            words = [
                "".join(rng.choice(list(own.alphabet), rng.integers(own.min_len, own.max_len + 1)))
                for _ in range(n)
            ]
            rows = [
                make_row(
                    tok.encode(w + "="),
                    tok.encode(w[::-1]),
                    T=data.seq_len,
                    eos_id=tok.eos_id,
                    pad_id=tok.pad_id,
                )
                for w in words
            ]
            out = {k: np.stack([r[k] for r in rows]) for k in ("tokens", "prompt_len", "length")}
            return {**out, "answer": [w[::-1] for w in words]}

        return tok, split(data.train_size, 0), split(data.test_size, 1)

    def prompt_width(self, data):
        return data.task_config.max_len + 1

    def evaluate(self, run, model, *, step):
        ev, tok = run.data.eval_split, run.data.tokenizer
        kw = base.decode_options(run)
        prompts = [row[:m].tolist() for row, m in zip(ev["tokens"], ev["prompt_len"], strict=True)]
        cfg = decoding.decoding_config("greedy", kw["max_new_tokens"])
        dec = decoding.decode(
            model, prompts, tok, cfg, width=kw["prompt_max"], key=jax.random.key(step)
        )
        correct = accuracy.exact_match(dec, ev["prompt_len"], ev["answer"], tok)
        lines = [tok.decode(f) for f in dec.final[:4]]
        return accuracy.AccuracyResult(
            {"accuracy": float(correct.mean())}, correct, "\n".join(lines)
        )


@pytest.fixture(scope="module")
def reverse_task():
    tasks.register(Reverse())
    yield
    tasks.unregister("reverse")


def _config(data_dir):
    c = arithmetic.get_config("smoke")  # a schema made after the registration: has data.reverse
    c.data.task = "reverse"
    c.data.tokenizer = ""
    c.data.data_dir = str(data_dir)
    c.data.seq_len = 16
    c.data.train_size, c.data.test_size = 64, 8
    c.train.num_steps, c.loss.bc_warmup_steps, c.sampling.sample_every = 8, 4, 2
    c.train.batch_size = c.train.model_rows = 8
    c.replay.capacity = 16
    c.train.log_every, c.train.eval_every, c.train.ckpt_every = 2, 8, 8
    return c


def test_its_subsection_is_checked_like_a_built_in_one(reverse_task, tmp_path):
    c = _config(tmp_path)
    assert validate.check_config(c).data.task_config == ReverseData()
    c.data.reverse.max_len = 9
    with pytest.raises(validate.ConfigError, match=r"data.seq_len=16 < 20: raise it"):
        validate.check_config(c)
    c.data.reverse.max_len, c.data.reverse.min_len = 1, 2
    with pytest.raises(validate.ConfigError, match=r"max_len must be >= data.reverse.min_len"):
        validate.check_config(c)
    c = _config(tmp_path)
    c.data.reverse.max_lenn = 3
    with pytest.raises(validate.ConfigError, match=r"did you mean 'data.reverse.max_len'"):
        validate.check_config(c)
    c = _config(tmp_path)
    c.noise.kind = "errors"  # it has no prefix automaton
    with pytest.raises(validate.ConfigError, match=r"automaton \(grammar\), not 'reverse'"):
        validate.check_config(c)


@pytest.mark.slow
def test_it_trains_evaluates_and_plans(reverse_task, tmp_path):
    wd = tmp_path / "w"
    c = _config(tmp_path / "data")
    state, metrics = train.train(c, str(wd))
    assert int(state.step) == 8 and np.isfinite(metrics["loss"])
    rows = [line for line in (wd / "metrics.jsonl").read_text().splitlines() if "eval/" in line]
    assert rows and '"eval/accuracy"' in rows[-1]  # the task's evaluation in training
    rep = report.evaluate_workdir(str(wd))
    assert rep["task"] == "reverse" and 0 <= rep["metrics"]["accuracy"] <= 1
    assert rep["protocol"]["split"] == "test" and rep["protocol"]["n"] == 8
    with pytest.raises(Exception, match=r"--questions is for arithmetic runs; .* reverse run"):
        report.evaluate_workdir(str(wd), questions=str(tmp_path / "q.jsonl"))
    if importlib.util.find_spec("libtpu") is not None:  # the pod plan: prompt width from the task
        from smatch_jax.main import compile as compile_main

        r = compile_main.build_report(
            _config(tmp_path), "v5e:2x2", vocab_size=7, pieces=("train_mle",)
        )
        assert r["pieces"]["train_mle"]["fits"] and r["pieces"]["train_mle"]["flops"] > 0
