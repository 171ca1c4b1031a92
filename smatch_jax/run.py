"""A run's compiled pieces, built once from its config: `setup`, `build` (what `setup` and the
pod plan share), and `load_trained` to restore a finished run (for evaluation, sampling, or
fine-tuning from it).

One builder, two callers (MaxText's pattern: one function makes the jitted step and its
signature for `train.py` and `train_compile.py`):

* `setup(config)`: the run that trains: data, weights, the initial state, and the jitted
  pieces of `build`, with the frozen weights and the noise tables bound;
* `compile_plan.abstract_run(config, devices)`: the same `build` on a model made of shapes
  and on a TPU topology's compile-only devices, so the plan compiles the very program that
  trains, shardings and donation included (tests/test_compile.py lowers both and compares).

`build` gives the `Program`: the train step and the replay refill (steps.py), jitted with the
state's shardings. Both donate the state they are given (its buffers become the new state's:
one copy of the state on the devices, not two), so a state passed to them must not be used
again. The frozen weights (the base model under LoRA) and the noise tables are arguments,
sharded by the parameter rules and copied respectively, not constants baked into the
programs. Nothing here loops; train.py does.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from smatch_jax import (
    checkpointing,
    noise,
    objective,
    read_noise,
    replay,
    sharding,
    steps,
    storage,
    validate,
)
from smatch_jax import config as config_lib
from smatch_jax.data import train_data as data_lib
from smatch_jax.errors import UserError
from smatch_jax.models import factory, lora

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Program:
    """The run's jitted pieces (steps.py) with their shardings; each donates `state`.

    `train_step(state, batch, frozen, tables, *, with_model) -> (state, metrics)`;
    `refill(state, batch, frozen) -> (state, stats)`. `lower` them with arrays or with
    `ShapeDtypeStruct`s carrying shardings (the pod plan)."""

    train_step: Any
    refill: Any


@dataclasses.dataclass
class Built:
    """What `build` makes of a config and a model (real or abstract)."""

    typed: config_lib.Typed
    mesh: Any
    graphdef: Any
    params: Any  # the trainable weights as given (arrays, or ShapeDtypeStructs)
    frozen: Any  # the non-trainable weights as given (the base model under LoRA)
    frozen_sh: Any  # their shardings
    abstract: steps.TrainState  # the state's ShapeDtypeStructs with shardings
    optimizer: optax.GradientTransformation
    settings: steps.StepSettings
    model_config: Any  # the model's ModelConfig
    program: Program


def build(c: config_lib.Typed, model: Any, tok: Any, prompt_max: int, mesh: Any) -> Built:
    """The run's pieces from its typed config, its model (built or `nnx.eval_shape`d), the
    tokenizer's ids (`bkspc_id`, `eos_id`, `pad_id`), the sampler's prompt width and the mesh;
    shared by `setup` and the pod plan."""
    graphdef, params, frozen = nnx.split(model, lora.trainable_filter(c.model.lora_rank > 0), ...)
    optimizer = build_optimizer(c, params, tok.bkspc_id)
    st = step_settings(c, tok, prompt_max)
    abstract = jax.eval_shape(lambda p: initial_state(c, p, optimizer, tok.pad_id), params)
    state_sh = state_shardings(abstract, optimizer, mesh, c.mesh.rules)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, state_sh
    )
    frozen_sh = sharding.param_shardings(frozen, mesh, c.mesh.rules)
    loss_fn = objective.make_loss_fn(c.loss, eos_id=tok.eos_id)
    train = steps.make_train_step(graphdef, optimizer, loss_fn, st, mesh=mesh)
    weights = sharding.decode_weight_specs(state_sh.params, frozen_sh)
    layout = sharding.decode_layout(mesh, c.train.batch_size, model.config.n_kv_heads, weights)
    refill = steps.make_refill(graphdef, st, layout)
    out = (state_sh, sharding.replicated(mesh))
    program = Program(
        train_step=jax.jit(
            train, static_argnames="with_model", donate_argnums=0, out_shardings=out
        ),
        refill=jax.jit(refill, donate_argnums=0, out_shardings=out),
    )
    return Built(
        c, mesh, graphdef, params, frozen, frozen_sh, abstract, optimizer, st, model.config,
        program,
    )  # fmt: skip


@dataclasses.dataclass
class Run:
    """Everything the loop needs, built once."""

    config: ml_collections.ConfigDict
    typed: config_lib.Typed
    data: data_lib.TrainData
    mesh: Any
    abstract: steps.TrainState  # ShapeDtypeStructs with shardings
    init_state: Callable[[], steps.TrainState]  # step 0, on the devices (a fresh copy)
    train_step: Any  # (state, batch, *, with_model) -> (state, metrics); donates state
    refill: Any  # (state, batch) -> (state, stats); donates state
    graphdef: Any
    frozen: Any  # the non-trainable weights, sharded
    settings: steps.StepSettings
    program: Program  # the jitted pieces, without the frozen weights and tables bound
    tables: steps.NoiseTables  # the noise's arrays, on the devices
    model_config: Any  # the model's ModelConfig

    def abstract_state(self) -> Any:
        """Shapes, dtypes and shardings of the state (what a checkpoint restores into)."""
        return self.abstract

    def sm_on(self) -> bool:
        """SequenceMatch with sampled model rows (else BC, MLE or offline SequenceMatch)."""
        return self.settings.model_rows > 0


def noise_tables(c: config_lib.Typed, data: data_lib.TrainData) -> steps.NoiseTables:
    """The noise's arrays: its distribution and, for the noise kinds that use one,
    the task's prefix automaton ('model' noise on such a task: the policy's own errors)."""
    probs = noise.noise_probs(c.noise.kind, data.train_rows, data.tokenizer)
    automaton = None
    if c.noise.kind in ("errors", "model") and data.automaton is not None:
        table, start = data.automaton
        automaton = (jnp.asarray(table, jnp.int32), jnp.asarray(start, jnp.int32))
    return steps.NoiseTables(jnp.asarray(probs, jnp.float32), automaton)


def setup(config: ml_collections.ConfigDict, typed: config_lib.Typed | None = None) -> Run:
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
    place = lambda abstract: sharding.param_shardings(abstract, mesh, c.mesh.rules)
    model = factory.build_model(
        c.model, vocab_size=tok.vocab_size, seq_len=c.data.seq_len, seed=c.seed, tokenizer=tok,
        trained=trained, place=place,  # an hf: checkpoint: each host reads its shards only
    )  # fmt: skip
    limit = model.config.position_limit
    if limit is not None and c.data.seq_len > limit:  # a row's positions past the table: NaN
        raise validate.ConfigError(
            f"data.seq_len={c.data.seq_len} exceeds the {limit} positions of this gpt2-family "
            f"model ({c.model.init or c.model.preset}); set data.seq_len <= {limit}"
        )
    b = build(c, model, tok, data.prompt_max, mesh)
    del model
    params = jax.device_get(b.params)  # on the host until init_state (a restore needs none)
    state_sh = jax.tree.map(lambda x: x.sharding, b.abstract)
    init_state = lambda: jax.device_put(initial_state(c, params, b.optimizer, tok.pad_id), state_sh)
    frozen = jax.device_put(b.frozen, b.frozen_sh)
    tables = jax.device_put(noise_tables(c, data), sharding.replicated(mesh))
    train_fn, refill_fn = b.program.train_step, b.program.refill

    def train_step(state, batch, *, with_model):
        return train_fn(state, batch, frozen, tables, with_model=with_model)

    def refill(state, batch):
        return refill_fn(state, batch, frozen)

    return Run(
        config, c, data, mesh, b.abstract, init_state, train_step, refill, b.graphdef, frozen,
        b.settings, b.program, tables, b.model_config,
    )  # fmt: skip


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


# The parts of `build` that work on arrays and on ShapeDtypeStructs alike.


def build_optimizer(
    c: config_lib.Typed, params: Any, bkspc_id: int
) -> optax.GradientTransformation:
    """The run's optimiser; with LoRA, only the adapters and the `<bkspc>` rows update."""
    mask = lora.update_mask(params, bkspc_id) if c.model.lora_rank else None
    return c.optim.build(c.train.num_steps, mask)


def step_settings(c: config_lib.Typed, tok: Any, prompt_max: int) -> steps.StepSettings:
    """The compiled steps' static settings; `tok` has `bkspc_id`, `eos_id` and `pad_id`."""
    return steps.StepSettings(
        bkspc_id=tok.bkspc_id,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
        noise=c.noise,
        model_rows=c.train.model_rows if c.loss.samples_model_rows else 0,
        prompt_max=prompt_max,
        sampling=c.sampling.decoding(c.data.seq_len - prompt_max),
        remat=c.model.remat,
        place_output=not c.model.scan_layers,
    )


def initial_state(
    c: config_lib.Typed, params: Any, optimizer: optax.GradientTransformation, pad_id: int
) -> steps.TrainState:
    """Step 0: the parameters, a fresh optimiser state, an empty replay buffer, the seed's
    key (under `jax.eval_shape`: the state's shapes)."""
    key = jax.random.key_data(jax.random.key(c.seed))
    return steps.TrainState(
        jnp.zeros((), jnp.int32),
        params,
        optimizer.init(params),
        replay.init(c.replay.capacity, c.data.seq_len, pad_id),
        key,
    )


def state_shardings(
    state: steps.TrainState, optimizer: optax.GradientTransformation, mesh: Any, rules: str = ""
) -> steps.TrainState:
    """The `NamedSharding` of every leaf of `state` (arrays or ShapeDtypeStructs); `rules`:
    `mesh.rules`, before the table `sharding.RULES`."""
    param_sh = sharding.param_shardings(state.params, mesh, rules)
    rep = sharding.replicated(mesh)
    # Optimiser moments follow their parameter's sharding.
    opt_sh = optax.tree_map_params(
        optimizer, lambda _, s: s, state.opt_state, param_sh, transform_non_params=lambda _: rep
    )
    return steps.TrainState(rep, param_sh, opt_sh, jax.tree.map(lambda _: rep, state.replay), rep)


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
) -> tuple[Run, steps.TrainState]:
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
