"""Train: `python -m smatch_jax.main --config=configs/arithmetic.py:smoke --workdir=W`
(also `python -m smatch_jax.main.train`).

Overrides: `--config.loss.chi2_coef=0.5` (an unknown key is reported with the closest known
one). A run resumes automatically from `--workdir`; a workdir holding a different config is
refused unless `--force_resume` (changing only `train.num_steps`, the log / eval / checkpoint
cadences or `data.data_dir` is allowed). Errors the user can fix (bad config, unusable workdir,
non-finite loss, failed checkpoint write, missing asset) end the run with one `error:` line.
Multi-host: set `--config.distributed=True` (then `jax.distributed.initialize()` reads the
cluster from the environment, or pass `--coordinator=host:port --num_processes=N
--process_id=i`, e.g. for several processes on 127.0.0.1).
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

# Locked: after the command-line overrides nothing may add a field by a typo.
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "experiment config file[:variant]", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics, samples")
_COORD = flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-host)")
_NPROC = flags.DEFINE_integer("num_processes", None, "number of processes (multi-host)")
_PID = flags.DEFINE_integer("process_id", None, "this process's id (multi-host)")
_FORCE = flags.DEFINE_bool(
    "force_resume", False, "resume a workdir whose config.json differs from this config"
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    del argv
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax is chatty at INFO
    logging.getLogger("smatch_jax").setLevel(logging.INFO)  # ours is not (resumed from ...)
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()  # our own progress line is enough
    config = _CONFIG.value
    if config.distributed:
        jax.distributed.initialize(_COORD.value, _NPROC.value, _PID.value)
    # After distributed init: train touches devices.
    from smatch_jax import assets, checkpointing, guard, train, validate

    try:
        result = train.train(config, _WORKDIR.value, force_resume=_FORCE.value)[1]
    except (
        validate.ConfigError,
        validate.WorkdirError,
        guard.NonFiniteError,
        checkpointing.CheckpointError,
        checkpointing.CheckpointWriteError,
        assets.AssetMissingError,
    ) as e:
        raise SystemExit(f"error: {e}") from None
    if jax.process_index() == 0:
        keys = [k for k in sorted(result) if k.startswith("eval/") or k in ("loss",)]
        print(" ".join(f"{k}={result[k]:.4g}" for k in keys))


def _config_overrides(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the --config value, the keys of its --config.<key> overrides) in argv."""
    spec, keys = None, []
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name == "--config":
            spec = value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
        elif name.startswith("--config."):
            keys.append(name[len("--config.") :])
    return spec, keys


def check_overrides(argv: list[str]) -> None:
    """Exit with one line naming the closest key if an override names no config field.

    (ml_collections would raise deep inside flag parsing, with a long traceback.)
    """
    spec, keys = _config_overrides(argv)
    if not spec or not keys:
        return
    path, _, arg = spec.partition(":")
    if not Path(path).is_file():
        return  # absl reports it
    module_spec = importlib.util.spec_from_file_location("_smatch_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
    from smatch_jax import validate

    try:
        validate.check_override_keys(config, keys)
    except validate.ConfigError as e:
        raise SystemExit(f"error: {e}") from None


def run_cli() -> None:
    check_overrides(sys.argv[1:])
    app.run(main)


if __name__ == "__main__":
    run_cli()
