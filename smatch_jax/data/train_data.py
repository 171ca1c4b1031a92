"""What the training loop needs from the data layer, built from `config.data`.

`TrainData` bundles the tokenizer, the resumable training iterator (process-local batches),
the training rows (for the ground-truth noise distribution) and the evaluation split.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from smatch_jax import masks, tasks
from smatch_jax.data import pipeline
from smatch_jax.data.tokenizer_base import Tokenizer
from smatch_jax.sections import SUBSECTION, Section, did_you_mean


@dataclasses.dataclass(frozen=True)
class DataConfig(Section):
    """`config.data`: the task, its dataset and the row format. The fields here are every
    task's; each task's own are in its subsection `config.data.<task>` (`tasks.Task.Config`),
    of which the run's is `task_config`."""

    NAME: ClassVar[str] = "data"
    task: str = ""  # the task (set by the experiment config): arithmetic | grammar | text | ...
    data_dir: str = ""  # where prepared datasets live ('' = $SMATCH_JAX_DATA or default)
    train_size: int = 0  # training examples (generated tasks)
    test_size: int = 0  # evaluation examples (text: the first test_size chunks; 0: all)
    validation_size: int = 500  # questions of the validation split (generated tasks)
    eval_split: str = ""  # split evaluated in training ('': the task's first, e.g. test for
    # arithmetic, validation for text); arithmetic experiments choose settings on 'validation'
    seq_len: int = 0  # T, row length including noise and backspaces
    prompt_max: int = 0  # sampler prompt width (0: the longest prompt in the data)
    tokenizer: str = ""  # text: 'bpe_train:<vocab>', 'gpt2', 'smollm2' or 'bpe:<json>';
    # arithmetic: '' / 'char' (its own characters), 'smollm2', 'gpt2' or 'bpe:<json>'
    task_config: Any = dataclasses.field(default=None, metadata=SUBSECTION)  # data.<task>

    RANGES: ClassVar[tuple[tuple[str, Any, Any, bool], ...]] = (
        ("seq_len", 2, None, True),
        ("prompt_max", 0, None, True),
        ("train_size", 0, None, True),
        ("test_size", 0, None, True),
        ("validation_size", 0, None, True),
    )

    def __post_init__(self) -> None:
        if self.task_config is None and self.task in tasks.names():  # built directly
            object.__setattr__(self, "task_config", tasks.get(self.task).Config())
        super().__post_init__()

    @classmethod
    def schema(cls) -> dict[str, Any]:
        """The shared fields and every registered task's subsection."""
        subsections = {name: tasks.get(name).Config.defaults() for name in tasks.names()}
        return {**cls.defaults(), **subsections}

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> DataConfig:
        """The typed section of `config.data`: its fields, and every registered task's
        subsection checked (the run's task's kept as `task_config`)."""
        items = dict(values.items())
        subs = {k: items.pop(k) for k in list(items) if hasattr(items[k], "items")}
        registered = tasks.names()
        problems = [
            did_you_mean(f"data.{k}", [f"data.{n}" for n in registered])
            for k in subs
            if k not in registered
        ]
        own = {}
        for name in registered:
            try:
                own[name] = tasks.get(name).Config.from_mapping(subs.get(name, {}))
            except ValueError as e:
                problems += str(e).splitlines()
        if "task_config" in items:
            problems.append(did_you_mean("data.task_config", [f"data.{k}" for k in cls.defaults()]))
        if problems:
            raise ValueError("\n".join(problems))
        return super().from_mapping({**items, "task_config": own.get(items.get("task", ""))})

    @classmethod
    def cross_problems(cls, values: dict[str, Any]) -> list[str]:
        task, T, prompt_max = values["task"], values["seq_len"], values["prompt_max"]
        if task not in tasks.names():
            return [f"data.task={task!r} is unknown; choose one of {list(tasks.names())}"]
        problems = []
        if prompt_max and prompt_max >= T:
            problems.append(
                f"data.prompt_max={prompt_max} leaves no room for actions in data.seq_len={T}; "
                "raise data.seq_len or lower data.prompt_max (0: the longest prompt in the data)"
            )
        splits = tasks.get(task).eval_splits
        if values["eval_split"] and values["eval_split"] not in splits:
            problems.append(
                f"data.eval_split={values['eval_split']!r} is not a split of {task}; choose "
                f"one of {list(splits)} ('' for {splits[0]!r})"
            )
        return problems + tasks.get(task).problems(values, values["task_config"])


@dataclasses.dataclass
class TrainData:
    tokenizer: Tokenizer
    train_rows: tuple[np.ndarray, np.ndarray, np.ndarray]  # tokens, prompt_len, length
    eval_split: dict[str, Any]  # tokens, prompt_len, length (+ question / answer)
    eval_name: str  # which split `eval_split` is ('test', 'validation', ...)
    prompt_max: int  # longest prompt in train and eval
    iterator: Any  # grain DatasetIterator of process-local batches
    # The task's prefix automaton (table [S, V] of next states, -1 = error; start state), for
    # noise kinds 'errors' and 'model'; None when the task has none (`tasks.Task.automaton`).
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
    task = tasks.get(d.task)
    eval_name = d.eval_split or task.eval_splits[0]
    tok, train, ev = task.load(d, seed=seed, eval_split=eval_name)
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
    return TrainData(tok, rows, ev, eval_name, prompt_max, it, task.automaton(d, tok))
