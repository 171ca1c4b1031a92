"""A run's compiled pieces, built once from its config: `setup`, and `load_trained` to restore
a finished run (for evaluation, sampling, or fine-tuning from it).

`Run` holds the typed config, the data, the mesh, the state's shapes and shardings (the
initial `TrainState` is built on demand by `init_state`, on the host until then), and the
jitted train step and replay refill (steps.py). Both donate the state they are given (its
buffers become the new state's: one copy of the state on the devices, not two), so a state
passed to them must not be used again. The frozen weights (the base model under LoRA) are
sharded by the same rules as the parameters and passed to every call, not baked into the
compiled programs. Nothing here loops; train.py does.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from smatch_jax import checkpointing, noise, objective, replay, sharding, steps, validate
from smatch_jax import config as config_lib
from smatch_jax.data import train_data as data_lib
from smatch_jax.models import factory, lora


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

    def abstract_state(self) -> Any:
        """Shapes, dtypes and shardings of the state (what a checkpoint restores into)."""
        return self.abstract

    def sm_on(self) -> bool:
        """SequenceMatch with sampled model rows (else BC, MLE or offline SequenceMatch)."""
        return self.settings.model_rows > 0


def setup(config: ml_collections.ConfigDict, typed: config_lib.Typed | None = None) -> Run:
    """The run of `config`; `typed`: `validate.check_config(config)`, when the caller has
    already checked it (train.py does, before it touches the workdir)."""
    c = typed or validate.check_config(config)  # every problem, one line each, before any work
    mesh = sharding.mesh_of(c.mesh)
    index, count = sharding.batch_slice(mesh)  # this host's share of every batch
    data = data_lib.build_train_data(
        c.data, seed=c.seed, batch_size=c.train.batch_size, process_index=index, process_count=count
    )
    tok = data.tokenizer
    validate.check_tokenizer(tok)
    T, P = c.data.seq_len, data.prompt_max
    trained = None
    if c.model.init.startswith("ckpt:"):  # fine-tune a run trained here
        prior, prior_state = load_trained(c.model.init[5:])
        model = nnx.merge(prior.graphdef, prior_state.params, prior.frozen)
        trained = (model, prior.data.tokenizer)
    model = factory.build_model(
        c.model, vocab_size=tok.vocab_size, seq_len=T, seed=c.seed, tokenizer=tok, trained=trained
    )
    graphdef, params, frozen = nnx.split(model, lora.trainable_filter(c.model.lora_rank > 0), ...)
    optimizer = build_optimizer(c, params, tok.bkspc_id)
    probs = noise.noise_probs(c.noise.kind, data.train_rows, tok)
    # 'model' noise on a task with an automaton: the policy's own errors (rejected tokens only)
    automaton = data.automaton if c.noise.kind in ("errors", "model") else None
    st = step_settings(c, tok, P)
    loss_fn = objective.make_loss_fn(c.loss, eos_id=tok.eos_id)
    params = jax.device_get(params)  # on the host until init_state (a restore needs none)
    abstract = jax.eval_shape(lambda p: initial_state(c, p, optimizer, tok.pad_id), params)
    state_sh = state_shardings(abstract, optimizer, mesh, c.mesh.rules)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, state_sh
    )
    init_state = lambda: jax.device_put(initial_state(c, params, optimizer, tok.pad_id), state_sh)
    frozen_sh = sharding.param_shardings(frozen, mesh, c.mesh.rules)
    frozen = jax.device_put(frozen, frozen_sh)
    rep = sharding.replicated(mesh)
    probs = jnp.asarray(probs)

    def train(state, batch, frozen, with_model):
        fn = steps.make_train_step(
            graphdef, frozen, optimizer, loss_fn, probs, st, automaton, mesh=mesh
        )
        return fn(state, batch, with_model=with_model)

    weights = sharding.decode_weight_specs(state_sh.params, frozen_sh)
    layout = sharding.decode_layout(mesh, c.train.batch_size, model.config.n_kv_heads, weights)

    def sample(state, batch, frozen):
        return steps.make_refill(graphdef, frozen, st, layout)(state, batch)

    jit = functools.partial(jax.jit, donate_argnums=0, out_shardings=(state_sh, rep))
    train_step = functools.partial(jit(train, static_argnames="with_model"), frozen=frozen)
    refill = functools.partial(jit(sample), frozen=frozen)
    return Run(
        config, c, data, mesh, abstract, init_state, train_step, refill, graphdef, frozen, st
    )


# The parts of `setup` that the abstract build (compile_plan.py) shares: they work on arrays
# and on ShapeDtypeStructs alike.


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
    cfg_file = Path(workdir) / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file} not found: is {workdir} a training workdir?")
    return ml_collections.ConfigDict(config_lib.upgrade(json.loads(cfg_file.read_text())))


def load_trained(
    workdir: str, step: int | None = None, *, eval_split: str | None = None
) -> tuple[Run, steps.TrainState]:
    """The run of `workdir` (its saved config) restored at `step` (default: latest), with
    `run.data.eval_split` the run's own evaluation split or `eval_split`."""
    config = read_config(workdir)
    if eval_split is not None:
        config.data.eval_split = eval_split
    run = setup(config)
    with checkpointing.Checkpointer(Path(workdir) / "checkpoints") as ckpt:
        step, state, _, _ = ckpt.restore(step, abstract_state=run.abstract_state())
    return run, state
