"""Scanned layers (`model.scan_layers`): the same weights, logits, loss, LoRA gradients and
samples as the unrolled model (tiny float32 models); remat inside the scanned body; importers,
committed checkpoints and trained runs load into either layout; the layer axis is never
sharded; a resumed scanned run continues bit for bit."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, AxisType

from smatch_jax import masks, objective, sampling, sharding, train
from smatch_jax.data.tokenizers import CharTokenizer
from smatch_jax.models import Transformer, lora, tiny
from smatch_jax.models.convert import load_npz, model_from_params, model_params, save_npz
from smatch_jax.models.factory import ModelSpec, build_model
from smatch_jax.models.transformer import REMAT, relayout
from tests.test_train import tiny_config

V = 17  # tiny()'s vocabulary


def _config(family, scan, n_layers=3):
    cfg = dataclasses.replace(tiny(family), n_layers=n_layers, scan_layers=scan)
    if family == "llama":
        cfg = dataclasses.replace(cfg, tie_embeddings=False)  # an lm_head too
    return cfg


def _pair(family, lora_rank=0, n_layers=3):
    """(unrolled, scanned) models built from the same seeds (LoRA adapters included)."""
    models = []
    for scan in (False, True):
        m = Transformer(_config(family, scan, n_layers), rngs=nnx.Rngs(0))
        if lora_rank:
            lora.apply_lora(m, rank=lora_rank, alpha=8.0, rngs=nnx.Rngs(1))
        models.append(m)
    return models


def _with_random_b(model):
    """`model` with random LoRA B factors (0 at init: no gradient would reach A), and its
    copy in the scanned layout."""
    state = nnx.state(model, nnx.LoRAParam)
    rng = np.random.default_rng(5)
    draw = lambda p, x: (
        jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype) if "lora_b" in str(p) else x
    )
    nnx.update(model, jax.tree_util.tree_map_with_path(draw, state))
    return model, relayout(nnx.clone(model), True)


def _rows(seed=0, B=4, T=12):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V - 2, (B, T)).astype(np.int32)
    tokens[:, 5] = V  # a <bkspc> in every row: the layout's non-causal masks
    m, n = np.full(B, 3, np.int32), np.array([T, T - 1, T - 3, T], np.int32)
    return tokens, m, n


def _logits(model, rows, remat="none"):
    lay = masks.backspace_layout(*rows, bkspc_id=V)
    return model(lay.input_ids, lay.positions, lay.attn_mask, remat)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_same_weights_and_logits_under_every_remat(family):
    unrolled, scanned = _pair(family)
    a, b = model_params(unrolled), model_params(scanned)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    w = nnx.state(scanned, nnx.Param)["blocks"]["attn"]["q_proj"]["kernel"]
    assert w.shape == (3, 32, 32)  # one stacked weight, a leading layer axis
    rows = _rows()
    ref = np.asarray(_logits(unrolled, rows))
    for remat in REMAT:
        np.testing.assert_allclose(_logits(scanned, rows, remat), ref, rtol=1e-5, atol=1e-5)


def test_lora_loss_and_gradients_equal():
    """The SequenceMatch loss (data and model rows) and its gradients with respect to the
    LoRA factors and `<bkspc>` rows, scanned and unrolled, remat inside the scanned body."""
    unrolled, scanned = _with_random_b(_pair("llama", lora_rank=4)[0])
    tokens, m, n = _rows(seed=1)
    is_model = np.array([False, False, True, True])
    batch = objective.Batch(tokens, m, n, is_model, np.ones(tokens.shape, np.float32))
    loss_fn = objective.make_loss_fn(objective.LossConfig(bc_warmup_steps=0), eos_id=V - 2)
    lay = masks.backspace_layout(tokens, m, n, bkspc_id=V)
    out = []
    for model, remat in ((unrolled, "none"), (scanned, "full")):
        graphdef, trainable, frozen = nnx.split(model, lora.trainable_filter(True), ...)

        def f(tr, graphdef=graphdef, frozen=frozen, remat=remat):
            logits = nnx.merge(graphdef, tr, frozen)(
                lay.input_ids, lay.positions, lay.attn_mask, remat
            )
            return loss_fn(logits, batch, jnp.int32(10))[0]

        loss, grads = jax.jit(jax.value_and_grad(f))(trainable)
        flat = model_params(nnx.merge(graphdef, grads, frozen))
        out.append((float(loss), {k: v for k, v in flat.items() if "lora" in k}))
    (l0, g0), (l1, g1) = out
    assert l1 == pytest.approx(l0, rel=1e-5)
    assert g0.keys() == g1.keys() and len(g0) == 2 * 7 * 3  # A and B of 7 projections x 3
    for k in g0:
        np.testing.assert_allclose(g1[k], g0[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert max(float(np.abs(g).max()) for g in g0.values()) > 1e-4  # the gradients are not 0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cached_decoding_samples_the_same_rows(family):
    """The KV cache written at a traced layer inside the scan: the same rows, greedy with
    forced backspaces and sampled at T = 1."""
    unrolled, scanned = _pair(family)
    rng = np.random.default_rng(2)
    prompts = rng.integers(0, V - 2, (4, 5)).astype(np.int32)
    plen = np.array([5, 3, 4, 2], np.int32)
    for cfg in (
        sampling.SamplingConfig(max_new_tokens=8, greedy=True, bkspc_logit_bias=3.0),
        sampling.SamplingConfig(max_new_tokens=8, temperature=1.0),
    ):
        a, b = (
            sampling.sample(
                m, prompts, plen, jax.random.key(3), eos_id=V - 2, pad_id=V - 1, cfg=cfg
            )
            for m in (unrolled, scanned)
        )
        np.testing.assert_array_equal(a.actions, b.actions)
        np.testing.assert_array_equal(a.length, b.length)
    assert int(a.n_bkspc.sum()) >= 0


def test_relayout_round_trip_and_same_graph_as_a_direct_build():
    unrolled, scanned = _pair("llama", lora_rank=2)
    a, b = model_params(unrolled), model_params(scanned)  # the same adapters drawn
    assert any("lora_a" in k for k in a) and all(np.array_equal(a[k], b[k]) for k in a)
    there = relayout(_pair("llama", lora_rank=2)[0], True)
    assert nnx.graphdef(there) == nnx.graphdef(scanned)
    a, b = model_params(there), model_params(scanned)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    back = relayout(there, False)
    assert nnx.graphdef(back) == nnx.graphdef(unrolled)
    assert all(np.array_equal(model_params(back)[k], model_params(unrolled)[k]) for k in a)


def test_merge_lora_in_the_scanned_layout():
    _, scanned = _pair("llama", lora_rank=2)
    rows = _rows()
    before = np.asarray(_logits(scanned, rows))
    merged = lora.merge_lora(scanned)
    assert not any("lora" in k for k in model_params(merged))
    np.testing.assert_allclose(_logits(merged, rows), before, rtol=1e-5, atol=1e-5)


def test_layer_axis_is_never_sharded():
    """Every stacked weight keeps its leading layer axis whole; the other axes are sharded
    as the unrolled model's layer 0."""
    mesh = AbstractMesh((1, 2, 2), sharding.AXES, axis_types=(AxisType.Auto,) * 3)
    specs = []
    for scan in (False, True):

        def build(scan=scan):
            m = Transformer(
                dataclasses.replace(_config("llama", scan), d_model=128), rngs=nnx.Rngs(0)
            )
            return lora.apply_lora(m, rank=4, rngs=nnx.Rngs(1))

        tree = sharding.param_shardings(nnx.state(nnx.eval_shape(build)), mesh)
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        specs.append({sharding.path_name(p): s.spec for p, s in flat})
    unrolled, scanned = specs
    stacked = [k for k in scanned if k.startswith("blocks.")]
    assert len(stacked) == len([k for k in unrolled if k.startswith("blocks.0.")]) > 10
    for k in stacked:
        assert scanned[k][0] is None, k
        assert tuple(scanned[k][1:]) == tuple(unrolled["blocks.0." + k[7:]]), k
    assert any(any(e for e in scanned[k]) for k in stacked)  # something is sharded


def test_imports_and_checkpoints_load_into_either_layout(tmp_path):
    """A committed npz checkpoint, the flat params every importer produces, and a trained
    run's model (`ckpt:` init) load into the scanned layout with the same logits."""
    unrolled, _ = _pair("llama")
    rows = _rows()
    ref = np.asarray(_logits(unrolled, rows))
    flat = model_params(unrolled)
    direct = model_from_params(dataclasses.replace(unrolled.config, scan_layers=True), flat)
    np.testing.assert_allclose(_logits(direct, rows), ref, rtol=1e-5, atol=1e-5)
    tok = CharTokenizer("abcdefghijklmno")
    vocab = [tok.decode([i]) for i in range(tok.vocab_size)]
    sha = save_npz(direct, tmp_path / "m.npz", vocab)
    assert sha == save_npz(unrolled, tmp_path / "u.npz", vocab)  # the layout is not the weights
    for scan in (False, True):
        loaded, _ = load_npz(tmp_path / "m.npz", sha256=sha, scan_layers=scan)
        assert loaded.config.scan_layers == scan
        np.testing.assert_allclose(_logits(loaded, rows), ref, rtol=1e-5, atol=1e-5)
        spec = ModelSpec(init="ckpt:elsewhere", scan_layers=not scan)
        other = build_model(spec, vocab_size=V, seq_len=8, seed=0, trained=(loaded, tok))
        assert other.config.scan_layers == (not scan)
        np.testing.assert_allclose(_logits(other, rows), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_scanned_run_resumes_bit_for_bit(tmp_path):
    """12 steps in one go, and 5 + 7 with a restart, of a scanned run (BC warm-up, refills,
    model rows): equal metrics and parameters."""
    data = tmp_path / "data"
    cfg = tiny_config(data)
    cfg.model.scan_layers = True
    cfg.model.remat = "full"
    full, _ = train.train(cfg, str(tmp_path / "full"))
    first, _ = train.train(cfg, str(tmp_path / "part"), stop_after=5)
    assert int(first.step) == 5
    again, _ = train.train(cfg, str(tmp_path / "part"))
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(again.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(full.replay.tokens), np.asarray(again.replay.tokens))
    read = lambda d: [
        json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()
    ]
    strip = lambda rows: [
        {
            k: v
            for k, v in r.items()
            if k != "time" and not k.startswith(("host/", "sec_", "tokens_per", "time/"))
        }
        for r in rows
    ]
    assert strip(read("full")) == strip(read("part"))
