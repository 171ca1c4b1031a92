"""Train: `python -m smatch_jax.main --config=configs/arithmetic.py:smoke --workdir=W`
(also `python -m smatch_jax.main.train`).

Overrides: `--config.loss.chi2_coef=0.5` (an unknown key is reported with the closest known
one). A run resumes automatically from `--workdir`; a workdir holding a different config is
refused unless `--force_resume` (changing only `train.num_steps`, the log / eval / checkpoint
cadences or `data.data_dir` is allowed). Errors the user can fix (bad config, unusable workdir,
non-finite loss, failed checkpoint write, missing asset) end the run with one `error:` line
(exit 2 for bad input, 1 for a failure; `--debug` adds the traceback). `--config=FILE --list`
lists the file's variants and every field with its value, default and comment. Ctrl-C or
SIGTERM saves a checkpoint after the current step and exits 0 (a second Ctrl-C quits at once).
Multi-host: set `--config.distributed=True` (then `jax.distributed.initialize()` reads the
cluster from the environment, or pass `--coordinator=host:port --num_processes=N
--process_id=i`, e.g. for several processes on 127.0.0.1).
"""

from __future__ import annotations

import sys

import jax
from absl import flags

from smatch_jax.main import cli

# `--config` and its overrides: `cli.CONFIG`, the entry every program with a config shares.
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics, samples")
_COORD = flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-host)")
_NPROC = flags.DEFINE_integer("num_processes", None, "number of processes (multi-host)")
_PID = flags.DEFINE_integer("process_id", None, "this process's id (multi-host)")
_FORCE = flags.DEFINE_bool(
    "force_resume", False, "resume a workdir whose config.json differs from this config"
)

# The end-of-run table: these figures when the run has them (metrics.jsonl has every one).
SUMMARY_KEYS = (
    "loss",
    "eval/accuracy",
    "eval/accuracy_sample",
    "eval/recovery",
    "eval/bkspc_per_sample",
    "eval/valid",
    "eval/mean_new_tokens",
    "eval/ngram_entropy_2",
    "eval/repetition_rate",
    "sec_per_step",
)


def summary_table(result: dict, workdir: str) -> str:
    """The end-of-run summary: a short markdown table and where the rest is."""
    rows = [f"| {k} | {result[k]:.4g} |" for k in SUMMARY_KEYS if k in result]
    return "\n".join(
        [
            "| metric | value |",
            "|---|---|",
            *rows,
            f"every figure: {workdir}/metrics.jsonl (tensorboard --logdir {workdir}/tensorboard)",
        ]
    )


def main(argv: list[str]) -> None:
    config = cli.parse_config_flags(
        argv, doc=__doc__, module_name=__name__, required=("config", "workdir")
    )
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()  # our own progress line is enough
    if config.distributed:
        jax.distributed.initialize(_COORD.value, _NPROC.value, _PID.value)
    # After distributed init: train touches devices.
    from smatch_jax import train

    _, result = train.train(config, _WORKDIR.value, force_resume=_FORCE.value, argv=sys.argv)
    if jax.process_index() == 0:
        print(summary_table(result, _WORKDIR.value))


def run_cli() -> None:
    cli.run(main)


if __name__ == "__main__":
    run_cli()
