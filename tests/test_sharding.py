"""Parameter shardings from the rules table, `mesh.rules`, the sampler's decode layout and
each host's slice of the batch (sharding.py); the decode layout's cache write; collectives
inside while loops (hlo_stats.py). Specs are checked on abstract meshes; that the decode layout
moves activations and not weights, and the host slices of a v5e-32, on the TPU compiler's
compile-only devices (no TPU needed)."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from configs import arithmetic
from smatch_jax import activations, sharding
from smatch_jax import config as config_lib
from smatch_jax.models import lora
from smatch_jax.models.config import ModelConfig
from smatch_jax.models.transformer import Transformer


def _mesh(data=1, fsdp=2, tensor=2):
    # Auto axes, as sharding.make_mesh builds them (AbstractMesh's default axis type is
    # Explicit on jax 0.12, Auto on 0.10).
    auto = (AxisType.Auto,) * len(sharding.AXES)
    return AbstractMesh((data, fsdp, tensor), sharding.AXES, axis_types=auto)


def _model(n_kv_heads=2, vocab=33, with_lora=True):
    cfg = ModelConfig(
        family="llama",
        vocab_size=vocab,
        d_model=64,
        n_layers=1,
        n_heads=4,
        n_kv_heads=n_kv_heads,
        d_ff=128,
        max_positions=16,
        tie_embeddings=False,
    )

    def build():
        m = Transformer(cfg, rngs=nnx.Rngs(0))
        if with_lora:
            lora.apply_lora(m, rank=4, rngs=nnx.Rngs(1))
        return m

    return nnx.eval_shape(build)


def _specs(tree) -> dict[str, P]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {sharding.path_name(p): s.spec for p, s in flat}


def test_rules_table_is_megatron_oriented_and_drops_axes_that_do_not_divide():
    params = nnx.state(_model())
    specs = _specs(sharding.param_shardings(params, _mesh()))
    b = "blocks.0."
    for name in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
        assert specs[f"{b}{name}.base.kernel"] == P("fsdp", "tensor"), name  # column-parallel
    for name in ("attn.o_proj", "mlp.down_proj"):
        assert specs[f"{b}{name}.base.kernel"] == P("tensor", "fsdp"), name  # row-parallel
    assert specs["tok_embed.embedding"] == P(None, ("fsdp", "tensor"))  # 34 rows: features
    assert specs["lm_head.kernel"] == P(("fsdp", "tensor"), None)  # [64, 34]
    # Unmatched and small: the FSDP default (LoRA adapters, norms) copies them.
    assert specs[f"{b}attn.q_proj.lora.lora_a"] == P()
    assert specs[f"{b}attn_norm.scale"] == P()
    # fsdp = 3 divides neither the 64 features nor the 34 rows: only tensor stays.
    odd = _specs(sharding.param_shardings(params, _mesh(fsdp=3, tensor=2)))
    assert odd[f"{b}attn.q_proj.base.kernel"] == P(None, "tensor")  # 64 % 3 != 0
    assert odd["tok_embed.embedding"] == P(None, "tensor")


def test_mesh_rules_come_first_and_bad_ones_are_config_errors():
    params = nnx.state(_model())
    rules = r"lm_head\.kernel$=_,_; q_proj\.base\.kernel$=tensor,fsdp+data"
    specs = _specs(sharding.param_shardings(params, _mesh(data=2), rules))
    assert specs["lm_head.kernel"] == P(None, None)
    assert specs["blocks.0.attn.q_proj.base.kernel"] == P("tensor", ("fsdp", "data"))
    assert specs["blocks.0.attn.k_proj.base.kernel"] == P("fsdp", "tensor")  # the table's
    with pytest.raises(ValueError, match="give one per dimension"):
        sharding.param_shardings(params, _mesh(), r"lm_head\.kernel$=fsdp")
    c = arithmetic.get_config("smoke")
    for bad, match in (
        ("lm_head=model,_", r"names \['model'\]; the mesh axes are"),
        ("lm_head", "is not REGEX=SPEC"),
        ("lm_(head=_,_", "does not compile"),
    ):
        c.mesh.rules = bad
        with pytest.raises(ValueError, match=match):
            config_lib.typed(c)


def test_decode_layout_splits_rows_over_data_and_fsdp_and_cache_heads_over_tensor():
    lay = sharding.decode_layout(_mesh(data=2, fsdp=2, tensor=2), batch_size=8, n_kv_heads=4)
    assert lay.rows.spec == P(("data", "fsdp"))
    assert lay.cache.spec == P(None, ("data", "fsdp"), None, "tensor", None)
    assert lay.heads.spec == P(("data", "fsdp"), None, "tensor", None)
    lay = sharding.decode_layout(_mesh(data=2, fsdp=4, tensor=4), batch_size=6, n_kv_heads=2)
    assert lay.rows.spec == P("data") and lay.cache.spec == P(None, "data", None, None, None)
    lay = sharding.decode_layout(_mesh(data=2, fsdp=4, tensor=4), batch_size=3, n_kv_heads=2)
    assert lay.rows.spec == P(None) and lay.cache.spec == P(None, None, None, None, None)
    assert sharding.batch_sharding(_mesh()).spec == P(("data", "fsdp"))


def test_decode_weights_keep_only_their_tensor_split():
    """The sampler's copy of the weights: each training spec without `fsdp` (gathered once
    per sampler call), so a weight split over tensor stays split and the rest is copied."""
    mesh = _mesh(data=2, fsdp=2, tensor=2)
    train = {
        "q": NamedSharding(mesh, P("fsdp", "tensor")),
        "o": NamedSharding(mesh, P("tensor", "fsdp")),
        "embed": NamedSharding(mesh, P(None, ("fsdp", "tensor"))),
        "norm": NamedSharding(mesh, P("fsdp")),
        "bias": NamedSharding(mesh, P()),
    }
    specs = dict(sharding.decode_weight_specs(train))
    assert specs == {
        "q": P(None, "tensor"),
        "o": P("tensor", None),
        "embed": P(None, "tensor"),
        "norm": P(None),
        "bias": P(),
    }
    lay = sharding.decode_layout(mesh, 8, 2, tuple(specs.items()))
    arrays = {k: jnp.ones((8, 8)) for k in ("embed", "o", "q")}
    eqns = jax.make_jaxpr(lay.put_weights)(arrays).eqns
    placed = [e.params["sharding"].spec for e in eqns if e.primitive.name == "sharding_constraint"]
    assert placed == [specs[k] for k in ("embed", "o", "q")]  # in the pytree's key order


def _constraints(fn, *args):
    eqns = jax.make_jaxpr(fn)(*args).eqns
    return [e.params["sharding"].spec for e in eqns if e.primitive.name == "sharding_constraint"]


def test_the_train_steps_activations_keep_their_rows_split():
    """Under `TRAIN_RULES`: the residual stream's rows over data x fsdp; the logits' actions
    over tensor too (`Transformer.head` pads V + 1 to a multiple of `split('vocab')`). Axes
    that do not divide a dimension are dropped; outside `axis_rules`, or with no mesh, nothing
    is constrained."""
    mesh = _mesh(data=2, fsdp=2, tensor=2)
    residual, logits = ("batch", "length", "embed"), ("batch", "length", "vocab")

    def specs(names, x, mesh=mesh):
        def fn(x):
            with activations.axis_rules(mesh, activations.TRAIN_RULES):
                return activations.constrain(x, names)

        return _constraints(fn, x)

    assert specs(residual, jnp.ones((8, 6, 4))) == [P(("data", "fsdp"), None, None)]
    assert specs(residual, jnp.ones((2, 6, 4))) == [P("data", None, None)]
    assert specs(logits, jnp.ones((8, 6, 128))) == [P(("data", "fsdp"), None, "tensor")]
    assert specs(logits, jnp.ones((8, 5, 33))) == [P(("data", "fsdp"), None, None)]
    with activations.axis_rules(mesh, activations.TRAIN_RULES):
        assert activations.split("vocab") == 2 and activations.split("batch") == 4
        assert activations.split("embed") == 1  # no rule
    assert activations.split("vocab") == 1  # outside the rules
    assert _constraints(lambda x: activations.constrain(x, residual), jnp.ones((8, 6, 4))) == []
    assert specs(residual, jnp.ones((8, 6, 4)), mesh=None) == []


def test_axis_rules_nest_and_the_innermost_is_in_force():
    """The decode layout's rules inside the train rules: q, k and v [B, T, H, D] on the
    layout's rows and heads; after them, the train rules again; then nothing."""
    mesh = _mesh(data=2, fsdp=2, tensor=2)
    lay = sharding.decode_layout(mesh, batch_size=8, n_kv_heads=4)
    heads = ("batch", "length", "heads", "head_dim")
    seen = []

    def fn(x):
        with activations.axis_rules(mesh, activations.TRAIN_RULES):
            with lay.axis_rules():
                seen.append(activations.constraining())
                x = activations.constrain(x, heads)
            x = activations.constrain(x, heads)
        seen.append(activations.constraining())
        return activations.constrain(x, heads)

    assert _constraints(fn, jnp.ones((8, 3, 4, 2))) == [
        lay.heads.spec,
        P(("data", "fsdp"), None, None, None),
    ]
    assert seen == [True, False]


needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu (the TPU compiler) is not installed: pip install -r requirements-tpu.txt",
)


@needs_libtpu
def test_the_sampler_in_the_decode_layout_moves_activations_not_weights():
    """The sampler of a d=512 model on 4 compile-only v5e chips (fsdp 2 x tensor 2), its
    weights in the training layout. Without a layout XLA gathers weight shards inside the
    loop, for every token; in the decode layout the weights are gathered over fsdp once,
    before the loop, and a token's collectives are a few rows' partial sums: under 2% of the
    weights (measured 0.7%, against 46% without the layout)."""
    from smatch_jax import hlo_stats, sampling, topologies

    devices = topologies.compile_devices("v5e:2x2")
    mesh = sharding.make_mesh(1, 2, 2, devices=devices)
    cfg = ModelConfig(
        family="llama",
        vocab_size=1000,
        d_model=512,
        n_layers=2,
        n_heads=8,
        n_kv_heads=4,
        d_ff=1536,
        max_positions=64,
        dtype="bfloat16",
        param_dtype="bfloat16",
    )
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    p_sh = sharding.param_shardings(params, mesh)
    params = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, p_sh
    )
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    B, P_, new = 16, 8, 24
    rows = sharding.batch_sharding(mesh)
    scfg = sampling.SamplingConfig(max_new_tokens=new)

    def per_token_bytes(layout):
        def sample(params, prompts, prompt_len, key):
            model = nnx.merge(graphdef, params)
            out = sampling.sample_traced(
                model, prompts, prompt_len, key, cfg=scfg, eos_id=1, pad_id=0, layout=layout
            )
            return out.actions

        key = jax.eval_shape(lambda: jax.random.key(0))
        args = (
            params,
            jax.ShapeDtypeStruct((B, P_), jnp.int32, sharding=rows),
            jax.ShapeDtypeStruct((B,), jnp.int32, sharding=rows),
            jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(mesh)),
        )
        compiled = jax.jit(sample).lower(*args).compile()
        return hlo_stats.collectives(compiled.as_text()).in_loops

    weights = sharding.decode_weight_specs(p_sh)
    decoded = per_token_bytes(sharding.decode_layout(mesh, B, cfg.n_kv_heads, weights))
    free = per_token_bytes(None)
    assert decoded < 0.02 * weight_bytes, (decoded, weight_bytes)
    assert free > 5 * decoded, (free, decoded)


@needs_libtpu
def test_a_mesh_whose_axes_split_a_physical_axis_is_built():
    """v4-64 is 2x4x4 chips: data 2 x fsdp 2 x tensor 8 takes a 4 apart (jax.make_mesh
    refuses it; configs/paper.py's v4 mesh)."""
    from smatch_jax import topologies

    devices = topologies.compile_devices("v4-64")
    mesh = sharding.make_mesh(2, 2, 8, devices=devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 8}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)


@needs_libtpu
@pytest.mark.parametrize("fsdp, tensor, slices", [(32, 1, 8), (4, 8, 2), (8, 4, 4)])
def test_each_host_of_a_v5e_32_slice_loads_the_rows_its_chips_hold(
    monkeypatch, fsdp, tensor, slices
):
    """8 hosts of 4 chips. With the tensor axis spanning hosts (jax.make_mesh lays a tensor
    group of 8 over 4 hosts), the hosts of one group load the same slice of the batch."""
    from smatch_jax import topologies

    devices = topologies.compile_devices("v5e-32")
    mesh = sharding.make_mesh(1, fsdp, tensor, devices=devices)
    got = {}
    for host in range(8):
        monkeypatch.setattr(jax, "process_index", lambda h=host: h)
        got[host] = sharding.batch_slice(mesh)
    assert {count for _, count in got.values()} == {slices}
    assert sorted({index for index, _ in got.values()}) == list(range(slices))
    per_slice = [sum(index == i for index, _ in got.values()) for i in range(slices)]
    assert per_slice == [8 // slices] * slices  # every slice loaded by the same number of hosts


def test_collectives_inside_a_while_body_are_counted_per_trip():
    """The loop body is named after the condition on the while line ("condition=%c,
    body=%b"); its collectives count once per trip and as per-iteration bytes."""
    from smatch_jax import hlo_stats

    hlo = "\n".join(
        [
            "%cond (p: s32[]) -> pred[] {",
            "  ROOT %lt = pred[] compare(s32[] %p, s32[] %p), direction=LT",
            "}",
            "%body.1 (p: s32[]) -> s32[] {",
            "  %ag = bf16[512,4096]{1,0} all-gather(bf16[128,4096]{1,0} %w), dimensions={0}",
            "  ROOT %n = s32[] add(s32[] %p, s32[] %p)",
            "}",
            "ENTRY %main (w: bf16[128,4096]) -> s32[] {",
            "  %ar = f32[64,1000]{1,0} all-reduce(f32[64,1000]{1,0} %x), to_apply=%add",
            "  ROOT %while.3 = s32[] while(s32[] %i), condition=%cond, body=%body.1",
            "}",
        ]
    )
    c = hlo_stats.collectives(hlo, loop_trips=48)
    gathered = 512 * 4096 * 2
    assert c.in_loops == gathered
    assert c.by_kind == {"all-gather": 48 * gathered, "all-reduce": 64 * 1000 * 4}
    assert hlo_stats.collectives(hlo).in_loops == gathered  # a loop of unknown length too


def test_a_transfer_split_over_fused_computations_is_counted_once():
    """XLA's TPU compiler splits one all-gather into a start and continuation steps, each a
    copy of the collective (same `channel_id`, full result shape) in its own fused
    computation: one transfer. Inside a 32-trip layer loop it runs 32 times; a collective
    without a channel is its own transfer."""
    from smatch_jax import hlo_stats

    ag = "bf16[4096,32001]{1,0} all-gather(bf16[1024,32001]{1,0} %p), channel_id=7, dimensions={0}"
    lg = (
        "bf16[8,4096,16]{2,1,0} all-gather(bf16[2,4096,16]{2,1,0} %q), channel_id=9, dimensions={0}"
    )
    hlo = "\n".join(
        [
            "%fused_start (p: bf16[1024,32001]) -> bf16[4096,32001] {",
            f"  ROOT %all-gather.1 = {ag}",
            "}",
            "%fused_step.1 (p: bf16[1024,32001]) -> bf16[4096,32001] {",
            f"  ROOT %all-gather.2 = {ag}",
            "}",
            "%fused_step.2 (p: bf16[1024,32001]) -> bf16[4096,32001] {",
            f"  ROOT %all-gather.3 = {ag}",
            "}",
            "%layer_start (q: bf16[2,4096,16]) -> bf16[8,4096,16] {",
            f"  ROOT %all-gather.4 = {lg}",
            "}",
            "%layer_done (q: bf16[2,4096,16]) -> bf16[8,4096,16] {",
            f"  ROOT %all-gather.5 = {lg}",
            "}",
            "%cond (p: s32[]) -> pred[] {",
            "  ROOT %lt = pred[] compare(s32[] %p, s32[] %p), direction=LT",
            "}",
            "%body (p: s32[]) -> s32[] {",
            "  %a = bf16[8,4096,16]{2,1,0} fusion(bf16[2,4096,16]{2,1,0} %q), kind=kCustom, "
            "calls=%layer_start",
            "  %b = bf16[8,4096,16]{2,1,0} fusion(bf16[2,4096,16]{2,1,0} %q), kind=kCustom, "
            "calls=%layer_done",
            "  ROOT %n = s32[] add(s32[] %p, s32[] %p)",
            "}",
            "ENTRY %main (w: bf16[1024,32001]) -> s32[] {",
            "  %s = bf16[4096,32001]{1,0} fusion(%w), kind=kCustom, calls=%fused_start",
            "  %t = bf16[4096,32001]{1,0} fusion(%w), kind=kCustom, calls=%fused_step.1",
            "  %u = bf16[4096,32001]{1,0} fusion(%w), kind=kCustom, calls=%fused_step.2",
            "  %ar = f32[64,1000]{1,0} all-reduce(f32[64,1000]{1,0} %x), to_apply=%add",
            "  ROOT %while.3 = s32[] while(s32[] %i), condition=%cond, body=%body, "
            'backend_config={"known_trip_count":{"n":"32"}}',
            "}",
        ]
    )
    c = hlo_stats.collectives(hlo)
    head, layer = 4096 * 32001 * 2, 8 * 4096 * 16 * 2
    assert c.by_kind == {"all-gather": head + 32 * layer, "all-reduce": 64 * 1000 * 4}
    assert c.count == {"all-gather": 2, "all-reduce": 1}
    assert c.in_loops == 0  # the layer loop has a known length: not a sampler's token loop


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu")
def test_the_buffers_at_xlas_peak_are_read_from_its_own_buffer_assignment(tmp_path):
    """`hlo_stats.peak_buffers` on a compile-only v5e:2x2: the gradient of a scan that keeps
    every step's input (jax.checkpoint) holds, at its peak, the stacked inputs [L, rows a chip,
    D] and the gradient of the stacked weights being filled in; the program's arguments are
    flagged as such and are the bytes XLA counts for them."""
    from smatch_jax import hlo_stats, topologies

    mesh = sharding.make_mesh(1, 4, 1, devices=topologies.compile_devices("v5e:2x2"))
    L, B, D = 16, 512, 256

    def loss(w, x):
        step = jax.checkpoint(lambda h, w_l: (jnp.tanh(h @ w_l), None))
        return jax.lax.scan(step, x, w)[0].astype(jnp.float32).sum()

    w = jax.ShapeDtypeStruct((L, D, D), jnp.bfloat16, sharding=sharding.replicated(mesh))
    x = jax.ShapeDtypeStruct((B, D), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp", None)))
    options = {"xla_dump_to": str(tmp_path), **hlo_stats.DUMP_OPTIONS}
    compiled = jax.jit(jax.grad(loss)).lower(w, x).compile(compiler_options=options)
    live, buffers = hlo_stats.peak_buffers(tmp_path)
    mem = hlo_stats.memory(compiled)
    assert sum(b.bytes for b in buffers if b.argument) == mem.args == (L * D + B // 4) * D * 2
    assert {b.source for b in buffers if b.argument} == {"w", "x"}
    temps = {(b.bytes, b.source.split("/")[1]) for b in buffers if b.source.count("/")}
    assert (L * (B // 4) * D * 2, "jvp()") in temps  # the forward's stacked inputs
    assert (L * D * D * 2, "transpose(jvp())") in temps  # the weights' gradient
    assert buffers == sorted(buffers, key=lambda b: -b.bytes)
    assert mem.args <= live <= mem.xla_peak
    with pytest.raises(FileNotFoundError, match="DUMP_OPTIONS"):
        hlo_stats.peak_buffers(tmp_path / "nothing")


def _abstract_llama(mesh, scan: bool, n_kv_heads: int, rules: str = ""):
    """A tiny bf16 Llama (3 layers, d 128) as shapes: `(graphdef, params, args)`, the args
    placed on `mesh` by the parameter rules."""
    cfg = ModelConfig(
        family="llama", vocab_size=255, d_model=128, n_layers=3, n_heads=4,
        n_kv_heads=n_kv_heads, d_ff=384, max_positions=64, use_bias=False, tie_embeddings=False,
        dtype="bfloat16", param_dtype="bfloat16", scan_layers=scan,
    )  # fmt: skip
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    sh = sharding.param_shardings(params, mesh, rules=rules)
    args = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, sh)
    return graphdef, params, args


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu")
@pytest.mark.parametrize("scan", [False, True])
def test_weight_all_gathers_of_a_real_compile_equal_the_weight_bytes(scan):
    """A tiny Llama's forward pass under FSDP over 4 chips of v5e:2x2 (compile-only): XLA
    gathers every kernel once, in both layer layouts, and the counted all-gather bytes equal
    the kernels' bytes computed from their shapes (XLA writes each gather several times over:
    counting every copy gave 2.7x that, unrolled)."""
    from smatch_jax import hlo_stats, topologies

    mesh = sharding.make_mesh(1, 4, 1, devices=topologies.compile_devices("v5e:2x2"))
    graphdef, params, args = _abstract_llama(mesh, scan, 2, r"norm\.scale$=_")  # norms copied
    B, T = 16, 32
    rows = sharding.batch_sharding(mesh)

    def forward(p, x):
        pos = jnp.broadcast_to(jnp.arange(T), (B, T))
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))
        with activations.axis_rules(mesh, activations.TRAIN_RULES):
            return nnx.merge(graphdef, p).forward_embeddings(x, pos, mask)

    x = jax.ShapeDtypeStruct((B, T, 128), jnp.bfloat16, sharding=rows)
    text = jax.jit(forward, out_shardings=rows).lower(args, x).compile().as_text()
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    kernels = sum(
        v.size * v.dtype.itemsize for p, v in flat if sharding.path_name(p)[-6:] == "kernel"
    )
    assert kernels == (3 * (2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 384) + 128 * 256) * 2
    assert hlo_stats.collectives(text).by_kind == {"all-gather": kernels}


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu")
def test_full_remat_keeps_each_blocks_input_split_over_tensor():
    """A tiny scanned Llama's gradient over tensor 4 of v5e:2x2 (compile-only), under
    `TRAIN_RULES`: full remat keeps the 3 blocks' inputs [3, B, T, d / 4] ("kept_embed",
    `transformer._full_remat`), while `jax.checkpoint` (remat 'save_qkv') keeps them whole."""
    from smatch_jax import topologies

    mesh = sharding.make_mesh(1, 1, 4, devices=topologies.compile_devices("v5e:2x2"))
    graphdef, _, args = _abstract_llama(mesh, True, 4)
    B, T = 16, 32
    ids = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=sharding.batch_sharding(mesh))

    def loss(p, ids, remat):
        pos = jnp.broadcast_to(jnp.arange(T), (B, T))
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))
        with activations.axis_rules(mesh, activations.TRAIN_RULES):
            logits = nnx.merge(graphdef, p)(ids, pos, mask, remat)
        return jnp.mean(logits.astype(jnp.float32) ** 2)

    def hlo(remat):
        grad = jax.jit(jax.grad(loss), static_argnums=2)
        return grad.lower(args, ids, remat).compile().as_text()

    split, whole = f"bf16[3,{B},{T},32]", f"bf16[3,{B},{T},128]"
    full, qkv = hlo("full"), hlo("save_qkv")
    assert split in full and whole not in full
    assert whole in qkv


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu")
def test_flops_of_xlas_windowed_matmul_loops_are_counted_whole():
    """The 7B step's down projection on v5e-32 (compile-only), rows over fsdp 4, features over
    tensor 8, its output's features split: XLA writes a windowed matmul, a while loop whose
    body its cost analysis counts once (half the flops here). `matmul_loops` finds it (and not
    a jax scan's loop), and the plan takes the flops of the program compiled again with
    `FLAT_MATMULS`: the whole product."""
    from smatch_jax import compile_plan, hlo_stats, topologies

    mesh = sharding.make_mesh(1, 4, 8, devices=topologies.compile_devices("v5e-32"))
    B, T, F, D = 64, 96, 11008, 4096
    split = lambda *spec: NamedSharding(mesh, P(*spec))
    h = jax.ShapeDtypeStruct((B, T, F), jnp.bfloat16, sharding=split("fsdp", None, "tensor"))
    w = jax.ShapeDtypeStruct((F, D), jnp.bfloat16, sharding=split("tensor", "fsdp"))
    down = jax.jit(lambda h, w: h @ w, out_shardings=split("fsdp", None, "tensor"))
    lowered = down.lower(h, w)
    whole = 2 * B * T * F * D / 32  # per chip
    assert hlo_stats.matmul_loops(lowered.compile().as_text()) == 1
    piece = compile_plan._figures("down", lambda: lowered, 1, False, "program")
    assert piece.flat_flops and piece.cost["flops"] == pytest.approx(whole, rel=1e-3)
    assert piece.xla_cost["flops"] < 0.6 * whole

    def layers(x, ws):  # a jax loop around matmuls: the plan's probes count those
        return jax.lax.scan(lambda x, w: (x @ w, None), x, ws)[0]

    x = jax.ShapeDtypeStruct((B, D), jnp.bfloat16, sharding=split("fsdp", None))
    ws = jax.ShapeDtypeStruct((3, D, D), jnp.bfloat16, sharding=split(None, None, "tensor"))
    assert hlo_stats.matmul_loops(jax.jit(layers).lower(x, ws).compile().as_text()) == 0


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu")
def test_the_accounted_bytes_read_each_weight_once():
    """Four [4096, 4096] bf16 matmuls on 16 rows, one v5e chip (compile-only): the traffic
    is each weight read once, and each layer's input read and output written. XLA's own
    count, with memory-space assignment, adds its prefetches into VMEM to the reads they
    serve (4x here); `accounted_cost` (COST_OPTIONS) counts the traffic."""
    from smatch_jax import hlo_stats, topologies

    mesh = sharding.make_mesh(1, 1, 1, devices=topologies.compile_devices("v5e:2x2")[:1])
    L, D, B = 4, 4096, 16
    one = lambda *shape: jax.ShapeDtypeStruct(
        shape, jnp.bfloat16, sharding=sharding.replicated(mesh)
    )
    ws, x = [one(D, D) for _ in range(L)], one(B, D)

    def layers(x, ws):
        for w in ws:
            x = jnp.tanh(x @ w)
        return x

    lowered = jax.jit(layers).lower(x, ws)
    traffic = L * D * D * 2 + L * 2 * B * D * 2
    accounted, flat = hlo_stats.accounted_cost(lowered)
    assert accounted["bytes"] == pytest.approx(traffic, rel=0.02) and not flat
    assert hlo_stats.cost(lowered.compile())["bytes"] > 3 * traffic
    assert accounted["flops"] == pytest.approx(2 * L * B * D * D, rel=0.01)


def test_xla_counted_loops_run_their_count_and_are_not_the_samplers_tokens():
    """A windowed matmul XLA writes as a loop `i < 4` (circulating 4 shards) runs 4 times,
    outside the sampler's loop or inside it; only the sampler's loop (unknown length) makes
    per-token bytes, its inner XLA loop included 4 times."""
    from smatch_jax import hlo_stats

    hlo = "\n".join(
        [
            "%wcond (p: (bf16[64,64], u32[])) -> pred[] {",
            "  %constant.7 = u32[]{:T(128)} constant(4)",
            "  %i = u32[] get-tuple-element((bf16[64,64], u32[]) %p), index=1",
            "  ROOT %c = pred[]{:T(512)} compare(u32[] %i, u32[]{:T(128)} %constant.7), "
            "direction=LT",
            "}",
            "%wbody (p: (bf16[64,64], u32[])) -> (bf16[64,64], u32[]) {",
            "  %cp = bf16[64,64]{1,0} collective-permute(bf16[64,64]{1,0} %x), "
            "source_target_pairs={{0,1},{1,0}}",
            "  ROOT %t = (bf16[64,64], u32[]) tuple(%cp, %i)",
            "}",
            "%cond (p: s32[]) -> pred[] {",
            "  %all = pred[] and(pred[] %a, pred[] %b)",
            "  ROOT %and = pred[] and(pred[] %all, pred[] %b)",
            "}",
            "%body (p: s32[]) -> s32[] {",
            "  %inner = (bf16[64,64], u32[]) while((bf16[64,64], u32[]) %q), "
            "condition=%wcond, body=%wbody",
            "  ROOT %n = s32[] add(s32[] %p, s32[] %p)",
            "}",
            "ENTRY %main (w: bf16[64,64]) -> s32[] {",
            "  %pre = (bf16[64,64], u32[]) while((bf16[64,64], u32[]) %q), "
            "condition=%wcond, body=%wbody",
            "  ROOT %while.3 = s32[] while(s32[] %i), condition=%cond, body=%body",
            "}",
        ]
    )
    c = hlo_stats.collectives(hlo, loop_trips=10)
    permute = 64 * 64 * 2
    assert c.in_loops == 4 * permute  # per token: the inner windowed loop, 4 shards
    assert c.by_kind == {"collective-permute": (4 + 10 * 4) * permute}  # both call sites


def test_the_decode_layouts_cache_write_by_select_equals_the_scatter():
    from smatch_jax.models.attention import _write_rows

    rng = np.random.default_rng(0)
    cache = jnp.asarray(rng.normal(size=(3, 4, 6, 2, 5)), jnp.float32)  # [L, B, S, K, D]
    new = jnp.asarray(rng.normal(size=(4, 1, 2, 5)), jnp.float32)
    index = jnp.asarray([0, 5, 9, -1])  # the last two clamped, like the scatter's starts
    for layer in range(3):
        want = _write_rows(cache, layer, new, index)
        got = _write_rows(cache, layer, new, index, by_select=True)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
