"""The compiled pieces of training (method.md §6): the train step and the replay refill.

* `train_step`: data rows get noise + `<bkspc>` augmentation (on device, keyed by the step),
  model rows are drawn from the replay buffer; both go through `backspace_layout` and ONE
  forward pass; the loss factory combines BC and SequenceMatch; one optimiser update, not
  applied when the loss, the gradient or the update is non-finite (`metrics["finite"]`).
* `refill`: the policy samples continuations of the current data prompts with the KV-cache
  sampler and pushes the action rows into the replay buffer.

Both are pure functions of a `TrainState` (a pytree, checkpointed whole: parameters,
optimiser state, replay buffer, RNG), of the non-trainable weights `frozen` (the base model
under LoRA) and, for the train step, of the noise's `NoiseTables`: arguments, never constants
baked into the program, so that the pod plan compiles the very program that trains
(`run.build` jits both, for training and for the plan alike).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from smatch_jax import masks, noise, objective, replay, sampling, sharding


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
    # to XLA (run.step_settings).
    place_output: bool = True


def _step_keys(state: TrainState):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
    return jax.random.split(key, 3)


def make_train_step(
    graphdef,
    optimizer: optax.GradientTransformation,
    loss_fn,
    st: StepSettings,
    mesh: jax.sharding.Mesh | None = None,
):
    """`step(state, batch, frozen, tables, with_model) -> (state, metrics)`; `with_model` must
    be static. `mesh`: the forward pass keeps its activations' rows split over the batch's
    mesh axes (`sharding.put_rows`, `Transformer.forward_embeddings`' `place`)."""
    place = None if mesh is None else functools.partial(sharding.put_rows, mesh)

    def forward(model, lay, remat: str = "none"):
        """Logits [B, T, V+1] of a layout; on a mesh, the rows split over the batch axes before
        every block (and before the output layer when `st.place_output`), the logits' rows
        and positions split too (`sharding.put_logits`)."""
        x = model.hidden(model.embed(lay.input_ids, lay.positions), lay.positions,
                         lay.attn_mask, remat, place)  # fmt: skip
        if mesh is None:
            return model.head(x)
        return sharding.put_logits(mesh, model.head(place(x) if st.place_output else x))

    def step(
        state: TrainState,
        batch: dict[str, jax.Array],
        frozen: Any,
        tables: NoiseTables,
        with_model: bool,
    ):
        k_noise, k_replay, _ = _step_keys(state)
        m = batch["prompt_len"]
        own = None
        if st.noise.kind == "model" and st.noise.rate > 0:  # the policy's own mistakes
            clean = masks.backspace_layout(
                batch["tokens"], m, batch["length"], bkspc_id=st.bkspc_id
            )
            logits = forward(nnx.merge(graphdef, state.params, frozen), clean)
            own = noise.policy_logits(jax.lax.stop_gradient(logits))
        nz = noise.add_noise(
            k_noise,
            batch["tokens"],
            m,
            batch["length"],
            noise_probs=tables.probs,
            bkspc_id=st.bkspc_id,
            noise_rate=st.noise.rate,
            max_burst=st.noise.max_burst,
            mask_noise_actions=st.noise.mask_noise_actions,
            exclude_target=st.noise.exclude_target,
            pad_id=st.pad_id,
            automaton=tables.automaton,
            position_logits=own,
        )
        tokens, prompt_len, length, aw = nz.tokens, m, nz.length, nz.action_weight
        is_model = jnp.zeros(m.shape, bool)
        if with_model:
            mt, mm, mn = replay.sample(state.replay, k_replay, st.model_rows)
            tokens = jnp.concatenate([tokens, mt])
            prompt_len = jnp.concatenate([prompt_len, mm])
            length = jnp.concatenate([length, mn])
            aw = jnp.concatenate([aw, jnp.ones(mt.shape, jnp.float32)])
            is_model = jnp.concatenate([is_model, jnp.ones(mm.shape, bool)])
        rows = objective.Batch(tokens, prompt_len, length, is_model, aw)
        lay = masks.backspace_layout(tokens, prompt_len, length, bkspc_id=st.bkspc_id)

        def loss_of(params):
            logits = forward(nnx.merge(graphdef, params, frozen), lay, st.remat)
            return loss_fn(logits, rows, state.step)

        (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # The update too: a finite gradient times an overflowing learning rate is not.
        finite = jnp.isfinite(loss) & jnp.isfinite(
            optax.tree.norm(grads) + optax.tree.norm(updates)
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
            "noise/tokens_per_row": jnp.mean(nz.n_noise.astype(jnp.float32)),
            "noise/truncated_frac": jnp.mean(nz.truncated.astype(jnp.float32)),
            "tokens": jnp.sum(length - prompt_len),
            "finite": finite,
        }
        new = state._replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new, metrics

    return step


def sampler_prompts(batch: dict[str, jax.Array], prompt_max: int, pad_id: int):
    """The data rows' prompts, left-aligned in [B, prompt_max]."""
    P = prompt_max
    toks = batch["tokens"][:, :P]
    keep = jnp.arange(P)[None, :] < batch["prompt_len"][:, None]
    return jnp.where(keep, toks, pad_id), batch["prompt_len"]


def make_refill(graphdef, st: StepSettings, layout: sharding.DecodeLayout | None = None):
    """`refill(state, batch, frozen) -> (state, stats)`: sample from the data prompts, push
    rows; the sampler decodes in `layout` (sharding.decode_layout; None: wherever XLA puts
    it)."""

    def refill(state: TrainState, batch: dict[str, jax.Array], frozen: Any):
        _, _, k_sample = _step_keys(state)
        prompts, m = sampler_prompts(batch, st.prompt_max, st.pad_id)
        model = nnx.merge(graphdef, state.params, frozen)
        out = sampling.sample_traced(
            model,
            prompts,
            m,
            k_sample,
            cfg=st.sampling,
            eos_id=st.eos_id,
            pad_id=st.pad_id,
            layout=layout,
        )
        T = state.replay.tokens.shape[1]
        rows = out.actions
        if rows.shape[1] < T:
            rows = jnp.pad(rows, ((0, 0), (0, T - rows.shape[1])), constant_values=st.pad_id)
        buf = replay.push(state.replay, rows[:, :T], m, jnp.minimum(out.length, T))
        stats = {
            "sample/bkspc_per_row": jnp.mean(out.n_bkspc.astype(jnp.float32)),
            "sample/ended_frac": jnp.mean(out.ended.astype(jnp.float32)),
            "sample/actions_per_row": jnp.mean((out.length - m).astype(jnp.float32)),
        }
        return state._replace(replay=buf), stats

    return refill
