"""Hugging Face checkpoints (config.json + safetensors): GPT-2 and Llama."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from smatch_jax.models.config import ModelConfig
from smatch_jax.models.convert.common import (
    Params,
    apply_specs,
    llama_block_specs,
    model_from_params,
    vocab_specs,
    with_dtypes,
)
from smatch_jax.models.transformer import Transformer


def safetensors_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of a HF checkpoint directory: those model.safetensors.index.json
    names, else every *.safetensors file."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {directory} (torch .bin is not supported)")
    return [directory / name for name in files]


def read_safetensors_dir(directory: str | os.PathLike) -> Params:
    """All tensors of a HF checkpoint directory (sharded via model.safetensors.index.json or
    plain *.safetensors files) as float32 numpy arrays."""
    from safetensors import safe_open

    out: Params = {}
    for path in safetensors_files(directory):
        with safe_open(str(path), framework="np") as f:
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


# Our name inside blocks.{i} -> GPT-2's inside h.{i}: Conv1D weights, already [in, out].
GPT2_BLOCK = {
    "attn_norm": "ln_1",
    "mlp_norm": "ln_2",
    "attn.o_proj": "attn.c_proj",
    "mlp.up_proj": "mlp.c_fc",
    "mlp.down_proj": "mlp.c_proj",
}


def gpt2_ignored(name: str) -> bool:
    """Tensors of a GPT-2 checkpoint that hold no weights of ours (prefix removed)."""
    return name == "lm_head.weight" or name.endswith((".attn.bias", ".attn.masked_bias"))


def gpt2_config(hf: Mapping, shapes: Mapping[str, tuple]) -> ModelConfig:
    """The `ModelConfig` of a GPT-2 checkpoint from config.json and its tensors' shapes (names
    without the "transformer." prefix)."""
    act = _cfg(hf, "activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        raise ValueError(f"gpt2 activation_function {act!r} unsupported (need tanh-GELU)")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
        raise ValueError("gpt2 with non-standard attention scaling is not supported")
    if hf.get("add_cross_attention"):
        raise ValueError("gpt2 with cross-attention is not supported")
    if "wte.weight" not in shapes:
        raise ValueError("gpt2 checkpoint is missing tensor 'wte.weight'")
    V, d = shapes["wte.weight"]
    if int(_cfg(hf, "vocab_size", V)) != V:
        raise ValueError(f"config vocab_size {hf['vocab_size']} != wte rows {V}")
    return ModelConfig(
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


GPT2_UNTIED = "gpt2 lm_head.weight differs from wte.weight; only tied gpt2 is supported"


def _hf_gpt2(hf: Mapping, tensors: Params, bkspc_init: str) -> tuple[ModelConfig, Params]:
    tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    config = gpt2_config(hf, {k: v.shape for k, v in tensors.items()})
    d = tensors["wte.weight"].shape[1]
    lm_head = tensors.get("lm_head.weight")
    if lm_head is not None and not np.array_equal(lm_head, tensors["wte.weight"]):
        raise ValueError(GPT2_UNTIED)
    specs = vocab_specs("wte.weight", None, bkspc_init)
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
        for ours, theirs in GPT2_BLOCK.items():  # Conv1D weights are already [in, out]
            w_name = "scale" if ours.endswith("norm") else "kernel"
            specs.append((f"{b}.{ours}.{w_name}", (f"{h}.{theirs}.weight",), np.asarray))
            specs.append((f"{b}.{ours}.bias", (f"{h}.{theirs}.bias",), np.asarray))
    return config, apply_specs(tensors, specs, gpt2_ignored, "gpt2 checkpoint")


def llama_ignored(tied: bool) -> Callable[[str], bool]:
    """Which tensors of a llama checkpoint hold no weights of ours."""
    return lambda n: n.endswith("rotary_emb.inv_freq") or (tied and n == "lm_head.weight")


def llama_config(hf: Mapping, shapes: Mapping[str, tuple]) -> ModelConfig:
    """The `ModelConfig` of a llama checkpoint from config.json and its tensors' shapes."""
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
    if "model.embed_tokens.weight" not in shapes:
        raise ValueError("llama checkpoint is missing tensor 'model.embed_tokens.weight'")
    V = shapes["model.embed_tokens.weight"][0]
    if int(_cfg(hf, "vocab_size", V)) != V:
        raise ValueError(f"config vocab_size {hf['vocab_size']} != embed_tokens rows {V}")
    tied = bool(_cfg(hf, "tie_word_embeddings", False))  # LlamaConfig's default is untied
    return ModelConfig(
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


def _hf_llama(hf: Mapping, tensors: Params, bkspc_init: str) -> tuple[ModelConfig, Params]:
    config = llama_config(hf, {k: v.shape for k, v in tensors.items()})
    tied = config.tie_embeddings
    specs = llama_block_specs(config)
    specs += vocab_specs(
        "model.embed_tokens.weight", None if tied else "lm_head.weight", bkspc_init
    )
    specs.append(("final_norm.scale", ("model.norm.weight",), np.asarray))
    return config, apply_specs(tensors, specs, llama_ignored(tied), "llama checkpoint")


_HF_FAMILIES = {"gpt2": _hf_gpt2, "llama": _hf_llama}


def read_hf_config(directory: str | os.PathLike) -> dict:
    """config.json of a HF checkpoint directory, of a model_type we import."""
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
    return hf


def load_hf_params(
    directory: str | os.PathLike, *, bkspc_init: str = "mean"
) -> tuple[ModelConfig, Params]:
    """Reads a HF checkpoint directory (config.json + safetensors): (config, float32 params)."""
    hf = read_hf_config(directory)
    return _HF_FAMILIES[hf["model_type"]](hf, read_safetensors_dir(directory), bkspc_init)


def load_hf(
    directory: str | os.PathLike,
    *,
    dtype: str = "float32",
    param_dtype: str | None = None,
    bkspc_init: str = "mean",
    scan_layers: bool = False,
) -> Transformer:
    """A `Transformer` from a local HF gpt2 / llama checkpoint directory, with a `<bkspc>` row,
    its blocks in the layout `scan_layers` names."""
    config, params = load_hf_params(directory, bkspc_init=bkspc_init)
    return model_from_params(with_dtypes(config, dtype, param_dtype, scan_layers), params)
