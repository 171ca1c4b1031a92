"""Tasks: what a run learns and how it is judged. One module per task, and their registry.

A task (`Task`) owns everything that differs between tasks: its own config subsection
`config.data.<name>` (a typed `sections.Section`, checked once), how its rows and tokenizer are
made, the splits `data.eval_split` may name, its prefix automaton (if it has one), the sampler's
prompt width when no data is read (pod plans), and its evaluation with the protocol text of its
report. The rest of the library (`data/train_data.py`, `eval/report.py`, `validate.py`,
`compile_plan.py`) asks the task and never looks at its name.

The built-in tasks (`arithmetic`, `grammar`, `text`) are imported on first use. A new task is a
subclass registered once, from anywhere (a test file, a research fork):

    class Reverse(tasks.Task):
        name = "reverse"
        Config = ReverseConfig               # a sections.Section with NAME = "data.reverse"
        def load(self, data, *, seed, eval_split): ...   # (tokenizer, train rows, eval rows)
        def evaluate(self, run, model, *, step): ...     # in training: an EvalResult
    tasks.register(Reverse())

and `--config.data.task=reverse --config.data.reverse.<field>=...` trains, evaluates and plans
it through the public programs (tests/test_task_plugin.py does exactly this).
"""

from smatch_jax.tasks.base import (
    EvalResult,
    Task,
    decode_options,
    get,
    names,
    recovery_options,
    register,
    unregister,
)

__all__ = [
    "EvalResult",
    "Task",
    "decode_options",
    "get",
    "names",
    "recovery_options",
    "register",
    "unregister",
]
