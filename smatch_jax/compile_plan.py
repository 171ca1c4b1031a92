"""A run built abstractly and compiled for a TPU topology on a CPU host: the pod plan.

`abstract_run(config, devices)` builds what `run.setup` builds, as shapes only: the model by
`nnx.eval_shape`, the state by `jax.eval_shape`, each leaf a `ShapeDtypeStruct` carrying the
`NamedSharding` `run.setup` would give it on a mesh of `devices` (e.g. the compile-only devices
of `topologies.compile_devices('v5e-32')`). No weight is allocated and no data is read; the
vocabulary comes from `vocab_size` or the pretrained preset (`models/config.py: VOCAB_SIZES`),
the sampler's prompt width from `data.prompt_max` (text: `data.prompt_tokens`).

`compile_pieces(ar)` lowers and compiles the run's jitted pieces with `steps.make_train_step`
and `steps.make_refill`, the functions training uses:

* `train_mle`: the train step without model rows (BC warm-up, MLE, BC);
* `train_sm`: the train step with `train.model_rows` rows from the replay buffer;
* `refill`: the sampler over the data batch's prompts, into the replay buffer;
* `eval_decode`: the evaluation's greedy decoding of 256 prompts (eval/decoding.py);
* `decode_step_refill`, `decode_step_eval`: one token of the sampler's loop, alone (below).

The non-trainable weights (`frozen`: the base model under LoRA) are an argument of every
piece, sharded by the parameter rules, as in `run.setup`.

Loops: XLA's `cost_analysis` counts a while-loop body once. The sampler's loop runs at most
`A` (= its action budget) times, so flops and bytes accessed of `refill` and `eval_decode` are
their reported figures plus `(A - 1)` times those of one decode step compiled alone with the
same weight layout (`decode_step_*`); collectives inside the loop body of the compiled HLO are
counted `A` times (`hlo_stats.collectives`).
"""

from __future__ import annotations

import dataclasses
import re
import time
import types
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from smatch_jax import config as config_lib
from smatch_jax import noise, objective, run, sampling, sharding, steps, validate
from smatch_jax.eval import decoding
from smatch_jax.models import init_cache, lora
from smatch_jax.models.config import VOCAB_SIZES, from_preset
from smatch_jax.models.transformer import Transformer

EVAL_BATCH = 256  # rows per evaluation decoding call (eval/accuracy.py's batch_size)


@dataclasses.dataclass
class AbstractRun:
    """A run's shapes and shardings, and what its compiled pieces close over."""

    typed: config_lib.Typed
    mesh: Any
    graphdef: Any
    frozen: Any  # ShapeDtypeStructs with shardings (the non-trainable weights)
    state: steps.TrainState  # ShapeDtypeStructs with shardings
    settings: steps.StepSettings
    optimizer: Any
    loss_fn: Any
    noise_probs: jax.Array
    vocab_size: int
    model_bytes: int  # all weights (trainable and frozen), in their storage dtype


def _preset_of(spec) -> str:
    return "smollm2_135m" if spec.init == "smollm2" else spec.preset


def resolve_vocab_size(c: config_lib.Typed, vocab_size: int | None = None) -> int:
    """`vocab_size`, else the vocabulary the pretrained weights of `model.preset` come with."""
    if vocab_size:
        return vocab_size
    preset = _preset_of(c.model)
    if c.model.init != "scratch" and preset in VOCAB_SIZES:
        return VOCAB_SIZES[preset]
    raise ValueError(
        f"the vocabulary size of model.init={c.model.init!r}, model.preset={preset!r} is not "
        f"known without its tokenizer; pass --vocab_size (pretrained presets: "
        f"{sorted(VOCAB_SIZES)})"
    )


def resolve_prompt_max(c: config_lib.Typed) -> int:
    """The sampler's prompt width without reading the data."""
    if c.data.prompt_max:
        return c.data.prompt_max
    if c.data.task == "text":
        return c.data.prompt_tokens
    raise ValueError(
        f"data.prompt_max=0 takes the longest prompt of the {c.data.task} data, which an "
        "abstract build does not read; set data.prompt_max (the longest prompt in tokens)"
    )


def abstract_model(c: config_lib.Typed, vocab_size: int) -> Transformer:
    """The run's model as shapes (`nnx.eval_shape`): preset shape, LoRA, dtypes.

    A pretrained model (`hf:`, `smollm2`, ...) is stored in `model.dtype` (the converters
    cast it), a scratch model in float32, as `factory.build_model` does."""
    spec = c.model
    param_dtype = "float32" if spec.init == "scratch" else spec.dtype
    mc = from_preset(
        _preset_of(spec),
        vocab_size=vocab_size,
        max_positions=max(c.data.seq_len, 8),
        dtype=spec.dtype,
        param_dtype=param_dtype,
    )

    def build() -> Transformer:
        model = Transformer(mc, rngs=nnx.Rngs(c.seed))
        if spec.lora_rank:
            alpha = spec.lora_alpha or None
            lora.apply_lora(model, rank=spec.lora_rank, alpha=alpha, rngs=nnx.Rngs(c.seed + 1))
        return model

    return nnx.eval_shape(build)


def _with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def abstract_run(
    config: ml_collections.ConfigDict, devices: list[Any], *, vocab_size: int | None = None
) -> AbstractRun:
    """`run.setup(config)` as shapes and shardings on a mesh of `devices` (see the module
    docstring)."""
    c = validate.check_config(config)
    V = resolve_vocab_size(c, vocab_size)
    P, T = resolve_prompt_max(c), c.data.seq_len
    if P >= T:
        raise ValueError(f"data.prompt_max={P} leaves no room for actions in data.seq_len={T}")
    # A stand-in tokenizer: only the ids the compiled steps use (their values change no shape).
    tok = types.SimpleNamespace(vocab_size=V, bkspc_id=V, eos_id=1, pad_id=0, special_ids=(0, 1))
    mesh = sharding.mesh_of(c.mesh, devices=devices)
    model = abstract_model(c, V)
    graphdef, params, frozen = nnx.split(model, lora.trainable_filter(c.model.lora_rank > 0), ...)
    optimizer = run.build_optimizer(c, params, tok.bkspc_id)
    state = jax.eval_shape(lambda p: run.initial_state(c, p, optimizer, tok.pad_id), params)
    state_sh = run.state_shardings(state, optimizer, mesh, c.mesh.rules)
    frozen_sh = sharding.param_shardings(frozen, mesh, c.mesh.rules)
    leaves = jax.tree.leaves(params) + jax.tree.leaves(frozen)
    return AbstractRun(
        typed=c,
        mesh=mesh,
        graphdef=graphdef,
        frozen=_with_shardings(frozen, frozen_sh),
        state=_with_shardings(state, state_sh),
        settings=run.step_settings(c, tok, P),
        optimizer=optimizer,
        loss_fn=objective.make_loss_fn(c.loss, eos_id=tok.eos_id),
        noise_probs=jnp.asarray(noise.random_noise_probs(V, tok.special_ids)),
        vocab_size=V,
        model_bytes=sum(x.size * x.dtype.itemsize for x in leaves),
    )


def _sds(shape, dtype, sh) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sh)


def data_batch(ar: AbstractRun) -> dict[str, jax.ShapeDtypeStruct]:
    """The global data batch: rows split over every device (sharding.global_batch)."""
    B, T = ar.typed.train.batch_size, ar.typed.data.seq_len
    sh = sharding.batch_sharding(ar.mesh)
    return {
        "tokens": _sds((B, T), jnp.int32, sh),
        "prompt_len": _sds((B,), jnp.int32, sh),
        "length": _sds((B,), jnp.int32, sh),
    }


@dataclasses.dataclass
class Piece:
    """One compiled function and the number of times its loop body runs (1: no loop).

    XLA's TPU compiler refuses a program whose temporaries exceed the chip's HBM: then
    `compiled` is None, `error` is its message and `needed_bytes` the bytes it asked for."""

    name: str
    compiled: Any
    loop_trips: int = 1
    step_name: str = ""  # the piece holding one loop iteration compiled alone
    seconds: float = 0.0  # lowering and compilation
    error: str = ""
    needed_bytes: int = 0


_NEEDED = re.compile(r"required for HLO temporaries \(([0-9.]+)([KMGT])\)")


def _compile(name: str, lower: Any, *args: Any, **kw: Any) -> Piece:
    """`lower(*args).compile()` as a Piece; an out-of-HBM refusal is recorded, not raised."""
    t0 = time.time()
    try:
        compiled = lower(*args).compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        m = _NEEDED.search(str(e))
        scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
        needed = int(float(m.group(1)) * scale[m.group(2)]) if m else 0
        msg = str(e).splitlines()[0][:300]
        return Piece(name, None, seconds=time.time() - t0, error=msg, needed_bytes=needed, **kw)
    return Piece(name, compiled, seconds=time.time() - t0, **kw)


def layout(ar: AbstractRun, batch_size: int) -> sharding.DecodeLayout:
    """The sampler's decode layout for `batch_size` rows (what run.setup gives the refill)."""
    n_kv = nnx.merge(ar.graphdef, ar.state.params, ar.frozen).config.n_kv_heads
    weights = sharding.decode_weight_specs(ar.state.params, ar.frozen)
    return sharding.decode_layout(ar.mesh, batch_size, n_kv, weights)


def _decode_step(ar: AbstractRun, name: str, batch_size: int, cache_len: int) -> Piece:
    """One token of the sampler's loop (`model.decode` of one token against the cache): weights,
    rows and cache in the decode layout, the next-token logits gathered there as the sampler
    does."""
    lay = layout(ar, batch_size)
    B, S = batch_size, cache_len

    def step(params, frozen, cache, tok, pos, mask, write_at):
        model = nnx.merge(ar.graphdef, params, frozen)
        logits, cache = model.decode(tok, pos, mask, cache, write_at, lay.put_heads)
        return lay.put_rows(logits), lay.put_cache(cache)

    model = nnx.merge(ar.graphdef, ar.state.params, ar.frozen)
    cache = jax.eval_shape(lambda: init_cache(model.config, B, S))
    cache = jax.tree.map(lambda x: _sds(x.shape, x.dtype, lay.cache), cache)

    def placed(tree):  # the weights as the sampler holds them in its loop
        return jax.tree_util.tree_map_with_path(
            lambda p, x: _sds(x.shape, x.dtype, lay.weight_sharding(p)), tree
        )

    args = (
        placed(ar.state.params),
        placed(ar.frozen),
        cache,
        _sds((B, 1), jnp.int32, lay.rows),
        _sds((B, 1), jnp.int32, lay.rows),
        _sds((B, 1, S), jnp.bool_, lay.rows),
        _sds((B,), jnp.int32, lay.rows),
    )
    return _compile(name, jax.jit(step).lower, *args)


def compile_pieces(
    ar: AbstractRun, on_piece: Callable[[Piece], None] | None = None
) -> dict[str, Piece]:
    """Lower and compile the run's pieces for the mesh's devices (module docstring);
    `on_piece` is called with each as it is compiled (progress)."""
    st, c = ar.settings, ar.typed
    rep = sharding.replicated(ar.mesh)
    state_sh = jax.tree.map(lambda x: x.sharding, ar.state)
    batch = data_batch(ar)
    out: dict[str, Piece] = {}

    def put(piece: Piece) -> None:
        out[piece.name] = piece
        if on_piece is not None:
            on_piece(piece)

    for with_model in (False, True):
        if with_model and not st.model_rows:
            continue

        def train(state, frozen, batch, with_model=with_model):
            fn = steps.make_train_step(
                ar.graphdef, frozen, ar.optimizer, ar.loss_fn, ar.noise_probs, st, mesh=ar.mesh
            )
            return fn(state, batch, with_model)

        jitted = jax.jit(train, out_shardings=(state_sh, rep))
        name = "train_sm" if with_model else "train_mle"
        put(_compile(name, jitted.lower, ar.state, ar.frozen, batch))
    A = st.sampling.n_actions
    if st.model_rows:

        def refill(state, frozen, batch):
            lay = layout(ar, c.train.batch_size)
            return steps.make_refill(ar.graphdef, frozen, st, lay)(state, batch)

        jitted = jax.jit(refill, out_shardings=(state_sh, rep))
        kw = dict(loop_trips=A, step_name="decode_step_refill")
        put(_compile("refill", jitted.lower, ar.state, ar.frozen, batch, **kw))
        S = st.prompt_max + st.sampling.max_new_tokens
        put(_decode_step(ar, "decode_step_refill", c.train.batch_size, S))
    cfg = decoding.decoding_config(decoding.HEADLINE, st.sampling.max_new_tokens)

    eval_layout = layout(ar, EVAL_BATCH)  # sampling.sample's layout_of the run's weights

    def eval_decode(params, frozen, prompts, prompt_len, key):
        model = nnx.merge(ar.graphdef, params, frozen)
        return sampling.sample_traced(
            model,
            prompts,
            prompt_len,
            key,
            cfg=cfg,
            eos_id=st.eos_id,
            pad_id=st.pad_id,
            layout=eval_layout,
        )

    P = st.prompt_max
    key = jax.eval_shape(lambda: jax.random.key(0))
    args = (
        ar.state.params,
        ar.frozen,
        _sds((EVAL_BATCH, P), jnp.int32, rep),  # numpy prompts: uncommitted, replicated
        _sds((EVAL_BATCH,), jnp.int32, rep),
        _sds(key.shape, key.dtype, rep),
    )
    kw = dict(loop_trips=cfg.n_actions, step_name="decode_step_eval")
    put(_compile("eval_decode", jax.jit(eval_decode).lower, *args, **kw))
    S = P + cfg.max_new_tokens
    put(_decode_step(ar, "decode_step_eval", EVAL_BATCH, S))
    return out
