"""The text task: (prompt, continuation) chunks of a corpus of documents.

Rows: `data/text.py` (document split, tokenizers, chunking) in the TFDS builder
`data/builders.py:SmatchText`. Evaluation: samples and backspace statistics during training;
the report (`eval/text_report.py`) adds n-gram statistics, perplexity under a reference model
(`ref_workdir`) and MAUVE (`featurizer`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from smatch_jax.data import builders
from smatch_jax.errors import UserError
from smatch_jax.sections import Section
from smatch_jax.tasks import base


@dataclasses.dataclass(frozen=True)
class TextData(Section):
    """`config.data.text`: the corpus and the shape of its chunks."""

    NAME: ClassVar[str] = "data.text"
    corpus: str = "shakespeare"  # 'shakespeare' or a directory of .txt files
    prompt_tokens: int = 32  # prompt length in tokens
    completion_tokens: int = 32  # continuation length in tokens (then eos)
    max_files: int = 0  # read at most this many corpus files (0: all)
    split_seed: int = -1  # seed of the document split and BPE (-1: the run's seed)

    RANGES: ClassVar[tuple[tuple[str, Any, Any, bool], ...]] = (
        ("prompt_tokens", 1, None, True),
        ("completion_tokens", 0, None, True),
        ("max_files", 0, None, True),
        ("split_seed", -1, None, True),
    )


class Text(base.Task):
    name = "text"
    Config = TextData
    eval_splits = ("validation", "test")
    report_options = ("featurizer", "ref_workdir", "mauve_seeds")

    def problems(self, data, own) -> list[str]:
        need = own.prompt_tokens + own.completion_tokens + 1
        if need > data["seq_len"]:
            return [
                f"data.seq_len={data['seq_len']} is shorter than a text row: prompt_tokens + "
                f"completion_tokens + 1 (eos) = {need}; raise data.seq_len to at least {need}"
            ]
        return []

    def load(self, data, *, seed, eval_split):
        own = data.task_config
        b = builders.build(
            "text",
            data_dir=data.data_dir or None,
            T=data.seq_len,
            seed=seed if own.split_seed < 0 else own.split_seed,
            corpus=own.corpus,
            tokenizer=data.tokenizer,
            prompt_tokens=own.prompt_tokens,
            completion_tokens=own.completion_tokens,
            max_files=own.max_files,
        )
        tok, train, ev = base.tfds_rows(b, eval_split)
        if data.test_size and len(ev["prompt_len"]) > data.test_size:  # the first test_size
            ev = {k: v[: data.test_size] for k, v in ev.items()}
        return tok, train, ev

    def prompt_width(self, data) -> int:
        return data.task_config.prompt_tokens

    def evaluate(self, run, model, *, step):
        from smatch_jax.eval import accuracy

        ev, tok = run.data.eval_split, run.data.tokenizer
        seed = run.typed.seed + step  # other samples at every evaluation
        return accuracy.sample_text(model, ev, tok, seed=seed, **base.decode_options(run))

    def report(self, run, model, options):
        from smatch_jax.eval import report, text_report

        tok = run.data.tokenizer
        ref_model, ref_name = None, text_report.SELF
        ref_workdir = options.get("ref_workdir")
        if ref_workdir:
            ref_run, ref_step, ref_model = report.load_reference(str(ref_workdir))
            if not ref_run.data.tokenizer.same_as(tok):
                raise UserError(f"--ref_workdir {ref_workdir}: another tokenizer than the run's")
            ref_name = f"{ref_workdir} (step {ref_step})"
        featurizer = options.get("featurizer")
        if isinstance(featurizer, str):
            featurizer = text_report.make_featurizer(featurizer, ref_model or model, tok)
        return text_report.text_report(
            model,
            run.data.eval_split,
            tok,
            seed=run.typed.seed,
            ref_model=ref_model,
            ref_name=ref_name,
            featurizer=featurizer,
            mauve_seeds=options.get("mauve_seeds", text_report.MAUVE_SEEDS),
            split_name=run.data.eval_name,
            **base.decode_options(run),
        )


TASK = Text()
