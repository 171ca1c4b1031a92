"""A run built once from its config: `setup` (data, model, and `steps.build`: the `steps.Run`
the loop trains), and `load_trained` to restore a finished run (for evaluation, sampling, or
fine-tuning from it).

One builder, two callers (MaxText's pattern: one function makes the jitted step and its
signature for `train.py` and `train_compile.py`):

* `setup(config)`: the run that trains: data, weights, the initial state, and the jitted
  pieces of `steps.build`, called with the frozen weights and the noise tables (on the
  devices);
* `compile_plan.abstract_run(config, devices)`: the same `steps.build` on a model made of
  shapes and on a TPU topology's compile-only devices, so the plan compiles the very program
  that trains, shardings and donation included (tests/test_compile.py lowers both and
  compares).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from smatch_jax import checkpointing, noise, read_noise, sharding, steps, storage, validate
from smatch_jax import config as config_lib
from smatch_jax.data import train_data as data_lib
from smatch_jax.errors import UserError
from smatch_jax.models import factory

log = logging.getLogger(__name__)


def noise_tables(c: config_lib.Typed, data: data_lib.TrainData) -> steps.NoiseTables:
    """The noise's arrays: its distribution and, for the noise kinds that use one,
    the task's prefix automaton ('model' noise on such a task: the policy's own errors)."""
    probs = noise.noise_probs(c.noise.kind, data.train_rows, data.tokenizer)
    automaton = None
    if c.noise.kind in ("errors", "model") and data.automaton is not None:
        table, start = data.automaton
        automaton = (jnp.asarray(table, jnp.int32), jnp.asarray(start, jnp.int32))
    return steps.NoiseTables(jnp.asarray(probs, jnp.float32), automaton)


def setup(config: ml_collections.ConfigDict, typed: config_lib.Typed | None = None) -> steps.Run:
    """The run of `config`; `typed`: `validate.check_config(config)`, when the caller has
    already checked it (train.py does, before it touches the workdir)."""
    c = typed or validate.check_config(config)  # every problem, one line each, before any work
    enable_compilation_cache(c.train.compilation_cache)
    mesh = sharding.mesh_of(c.mesh)
    index, count = sharding.batch_slice(mesh)  # this host's share of every batch
    data = data_lib.build_train_data(
        c.data, seed=c.seed, batch_size=c.train.batch_size, process_index=index, process_count=count
    )
    tok = data.tokenizer
    validate.check_tokenizer(tok)
    trained = None
    if c.model.init.startswith("ckpt:"):  # fine-tune a run trained here
        prior, prior_state = load_trained(c.model.init[5:])
        model = nnx.merge(prior.graphdef, prior_state.params, prior.frozen)
        trained = (model, prior.data.tokenizer)
    shardings = lambda abstract: sharding.param_shardings(abstract, mesh, c.mesh.rules)
    model = factory.build_model(
        c.model, vocab_size=tok.vocab_size, seq_len=c.data.seq_len, seed=c.seed, tokenizer=tok,
        trained=trained, shardings=shardings,  # an hf: checkpoint: each host reads its shards
    )  # fmt: skip
    limit = model.config.position_limit
    if limit is not None and c.data.seq_len > limit:  # a row's positions past the table: NaN
        raise validate.ConfigError(
            f"data.seq_len={c.data.seq_len} exceeds the {limit} positions of this gpt2-family "
            f"model ({c.model.init or c.model.preset}); set data.seq_len <= {limit}"
        )
    b = steps.build(c, model, tok, data.prompt_max, mesh)
    del model
    placed = vars(b) | dict(
        params=jax.device_get(b.params),  # on the host until init_state (a restore needs none)
        frozen=jax.device_put(b.frozen, b.frozen_sh),
    )
    tables = jax.device_put(noise_tables(c, data), sharding.replicated(mesh))
    return steps.Run(**placed, config=config, data=data, tables=tables)


def enable_compilation_cache(path: str) -> None:
    """JAX's persistent compilation cache in `path` (`train.compilation_cache`): the compiled
    train step, refill and samplers of a restarted run are read from it (keyed by the
    program, the devices and the compiler), not compiled again. A directory already set
    (`JAX_COMPILATION_CACHE_DIR`) is kept; '' turns the cache off. JAX caches what took at
    least `jax_persistent_cache_min_compile_time_secs` (1 s) to compile."""
    if not path:
        jax.config.update("jax_enable_compilation_cache", False)
    elif not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))


def read_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """The config a workdir's run was trained with (`config.upgrade`d to the current schema)."""
    cfg_file = storage.path(workdir) / "config.json"
    if not storage.path(workdir).is_dir():
        raise UserError(f"--workdir {workdir} does not exist")
    if not cfg_file.exists():
        raise UserError(f"{cfg_file} not found: is {workdir} a training workdir?")
    try:
        return ml_collections.ConfigDict(config_lib.upgrade(json.loads(cfg_file.read_text())))
    except ValueError as e:
        raise UserError(f"{cfg_file} is not a readable config ({e})") from None


def checkpoint_steps(workdir: str | Path) -> list[int]:
    """The steps of a workdir's complete checkpoints (read from the directory)."""
    d = storage.path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def load_trained(
    workdir: str, step: int | None = None, *, eval_split: str | None = None
) -> tuple[steps.Run, steps.TrainState]:
    """The run of `workdir` (its saved config) restored at `step` (default: the latest that
    can be read, as training falls back: a warning names what was skipped), with
    `run.data.eval_split` the run's own evaluation split or `eval_split`. A `step` with no
    checkpoint is a UserError listing the steps there are; nothing in the workdir changes."""
    config = read_config(workdir)
    if eval_split is not None:
        config.data.eval_split = eval_split
    have = checkpoint_steps(workdir)
    if not have:
        raise UserError(f"{workdir} has no checkpoint yet: train it first, or wait for its first")
    if step is not None and step not in have:
        raise UserError(f"--step {step}: {workdir} has checkpoints at steps {have}")
    run = setup(config)
    with checkpointing.Checkpointer(storage.path(workdir) / "checkpoints") as ckpt:
        if step is not None:
            try:
                _, state, _, _ = ckpt.restore(step, abstract_state=run.abstract_state())
            except Exception as e:
                others = [s for s in have if s != step]
                raise checkpointing.CheckpointError(
                    f"checkpoint step {step} in {workdir} could not be restored "
                    f"({read_noise.first_line(e)}); the other steps are {others}: pass one "
                    "as --step"
                ) from None
            return run, state
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got, state, _, _ = ckpt.restore_latest_valid(abstract_state=run.abstract_state())
    if got != have[-1]:
        log.warning(
            "%s; using step %d (--step chooses another)", read_noise.skipped_steps(caught), got
        )
    return run, state
