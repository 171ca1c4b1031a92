"""The `Task` interface and the registry of tasks (see the package docstring)."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from smatch_jax.sections import Section

if TYPE_CHECKING:
    from smatch_jax.data.tokenizer_base import Tokenizer
    from smatch_jax.data.train_data import DataConfig

Rows = dict[str, Any]  # tokens [N, T], prompt_len [N], length [N] (+ the task's own fields)


class EvalResult(Protocol):
    """What an evaluation during training returns (`eval.accuracy.AccuracyResult` is one)."""

    scalars: dict[str, float]  # written as eval/<name>
    samples: str  # a text dump, one sample a line
    recovery_examples: list[str]  # may be empty


class Task:
    """One task. Subclass it, set the class attributes, implement `load` and `evaluate` (and
    the hooks whose defaults do not fit), and `register` an instance."""

    name: ClassVar[str] = ""  # the value of config.data.task
    Config: ClassVar[type[Section]]  # its subsection config.data.<name> (NAME = "data.<name>")
    eval_splits: ClassVar[tuple[str, ...]] = ("test",)  # data.eval_split's choices; the first
    # is the default
    # The options of `evaluate_workdir` (and `python -m smatch_jax.main.evaluate`) it takes:
    # `report` receives those given; any other given option is refused naming the task.
    report_options: ClassVar[tuple[str, ...]] = ()
    has_automaton: ClassVar[bool] = False  # `automaton` returns one (checked before data is read)

    def problems(self, data: Mapping[str, Any], own: Any) -> list[str]:
        """Problems between `config.data`'s shared fields (`data`, a dict) and the task's own
        (`own`, its typed `Config`): one line each, naming the fix. The section checks its
        fields' types, choices and ranges itself."""
        del data, own
        return []

    def load(self, data: DataConfig, *, seed: int, eval_split: str) -> tuple[Tokenizer, Rows, Rows]:
        """(tokenizer, the training rows, the rows of `eval_split`) of `config.data` (its own
        fields: `data.task_config`). The tokenizer's `<bkspc>` id is its `vocab_size`."""
        raise NotImplementedError

    def automaton(self, data: DataConfig, tokenizer: Tokenizer) -> tuple[np.ndarray, int] | None:
        """The task's prefix automaton (a table [S, V] of next states, -1 = error; the start
        state), which noise kinds 'errors' and 'model' use; None when it has none."""
        del data, tokenizer
        return None

    def prompt_width(self, data: DataConfig) -> int | None:
        """The longest prompt in tokens, known from the config alone (a pod plan reads no data);
        None: only the data knows, so a plan needs `data.prompt_max`."""
        del data
        return None

    def evaluate(self, run: Any, model: Any, *, step: int) -> EvalResult:
        """The evaluation during training, on `run.data.eval_split` (`run`: `steps.Run`)."""
        raise NotImplementedError

    def report(self, run: Any, model: Any, options: dict[str, Any]) -> dict[str, Any]:
        """The body of an evaluation report: {"metrics": {...}, "protocol": {...}, "samples":
        [...], ...} (`eval/report.py` adds step, task and time). `options`: the given
        `report_options`. Default: `evaluate` at step 0, with its protocol."""
        del options
        res = self.evaluate(run, model, step=0)
        n = len(run.data.eval_split["prompt_len"])
        return report_body(res, {"split": run.data.eval_name, "n": n})


def report_body(res: EvalResult, protocol: dict[str, Any]) -> dict[str, Any]:
    """A report's body (`Task.report`) from an evaluation's result and its protocol."""
    return {
        "metrics": res.scalars,
        "protocol": protocol,
        "samples": res.samples.splitlines(),
        "recovery_examples": list(res.recovery_examples),
    }


def decode_options(run: Any) -> dict[str, int]:
    """The sampler's widths of a run: prompt_max and max_new_tokens."""
    return dict(
        prompt_max=run.settings.prompt_max, max_new_tokens=run.settings.sampling.max_new_tokens
    )


def recovery_options(run: Any, given: Mapping[str, Any], **task_opts: Any) -> dict[str, Any]:
    """Evaluation keywords from the run's `config.eval` (samples, temperature and recovery,
    which uses the ground-truth noise of the training rows), then the task's, then `given`."""
    from smatch_jax import noise

    e = run.typed.eval
    opts = dict(num_samples=e.num_samples, temperature=e.temperature, recovery=e.recovery)
    opts.update(task_opts)
    opts.update(given)
    probs = noise.noise_probs("ground_truth", run.data.train_rows, run.data.tokenizer)
    opts["noise_probs"] = probs if opts.pop("recovery") else None
    return opts


def tfds_rows(builder: Any, eval_split: str) -> tuple[Tokenizer, Rows, Rows]:
    """`Task.load`'s result from a prepared TFDS builder (`data/builders.py`)."""
    from smatch_jax.data import builders

    tok = builders.load_tokenizer(builder)
    return tok, builders.load_split(builder, "train"), builders.load_split(builder, eval_split)


# name -> module of the built-in tasks, imported on first use (they import the evaluation code)
_BUILTIN = {
    "arithmetic": "smatch_jax.tasks.arithmetic",
    "grammar": "smatch_jax.tasks.grammar",
    "text": "smatch_jax.tasks.text",
}
_REGISTRY: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Adds `task` under `task.name` (its subsection `config.data.<name>` joins the schema).
    A name already taken by another class is an error; the same class again (a config file
    that registers its task, loaded twice) replaces it."""
    _load_builtin()
    old = _REGISTRY.get(task.name)
    same = old is not None and _where(old) == _where(task)
    if not task.name or (old is not None and not same):
        raise ValueError(f"a task needs a new name; {task.name!r} is taken or empty")
    if f"data.{task.name}" != task.Config.NAME:
        raise ValueError(f"{task.Config.__name__}.NAME must be 'data.{task.name}'")
    _REGISTRY[task.name] = task
    return task


def _where(task: Task) -> tuple[str, str]:
    return type(task).__module__, type(task).__qualname__


def unregister(name: str) -> None:
    """Removes a task added by `register` (tests)."""
    _REGISTRY.pop(name, None)


def _load_builtin() -> None:
    for name, module in _BUILTIN.items():
        if name not in _REGISTRY:
            _REGISTRY[name] = importlib.import_module(module).TASK


def names() -> tuple[str, ...]:
    """The registered tasks, the built-in ones first."""
    _load_builtin()
    return tuple(_REGISTRY)


def get(name: str) -> Task:
    """The task called `name` (an unknown name raises naming the registered ones)."""
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; registered: {list(_REGISTRY)}")
    return _REGISTRY[name]
