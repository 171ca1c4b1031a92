"""What every converter shares: the `<bkspc>` row, and checked name-by-name param mapping.

Every loader produces a `ModelConfig` and a flat dict of float32 numpy arrays keyed by our param
names (``"blocks.3.attn.q_proj.kernel"``, see `transformer.py`), then `model_from_params` puts
them into an NNX model cast to `param_dtype`. Kernels are transposed to our [in, out] layout.
The names are always the unrolled layout's, one per layer; `model_from_params` stacks them
when the config asks for scanned layers (`scan_layers`), and `model_params` unstacks.

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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from smatch_jax.models.config import ModelConfig
from smatch_jax.models.transformer import Transformer

Params = dict[str, np.ndarray]  # our param name -> array (kernels [in, out])
BKSPC_INITS = ("mean", "zeros", "normal")
# One output param: (our name, source tensor names, fn(*source arrays) -> our array).
Spec = tuple[str, tuple[str, ...], Callable[..., np.ndarray]]


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
    return np.concatenate([table, bkspc_row(table, init=init, rng=rng)[None]], axis=0)


def bkspc_row(
    embedding_VxD: np.ndarray,
    *,
    init: str = "mean",
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """The [D] float32 `<bkspc>` row that `add_bkspc_row` appends."""
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
    return row_D.astype(np.float32)


def _name(path: tuple) -> str:
    return ".".join(str(getattr(k, "key", k)) for k in path)


_STACKED = "blocks."  # a scanned model's block weights: `blocks.<name>` [L, ...]


def model_params(model: Transformer) -> Params:
    """The model's parameters as a flat dict of numpy arrays keyed by dotted param names, one
    per layer (`blocks.{i}.<name>`) in either layout."""
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    out = {}
    for p, v in jax.tree_util.tree_flatten_with_path(pure)[0]:
        name, v = _name(p), np.asarray(v)
        if model.config.scan_layers and name.startswith(_STACKED):
            rest = name.removeprefix(_STACKED)
            out.update({f"blocks.{i}.{rest}": v[i] for i in range(v.shape[0])})
        else:
            out[name] = v
    return out


def layer_shapes(config: ModelConfig, name: str, shape: tuple) -> dict[str, tuple]:
    """The unrolled names and shapes of one parameter of the model (a stacked block weight
    is `n_layers` of them)."""
    if config.scan_layers and name.startswith(_STACKED):
        rest = name.removeprefix(_STACKED)
        return {f"blocks.{i}.{rest}": tuple(shape[1:]) for i in range(config.n_layers)}
    return {name: tuple(shape)}


def model_from_params(config: ModelConfig, params: Mapping[str, np.ndarray]) -> Transformer:
    """A `Transformer` whose parameters are `params` (unrolled names, `model_params`) cast to
    `config.param_dtype`, in the layout `config.scan_layers` names.

    The model is built abstractly (`nnx.eval_shape`, no random init), then every parameter is
    replaced; raises ValueError listing missing, unexpected and wrongly-shaped names.
    """
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state)
    expected = {}
    for p, v in jax.tree_util.tree_flatten_with_path(pure)[0]:
        expected.update(layer_shapes(config, _name(p), v.shape))
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

    def value(path, x):
        names = layer_shapes(config, _name(path), x.shape)
        if len(names) == 1 and _name(path) in names:
            return jnp.asarray(np.asarray(params[_name(path)]), dtype)
        return jnp.stack([jnp.asarray(np.asarray(params[n]), dtype) for n in names])

    new = jax.tree_util.tree_map_with_path(value, pure)
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


def check_tensors(available, needed, ignored, what) -> None:
    """Raises ValueError naming the `needed` source tensors missing from `available` and the
    `available` ones neither needed nor `ignored`."""
    missing = sorted(set(needed) - set(available))
    if missing:
        raise ValueError(f"{what} is missing tensors {missing}")
    unused = sorted(n for n in set(available) - set(needed) if not ignored(n))
    if unused:
        raise ValueError(f"{what} has tensors the importer does not understand: {unused}")


def apply_specs(tensors: Mapping[str, np.ndarray], specs: list[Spec], ignored, what) -> Params:
    """Evaluates the specs; raises ValueError naming missing or unused source tensors."""
    check_tensors(tensors, {s for _, srcs, _ in specs for s in srcs}, ignored, what)
    return {ours: fn(*(tensors[s] for s in srcs)) for ours, srcs, fn in specs}


def with_dtypes(
    config: ModelConfig, dtype: str, param_dtype: str | None, scan_layers: bool = False
) -> ModelConfig:
    """`config` with the compute and storage dtypes and the layer layout of the model to build."""
    return dataclasses.replace(
        config, dtype=dtype, param_dtype=param_dtype or dtype, scan_layers=scan_layers
    )


def transpose(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.T)


def vocab_specs(embed: str, lm_head: str | None, init: str) -> list[Spec]:
    """tok_embed from `embed` and, when untied, lm_head from `lm_head` (both [V, d] tensors)."""
    add = lambda w: add_bkspc_row(w, init=init)
    specs: list[Spec] = [("tok_embed.embedding", (embed,), add)]
    if lm_head is not None:
        specs.append(("lm_head.kernel", (lm_head,), lambda w: transpose(add(w))))
    return specs


# Our name inside blocks.{i} -> (GGUF name inside blk.{i}, HF name inside model.layers.{i}).
LLAMA_BLOCK = {
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


def llama_block_specs(
    config: ModelConfig, *, gguf_qk_rows: Callable[[np.ndarray, int], np.ndarray] | None = None
) -> list[Spec]:
    """Per-layer specs of a llama checkpoint whose Linear weights are [out, in]: HF names, or
    GGUF names when `gguf_qk_rows` is given (it reorders the q/k rows of GGUF's interleaved
    RoPE layout into HF's, see gguf.py)."""
    heads = {"attn.q_proj.kernel": config.n_heads, "attn.k_proj.kernel": config.n_kv_heads}
    specs: list[Spec] = []
    for i in range(config.n_layers):
        for ours, (gguf_name, hf_name) in LLAMA_BLOCK.items():
            if gguf_qk_rows is not None:
                src = f"blk.{i}.{gguf_name}.weight"
            else:
                src = f"model.layers.{i}.{hf_name}.weight"
            if ours.endswith("scale"):
                fn = np.asarray
            elif gguf_qk_rows is not None and ours in heads:
                fn = lambda w, n=heads[ours]: transpose(gguf_qk_rows(w, n))
            else:
                fn = transpose
            specs.append((f"blocks.{i}.{ours}", (src,), fn))
    return specs
