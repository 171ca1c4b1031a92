"""Tests of the decoder-only transformer (`smatch_jax.models`) on tiny configs.

Weights are re-drawn at unit-ish scale (the 0.02 initialiser gives near-uniform logits, which
would make the comparisons vacuous). Jitted functions are cached per setup so each shape
compiles once for the whole file.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from smatch_jax.models import (
    KVCache,
    ModelConfig,
    Transformer,
    gpt2_124m,
    init_cache,
    smollm2_135m,
    tiny,
)
from smatch_jax.models.attention import masked_attention
from smatch_jax.models.transformer import REMAT

ATOL = 2e-5
VARIANTS = {
    "gpt2": {},
    "llama": {},
    "llama_untied": {"tie_embeddings": False},
    "llama_bf16": {"dtype": "bfloat16"},
}


class Setup(NamedTuple):
    config: ModelConfig
    model: Transformer
    state: Any  # nnx.State of the model
    forward: Any  # jitted (state, ids, pos, mask) -> logits
    decode: Any  # jitted (state, ids, pos, mask, cache, cache_index) -> (logits, cache)


def _randomize(model: Transformer, seed: int) -> None:
    """Sets the parameters to unit-scale random values (norm scales around 1), in place.

    Works on an abstract model from `nnx.eval_shape`, which skips the (slow, eager) init.
    """
    rng = np.random.default_rng(seed)
    state = nnx.state(model, nnx.Param)

    def draw(path, value):
        noise = rng.standard_normal(value.shape)
        name = path[-1].key
        if name == "scale":
            noise = 1.0 + 0.2 * noise
        elif name == "bias":
            noise = 0.2 * noise
        elif name == "kernel":  # [in, out]
            noise = noise / np.sqrt(value.shape[0])
        return jnp.asarray(noise, value.dtype)  # embeddings: standard normal

    pure = jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)


def _make_setup(config: ModelConfig, model: Transformer) -> Setup:
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda st, ids, pos, mask: nnx.merge(graphdef, st)(ids, pos, mask))
    decode = jax.jit(
        lambda st, ids, pos, mask, cache, idx: nnx.merge(graphdef, st).decode(
            ids, pos, mask, cache, idx
        )
    )
    return Setup(config, model, state, forward, decode)


@functools.cache
def _setup(variant: str) -> Setup:
    family = variant.split("_")[0]
    config = dataclasses.replace(tiny(family), **VARIANTS[variant])
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    _randomize(model, seed=1)
    return _make_setup(config, model)


def _params(model: Transformer) -> dict:
    """Pure nested dict of float64 numpy parameters."""
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return jax.tree.map(lambda a: np.asarray(a, np.float64), pure)


def _causal(B: int, T: int) -> jax.Array:
    return jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))


def _arange(B: int, T: int) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))


def _random_ids(config: ModelConfig, shape: tuple[int, ...], seed: int) -> jax.Array:
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(0, config.n_actions, shape), jnp.int32)


# --------------------------------------------------------------------------- numpy reference


def _np_norm(x, p, family, eps):
    if family == "gpt2":
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * p["scale"] + p.get("bias", 0.0)
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * p["scale"]


def _np_linear(x, p):
    return x @ p["kernel"] + p.get("bias", 0.0)


def _np_rope(x_TxHxD, pos_T, theta):
    """Rotates the complex pairs (x[i], x[i + D/2]) by angle pos * theta^(-2i/D)."""
    half = x_TxHxD.shape[-1] // 2
    angle = pos_T[:, None, None] * theta ** (-2.0 * np.arange(half) / x_TxHxD.shape[-1])
    z = (x_TxHxD[..., :half] + 1j * x_TxHxD[..., half:]) * np.exp(1j * angle)
    return np.concatenate([z.real, z.imag], axis=-1)


def _np_forward(cfg: ModelConfig, p: dict, ids, pos, mask) -> np.ndarray:
    """float64 reference, one row at a time, explicit formulas."""
    ids, pos, mask = np.asarray(ids), np.asarray(pos), np.asarray(mask)
    H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    out = []
    for b in range(ids.shape[0]):
        x = p["tok_embed"]["embedding"][ids[b]]
        if cfg.family == "gpt2":
            x = x + p["pos_embed"]["embedding"][pos[b]]
        T = x.shape[0]
        for layer in range(cfg.n_layers):
            blk = p["blocks"][layer]
            h = _np_norm(x, blk["attn_norm"], cfg.family, cfg.norm_eps)
            q = _np_linear(h, blk["attn"]["q_proj"]).reshape(T, H, D)
            k = _np_linear(h, blk["attn"]["k_proj"]).reshape(T, Hkv, D)
            v = _np_linear(h, blk["attn"]["v_proj"]).reshape(T, Hkv, D)
            if cfg.family == "llama":
                q, k = _np_rope(q, pos[b], cfg.rope_theta), _np_rope(k, pos[b], cfg.rope_theta)
            k, v = np.repeat(k, H // Hkv, axis=1), np.repeat(v, H // Hkv, axis=1)
            att = np.zeros((T, H, D))
            for t in range(T):
                keys = np.flatnonzero(mask[b, t])
                if keys.size == 0:
                    continue  # fully-masked query: zero attention output
                s = np.einsum("hd,shd->hs", q[t], k[keys]) / np.sqrt(D)
                w = np.exp(s - s.max(-1, keepdims=True))
                w /= w.sum(-1, keepdims=True)
                att[t] = np.einsum("hs,shd->hd", w, v[keys])
            x = x + _np_linear(att.reshape(T, H * D), blk["attn"]["o_proj"])
            h = _np_norm(x, blk["mlp_norm"], cfg.family, cfg.norm_eps)
            mlp = blk["mlp"]
            if cfg.family == "gpt2":
                u = _np_linear(h, mlp["up_proj"])
                a = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u**3)))
            else:
                g = _np_linear(h, mlp["gate_proj"])
                a = g / (1 + np.exp(-g)) * _np_linear(h, mlp["up_proj"])
            x = x + _np_linear(a, mlp["down_proj"])
        h = _np_norm(x, p["final_norm"], cfg.family, cfg.norm_eps)
        w_out = p["lm_head"]["kernel"] if "lm_head" in p else p["tok_embed"]["embedding"].T
        out.append(h @ w_out)
    return np.stack(out)


# --------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_output_shape_dtype_finite(variant):
    s = _setup(variant)
    B, T = 2, 8
    logits = s.forward(s.state, _random_ids(s.config, (B, T), 0), _arange(B, T), _causal(B, T))
    assert logits.shape == (B, T, s.config.vocab_size + 1)
    assert logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()
    assert ("lm_head" in nnx.to_pure_dict(s.state)) == (variant == "llama_untied")


@pytest.mark.parametrize("variant", ["gpt2", "llama", "llama_untied"])
def test_matches_numpy_reference(variant):
    s = _setup(variant)
    B, T = 2, 7
    rng = np.random.default_rng(3)
    ids = _random_ids(s.config, (B, T), 1)
    pos = jnp.asarray(rng.integers(0, 20, (B, T)), jnp.int32)  # arbitrary, not sorted
    mask = rng.random((B, T, T)) < 0.5
    mask[1, 4] = False  # a fully-masked query row: attention output is zero, not NaN
    logits = s.forward(s.state, ids, pos, jnp.asarray(mask))
    ref = _np_forward(s.config, _params(s.model), ids, pos, mask)
    np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_causal_forward_equals_prefix_forward(variant):
    s = _setup(variant)
    B, T = 2, 8
    ids = _random_ids(s.config, (B, T), 2)
    full = s.forward(s.state, ids, _arange(B, T), _causal(B, T))
    for t in (2, 7):  # T = 7 reuses the compiled forward of the numpy-reference test
        prefix = s.forward(s.state, ids[:, :t], _arange(B, t), _causal(B, t))
        np.testing.assert_allclose(prefix, full[:, :t], atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_forward_embeddings_and_input_gradients(variant):
    s = _setup(variant)
    graphdef = nnx.graphdef(s.model)
    B, T, t = 2, 8, 3
    ids, pos, mask = _random_ids(s.config, (B, T), 4), _arange(B, T), _causal(B, T)

    @jax.jit
    def embed_forward_grad(state):
        model = nnx.merge(graphdef, state)
        x = model.embed(ids, pos)
        logits_fn = lambda x_: model.forward_embeddings(x_, pos, mask)
        return x, logits_fn(x), jax.grad(lambda x_: logits_fn(x_)[:, t].sum())(x)

    x, logits, grad = embed_forward_grad(s.state)
    assert x.shape == (B, T, s.config.d_model)
    np.testing.assert_allclose(logits, s.forward(s.state, ids, pos, mask), atol=ATOL)
    grad_norm_BxT = np.abs(np.asarray(grad)).sum(-1)
    assert (grad_norm_BxT[:, : t + 1] > 0).all()  # position t sees itself and its past ...
    assert (grad_norm_BxT[:, t + 1 :] == 0).all()  # ... and nothing after it


@pytest.mark.parametrize("remat", [r for r in REMAT if r != "none"])
def test_remat_gives_the_same_loss_and_parameter_gradients(remat):
    """Rematerialisation changes what the backward pass keeps, not what it computes; and it is
    really there (a checkpoint per block in the traced program). As in training: LoRA, the
    adapters differentiated, the frozen base weights an argument of the jitted function."""
    from smatch_jax.models import lora

    s = _setup("llama")
    model = nnx.merge(*nnx.split(s.model))  # a copy to put adapters on
    lora.apply_lora(model, rank=2, rngs=nnx.Rngs(3))
    graphdef, params, frozen = nnx.split(model, lora.trainable_filter(True), ...)
    params = jax.tree.map(lambda x: x + 0.01, params)  # nonzero adapters: gradients reach both
    B, T = 2, 8
    ids, pos, mask = _random_ids(s.config, (B, T), 5), _arange(B, T), _causal(B, T)

    def loss(params, frozen, policy):
        logits = nnx.merge(graphdef, params, frozen)(ids, pos, mask, remat=policy)
        return jnp.mean(logits**2)

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=2)
    (l0, g0), (l1, g1) = grad(params, frozen, "none"), grad(params, frozen, remat)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g1, g0)
    jaxpr = lambda policy: str(
        jax.make_jaxpr(jax.grad(loss), static_argnums=2)(params, frozen, policy)
    )
    assert jaxpr(remat).count("checkpoint") + jaxpr(remat).count("remat") >= s.config.n_layers
    assert "checkpoint" not in jaxpr("none")
    with pytest.raises(ValueError, match="remat='all'; use one of"):
        loss(params, frozen, "all")


def test_fully_masked_query_row_is_zero_with_finite_gradients():
    rng = np.random.default_rng(9)
    q = jnp.asarray(rng.standard_normal((1, 3, 4, 8)), jnp.float32)  # H = 4
    k, v = (jnp.asarray(rng.standard_normal((1, 5, 2, 8)), jnp.float32) for _ in range(2))
    mask = jnp.asarray(rng.random((1, 3, 5)) < 0.5).at[0, 1].set(False)
    out = jax.jit(masked_attention)(q, k, v, mask)
    np.testing.assert_array_equal(out[0, 1], 0.0)
    loss = lambda q_, k_, v_: masked_attention(q_, k_, v_, mask).sum()
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


# Ragged rows: row b starts at cache slot OFFSETS[b] and has a prompt of PROMPT_LENS[b] tokens,
# padded to K = max(PROMPT_LENS) with junk tokens that later steps overwrite.
OFFSETS = np.array([0, 2, 1])
PROMPT_LENS = np.array([5, 3, 4])
N_STEPS, SEQ_LEN, CACHE_LEN = 6, 11, 16


def _slot_mask(n_valid_B: np.ndarray, K: int) -> jax.Array:
    """[B, K, S]: query k of row b sees slots OFFSETS[b] .. OFFSETS[b] + n_valid[b] + k."""
    slots = np.arange(CACHE_LEN)
    last_BxK = OFFSETS[:, None] + n_valid_B[:, None] + np.arange(K)
    return jnp.asarray(
        (slots >= OFFSETS[:, None, None]) & (slots <= last_BxK[:, :, None]), dtype=bool
    )


def _prefill(s: Setup, ids_BxT: jax.Array) -> tuple[jax.Array, KVCache]:
    B, K = len(OFFSETS), int(PROMPT_LENS.max())
    junk = _random_ids(s.config, (B, K), 99)
    is_prompt = np.arange(K)[None, :] < PROMPT_LENS[:, None]
    prompt_ids = jnp.where(is_prompt, ids_BxT[:, :K], junk)
    cache = init_cache(s.config, B, CACHE_LEN)
    return s.decode(
        s.state,
        prompt_ids,
        _arange(B, K),
        _slot_mask(np.zeros(B, int), K),
        cache,
        jnp.asarray(OFFSETS, jnp.int32),
    )


def _step(s: Setup, tok_B, n_B: np.ndarray, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Decodes one token per row at logical position n[b] (slot OFFSETS[b] + n[b])."""
    return s.decode(
        s.state,
        jnp.asarray(tok_B, jnp.int32)[:, None],
        jnp.asarray(n_B, jnp.int32)[:, None],
        _slot_mask(n_B, 1),
        cache,
        jnp.asarray(OFFSETS + n_B, jnp.int32),
    )


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_cached_decoding_matches_full_forward(variant):
    s = _setup(variant)
    B = len(OFFSETS)
    ids = _random_ids(s.config, (B, SEQ_LEN), 5)
    full = np.asarray(s.forward(s.state, ids, _arange(B, SEQ_LEN), _causal(B, SEQ_LEN)))
    logits, cache = _prefill(s, ids)
    assert cache.k.shape == (2, B, CACHE_LEN, s.config.n_kv_heads, s.config.head_dim)
    for b in range(B):
        n = PROMPT_LENS[b]
        np.testing.assert_allclose(logits[b, :n], full[b, :n], atol=ATOL, rtol=1e-5)
    rows = np.arange(B)
    for i in range(N_STEPS):
        n_B = PROMPT_LENS + i
        logits, cache = _step(s, ids[rows, n_B], n_B, cache)
        np.testing.assert_allclose(logits[:, 0], full[rows, n_B], atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_rewriting_a_slot_overwrites_it(variant):
    s = _setup(variant)
    B = len(OFFSETS)
    ids = _random_ids(s.config, (B, SEQ_LEN), 6)
    _, cache0 = _prefill(s, ids)
    x_B, y_B = ids[:, 7], (ids[:, 7] + 1) % s.config.n_actions
    logits1, cache1 = _step(s, x_B, PROMPT_LENS, cache0)
    logits2, cache2 = _step(s, x_B, PROMPT_LENS, cache1)  # same token, same slot again
    _, cache_y = _step(s, y_B, PROMPT_LENS, cache0)
    logits3, cache3 = _step(s, x_B, PROMPT_LENS, cache_y)  # a different token, then x
    assert not np.array_equal(cache_y.k, cache1.k)
    for logits, cache in ((logits2, cache2), (logits3, cache3)):
        np.testing.assert_array_equal(logits, logits1)
        np.testing.assert_array_equal(cache.k, cache1.k)
        np.testing.assert_array_equal(cache.v, cache1.v)


def test_gqa_equals_repeated_kv_heads():
    s = _setup("llama")
    cfg = s.config
    group = cfg.n_heads // cfg.n_kv_heads
    assert group > 1
    mha_cfg = dataclasses.replace(cfg, n_kv_heads=cfg.n_heads)
    mha = nnx.eval_shape(lambda: Transformer(mha_cfg, rngs=nnx.Rngs(0)))
    pure = nnx.to_pure_dict(nnx.state(s.model, nnx.Param))
    for blk in pure["blocks"].values():
        for name in ("k_proj", "v_proj"):
            kernel = blk["attn"][name]["kernel"].reshape(cfg.d_model, cfg.n_kv_heads, -1)
            blk["attn"][name]["kernel"] = jnp.repeat(kernel, group, axis=1).reshape(cfg.d_model, -1)
    mha_state = nnx.state(mha, nnx.Param)
    nnx.replace_by_pure_dict(mha_state, pure)
    nnx.update(mha, mha_state)
    B, T = 2, 8
    ids, pos, mask = _random_ids(cfg, (B, T), 7), _arange(B, T), _causal(B, T)
    np.testing.assert_allclose(
        _make_setup(mha_cfg, mha).forward(nnx.state(mha), ids, pos, mask),
        s.forward(s.state, ids, pos, mask),
        atol=ATOL,
        rtol=1e-5,
    )


def test_rope_depends_only_on_relative_positions():
    B, T = 2, 8
    shift_Bx1 = jnp.array([[3], [17]], jnp.int32)
    pos, mask = _arange(B, T), _causal(B, T)
    for variant in ("llama", "gpt2"):
        s = _setup(variant)
        ids = _random_ids(s.config, (B, T), 8)
        base = s.forward(s.state, ids, pos, mask)
        shifted = s.forward(s.state, ids, pos + shift_Bx1, mask)
        if variant == "llama":
            np.testing.assert_allclose(shifted, base, atol=1e-4, rtol=1e-4)
        else:  # learned absolute positions: a shift changes the logits
            assert np.abs(np.asarray(shifted - base)).max() > 1e-2


def test_default_init():
    config = dataclasses.replace(tiny("llama"), tie_embeddings=False, n_layers=8)
    p = _params(Transformer(config, rngs=nnx.Rngs(0)))
    assert p["tok_embed"]["embedding"].shape == (config.n_actions, config.d_model)
    assert p["lm_head"]["kernel"].shape == (config.d_model, config.n_actions)
    np.testing.assert_array_equal(p["final_norm"]["scale"], 1.0)
    kernels = [blk["mlp"]["up_proj"]["kernel"] for blk in p["blocks"].values()]
    np.testing.assert_allclose(np.std(kernels), 0.02, rtol=0.1)
    residual_out = [blk["attn"]["o_proj"]["kernel"] for blk in p["blocks"].values()]
    np.testing.assert_allclose(np.std(residual_out), 0.02 / 4, rtol=0.1)  # 0.02 / sqrt(2 L)


def test_presets():
    gpt2, smol = gpt2_124m(), smollm2_135m()
    assert (gpt2.head_dim, gpt2.n_actions) == (64, 50258)
    assert (smol.head_dim, smol.n_kv_heads, smol.n_actions) == (64, 3, 49153)
    assert tiny("llama").n_kv_heads == 2 and tiny("gpt2").n_kv_heads == 4


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"family": "gpt3"}, "unknown model family 'gpt3'"),
        ({"d_model": 30}, r"d_model \(30\) must be divisible by n_heads \(4\)"),
        ({"n_kv_heads": 3}, r"n_heads \(4\) must be divisible by n_kv_heads \(3\)"),
        ({"n_kv_heads": 2}, "gpt2 has no grouped-query attention"),
        ({"tie_embeddings": False}, "gpt2 always ties"),
        ({"vocab_size": 0}, "vocab_size must be a positive int"),
        ({"dtype": "int8"}, "dtype must be one of"),
    ],
)
def test_config_validation_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(tiny("gpt2"), **overrides)


def test_config_validation_rope_head_dim():
    with pytest.raises(ValueError, match="RoPE needs an even head_dim"):
        dataclasses.replace(tiny("llama"), d_model=36, n_heads=4, n_kv_heads=4)
