"""A run built abstractly and compiled for a TPU topology on a CPU host: the pod plan.

`abstract_run(config, devices)` is `steps.build`, the builder `run.setup` trains with, on a
model made of shapes (`nnx.eval_shape`) and a mesh of `devices` (e.g. the compile-only devices
of `topologies.compile_devices('v5e-32')`): the same jitted train step and refill, with the
same argument order, shardings and donation. No weight is allocated and no data is read; the
vocabulary comes from `vocab_size` or the pretrained preset (`models/config.py: VOCAB_SIZES`),
the sampler's prompt width from `data.prompt_max` (else the task's `prompt_width`: text's
prompt_tokens).

`compile_pieces(ar)` lowers and compiles:

* `train_mle`: the train step without model rows (BC warm-up, MLE, BC);
* `train_sm`: the train step with `train.model_rows` rows from the replay buffer;
* `refill`: the sampler over the data batch's prompts, into the replay buffer;
* `eval_decode`: the evaluation's greedy decoding of 256 prompts: `sampling.sample_jit`, the
  function `sampling.sample` calls, with the arguments it passes (eval/decoding.py);
* `decode_step_refill`, `decode_step_eval`: one token of the sampler's loop, alone (below).

Costs (flops, bytes) are XLA's cost analysis of the programs compiled with
`hlo_stats.COST_OPTIONS` (without the copies between HBM and VMEM, which it counts besides
the reads they serve); memory and collectives are the real program's. A while-loop body is
counted once, so three kinds of loop are counted here:

* the layer scan (`model.scan_layers`): the costs of each piece are those of two probes, the
  same run with 1 and with 2 unrolled layers, extended linearly to `n_layers` (`c1 +
  (n_layers - 1) (c2 - c1)`: exact for unrolled programs, which are costed so too; within 2%
  of an unrolled program's own flops and bytes, tests/test_compile.py).
* the sampler's token loop runs at most `A` (= its action budget) times, so the figures of
  `refill` and `eval_decode` add `(A - 1)` times those of one decode step compiled alone with
  the same weight layout (`decode_step_*`).
* XLA's own loops around matmuls (windowed matmuls, e.g. when the residual stream is split
  over `tensor`; `hlo_stats.matmul_loops`): the flops are those of the program compiled
  without them (`hlo_stats.FLAT_MATMULS`).

Collectives inside loops are multiplied by their trip counts (`hlo_stats.collectives`). The
programs compile two at a time (XLA's compiler is mostly single-threaded, releases the GIL).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import re
import tempfile
import time
import types
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from smatch_jax import config as config_lib
from smatch_jax import hlo_stats, sampling, sharding, steps, tasks, validate
from smatch_jax.eval import decoding
from smatch_jax.models import factory, init_cache

EVAL_BATCH = 256  # rows per evaluation decoding call (eval/accuracy.py's batch_size)
_LOOP_BODY = {"refill": "decode_step_refill", "eval_decode": "decode_step_eval"}
PIECES = ("train_mle", "train_sm", *(n for piece in _LOOP_BODY.items() for n in piece))


@dataclasses.dataclass
class AbstractRun:
    """`steps.build` of a config on shapes, and what the plan needs besides."""

    built: steps.Built
    tables: steps.NoiseTables  # ShapeDtypeStructs, replicated
    vocab_size: int
    model_bytes: int  # all weights (trainable and frozen), in their storage dtype
    probe: Callable[[int], AbstractRun]  # the same build with k unrolled layers

    @property
    def typed(self) -> config_lib.Typed:
        return self.built.typed

    @property
    def mesh(self) -> Any:
        return self.built.mesh

    @property
    def settings(self) -> steps.StepSettings:
        return self.built.settings


def resolve_prompt_max(c: config_lib.Typed) -> int:
    """The sampler's prompt width without reading the data."""
    if c.data.prompt_max:
        return c.data.prompt_max
    width = tasks.get(c.data.task).prompt_width(c.data)
    if width is not None:
        return width
    raise ValueError(
        f"data.prompt_max=0 takes the longest prompt of the {c.data.task} data, which an "
        "abstract build does not read; set data.prompt_max (the longest prompt in tokens)"
    )


def _sds(shape, dtype, sh=None) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sh)


def abstract_run(
    config: ml_collections.ConfigDict,
    devices: list[Any],
    *,
    vocab_size: int | None = None,
    tokenizer: Any = None,
    n_layers: int | None = None,
) -> AbstractRun:
    """`steps.build(config)` as shapes and shardings on a mesh of `devices` (module docstring).
    `tokenizer`: the ids the steps use (`bkspc_id`, `eos_id`, `pad_id`; default a stand-in
    with the vocabulary's size: the ids change no shape); `n_layers`: a cost probe with that
    many unrolled layers."""
    c = validate.check_config(config)
    automaton = tasks.get(c.data.task).has_automaton
    if c.noise.kind == "errors" or (c.noise.kind == "model" and automaton):
        raise ValueError(
            f"noise.kind={c.noise.kind!r} on the {c.data.task} task draws from its prefix "
            "automaton, which an abstract build does not make; plan the run with "
            "noise.kind='random' (the same shapes but the automaton's table)"
        )
    V = factory.vocab_size_of(c.model, vocab_size) if tokenizer is None else tokenizer.vocab_size
    prompt_max, T = resolve_prompt_max(c), c.data.seq_len
    if prompt_max >= T:
        raise ValueError(
            f"data.prompt_max={prompt_max} leaves no room for actions in data.seq_len={T}"
        )
    tok = tokenizer or types.SimpleNamespace(vocab_size=V, bkspc_id=V, eos_id=1, pad_id=0)
    mesh = sharding.mesh_of(c.mesh, devices=devices)
    model = factory.abstract_model(c.model, V, c.data.seq_len, c.seed, n_layers)
    built = steps.build(c, model, tok, prompt_max, mesh)
    leaves = jax.tree.leaves(built.params) + jax.tree.leaves(built.frozen)
    tables = steps.NoiseTables(_sds((V,), jnp.float32, sharding.replicated(mesh)))
    return AbstractRun(
        built=built,
        tables=tables,
        vocab_size=V,
        model_bytes=sum(x.size * x.dtype.itemsize for x in leaves),
        probe=lambda k: abstract_run(
            config, devices, vocab_size=vocab_size, tokenizer=tokenizer, n_layers=k
        ),
    )


def data_batch(ar: AbstractRun) -> dict[str, jax.ShapeDtypeStruct]:
    """The global data batch: rows split over every device (sharding.global_batch)."""
    B, T = ar.typed.train.batch_size, ar.typed.data.seq_len
    sh = sharding.batch_sharding(ar.mesh)
    return {
        "tokens": _sds((B, T), jnp.int32, sh),
        "prompt_len": _sds((B,), jnp.int32, sh),
        "length": _sds((B,), jnp.int32, sh),
    }


def frozen_abstract(ar: AbstractRun) -> Any:
    """The frozen weights as ShapeDtypeStructs with their shardings (as `setup` places them)."""
    return jax.tree.map(lambda x, s: _sds(x.shape, x.dtype, s), ar.built.frozen, ar.built.frozen_sh)


def lower_train_step(ar: AbstractRun, use_model_rows: bool) -> Any:
    """The train step as `steps.Run.train_step` calls it, lowered."""
    b = ar.built
    return b.program.train_step.lower(
        b.abstract, data_batch(ar), frozen_abstract(ar), ar.tables, use_model_rows=use_model_rows
    )


def lower_refill(ar: AbstractRun) -> Any:
    """The replay refill as `steps.Run.refill` calls it, lowered."""
    b = ar.built
    return b.program.refill.lower(b.abstract, data_batch(ar), frozen_abstract(ar))


def eval_decoding_config(ar: AbstractRun) -> sampling.SamplingConfig:
    """The evaluation's headline decoding (eval/decoding.py) for the run's action budget."""
    return decoding.decoding_config(decoding.HEADLINE, ar.settings.sampling.max_new_tokens)


def lower_eval_decode(ar: AbstractRun) -> Any:
    """`sampling.sample_jit` with the arguments `sampling.sample` gives it during evaluation:
    the whole model's state, 256 prompts and their lengths (uncommitted numpy: copied), a
    key."""
    b, settings = ar.built, ar.settings
    model = nnx.merge(b.graphdef, b.abstract.params, frozen_abstract(ar))
    graphdef, weights = nnx.split(model)
    layout = sampling.layout_of(graphdef, weights, EVAL_BATCH)
    rep = sharding.replicated(ar.mesh)
    key = jax.eval_shape(lambda: jax.random.key(0))
    B = EVAL_BATCH
    args = (
        graphdef,
        weights,
        _sds((B, settings.prompt_max), jnp.int32, rep),
        _sds((B,), jnp.int32, rep),
        _sds(key.shape, key.dtype, rep),
        _sds((B,), jnp.int32, rep),
    )
    kw = dict(
        cfg=eval_decoding_config(ar), eos_id=settings.eos_id, pad_id=settings.pad_id, layout=layout
    )
    return sampling.sample_jit.lower(*args, **kw)


def layout(ar: AbstractRun, batch_size: int) -> sharding.DecodeLayout:
    """The sampler's decode layout for `batch_size` rows (what steps.build gives the refill)."""
    b = ar.built
    weights = sharding.decode_weight_specs(b.abstract.params, b.frozen_sh)
    return sharding.decode_layout(ar.mesh, batch_size, b.model_config.n_kv_heads, weights)


def lower_decode_step(ar: AbstractRun, batch_size: int, cache_len: int) -> Any:
    """One token of the sampler's loop (`model.decode` of one token against the cache): weights,
    rows and cache in the decode layout, the next-token logits placed there as the sampler
    does."""
    b = ar.built
    lay = layout(ar, batch_size)
    B, S = batch_size, cache_len

    def step(params, frozen, cache, tok, pos, mask, write_at):
        model = nnx.merge(b.graphdef, params, frozen)
        logits, cache = sharding.layout_decode(model, lay)(tok, pos, mask, cache, write_at)
        return lay.put_rows(logits), lay.put_cache(cache)

    model = nnx.merge(b.graphdef, b.abstract.params, b.frozen)
    cache = jax.eval_shape(lambda: init_cache(model.config, B, S))
    cache = jax.tree.map(lambda x: _sds(x.shape, x.dtype, lay.cache), cache)

    def placed(tree):  # the weights as the sampler holds them in its loop
        return jax.tree_util.tree_map_with_path(
            lambda p, x: _sds(x.shape, x.dtype, lay.weight_sharding(p)), tree
        )

    args = (
        placed(b.abstract.params),
        placed(b.frozen),
        cache,
        _sds((B, 1), jnp.int32, lay.rows),
        _sds((B, 1), jnp.int32, lay.rows),
        _sds((B, 1, S), jnp.bool_, lay.rows),
        _sds((B,), jnp.int32, lay.rows),
    )
    return jax.jit(step).lower(*args)


def lowerings(ar: AbstractRun) -> dict[str, Callable[[], Any]]:
    """Per piece (`PIECES`, those the run has), a thunk that lowers it."""
    settings, c = ar.settings, ar.typed
    S_eval = settings.prompt_max + eval_decoding_config(ar).max_new_tokens
    out = {"train_mle": lambda: lower_train_step(ar, False)}
    if settings.model_rows:
        S = settings.prompt_max + settings.sampling.max_new_tokens
        out |= {
            "train_sm": lambda: lower_train_step(ar, True),
            "refill": lambda: lower_refill(ar),
            "decode_step_refill": lambda: lower_decode_step(ar, c.train.batch_size, S),
        }
    out |= {
        "eval_decode": lambda: lower_eval_decode(ar),
        "decode_step_eval": lambda: lower_decode_step(ar, EVAL_BATCH, S_eval),
    }
    return out


@dataclasses.dataclass
class Piece:
    """One compiled function's figures per chip (the executable itself is not kept).

    XLA's TPU compiler refuses a program whose temporaries exceed the chip's HBM: then
    `error` is its message, `needed_bytes` the bytes it asked for, and no figures are set.
    `cost`: flops and bytes of one call with every layer counted (`layers_counted`) but the
    sampler's token loop once (`loop_trips`: its bound; `step_name`: one iteration's piece)."""

    name: str
    memory: hlo_stats.Memory | None = None
    cost: dict[str, float] | None = None
    xla_cost: dict[str, float] | None = None  # as XLA reports it (loop bodies once)
    collectives: hlo_stats.Collectives | None = None
    loop_trips: int = 1
    step_name: str = ""
    layers_counted: int = 1  # n_layers once the probes compiled (a scanned model's, else 1)
    donated: bool = False  # an argument's buffers become the outputs' (steps.Program: state)
    flat_flops: bool = False  # flops from a compile without XLA's matmul loops (matmul_loops)
    seconds: float = 0.0  # lowering and compilation (the program's and its probes')
    error: str = ""
    needed_bytes: int = 0
    peak_live: int = 0  # bytes live at XLA's peak in the entry computation (buffers=True)
    peak_buffers: list[hlo_stats.PeakBuffer] = dataclasses.field(default_factory=list)


_NEEDED = re.compile(r"required for HLO temporaries \(([0-9.]+)([KMGT])\)")


def _donates(lowered: Any) -> bool:
    """Whether a lowered program gives an argument's buffers to its outputs (donation)."""
    text = lowered.as_text()
    return "tf.aliasing_output" in text or "jax.buffer_donor" in text


def _compile(lower: Callable[[], Any], dump_dir: str = "") -> tuple[Any, str, int, bool]:
    """`(compiled, '', 0, donates)`, or `(None, message, needed bytes, donates)` when XLA
    refuses it for HBM. `dump_dir`: XLA writes its buffer assignment there."""
    lowered = lower()
    donates = _donates(lowered)
    options = {"xla_dump_to": dump_dir, **hlo_stats.DUMP_OPTIONS} if dump_dir else None
    try:
        return lowered.compile(compiler_options=options), "", 0, donates
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        m, scale = _NEEDED.search(str(e)), {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
        needed = int(float(m.group(1)) * scale[m.group(2)]) if m else 0
        return None, str(e).splitlines()[0][:300], needed, donates


def _figures(name: str, lower: Callable[[], Any], loop_trips: int, buffers: bool, kind: str):
    """One program's figures (not the executable). `kind`: 'program' (memory, collectives,
    XLA's own cost; `buffers`: and the buffers live at XLA's peak) and its accounted cost
    (`hlo_stats.accounted_cost`); 'main' the same without the latter (its probes give it);
    'cost' only the accounted cost (a probe)."""
    t0 = time.time()
    piece = Piece(name, loop_trips=loop_trips, step_name=_LOOP_BODY.get(name, ""))
    dumps = tempfile.TemporaryDirectory(prefix="smatch_jax_xla_dump_") if buffers else None
    with dumps or contextlib.nullcontext("") as dump:
        no = (None, "", 0, False)  # a probe: its cost only
        compiled, error, needed, piece.donated = _compile(lower, dump) if kind != "cost" else no
        if error:
            piece.error, piece.needed_bytes = error, needed
        elif compiled is not None:
            piece.memory = hlo_stats.memory(compiled)
            piece.xla_cost = hlo_stats.cost(compiled)
            piece.cost = dict(piece.xla_cost)
            piece.collectives = hlo_stats.collectives(compiled.as_text(), loop_trips)
            if buffers:
                piece.peak_live, piece.peak_buffers = hlo_stats.peak_buffers(dump)
    if not error and kind != "main":
        try:
            piece.cost, piece.flat_flops = hlo_stats.accounted_cost(lower())
        except jax.errors.JaxRuntimeError as e:  # a probe XLA refuses for HBM has no cost
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
    piece.seconds = time.time() - t0
    return piece


def compile_pieces(
    ar: AbstractRun,
    on_piece: Callable[[Piece], None] | None = None,
    only: tuple[str, ...] | None = None,
    workers: int = 2,
    buffers: bool = False,
) -> dict[str, Piece]:
    """Lower and compile the run's pieces (`only`: these) for the mesh's devices, `workers`
    programs at a time (module docstring); `on_piece` is called with each piece as it is
    done (progress); `buffers`: each piece's buffers live at XLA's peak too (the probes'
    are not kept)."""
    n_layers = ar.built.model_config.n_layers
    scanned = ar.built.model_config.scan_layers and n_layers > 1
    probed = n_layers > 1  # costs from probes: see the module docstring
    A = {"refill": ar.settings.sampling.n_actions}  # the token loops' bounds
    A["eval_decode"] = eval_decoding_config(ar).n_actions
    names = [n for n in lowerings(ar) if only is None or n in only or n in _needed_by(only)]
    runs = {"": ar} | ({"1": ar.probe(1), "2": ar.probe(2)} if probed else {})
    jobs = {(n, k): lowerings(r)[n] for n in names for k, r in runs.items()}
    out: dict[str, Piece] = {}
    done: dict[tuple[str, str], Piece] = {}
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = {}
        for (name, kind), lower in jobs.items():  # lowered here, compiled in the pool
            lowered = lower()
            what = "cost" if kind else "main" if probed else "program"
            job = (name, lambda x=lowered: x, A.get(name, 1), buffers and not kind, what)
            futures[pool.submit(_figures, *job)] = (name, kind)
        for future in concurrent.futures.as_completed(futures):
            done[futures[future]] = future.result()
            name = futures[future][0]
            if all((name, k) in done for k in runs):
                out[name] = piece = done[(name, "")]
                piece.seconds = sum(done[(name, k)].seconds for k in runs)
                one, two = (done.get((name, k)) for k in ("1", "2"))
                if piece.cost is not None:
                    piece.layers_counted = n_layers if not scanned else 1
                if probed and piece.cost and one and two and one.cost and two.cost:
                    for k in piece.cost:  # c1 + (L - 1)(c2 - c1): every layer counted
                        piece.cost[k] = one.cost[k] + (n_layers - 1) * (two.cost[k] - one.cost[k])
                    piece.layers_counted = n_layers
                    piece.flat_flops = one.flat_flops or two.flat_flops
                if on_piece is not None:
                    on_piece(piece)
    return {n: out[n] for n in names}


def _needed_by(only: tuple[str, ...]) -> set[str]:
    """The loop-body pieces that the pieces in `only` need for their figures."""
    return {_LOOP_BODY[n] for n in only if n in _LOOP_BODY}
