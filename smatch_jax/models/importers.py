"""Import pretrained weights (GGUF llama, Hugging Face gpt2 / llama) into `Transformer`.

Every loader produces a `ModelConfig` and a flat dict of float32 numpy arrays keyed by our param
names (``"blocks.3.attn.q_proj.kernel"``, see `transformer.py`), then `build_model` puts them
into an NNX model cast to `param_dtype`. Kernels are transposed to our [in, out] layout.

The `<bkspc>` row. Pretrained vocabularies have V rows; we append row V (the `<bkspc>` action)
to the token embedding and, when untied, to the output layer with `add_bkspc_row`. The default
``init="mean"`` uses the mean of the existing rows (Hewitt, 2021, "Initializing new word
embeddings for pretrained language models"): its logit is then the average of the V token
logits, so by Jensen ``exp(l_bkspc) <= mean_i exp(l_i)`` and ``pi(<bkspc>) <= 1 / (V + 1)`` at
every position, whatever the hidden state. The pretrained next-token distribution is changed by
at most a factor V / (V + 1), i.e. KL(old || new) <= log(1 + 1/V). As an input id (tied tables)
the row is "an average token". Measured with SmolLM2-135M on English prose: pi(<bkspc>) between
6e-13 and 5e-7, median ~3e-10 (log pi ~ -22; the bound is 2e-5). Alternatives: ``"zeros"``
(logit exactly 0, so pi depends on the model's logit scale: where logits are mostly negative,
as is common in GPT-2, it can dominate) and ``"normal"`` (a draw from N(mean, covariance) of
the rows, Hewitt's proposal: looks like a random token, no bound on pi). Hugging Face's
`resize_token_embeddings` default samples N(mean, 1e-9 covariance), i.e. essentially "mean".

GGUF (llama.cpp) q/k rows. llama.cpp's converter permutes the rows of the q and k projections of
each head from the HF rotate_half layout (dims i and i + D/2 are a RoPE pair) into the
interleaved layout (dims 2i and 2i + 1 are a pair); `unpermute_rope_rows` undoes that, since our
model uses rotate_half. GGUF tensors list their dims reversed (``tensor.shape`` = [in, out]); the
dequantised arrays are [out, in] like torch Linear weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from smatch_jax.models.config import ModelConfig
from smatch_jax.models.transformer import Transformer

Params = dict[str, np.ndarray]  # our param name -> array (kernels [in, out])
BKSPC_INITS = ("mean", "zeros", "normal")
# One output param: (our name, source tensor names, fn(*source arrays) -> our array).
_Spec = tuple[str, tuple[str, ...], Callable[..., np.ndarray]]


def add_bkspc_row(
    embedding_VxD: np.ndarray,
    *,
    init: str = "mean",
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """Returns the [V + 1, D] float32 table with the `<bkspc>` row appended (see module doc).

    init: "mean" (default; pi(<bkspc>) <= 1/(V+1) at init), "zeros", or "normal" (a draw from
    the Gaussian with the rows' mean and full covariance; `rng` is a Generator or a seed).
    """
    table = np.asarray(embedding_VxD, np.float32)
    if table.ndim != 2 or table.shape[0] < 1:
        raise ValueError(f"expected a [V, D] table with V >= 1, got shape {table.shape}")
    mean_D = table.mean(axis=0, dtype=np.float64)
    if init == "mean":
        row_D = mean_D
    elif init == "zeros":
        row_D = np.zeros(table.shape[1])
    elif init == "normal":
        cov_DxD = np.cov(table, rowvar=False, dtype=np.float64).reshape(len(mean_D), len(mean_D))
        row_D = np.random.default_rng(rng).multivariate_normal(mean_D, cov_DxD, method="eigh")
    else:
        raise ValueError(f"unknown <bkspc> init {init!r}; expected one of {BKSPC_INITS}")
    return np.concatenate([table, row_D[None].astype(np.float32)], axis=0)


def permute_rope_rows(w_OxI: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate_half -> GGUF interleaved row order (llama.cpp convert_hf_to_gguf `permute`).

    Per head of D rows, GGUF row 2j + c is HF row c * D/2 + j (c in {0, 1}, j < D/2).
    """
    w = np.asarray(w_OxI)
    head_dim = _head_rows(w, n_heads)
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rope_rows(w_OxI: np.ndarray, n_heads: int) -> np.ndarray:
    """GGUF interleaved -> HF rotate_half row order: the inverse of `permute_rope_rows`."""
    w = np.asarray(w_OxI)
    head_dim = _head_rows(w, n_heads)
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _head_rows(w: np.ndarray, n_heads: int) -> int:
    if w.shape[0] % n_heads or (w.shape[0] // n_heads) % 2:
        raise ValueError(f"{w.shape[0]} rows do not split into {n_heads} heads of even size")
    return w.shape[0] // n_heads


# --------------------------------------------------------------------------- numpy <-> NNX


def _name(path: tuple) -> str:
    return ".".join(str(getattr(k, "key", k)) for k in path)


def model_params(model: Transformer) -> Params:
    """The model's parameters as a flat dict of numpy arrays keyed by dotted param names."""
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {_name(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(pure)[0]}


def build_model(config: ModelConfig, params: Mapping[str, np.ndarray]) -> Transformer:
    """A `Transformer` whose parameters are `params` cast to `config.param_dtype`.

    The model is built abstractly (`nnx.eval_shape`, no random init), then every parameter is
    replaced; raises ValueError listing missing, unexpected and wrongly-shaped names.
    """
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state)
    expected = {_name(p): v.shape for p, v in jax.tree_util.tree_flatten_with_path(pure)[0]}
    missing = sorted(set(expected) - set(params))
    unexpected = sorted(set(params) - set(expected))
    bad = sorted(
        f"{n}: got {tuple(np.shape(params[n]))}, expected {tuple(s)}"
        for n, s in expected.items()
        if n in params and tuple(np.shape(params[n])) != tuple(s)
    )
    if missing or unexpected or bad:
        raise ValueError(
            f"params do not match the {config.family} model: missing {missing}, "
            f"unexpected {unexpected}, shape mismatches {bad}"
        )
    dtype = config.params_dtype
    new = jax.tree_util.tree_map_with_path(
        lambda p, _: jnp.asarray(np.asarray(params[_name(p)]), dtype), pure
    )
    nnx.replace_by_pure_dict(state, new)
    nnx.update(model, state)
    abstract = [
        _name(p)
        for p, v in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model)))[0]
        if isinstance(v, jax.ShapeDtypeStruct)
    ]
    if abstract:
        raise ValueError(f"model state left uninitialised (not params): {abstract}")
    return model


def _apply_specs(tensors: Mapping[str, np.ndarray], specs: list[_Spec], ignored, what) -> Params:
    """Evaluates the specs; raises ValueError naming missing or unused source tensors."""
    needed = {s for _, srcs, _ in specs for s in srcs}
    missing = sorted(needed - set(tensors))
    if missing:
        raise ValueError(f"{what} is missing tensors {missing}")
    unused = sorted(n for n in set(tensors) - needed if not ignored(n))
    if unused:
        raise ValueError(f"{what} has tensors the importer does not understand: {unused}")
    return {ours: fn(*(tensors[s] for s in srcs)) for ours, srcs, fn in specs}


def _with_dtypes(config: ModelConfig, dtype: str, param_dtype: str | None) -> ModelConfig:
    return dataclasses.replace(config, dtype=dtype, param_dtype=param_dtype or dtype)


def _t(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.T)


def _vocab_specs(embed: str, lm_head: str | None, init: str) -> list[_Spec]:
    """tok_embed from `embed` and, when untied, lm_head from `lm_head` (both [V, d] tensors)."""
    add = lambda w: add_bkspc_row(w, init=init)
    specs: list[_Spec] = [("tok_embed.embedding", (embed,), add)]
    if lm_head is not None:
        specs.append(("lm_head.kernel", (lm_head,), lambda w: _t(add(w))))
    return specs


# Our name inside blocks.{i} -> (GGUF name inside blk.{i}, HF name inside model.layers.{i}).
_LLAMA_BLOCK = {
    "attn_norm.scale": ("attn_norm", "input_layernorm"),
    "mlp_norm.scale": ("ffn_norm", "post_attention_layernorm"),
    "attn.q_proj.kernel": ("attn_q", "self_attn.q_proj"),
    "attn.k_proj.kernel": ("attn_k", "self_attn.k_proj"),
    "attn.v_proj.kernel": ("attn_v", "self_attn.v_proj"),
    "attn.o_proj.kernel": ("attn_output", "self_attn.o_proj"),
    "mlp.gate_proj.kernel": ("ffn_gate", "mlp.gate_proj"),
    "mlp.up_proj.kernel": ("ffn_up", "mlp.up_proj"),
    "mlp.down_proj.kernel": ("ffn_down", "mlp.down_proj"),
}


def _llama_block_specs(config: ModelConfig, from_gguf: bool) -> list[_Spec]:
    """Per-layer specs of a llama checkpoint whose Linear weights are [out, in] (GGUF or HF).

    GGUF q/k rows are un-permuted from the interleaved RoPE layout; HF ones are already HF.
    """
    heads = {"attn.q_proj.kernel": config.n_heads, "attn.k_proj.kernel": config.n_kv_heads}
    specs: list[_Spec] = []
    for i in range(config.n_layers):
        for ours, names in _LLAMA_BLOCK.items():
            src = (
                f"blk.{i}.{names[0]}.weight" if from_gguf else f"model.layers.{i}.{names[1]}.weight"
            )
            if ours.endswith("scale"):
                fn = np.asarray
            elif from_gguf and ours in heads:
                fn = lambda w, n=heads[ours]: _t(unpermute_rope_rows(w, n))
            else:
                fn = _t
            specs.append((f"blocks.{i}.{ours}", (src,), fn))
    return specs


# --------------------------------------------------------------------------- GGUF


def load_gguf_llama(
    path: str | os.PathLike, *, bkspc_init: str = "mean"
) -> tuple[ModelConfig, Params]:
    """Reads a llama-architecture GGUF file: (config, float32 params with the `<bkspc>` row).

    Quantised tensors are dequantised to float32; q/k rows are un-permuted to HF order.
    """
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = reader.fields

    def meta(key: str, default: object = ...) -> object:
        if key in fields:
            return fields[key].contents()
        if default is ...:
            raise ValueError(f"GGUF {path} lacks metadata field {key!r}")
        return default

    arch = meta("general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF {path}: architecture {arch!r} is not supported (only 'llama')")
    scaling = meta("llama.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise ValueError(f"GGUF {path}: RoPE scaling {scaling!r} is not supported")
    tensors: Params = {}
    for t in reader.tensors:
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        if w.shape != tuple(int(n) for n in reversed(t.shape)):  # GGUF lists dims reversed
            raise ValueError(f"GGUF tensor {t.name}: dequantised {w.shape}, header {t.shape}")
        tensors[t.name] = w
    if "token_embd.weight" not in tensors:
        raise ValueError(f"GGUF {path} is missing tensor 'token_embd.weight'")
    V = tensors["token_embd.weight"].shape[0]
    n_vocab = len(meta("tokenizer.ggml.tokens", [])) or int(meta("llama.vocab_size", V))
    if n_vocab != V:
        raise ValueError(f"GGUF {path}: vocabulary has {n_vocab} tokens, token_embd {V} rows")
    d = int(meta("llama.embedding_length"))
    n_heads = int(meta("llama.attention.head_count"))
    n_kv = int(meta("llama.attention.head_count_kv", n_heads))
    rope_dim = int(meta("llama.rope.dimension_count", d // n_heads))
    if rope_dim != d // n_heads:
        raise ValueError(f"GGUF {path}: partial RoPE ({rope_dim} of {d // n_heads}) unsupported")
    tied = "output.weight" not in tensors
    config = ModelConfig(
        family="llama",
        vocab_size=V,
        d_model=d,
        n_layers=int(meta("llama.block_count")),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        d_ff=int(meta("llama.feed_forward_length")),
        max_positions=int(meta("llama.context_length", 2048)),
        rope_theta=float(meta("llama.rope.freq_base", 10_000.0)),
        norm_eps=float(f"{meta('llama.attention.layer_norm_rms_epsilon'):.7g}"),  # stored as f32
        tie_embeddings=tied,
        use_bias=False,
    )
    specs = _llama_block_specs(config, from_gguf=True)
    specs += _vocab_specs("token_embd.weight", None if tied else "output.weight", bkspc_init)
    specs.append(("final_norm.scale", ("output_norm.weight",), np.asarray))
    return config, _apply_specs(tensors, specs, lambda n: False, f"GGUF {path}")


def smollm2(
    path: str | os.PathLike | None = None,
    *,
    dtype: str = "float32",
    param_dtype: str | None = None,
    bkspc_init: str = "mean",
) -> Transformer:
    """SmolLM2-135M-Instruct from the `smollm2` asset GGUF (or `path`), with a `<bkspc>` row.

    `dtype` is the compute dtype; `param_dtype` defaults to `dtype`.
    """
    from smatch_jax import assets

    config, params = load_gguf_llama(path or assets.path("smollm2"), bkspc_init=bkspc_init)
    return build_model(_with_dtypes(config, dtype, param_dtype), params)


# --------------------------------------------------------------------------- Hugging Face


def read_safetensors_dir(directory: str | os.PathLike) -> Params:
    """All tensors of a HF checkpoint directory (sharded via model.safetensors.index.json or
    plain *.safetensors files) as float32 numpy arrays."""
    from safetensors import safe_open

    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {directory} (torch .bin is not supported)")
    out: Params = {}
    for name in files:
        with safe_open(str(directory / name), framework="np") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                out[key] = np.asarray(f.get_tensor(key), np.float32)
    return out


def _cfg(config: Mapping, key: str, default: object = ..., *, alt: str | None = None) -> object:
    for k in (key, alt):
        if k is not None and config.get(k) is not None:
            return config[k]
    if default is ...:
        raise ValueError(f"config.json lacks {key!r}")
    return default


def _hf_gpt2(hf: Mapping, tensors: Params, bkspc_init: str) -> tuple[ModelConfig, Params]:
    act = _cfg(hf, "activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        raise ValueError(f"gpt2 activation_function {act!r} unsupported (need tanh-GELU)")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
        raise ValueError("gpt2 with non-standard attention scaling is not supported")
    if hf.get("add_cross_attention"):
        raise ValueError("gpt2 with cross-attention is not supported")
    tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    if "wte.weight" not in tensors:
        raise ValueError("gpt2 checkpoint is missing tensor 'wte.weight'")
    V, d = tensors["wte.weight"].shape
    if int(_cfg(hf, "vocab_size", V)) != V:
        raise ValueError(f"config vocab_size {hf['vocab_size']} != wte rows {V}")
    lm_head = tensors.get("lm_head.weight")
    if lm_head is not None and not np.array_equal(lm_head, tensors["wte.weight"]):
        raise ValueError("gpt2 lm_head.weight differs from wte.weight; only tied gpt2 is supported")
    config = ModelConfig(
        family="gpt2",
        vocab_size=V,
        d_model=int(_cfg(hf, "n_embd", alt="hidden_size")),
        n_layers=int(_cfg(hf, "n_layer", alt="num_hidden_layers")),
        n_heads=int(_cfg(hf, "n_head", alt="num_attention_heads")),
        n_kv_heads=int(_cfg(hf, "n_head", alt="num_attention_heads")),
        d_ff=int(_cfg(hf, "n_inner", 4 * d)),
        max_positions=int(_cfg(hf, "n_positions", alt="n_ctx")),
        norm_eps=float(_cfg(hf, "layer_norm_epsilon", 1e-5)),
        tie_embeddings=True,
        use_bias=True,
    )
    specs = _vocab_specs("wte.weight", None, bkspc_init)
    specs += [
        ("pos_embed.embedding", ("wpe.weight",), np.asarray),
        ("final_norm.scale", ("ln_f.weight",), np.asarray),
        ("final_norm.bias", ("ln_f.bias",), np.asarray),
    ]
    for i in range(config.n_layers):
        b, h = f"blocks.{i}", f"h.{i}"
        for j, qkv in enumerate("qkv"):  # c_attn is a Conv1D [d, 3d]: columns q | k | v
            cut = lambda w, j=j: np.ascontiguousarray(w[..., j * d : (j + 1) * d])
            specs.append((f"{b}.attn.{qkv}_proj.kernel", (f"{h}.attn.c_attn.weight",), cut))
            specs.append((f"{b}.attn.{qkv}_proj.bias", (f"{h}.attn.c_attn.bias",), cut))
        pairs = [
            ("attn_norm", "ln_1"),
            ("mlp_norm", "ln_2"),
            ("attn.o_proj", "attn.c_proj"),
            ("mlp.up_proj", "mlp.c_fc"),
            ("mlp.down_proj", "mlp.c_proj"),
        ]
        for ours, theirs in pairs:  # Conv1D weights are already [in, out]
            w_name = "scale" if ours.endswith("norm") else "kernel"
            specs.append((f"{b}.{ours}.{w_name}", (f"{h}.{theirs}.weight",), np.asarray))
            specs.append((f"{b}.{ours}.bias", (f"{h}.{theirs}.bias",), np.asarray))
    ignored = lambda n: n == "lm_head.weight" or n.endswith((".attn.bias", ".attn.masked_bias"))
    return config, _apply_specs(tensors, specs, ignored, "gpt2 checkpoint")


def _hf_llama(hf: Mapping, tensors: Params, bkspc_init: str) -> tuple[ModelConfig, Params]:
    if _cfg(hf, "hidden_act", "silu") != "silu":
        raise ValueError(f"llama hidden_act {hf['hidden_act']!r} unsupported (need 'silu')")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError("llama with attention_bias / mlp_bias is not supported")
    rope = dict(hf.get("rope_parameters") or {})  # transformers >= 5 nests rope_theta here
    if hf.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        raise ValueError(f"llama RoPE scaling {hf.get('rope_scaling') or rope} unsupported")
    d, n_heads = int(_cfg(hf, "hidden_size")), int(_cfg(hf, "num_attention_heads"))
    if int(_cfg(hf, "head_dim", d // n_heads)) != d // n_heads:
        raise ValueError(f"llama head_dim {hf['head_dim']} != hidden_size / heads")
    if "model.embed_tokens.weight" not in tensors:
        raise ValueError("llama checkpoint is missing tensor 'model.embed_tokens.weight'")
    V = tensors["model.embed_tokens.weight"].shape[0]
    if int(_cfg(hf, "vocab_size", V)) != V:
        raise ValueError(f"config vocab_size {hf['vocab_size']} != embed_tokens rows {V}")
    tied = bool(_cfg(hf, "tie_word_embeddings", False))  # LlamaConfig's default is untied
    config = ModelConfig(
        family="llama",
        vocab_size=V,
        d_model=d,
        n_layers=int(_cfg(hf, "num_hidden_layers")),
        n_heads=n_heads,
        n_kv_heads=int(_cfg(hf, "num_key_value_heads", n_heads)),
        d_ff=int(_cfg(hf, "intermediate_size")),
        max_positions=int(_cfg(hf, "max_position_embeddings", 2048)),
        rope_theta=float(rope.get("rope_theta") or _cfg(hf, "rope_theta", 10_000.0)),
        norm_eps=float(_cfg(hf, "rms_norm_eps", 1e-6)),
        tie_embeddings=tied,
        use_bias=False,
    )
    specs = _llama_block_specs(config, from_gguf=False)
    specs += _vocab_specs(
        "model.embed_tokens.weight", None if tied else "lm_head.weight", bkspc_init
    )
    specs.append(("final_norm.scale", ("model.norm.weight",), np.asarray))
    ignored = lambda n: n.endswith("rotary_emb.inv_freq") or (tied and n == "lm_head.weight")
    return config, _apply_specs(tensors, specs, ignored, "llama checkpoint")


_HF_FAMILIES = {"gpt2": _hf_gpt2, "llama": _hf_llama}


def load_hf_params(
    directory: str | os.PathLike, *, bkspc_init: str = "mean"
) -> tuple[ModelConfig, Params]:
    """Reads a HF checkpoint directory (config.json + safetensors): (config, float32 params)."""
    config_path = Path(directory) / "config.json"
    if not config_path.exists():
        raise ValueError(f"{directory} has no config.json")
    hf = json.loads(config_path.read_text())
    model_type = hf.get("model_type")
    if model_type not in _HF_FAMILIES:
        raise ValueError(
            f"unsupported model_type {model_type!r} in {config_path}; "
            f"supported: {sorted(_HF_FAMILIES)}"
        )
    return _HF_FAMILIES[model_type](hf, read_safetensors_dir(directory), bkspc_init)


def load_hf(
    directory: str | os.PathLike,
    *,
    dtype: str = "float32",
    param_dtype: str | None = None,
    bkspc_init: str = "mean",
) -> Transformer:
    """A `Transformer` from a local HF gpt2 / llama checkpoint directory, with a `<bkspc>` row."""
    config, params = load_hf_params(directory, bkspc_init=bkspc_init)
    return build_model(_with_dtypes(config, dtype, param_dtype), params)
