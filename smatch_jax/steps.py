"""The glue between the loop (train.py) and the compiled step, in one module (method.md §6):
what the loop calls (`Run.train_step`, `Run.refill`), the builder that jits the step (`build`,
for `run.setup` and for the pod plan alike), and the compiled train step and replay refill.

* `make_train_step`: data rows get noise + `<bkspc>` augmentation (on device, keyed by the
  step), model rows are drawn from the replay buffer; both go through `backspace_layout` and
  ONE forward pass; the loss factory combines BC and SequenceMatch; one optimiser update, not
  applied when the loss, the gradient or the update is non-finite (`metrics["finite"]`).
* `make_refill`: the policy samples continuations of the current data prompts with the
  KV-cache sampler and pushes the action rows into the replay buffer.

Both are pure functions of a `TrainState` (a pytree, checkpointed whole: parameters,
optimiser state, replay buffer, RNG), of the non-trainable weights `frozen` (the base model
under LoRA) and, for the train step, of the noise's `NoiseTables`: arguments (sharded by the
parameter rules, and copied), never constants baked into the programs, so that the pod plan
compiles the very program that trains (`build` on a model of shapes, compile_plan.py).
`build` jits both with the state's shardings; both donate the state they are given (its
buffers become the new state's: one copy of the state on the devices, not two), so a state
passed to them must not be used again. Nothing here loops; train.py does.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from smatch_jax import activations, masks, noise, objective, replay, sampling, sharding
from smatch_jax.models import lora

if TYPE_CHECKING:
    import ml_collections

    from smatch_jax import config as config_lib
    from smatch_jax.data import train_data as data_lib


class TrainState(NamedTuple):
    step: jax.Array  # int32 []
    params: Any  # nnx.State of the trainable variables
    opt_state: Any
    replay: replay.Replay
    key: jax.Array  # uint32 key data (jax.random.key_data), so checkpoints are plain arrays


class NoiseTables(NamedTuple):
    """The data-dependent arrays of the noise (noise.py): arguments of the train step."""

    probs: jax.Array  # float32 [V]: the noise distribution over the base vocabulary
    # The task's prefix automaton for noise kinds 'errors' / 'model': (table int32 [S, V] of
    # next states, -1 rejected; start state int32 []), or None
    automaton: tuple[jax.Array, jax.Array] | None = None


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """Static settings of the compiled step (hashable)."""

    bkspc_id: int
    eos_id: int
    pad_id: int
    noise: noise.NoiseConfig
    model_rows: int  # model rows per SequenceMatch batch (0: offline)
    prompt_max: int  # prompts are cut to this many tokens for sampling
    sampling: sampling.SamplingConfig
    remat: str = "none"  # the train step's forward pass (model.remat)
    # On a mesh, the rows of the output layer's input split over the batch axes. Measured on
    # the paper's train step with model rows (v5e-32, benchmarks/RESULTS.md): unrolled layers
    # 7.73 -> 6.93 GiB a chip with it; scanned 5.40 -> 14.6 GiB, so a scanned run leaves it
    # to XLA (build).
    place_output: bool = True


@dataclasses.dataclass(frozen=True)
class Program:
    """The run's jitted pieces with their shardings; each donates `state`.

    `train_step(state, batch, frozen, tables, *, use_model_rows) -> (state, metrics)`;
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
    abstract: TrainState  # the state's ShapeDtypeStructs with shardings
    optimizer: optax.GradientTransformation
    settings: StepSettings
    model_config: Any  # the model's ModelConfig
    program: Program


@dataclasses.dataclass
class Run(Built):
    """Everything the loop needs, built once (`run.setup`): `build`'s pieces with `params` on
    the host (until `init_state`), `frozen` and the noise's `tables` on the devices, the data."""

    config: ml_collections.ConfigDict
    data: data_lib.TrainData
    tables: NoiseTables

    def train_step(self, state, batch, *, use_model_rows: bool):
        """One update: `(state, metrics)`; donates `state`. `use_model_rows`: rows sampled
        from the replay buffer join the batch (SequenceMatch after the warm-up)."""
        step = self.program.train_step
        return step(state, batch, self.frozen, self.tables, use_model_rows=use_model_rows)

    def refill(self, state, batch):
        """`(state, sampler stats)` with new model rows in the replay buffer; donates `state`."""
        return self.program.refill(state, batch, self.frozen)

    def init_state(self) -> TrainState:
        """Step 0, on the devices (a fresh copy)."""
        state = initial_state(self.typed, self.params, self.optimizer, self.settings.pad_id)
        return jax.device_put(state, jax.tree.map(lambda x: x.sharding, self.abstract))

    def abstract_state(self) -> Any:
        """Shapes, dtypes and shardings of the state (what a checkpoint restores into)."""
        return self.abstract

    @property
    def samples_model_rows(self) -> bool:
        """SequenceMatch with sampled model rows (else BC, MLE or offline SequenceMatch)."""
        return self.settings.model_rows > 0


def build(c: config_lib.Typed, model: Any, tok: Any, prompt_max: int, mesh: Any) -> Built:
    """The run's pieces from its typed config, its model (built or `nnx.eval_shape`d), the
    tokenizer's ids (`bkspc_id`, `eos_id`, `pad_id`), the sampler's prompt width and the mesh;
    shared by `run.setup` and the pod plan."""
    graphdef, params, frozen = nnx.split(model, lora.trainable_filter(c.model.lora_rank > 0), ...)
    # With LoRA, only the adapters and the `<bkspc>` rows update.
    mask = lora.update_mask(params, tok.bkspc_id) if c.model.lora_rank else None
    optimizer = c.optim.build(c.train.num_steps, mask)
    settings = StepSettings(
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
    abstract = jax.eval_shape(lambda p: initial_state(c, p, optimizer, tok.pad_id), params)
    state_sh = state_shardings(abstract, optimizer, mesh, c.mesh.rules)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, state_sh
    )
    frozen_sh = sharding.param_shardings(frozen, mesh, c.mesh.rules)
    loss_fn = objective.make_loss_fn(c.loss, eos_id=tok.eos_id)
    train = make_train_step(graphdef, optimizer, loss_fn, settings, mesh=mesh)
    weights = sharding.decode_weight_specs(state_sh.params, frozen_sh)
    layout = sharding.decode_layout(mesh, c.train.batch_size, model.config.n_kv_heads, weights)
    refill = make_refill(graphdef, settings, layout)
    out = (state_sh, sharding.replicated(mesh))
    program = Program(
        train_step=jax.jit(
            train, static_argnames="use_model_rows", donate_argnums=0, out_shardings=out
        ),
        refill=jax.jit(refill, donate_argnums=0, out_shardings=out),
    )
    return Built(
        c, mesh, graphdef, params, frozen, frozen_sh, abstract, optimizer, settings,
        model.config, program,
    )  # fmt: skip


# The parts of `build` that work on arrays and on ShapeDtypeStructs alike.


def initial_state(
    c: config_lib.Typed, params: Any, optimizer: optax.GradientTransformation, pad_id: int
) -> TrainState:
    """Step 0: the parameters, a fresh optimiser state, an empty replay buffer, the seed's
    key (under `jax.eval_shape`: the state's shapes)."""
    key = jax.random.key_data(jax.random.key(c.seed))
    return TrainState(
        jnp.zeros((), jnp.int32),
        params,
        optimizer.init(params),
        replay.init(c.replay.capacity, c.data.seq_len, pad_id),
        key,
    )


def state_shardings(
    state: TrainState, optimizer: optax.GradientTransformation, mesh: Any, rules: str = ""
) -> TrainState:
    """The `NamedSharding` of every leaf of `state` (arrays or ShapeDtypeStructs); `rules`:
    `mesh.rules`, before the table `sharding.RULES`."""
    param_sh = sharding.param_shardings(state.params, mesh, rules)
    rep = sharding.replicated(mesh)
    # Optimiser moments follow their parameter's sharding.
    opt_sh = optax.tree_map_params(
        optimizer, lambda _, s: s, state.opt_state, param_sh, transform_non_params=lambda _: rep
    )
    return TrainState(rep, param_sh, opt_sh, jax.tree.map(lambda _: rep, state.replay), rep)


def make_train_step(
    graphdef,
    optimizer: optax.GradientTransformation,
    loss_fn: objective.LossFn,
    settings: StepSettings,
    mesh: jax.sharding.Mesh | None = None,
):
    """`step(state, batch, frozen, tables, use_model_rows) -> (state, metrics)`;
    `use_model_rows` (the rows sampled from the replay buffer join the batch) must be static.
    `mesh`: the forward pass's activations are constrained there by their logical axis names
    (`activations.TRAIN_RULES`: rows split over the batch's mesh axes)."""

    def forward(model, inputs: masks.Layout, remat: str = "none"):
        """Logits [B, T, V+1] of a layout; on a mesh, the rows split over the batch axes before
        every block (and before the output layer when `settings.place_output`), the logits'
        rows and actions split too (`Transformer.head`)."""
        with activations.axis_rules(mesh, activations.TRAIN_RULES):
            x = model.hidden(model.embed(inputs.input_ids, inputs.positions), inputs.positions,
                             inputs.attn_mask, remat)  # fmt: skip
            if settings.place_output:
                x = activations.constrain(x, ("batch", "length", "embed"))
            return model.head(x)

    def step(
        state: TrainState,
        batch: dict[str, jax.Array],
        frozen: Any,
        tables: NoiseTables,
        use_model_rows: bool,
    ):
        k_noise, k_replay, _ = _step_keys(state)
        prompt_len = batch["prompt_len"]
        own = None
        if settings.noise.kind == "model" and settings.noise.rate > 0:  # the policy's mistakes
            clean = masks.backspace_layout(
                batch["tokens"], prompt_len, batch["length"], bkspc_id=settings.bkspc_id
            )
            logits = forward(nnx.merge(graphdef, state.params, frozen), clean)
            own = noise.policy_logits(jax.lax.stop_gradient(logits))
        noisy = noise.add_noise(
            k_noise,
            batch["tokens"],
            prompt_len,
            batch["length"],
            noise_probs=tables.probs,
            bkspc_id=settings.bkspc_id,
            noise_rate=settings.noise.rate,
            max_burst=settings.noise.max_burst,
            mask_noise_actions=settings.noise.mask_noise_actions,
            exclude_target=settings.noise.exclude_target,
            pad_id=settings.pad_id,
            automaton=tables.automaton,
            position_logits=own,
        )
        tokens, length, action_weight = noisy.tokens, noisy.length, noisy.action_weight
        is_model = jnp.zeros(prompt_len.shape, bool)
        if use_model_rows:
            sampled = replay.sample(state.replay, k_replay, settings.model_rows)
            model_tokens, model_prompt_len, model_length = sampled
            tokens = jnp.concatenate([tokens, model_tokens])
            prompt_len = jnp.concatenate([prompt_len, model_prompt_len])
            length = jnp.concatenate([length, model_length])
            action_weight = jnp.concatenate(
                [action_weight, jnp.ones(model_tokens.shape, jnp.float32)]
            )
            is_model = jnp.concatenate([is_model, jnp.ones(model_prompt_len.shape, bool)])
        rows = objective.Batch(tokens, prompt_len, length, is_model, action_weight)
        inputs = masks.backspace_layout(tokens, prompt_len, length, bkspc_id=settings.bkspc_id)

        def loss_of(params):
            logits = forward(nnx.merge(graphdef, params, frozen), inputs, settings.remat)
            return loss_fn(logits, rows, state.step)

        (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # The update too: a finite gradient times an overflowing learning rate is not. Its
        # norm comes from the update computed again behind a barrier: XLA then writes each
        # update straight into its parameter, instead of keeping every update until `finite`
        # is known (0.38 GiB a chip for the 7B step of benchmarks/RESULTS.md, issue 35).
        again = jax.lax.optimization_barrier((grads, state.opt_state, state.params))
        finite = jnp.isfinite(loss) & jnp.isfinite(
            optax.tree.norm(grads) + optax.tree.norm(optimizer.update(*again)[0])
        )
        # A non-finite step leaves the parameters and optimiser state as they were (only the
        # step counter moves); the loop then stops or counts the skipped update.
        params, opt_state = jax.tree.map(
            lambda new, old: jnp.where(finite, new, old),
            (params, opt_state),
            (state.params, state.opt_state),
        )
        metrics = {
            **metrics,
            "grad_norm": optax.tree.norm(grads),
            "noise/tokens_per_row": jnp.mean(noisy.n_noise.astype(jnp.float32)),
            "noise/truncated_frac": jnp.mean(noisy.truncated.astype(jnp.float32)),
            "tokens": jnp.sum(length - prompt_len),
            "finite": finite,
        }
        new = state._replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new, metrics

    return step


def _step_keys(state: TrainState):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
    return jax.random.split(key, 3)


def sampler_prompts(batch: dict[str, jax.Array], prompt_max: int, pad_id: int):
    """The data rows' prompts, left-aligned in [B, prompt_max]."""
    toks = batch["tokens"][:, :prompt_max]
    keep = jnp.arange(prompt_max)[None, :] < batch["prompt_len"][:, None]
    return jnp.where(keep, toks, pad_id), batch["prompt_len"]


def make_refill(graphdef, settings: StepSettings, layout: sharding.DecodeLayout | None = None):
    """`refill(state, batch, frozen) -> (state, stats)`: sample from the data prompts, push
    rows; the sampler decodes in `layout` (sharding.decode_layout; None: wherever XLA puts
    it)."""

    def refill(state: TrainState, batch: dict[str, jax.Array], frozen: Any):
        _, _, k_sample = _step_keys(state)
        prompts, prompt_len = sampler_prompts(batch, settings.prompt_max, settings.pad_id)
        model = nnx.merge(graphdef, state.params, frozen)
        out = sampling.sample_traced(
            model,
            prompts,
            prompt_len,
            k_sample,
            cfg=settings.sampling,
            eos_id=settings.eos_id,
            pad_id=settings.pad_id,
            layout=layout,
        )
        T = state.replay.tokens.shape[1]
        rows = out.actions
        if rows.shape[1] < T:
            rows = jnp.pad(rows, ((0, 0), (0, T - rows.shape[1])), constant_values=settings.pad_id)
        buf = replay.push(state.replay, rows[:, :T], prompt_len, jnp.minimum(out.length, T))
        stats = {
            "sample/bkspc_per_row": jnp.mean(out.n_bkspc.astype(jnp.float32)),
            "sample/ended_frac": jnp.mean(out.ended.astype(jnp.float32)),
            "sample/actions_per_row": jnp.mean((out.length - prompt_len).astype(jnp.float32)),
        }
        return state._replace(replay=buf), stats

    return refill
