"""The grammar task: Dyck-2 words of a known generator, judged exactly against it.

Rows: `data/grammar.py` (the generator, its exact distribution and prefix automaton) in the
TFDS builder `data/builders.py:SmatchGrammar`. Evaluation: `eval/grammar.py` (valid-sample
rate at temperature 1, likelihood of the valid words under the generator against its entropy,
length and depth histograms, recovery). The automaton drives noise kinds 'errors' and 'model'.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from smatch_jax.data import builders, grammar
from smatch_jax.sections import Section
from smatch_jax.tasks import base
from smatch_jax.tasks.arithmetic import size_problems


@dataclasses.dataclass(frozen=True)
class GrammarData(Section):
    """`config.data.grammar`: the generator of the words."""

    NAME: ClassVar[str] = "data.grammar"
    max_depth: int = 6  # nesting bound of the Dyck-2 words
    max_len: int = 40  # brackets per word at most
    p_end: float = 0.3  # the generator stops at depth 0 with this probability
    p_open: float = 0.5  # below the depth bound it opens with this probability

    RANGES: ClassVar[tuple[tuple[str, Any, Any, bool], ...]] = (
        ("max_depth", 1, None, True),
        ("max_len", 2, None, True),
        ("p_end", 0, 1, False),
        ("p_open", 0, 1, False),
    )

    @classmethod
    def cross_problems(cls, values: dict[str, Any]) -> list[str]:
        bad = [k for k in ("p_end", "p_open") if values[k] >= 1]  # RANGES' upper bound is <=
        return [f"{cls.NAME}.{k}={values[k]} must be below 1" for k in bad]

    def spec(self) -> grammar.GrammarSpec:
        return grammar.GrammarSpec(self.max_depth, self.max_len, self.p_end, self.p_open)


class Grammar(base.Task):
    name = "grammar"
    Config = GrammarData
    eval_splits = ("test", "validation")
    has_automaton = True
    report_options = ("temperature", "num_samples")

    def problems(self, data, own) -> list[str]:
        problems = size_problems(data)
        if data["tokenizer"] not in ("", "char"):
            problems.append(
                f"data.tokenizer={data['tokenizer']!r}: the grammar task is character-level "
                "(its prefix automaton and error noise are over single brackets); leave it ''"
            )
        if own.max_len + 2 > data["seq_len"]:
            problems.append(
                f"data.seq_len={data['seq_len']} is shorter than the longest grammar row: "
                f"data.grammar.max_len + 2 (prompt, eos) = {own.max_len + 2}; raise data.seq_len"
            )
        return problems

    def load(self, data, *, seed, eval_split):
        own = data.task_config
        b = builders.build(
            "grammar",
            data_dir=data.data_dir or None,
            T=data.seq_len,
            seed=seed,
            max_depth=own.max_depth,
            max_len=own.max_len,
            p_end=own.p_end,
            p_open=own.p_open,
            train_size=data.train_size,
            validation_size=data.validation_size,
            test_size=data.test_size,
        )
        return base.tfds_rows(b, eval_split)

    def automaton(self, data, tokenizer):
        return grammar.automaton(data.task_config.spec(), tokenizer)

    def options(self, run, **given) -> dict[str, Any]:
        """`eval.grammar.evaluate_grammar` keywords from the run's `config.eval` and data."""
        spec = run.typed.data.task_config.spec()
        return {"spec": spec, **base.recovery_options(run, given)}

    def evaluate(self, run, model, *, step):
        from smatch_jax.eval import grammar as grammar_eval

        del step  # seeded by config.eval: the same draws at every step
        ev, tok = run.data.eval_split, run.data.tokenizer
        kw = base.decode_options(run)
        return grammar_eval.evaluate_grammar(model, ev, tok, **kw, **self.options(run))

    def report(self, run, model, options):
        from smatch_jax.eval import grammar as grammar_eval

        ev, tok, kw = run.data.eval_split, run.data.tokenizer, base.decode_options(run)
        opts = self.options(run, **options)
        res = grammar_eval.evaluate_grammar(model, ev, tok, **kw, **opts)
        protocol = {
            "split": run.data.eval_name,
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
        return base.report_body(res, protocol)


TASK = Grammar()
