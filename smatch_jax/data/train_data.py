"""What the training loop needs from the data layer, built from `config.data`.

`TrainData` bundles the tokenizer, the resumable training iterator (process-local batches),
the training rows (for the ground-truth noise distribution) and the evaluation split.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np

from smatch_jax import masks
from smatch_jax.data import arithmetic, builders, grammar, pipeline
from smatch_jax.data.tokenizer_base import Tokenizer
from smatch_jax.sections import Section

TASKS = tuple(builders.TASKS)  # the tasks that have a dataset builder
# The splits `data.eval_split` may name per task; the first is the default ('').
EVAL_SPLITS = {
    "arithmetic": ("test", "validation", "test_large"),
    "text": ("validation", "test"),
    "grammar": ("test", "validation"),
}


@dataclasses.dataclass(frozen=True)
class DataConfig(Section):
    """`config.data`: the task, its dataset and the row format."""

    NAME: ClassVar[str] = "data"
    task: str = ""  # dataset name (set by the experiment config): arithmetic | text
    data_dir: str = ""  # where prepared datasets live ('' = $SMATCH_JAX_DATA or default)
    train_size: int = 0  # training examples
    test_size: int = 0  # evaluation examples
    validation_size: int = 500  # arithmetic: questions of the validation split
    eval_split: str = ""  # split evaluated in training ('': test for arithmetic, validation
    # for text); arithmetic experiments choose settings on 'validation'
    difficulty: str = ""  # task-specific difficulty (arithmetic: of the train split)
    test_difficulty: str = ""  # arithmetic: of the test split ('': 'interpolate')
    seq_len: int = 0  # T, row length including noise and backspaces
    prompt_max: int = 0  # sampler prompt width (0: the longest prompt in the data)
    corpus: str = ""  # text: 'shakespeare' or a directory of .txt files
    tokenizer: str = ""  # text: 'bpe_train:<vocab>', 'gpt2', 'smollm2' or 'bpe:<json>';
    # arithmetic: '' / 'char' (its own characters), 'smollm2', 'gpt2' or 'bpe:<json>'
    prompt_format: str = "auto"  # arithmetic: 'compact' ("q a"), 'qa' ("Question: q\nAnswer:
    # a"), 'auto' (compact for char, qa for a pretrained LM's tokenizer)
    prompt_tokens: int = 0  # text: prompt length in tokens
    completion_tokens: int = 0  # text: continuation length in tokens
    max_files: int = 0  # text: read at most this many corpus files (0: all)
    split_seed: int = -1  # text: seed of the document split and BPE (-1: the run's seed)
    max_depth: int = 6  # grammar: nesting bound of the Dyck-2 words
    max_len: int = 40  # grammar: brackets per word at most
    p_end: float = 0.3  # grammar: the generator stops at depth 0 with this probability
    p_open: float = 0.5  # grammar: below the depth bound it opens with this probability

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "task": TASKS,
        "prompt_format": arithmetic.PROMPT_FORMATS,
    }
    RANGES: ClassVar[tuple[tuple[str, Any, Any, bool], ...]] = (
        ("seq_len", 2, None, True),
        ("prompt_max", 0, None, True),
    )

    @classmethod
    def cross_problems(cls, values: dict[str, Any]) -> list[str]:
        problems = []
        T, prompt_max, task = values["seq_len"], values["prompt_max"], values["task"]
        if prompt_max and prompt_max >= T:
            problems.append(
                f"data.prompt_max={prompt_max} leaves no room for actions in data.seq_len={T}; "
                "raise data.seq_len or lower data.prompt_max (0: the longest prompt in the data)"
            )
        splits = EVAL_SPLITS[task]
        if values["eval_split"] and values["eval_split"] not in splits:
            problems.append(
                f"data.eval_split={values['eval_split']!r} is not a split of {task}; choose "
                f"one of {list(splits)} ('' for {splits[0]!r})"
            )
        if task == "arithmetic":
            try:
                arithmetic.check_tokenizer_name(values["tokenizer"])
            except ValueError as e:
                problems.append(f"data.tokenizer: {e}")
            for key in ("difficulty", "test_difficulty"):
                allowed = arithmetic.DIFFICULTIES + (("",) if key == "test_difficulty" else ())
                if values[key] not in allowed:
                    problems.append(
                        f"data.{key}={values[key]!r} is unknown; choose one of {list(allowed)}"
                    )
        if task in ("arithmetic", "grammar"):  # their splits are generated at these sizes
            for key in ("train_size", "test_size", "validation_size"):
                if values[key] < 1:
                    problems.append(
                        f"data.{key}={values[key]} would make an empty split; set it >= 1"
                    )
        if task == "grammar":
            if values["tokenizer"] not in ("", "char"):
                problems.append(
                    f"data.tokenizer={values['tokenizer']!r}: the grammar task is character-level "
                    "(its prefix automaton and error noise are over single brackets); leave it ''"
                )
            try:
                grammar_spec(values)
            except ValueError as e:
                problems.append(f"data: {e}; fix data.max_depth/max_len/p_end/p_open")
            if values["max_len"] + 2 > T:
                problems.append(
                    f"data.seq_len={T} is shorter than the longest grammar row: max_len + 2 "
                    f"(prompt, eos) = {values['max_len'] + 2}; raise data.seq_len"
                )
        if task == "text":
            need = values["prompt_tokens"] + values["completion_tokens"] + 1
            if values["prompt_tokens"] < 1:
                problems.append("data.prompt_tokens must be >= 1 for the text task")
            if need > T:
                problems.append(
                    f"data.seq_len={T} is shorter than a text row: prompt_tokens + "
                    f"completion_tokens + 1 (eos) = {need}; raise data.seq_len to at least {need}"
                )
        return problems


def grammar_spec(d: DataConfig | dict[str, Any]) -> grammar.GrammarSpec:
    """The grammar generator of a `config.data` (or of its fields as a dict)."""
    get = d.get if isinstance(d, dict) else lambda k: getattr(d, k)
    return grammar.GrammarSpec(get("max_depth"), get("max_len"), get("p_end"), get("p_open"))


@dataclasses.dataclass
class TrainData:
    tokenizer: Tokenizer
    train_rows: tuple[np.ndarray, np.ndarray, np.ndarray]  # tokens, prompt_len, length
    eval_split: dict[str, Any]  # tokens, prompt_len, length (+ question / answer)
    eval_name: str  # which split `eval_split` is ('test', 'validation', ...)
    prompt_max: int  # longest prompt in train and eval
    iterator: Any  # grain DatasetIterator of process-local batches
    # The task's prefix automaton (table [S, V] of next states, -1 = error; start state), for
    # noise kinds 'errors' and 'model'; None when the task has none (grammar has one).
    automaton: tuple[np.ndarray, int] | None = None

    def next(self) -> dict[str, np.ndarray]:
        return next(self.iterator)

    def get_state(self) -> dict:
        return self.iterator.get_state()

    def set_state(self, state: dict) -> None:
        self.iterator.set_state(state)


def build_train_data(
    d: DataConfig, *, seed: int, batch_size: int, process_index: int = 0, process_count: int = 1
) -> TrainData:
    """The data of a run: `d` is its `config.data`, `seed` its seed, `batch_size` the global
    number of data rows per step (split over the processes)."""
    eval_name = d.eval_split or EVAL_SPLITS[d.task][0]
    common = dict(data_dir=d.data_dir or None, T=d.seq_len, seed=seed)
    if d.task == "arithmetic":
        b = builders.build(
            "arithmetic",
            train_size=d.train_size,
            test_size=d.test_size,
            difficulty=d.difficulty,
            test_difficulty=d.test_difficulty or "interpolate",
            validation_size=d.validation_size,
            tokenizer=d.tokenizer,
            prompt_format=d.prompt_format,
            **common,
        )
    elif d.task == "grammar":
        spec = grammar_spec(d)
        b = builders.build(
            "grammar",
            max_depth=spec.max_depth,
            max_len=spec.max_len,
            p_end=spec.p_end,
            p_open=spec.p_open,
            train_size=d.train_size,
            validation_size=d.validation_size,
            test_size=d.test_size,
            **common,
        )
    else:
        b = builders.build(
            "text",
            corpus=d.corpus,
            tokenizer=d.tokenizer,
            prompt_tokens=d.prompt_tokens,
            completion_tokens=d.completion_tokens,
            max_files=d.max_files,
            **{**common, "seed": seed if d.split_seed < 0 else d.split_seed},
        )
    tok = builders.load_tokenizer(b)
    train = builders.load_split(b, "train")
    ev = builders.load_split(b, eval_name)
    # Text: evaluate on the first test_size chunks (arithmetic splits have their own sizes).
    if d.task == "text" and d.test_size and len(ev["prompt_len"]) > d.test_size:
        ev = {k: v[: d.test_size] for k, v in ev.items()}
    for name, split in (("train", train), (eval_name, ev)):
        if len(split["prompt_len"]) == 0:
            raise ValueError(f"the {name} split is empty; check data.train_size / data.test_size")
        masks.check_rows(
            split["tokens"], split["prompt_len"], split["length"], n_actions=tok.vocab_size + 1
        )
    longest = int(max(train["prompt_len"].max(), ev["prompt_len"].max()))
    prompt_max = d.prompt_max or longest
    if longest > prompt_max or prompt_max >= d.seq_len:
        raise ValueError(
            f"data.prompt_max={prompt_max} must cover the longest prompt ({longest}) and leave "
            f"room for actions in data.seq_len={d.seq_len}; raise seq_len or set prompt_max=0"
        )
    if batch_size % process_count:
        raise ValueError(
            f"train.batch_size={batch_size} must divide over {process_count} host slices"
        )
    it = pipeline.make_iterator(
        pipeline.ArraySource(train),
        batch_size=batch_size // process_count,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
    )
    rows = (train["tokens"], train["prompt_len"], train["length"])
    auto = grammar.automaton(grammar_spec(d), tok) if d.task == "grammar" else None
    return TrainData(tok, rows, ev, eval_name, prompt_max, it, auto)
