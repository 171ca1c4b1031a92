"""Tests of `smatch_jax.models.convert`: HF / GGUF weight import and the `<bkspc>` row.

HF checkpoints are written from random arrays in the exact HF naming and layout (Conv1D [in, out]
for gpt2, torch Linear [out, in] for llama), loaded with `load_hf`, and the logits compared with
an independent float64 numpy forward that follows HF semantics on the raw HF arrays. The slow
tests run the real SmolLM2-135M-Instruct GGUF asset.
"""

from __future__ import annotations

import json

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from smatch_jax.models import smollm2_135m
from smatch_jax.models.attention import rope_rotate
from smatch_jax.models.convert import (
    add_bkspc_row,
    load_gguf_llama,
    load_hf,
    load_hf_params,
    model_from_params,
    model_params,
    permute_rope_rows,
    unpermute_rope_rows,
)

ATOL = 2e-5
GPT2 = dict(vocab_size=23, n_embd=32, n_layer=2, n_head=4, n_positions=16, n_inner=48)
LLAMA = dict(
    vocab_size=29,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=48,
    max_position_embeddings=64,
    rope_theta=500.0,
    rms_norm_eps=1e-6,
)


# --------------------------------------------------------------------------- HF checkpoints


def _hf_gpt2_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    V, d, L, P, F = (GPT2[k] for k in ("vocab_size", "n_embd", "n_layer", "n_positions", "n_inner"))
    lin = lambda i, o: (rng.standard_normal((i, o)) / np.sqrt(i), 0.2 * rng.standard_normal(o))
    norm = lambda: (1 + 0.2 * rng.standard_normal(d), 0.2 * rng.standard_normal(d))
    t = {"wte.weight": rng.standard_normal((V, d)), "wpe.weight": rng.standard_normal((P, d))}
    for i in range(L):
        for name, (w, b) in {
            "ln_1": norm(),
            "attn.c_attn": lin(d, 3 * d),  # Conv1D: [in, out]
            "attn.c_proj": lin(d, d),
            "ln_2": norm(),
            "mlp.c_fc": lin(d, F),
            "mlp.c_proj": lin(F, d),
        }.items():
            t[f"h.{i}.{name}.weight"], t[f"h.{i}.{name}.bias"] = w, b
    t["ln_f.weight"], t["ln_f.bias"] = norm()
    return {k: v.astype(np.float32) for k, v in t.items()}


def _hf_llama_arrays(tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    V, d, L, F = (
        LLAMA[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size")
    )
    kv = LLAMA["num_key_value_heads"] * d // LLAMA["num_attention_heads"]
    lin = lambda o, i: rng.standard_normal((o, i)) / np.sqrt(i)  # torch Linear: [out, in]
    t = {"model.embed_tokens.weight": rng.standard_normal((V, d))}
    for i in range(L):
        p = f"model.layers.{i}"
        t[f"{p}.input_layernorm.weight"] = 1 + 0.2 * rng.standard_normal(d)
        t[f"{p}.post_attention_layernorm.weight"] = 1 + 0.2 * rng.standard_normal(d)
        for name, shape in {"q": (d, d), "k": (kv, d), "v": (kv, d), "o": (d, d)}.items():
            t[f"{p}.self_attn.{name}_proj.weight"] = lin(*shape)
        for name, shape in {"gate": (F, d), "up": (F, d), "down": (d, F)}.items():
            t[f"{p}.mlp.{name}_proj.weight"] = lin(*shape)
    t["model.norm.weight"] = 1 + 0.2 * rng.standard_normal(d)
    if not tied:
        t["lm_head.weight"] = rng.standard_normal((V, d))
    return {k: v.astype(np.float32) for k, v in t.items()}


def _write_hf(directory, config: dict, tensors: dict[str, np.ndarray], shards: int = 1) -> None:
    """config.json + model.safetensors, or `shards` files with model.safetensors.index.json."""
    (directory / "config.json").write_text(json.dumps(config))
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    names, weight_map = sorted(tensors), {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())}}
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({**index, "weight_map": weight_map})
    )


# --------------------------------------------------------------------------- HF numpy forward


def _softmax_attention(q_THD, k_THD, v_THD):
    T, _, D = q_THD.shape
    s = np.einsum("thd,shd->hts", q_THD, k_THD) / np.sqrt(D)
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("hts,shd->thd", w / w.sum(-1, keepdims=True), v_THD).reshape(T, -1)


def _hf_gpt2_forward(t: dict, ids: np.ndarray) -> np.ndarray:
    """GPT2LMHeadModel logits [T, V] in float64, from the HF arrays."""
    t = {k: v.astype(np.float64) for k, v in t.items()}
    H, T = GPT2["n_head"], len(ids)

    def ln(x, n):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * t[f"{n}.weight"] + t[f"{n}.bias"]

    conv1d = lambda x, n: x @ t[f"{n}.weight"] + t[f"{n}.bias"]
    x = t["wte.weight"][ids] + t["wpe.weight"][np.arange(T)]
    for i in range(GPT2["n_layer"]):
        q, k, v = np.split(conv1d(ln(x, f"h.{i}.ln_1"), f"h.{i}.attn.c_attn"), 3, axis=-1)
        q, k, v = (a.reshape(T, H, -1) for a in (q, k, v))
        x = x + conv1d(_softmax_attention(q, k, v), f"h.{i}.attn.c_proj")
        u = conv1d(ln(x, f"h.{i}.ln_2"), f"h.{i}.mlp.c_fc")
        gelu_new = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u**3)))
        x = x + conv1d(gelu_new, f"h.{i}.mlp.c_proj")
    return ln(x, "ln_f") @ t["wte.weight"].T


def _hf_llama_forward(t: dict, ids: np.ndarray) -> np.ndarray:
    """LlamaForCausalLM logits [T, V] in float64 (rotate_half RoPE, repeat_kv), from HF arrays."""
    t = {k: v.astype(np.float64) for k, v in t.items()}
    H, K, T = LLAMA["num_attention_heads"], LLAMA["num_key_value_heads"], len(ids)
    D = LLAMA["hidden_size"] // H
    inv_freq = 1.0 / LLAMA["rope_theta"] ** (np.arange(0, D, 2) / D)
    emb = np.concatenate([np.outer(np.arange(T), inv_freq)] * 2, axis=-1)[:, None, :]
    rotate_half = lambda x: np.concatenate([-x[..., D // 2 :], x[..., : D // 2]], axis=-1)
    rope = lambda x: x * np.cos(emb) + rotate_half(x) * np.sin(emb)
    rms = lambda x, n: x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6) * t[n]
    x = t["model.embed_tokens.weight"][ids]
    for i in range(LLAMA["num_hidden_layers"]):
        p = f"model.layers.{i}"
        lin = lambda x, n, p=p: x @ t[f"{p}.{n}.weight"].T
        h = rms(x, f"{p}.input_layernorm.weight")
        q = rope(lin(h, "self_attn.q_proj").reshape(T, H, D))
        k = np.repeat(rope(lin(h, "self_attn.k_proj").reshape(T, K, D)), H // K, axis=1)
        v = np.repeat(lin(h, "self_attn.v_proj").reshape(T, K, D), H // K, axis=1)
        x = x + lin(_softmax_attention(q, k, v), "self_attn.o_proj")
        h = rms(x, f"{p}.post_attention_layernorm.weight")
        g = lin(h, "mlp.gate_proj")
        x = x + lin(g / (1 + np.exp(-g)) * lin(h, "mlp.up_proj"), "mlp.down_proj")
    out = t.get("lm_head.weight", t["model.embed_tokens.weight"])
    return rms(x, "model.norm.weight") @ out.T


def _our_logits(model, ids: np.ndarray) -> np.ndarray:
    T = len(ids)
    mask = jnp.tril(jnp.ones((T, T), bool))[None]
    return np.asarray(model(jnp.asarray(ids)[None], jnp.arange(T)[None], mask)[0], np.float64)


def _check_logits(model, hf_logits_TxV: np.ndarray, ids) -> None:
    ours = _our_logits(model, ids)
    V = hf_logits_TxV.shape[1]
    assert ours.shape == (len(ids), V + 1)
    np.testing.assert_allclose(ours[:, :V], hf_logits_TxV, atol=ATOL, rtol=1e-5)
    # <bkspc> ("mean" init): its logit is the average token logit, so pi <= 1/(V+1).
    np.testing.assert_allclose(ours[:, V], hf_logits_TxV.mean(-1), atol=ATOL)
    lse = np.log(np.exp(ours - ours.max(-1, keepdims=True)).sum(-1)) + ours.max(-1)
    assert (np.exp(ours[:, V] - lse) <= 1 / (V + 1) + 1e-9).all()


# --------------------------------------------------------------------------- tests: HF


@pytest.mark.parametrize("prefix", ["", "transformer."])
def test_hf_gpt2_matches_numpy_forward(tmp_path, prefix):
    t = _hf_gpt2_arrays()
    on_disk = {prefix + k: v for k, v in t.items()}
    on_disk[f"{prefix}h.0.attn.bias"] = np.tril(np.ones((16, 16), np.float32))  # causal buffer
    _write_hf(tmp_path, {"model_type": "gpt2", "activation_function": "gelu_new", **GPT2}, on_disk)
    model = load_hf(tmp_path)
    assert model.config.family == "gpt2" and model.config.d_ff == GPT2["n_inner"]
    ids = np.array([3, 0, 22, 7, 7, 15, 1, 9, 4, 12])
    _check_logits(model, _hf_gpt2_forward(t, ids), ids)


@pytest.mark.parametrize(("tied", "shards"), [(True, 1), (False, 3)])
def test_hf_llama_matches_numpy_forward(tmp_path, tied, shards):
    t = _hf_llama_arrays(tied)
    config = {"model_type": "llama", "hidden_act": "silu", "tie_word_embeddings": tied, **LLAMA}
    _write_hf(tmp_path, config, t, shards=shards)
    model = load_hf(tmp_path)
    cfg = model.config
    assert (cfg.tie_embeddings, cfg.n_kv_heads, cfg.rope_theta) == (tied, 2, 500.0)
    ids = np.array([28, 0, 5, 5, 17, 3, 9, 1, 26, 11, 2])
    _check_logits(model, _hf_llama_forward(t, ids), ids)
    scanned = load_hf(tmp_path, scan_layers=True)  # the blocks stacked, under jax.lax.scan
    assert scanned.config.scan_layers and not cfg.scan_layers
    _check_logits(scanned, _hf_llama_forward(t, ids), ids)


def test_load_hf_dtype_and_bkspc_row(tmp_path):
    t = _hf_llama_arrays(tied=False)
    _write_hf(tmp_path, {"model_type": "llama", **LLAMA}, t)  # LlamaConfig default: untied
    model = load_hf(tmp_path, dtype="bfloat16", bkspc_init="zeros")
    params = model_params(model)
    assert params["tok_embed.embedding"].dtype == jnp.bfloat16
    assert params["lm_head.kernel"].shape == (LLAMA["hidden_size"], LLAMA["vocab_size"] + 1)
    assert not params["lm_head.kernel"][:, -1].astype(np.float32).any()


def test_hf_errors(tmp_path):
    t = _hf_llama_arrays(tied=True)
    _write_hf(tmp_path, {"model_type": "mamba", **LLAMA}, t)
    with pytest.raises(ValueError, match="unsupported model_type 'mamba'"):
        load_hf(tmp_path)
    missing = {k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight"}
    (tmp_path / "model.safetensors").unlink()
    _write_hf(tmp_path, {"model_type": "llama", "tie_word_embeddings": True, **LLAMA}, missing)
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.1.mlp.up_proj.weight"):
        load_hf(tmp_path)
    _write_hf(
        tmp_path,
        {"model_type": "llama", "tie_word_embeddings": True, **LLAMA},
        {**t, "x": t["model.norm.weight"]},
    )
    with pytest.raises(ValueError, match=r"does not understand: \['x'\]"):
        load_hf(tmp_path)


def test_build_model_reports_mismatches(tmp_path):
    _write_hf(tmp_path, {"model_type": "gpt2", **GPT2}, _hf_gpt2_arrays())
    config, params = load_hf_params(tmp_path)
    params["final_norm.scale"] = params["final_norm.scale"][:-1]
    del params["blocks.1.mlp.up_proj.bias"]
    with pytest.raises(ValueError, match=r"missing \['blocks.1.mlp.up_proj.bias'\].*final_norm"):
        model_from_params(config, params)


# --------------------------------------------------------------------------- tests: <bkspc> row


def test_add_bkspc_row():
    rng = np.random.default_rng(0)
    E = rng.standard_normal((50, 6)).astype(np.float32) + 3.0
    for init in ("mean", "zeros", "normal"):
        out = add_bkspc_row(E, init=init, rng=1)
        assert out.shape == (51, 6) and out.dtype == np.float32
        np.testing.assert_array_equal(out[:50], E)
    np.testing.assert_allclose(add_bkspc_row(E)[-1], E.mean(0), rtol=1e-6)
    assert not add_bkspc_row(E, init="zeros")[-1].any()
    np.testing.assert_array_equal(
        add_bkspc_row(E, init="normal", rng=5), add_bkspc_row(E, init="normal", rng=5)
    )
    h = rng.standard_normal((200, 6)) * 3  # Jensen: mean row => pi(<bkspc>) <= 1/(V+1)
    logits = h @ add_bkspc_row(E).T.astype(np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    assert (p[:, -1] / p.sum(-1) <= 1 / 51).all()
    with pytest.raises(ValueError, match="unknown <bkspc> init"):
        add_bkspc_row(E, init="ones")


# --------------------------------------------------------------------------- tests: GGUF


def test_rope_row_permutation_inverse():
    rng = np.random.default_rng(0)
    n_heads, D = 3, 8
    w = rng.standard_normal((n_heads * D, 5))
    g = permute_rope_rows(w, n_heads)
    np.testing.assert_array_equal(unpermute_rope_rows(g, n_heads), w)
    np.testing.assert_array_equal(permute_rope_rows(unpermute_rope_rows(w, n_heads), n_heads), w)
    for h in range(n_heads):  # GGUF row 2j + c of a head is HF row c * D/2 + j
        for j in range(D // 2):
            for c in range(2):
                np.testing.assert_array_equal(g[h * D + 2 * j + c], w[h * D + c * D // 2 + j])
    with pytest.raises(ValueError, match="heads of even size"):
        unpermute_rope_rows(w[:-1], n_heads)


def test_interleaved_rope_on_gguf_equals_rotate_half_on_unpermuted():
    """llama.cpp rotates lanes (2i, 2i+1) of GGUF-layout q/k; we rotate (i, i+D/2) of HF ones."""
    rng = np.random.default_rng(1)
    T, d, H, K, D, theta = 6, 16, 4, 2, 8, 100.0
    x = rng.standard_normal((T, d))
    wq_gguf, wk_gguf = rng.standard_normal((H * D, d)), rng.standard_normal((K * D, d))
    pos = np.array([0, 1, 2, 5, 9, 30])

    def interleaved(x_THD):
        angle = pos[:, None, None] * theta ** (-np.arange(0, D, 2) / D)
        z = (x_THD[..., 0::2] + 1j * x_THD[..., 1::2]) * np.exp(1j * angle)
        return np.stack([z.real, z.imag], axis=-1).reshape(x_THD.shape)

    def scores(q, k):
        return np.einsum("thd,shd->hts", q, np.repeat(k, H // K, axis=1))

    ref = scores(
        interleaved((x @ wq_gguf.T).reshape(T, H, D)), interleaved((x @ wk_gguf.T).reshape(T, K, D))
    )

    def half(w_gguf, n):  # our model's rope_rotate on un-permuted projections
        x_1THD = jnp.asarray((x @ unpermute_rope_rows(w_gguf, n).T).reshape(1, T, n, D))
        return np.asarray(rope_rotate(x_1THD, jnp.asarray(pos)[None], theta)[0], np.float64)

    np.testing.assert_allclose(scores(half(wq_gguf, H), half(wk_gguf, K)), ref, atol=1e-4)


_HF_TO_GGUF = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    **{f"self_attn.{c}_proj": f"attn_{c}" for c in "qkv"},
    "self_attn.o_proj": "attn_output",
    **{f"mlp.{c}_proj": f"ffn_{c}" for c in ("gate", "up", "down")},
}


def _write_tiny_gguf(path, t: dict[str, np.ndarray], quantize_q: bool) -> None:
    """A llama GGUF as llama.cpp writes it: permuted q/k rows, [out, in] arrays, metadata."""
    H, K = LLAMA["num_attention_heads"], LLAMA["num_key_value_heads"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LLAMA["num_hidden_layers"])
    w.add_context_length(LLAMA["max_position_embeddings"])
    w.add_embedding_length(LLAMA["hidden_size"])
    w.add_feed_forward_length(LLAMA["intermediate_size"])
    w.add_head_count(H)
    w.add_head_count_kv(K)
    w.add_rope_freq_base(LLAMA["rope_theta"])
    w.add_layer_norm_rms_eps(LLAMA["rms_norm_eps"])
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"tok{i}" for i in range(LLAMA["vocab_size"])])
    names = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output"}
    for name, a in t.items():
        parts = name.removeprefix("model.").split(".")
        if parts[0] != "layers":
            w.add_tensor(f"{names[parts[0]]}.weight", a)
            continue
        i, kind = parts[1], ".".join(parts[2:-1])
        if kind in ("self_attn.q_proj", "self_attn.k_proj"):
            a = permute_rope_rows(a, H if kind == "self_attn.q_proj" else K)
        if quantize_q and kind == "self_attn.q_proj":
            q8 = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(
                f"blk.{i}.{_HF_TO_GGUF[kind]}.weight", gguf.quants.quantize(a, q8), raw_dtype=q8
            )
        else:
            w.add_tensor(f"blk.{i}.{_HF_TO_GGUF[kind]}.weight", a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_loader_matches_hf_loader(tmp_path, tied):
    t = _hf_llama_arrays(tied, seed=2)
    _write_tiny_gguf(tmp_path / "tiny.gguf", t, quantize_q=tied)
    if tied:  # Q8_0 rows quantise blockwise along `in`, so they commute with the row permutation
        q8 = gguf.GGMLQuantizationType.Q8_0
        for i in range(LLAMA["num_hidden_layers"]):
            n = f"model.layers.{i}.self_attn.q_proj.weight"
            t[n] = gguf.quants.dequantize(gguf.quants.quantize(t[n], q8), q8)
    _write_hf(tmp_path, {"model_type": "llama", "tie_word_embeddings": tied, **LLAMA}, t)
    config, params = load_gguf_llama(tmp_path / "tiny.gguf")
    hf_config, hf_params = load_hf_params(tmp_path)
    assert config == hf_config
    assert params.keys() == hf_params.keys()
    for name, a in params.items():
        np.testing.assert_array_equal(a, hf_params[name], err_msg=name)


# --------------------------------------------------------------------------- tests: SmolLM2

PROSE = (
    "The United States of America is a country in North America. It is made up of fifty states "
    "and a federal district. The capital is Washington, D.C., and the largest city is New York "
    "City. The country has a population of more than three hundred million people."
)


SMOL_T = 64  # every SmolLM2 forward is padded to this length: one compilation


@pytest.fixture(scope="module")
def smol():
    """(model, tokenizer, forward(ids) -> float64 logits [len(ids), V+1]) for SmolLM2-135M."""
    import jax
    from flax import nnx

    from smatch_jax import assets
    from smatch_jax.data.tokenizers import get_tokenizer
    from smatch_jax.models.convert import smollm2

    assets.fetch("smollm2")
    model = smollm2()
    graphdef, state = nnx.split(model)
    causal = jnp.tril(jnp.ones((SMOL_T, SMOL_T), bool))[None]
    jitted = jax.jit(lambda st, ids: nnx.merge(graphdef, st)(ids, jnp.arange(SMOL_T)[None], causal))

    def forward(ids: list[int]) -> np.ndarray:
        padded = np.zeros((1, SMOL_T), np.int32)  # causal: padding never affects ids' logits
        padded[0, : len(ids)] = ids
        return np.asarray(jitted(state, jnp.asarray(padded))[0, : len(ids)], np.float64)

    return model, get_tokenizer("smollm2"), forward


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@pytest.mark.slow
def test_smollm2_config(smol):
    model, tok, _ = smol
    assert model.config == smollm2_135m()
    assert tok.vocab_size == model.config.vocab_size


@pytest.mark.slow
def test_smollm2_greedy_paris(smol):
    model, tok, forward = smol
    ids = tok.encode("The capital of France is")
    prompt_len = len(ids)
    for _ in range(5):  # naive greedy: full causal forward on the growing sequence
        ids.append(int(np.argmax(forward(ids)[-1, : model.config.vocab_size])))
    assert tok.decode(ids[prompt_len:]).startswith(" Paris")


@pytest.mark.slow
def test_smollm2_perplexity_and_initial_bkspc_probability(smol):
    model, tok, forward = smol
    V = model.config.vocab_size
    ids = tok.encode(PROSE)
    logits = forward(ids)
    nll = -_log_softmax(logits[:-1, :V])[np.arange(len(ids) - 1), ids[1:]]
    assert np.exp(nll.mean()) < 10  # measured 5.21 (Q4_1 weights, float32)
    pi_bkspc = np.exp(_log_softmax(logits)[:, V])
    assert (pi_bkspc <= 1 / (V + 1)).all()  # the "mean" init bound
    assert (pi_bkspc > 1e-15).all()  # measured 6e-13 .. 1e-7, median 2.5e-10


def test_npz_checkpoint_round_trip_hash_and_tokenizer_checks(tmp_path):
    """Our small-checkpoint format: the same logits after a round trip, a content hash that
    ignores the zip container, and clear errors for another file or another tokenizer."""
    from flax import nnx

    from smatch_jax.data.tokenizers import CharTokenizer
    from smatch_jax.models import Transformer, tiny
    from smatch_jax.models.convert import load_npz, save_npz
    from smatch_jax.models.factory import ModelSpec, build_model

    tok = CharTokenizer("abcdefghijklmno")  # 15 chars + eos, pad = 17 ids: tiny's vocabulary
    model = Transformer(tiny("llama"), rngs=nnx.Rngs(3))
    vocab = [tok.decode([i]) for i in range(tok.vocab_size)]
    path = tmp_path / "base.npz"
    sha = save_npz(model, path, vocab)
    again = tmp_path / "again.npz"
    assert save_npz(model, again, vocab) == sha  # written twice: one content hash
    loaded, got_vocab = load_npz(path, sha256=sha)
    assert got_vocab == vocab and loaded.config == model.config
    ids = jnp.arange(6)[None] % 17
    causal = jnp.tril(jnp.ones((1, 6, 6), bool))
    np.testing.assert_array_equal(
        model(ids, jnp.arange(6)[None], causal), loaded(ids, jnp.arange(6)[None], causal)
    )
    with pytest.raises(ValueError, match=r"content hash .* expected 0+: the file is not the one"):
        load_npz(path, sha256="0" * 64)
    spec = ModelSpec(init=f"npz:{path}", init_sha256=sha)
    built = build_model(spec, vocab_size=17, seq_len=8, seed=0, tokenizer=tok)
    assert built.config == model.config
    other = CharTokenizer("onmlkjihgfedcba")
    with pytest.raises(ValueError, match="different tokenizer"):
        build_model(spec, vocab_size=17, seq_len=8, seed=0, tokenizer=other)
