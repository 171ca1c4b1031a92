"""Command line: `python -m smatch_jax.main --config=configs/arithmetic.py:smoke --workdir=W`.

Overrides: `--config.loss.chi2_coef=0.5`. A run resumes automatically from `--workdir`.
Multi-host: set `--config.distributed=True` (then `jax.distributed.initialize()` reads the
cluster from the environment, or pass `--coordinator=host:port --num_processes=N
--process_id=i`, e.g. for several processes on 127.0.0.1).
"""

from __future__ import annotations

import logging
import sys

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file[:variant]")
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics, samples")
_COORD = flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-host)")
_NPROC = flags.DEFINE_integer("num_processes", None, "number of processes (multi-host)")
_PID = flags.DEFINE_integer("process_id", None, "this process's id (multi-host)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    del argv
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax is chatty at INFO
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()  # our own progress line is enough
    config = _CONFIG.value
    if config.distributed:
        jax.distributed.initialize(_COORD.value, _NPROC.value, _PID.value)
    from smatch_jax import train  # after distributed init: it touches devices

    result = train.train_and_evaluate(config, _WORKDIR.value)
    if jax.process_index() == 0:
        keys = [k for k in sorted(result) if k.startswith("eval/") or k in ("loss",)]
        print(" ".join(f"{k}={result[k]:.4g}" for k in keys))


if __name__ == "__main__":
    app.run(main)
