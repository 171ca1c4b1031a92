"""Model configuration for the decoder-only transformer, with validation and presets.

`ModelConfig` covers two families that share one code path in `transformer.py`:

* ``'gpt2'``: learned absolute positions, pre-LayerNorm, GELU MLP, biases, tied embeddings;
* ``'llama'``: RoPE, RMSNorm, SwiGLU MLP, grouped-query attention, no biases.

`vocab_size` is the BASE vocabulary size V. The model always has V + 1 output rows: the extra
row, id V, is the `<bkspc>` action of SequenceMatch (`n_actions = V + 1`). With tied embeddings
the token embedding table has V + 1 rows as well, so `<bkspc>` can also be fed as an input id.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

FAMILIES = ("gpt2", "llama")
_FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a decoder-only transformer (hashable, so usable as a jit static)."""

    family: str  # 'gpt2' | 'llama': selects positions, norm, MLP and bias conventions
    vocab_size: int  # base vocabulary size V; output layer has V + 1 rows (id V = <bkspc>)
    d_model: int  # residual stream width
    n_layers: int  # number of transformer blocks
    n_heads: int  # number of query heads
    n_kv_heads: int  # number of key/value heads (GQA); gpt2 requires n_kv_heads == n_heads
    d_ff: int  # MLP hidden width (llama: width of the gate and up projections)
    max_positions: int  # gpt2: rows of the learned position table; llama: sanity bound only
    rope_theta: float = 10_000.0  # llama: RoPE base frequency (unused by gpt2)
    norm_eps: float = 1e-5  # epsilon of LayerNorm (gpt2) / RMSNorm (llama)
    tie_embeddings: bool = True  # output layer reuses the token table; gpt2 requires True
    use_bias: bool = True  # biases in linear layers and LayerNorm (gpt2 True, llama False)
    dtype: str = "float32"  # compute dtype of activations, e.g. 'float32' or 'bfloat16'
    param_dtype: str = "float32"  # storage dtype of parameters
    # The blocks' weights stacked on a leading layer axis and run under `jax.lax.scan`: one
    # block is traced and compiled instead of `n_layers` (transformer.py). Same function and
    # same initial weights as the unrolled layout; the param tree differs (`blocks.attn...`
    # [L, ...] instead of `blocks.{i}.attn...`), and `transformer.relayout` converts.
    scan_layers: bool = False

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; expected one of {FAMILIES}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.max_positions, int) or self.max_positions <= 0:
            raise ValueError(f"max_positions must be a positive int, got {self.max_positions!r}")
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})"
            )
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _FLOAT_DTYPES:
                raise ValueError(
                    f"{name} must be one of {_FLOAT_DTYPES}, got {getattr(self, name)!r}"
                )
        if self.family == "gpt2":
            if self.n_kv_heads != self.n_heads:
                raise ValueError(
                    f"gpt2 has no grouped-query attention: n_kv_heads ({self.n_kv_heads}) "
                    f"must equal n_heads ({self.n_heads})"
                )
            if not self.tie_embeddings:
                raise ValueError("gpt2 always ties input and output embeddings")
        if self.family == "llama":
            if self.head_dim % 2 != 0:
                raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
            if self.rope_theta <= 0:
                raise ValueError(f"rope_theta must be positive, got {self.rope_theta!r}")

    @property
    def position_limit(self) -> int | None:
        """The positions the model can run at: gpt2's learned table has `max_positions` rows
        (past it the embeddings are NaN); llama rotates positions (RoPE): None, no limit."""
        return self.max_positions if self.family == "gpt2" else None

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_heads

    @property
    def n_actions(self) -> int:
        """Output rows: V vocabulary tokens plus `<bkspc>` (id V)."""
        return self.vocab_size + 1

    @property
    def bkspc_id(self) -> int:
        """Id of the `<bkspc>` action (the last output row)."""
        return self.vocab_size

    @property
    def compute_dtype(self) -> jnp.dtype:
        """`dtype` as a numpy dtype object."""
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self) -> jnp.dtype:
        """`param_dtype` as a numpy dtype object."""
        return jnp.dtype(self.param_dtype)


def tiny(family: str) -> ModelConfig:
    """A few-thousand-parameter model for tests (llama: 2 of 4 heads are kv heads)."""
    return ModelConfig(
        family=family,
        vocab_size=17,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2 if family == "llama" else 4,
        d_ff=64,
        max_positions=64,
        use_bias=family == "gpt2",
    )


# Architectures by name: ModelConfig fields without the vocabulary and the position table,
# which come from the tokenizer and the data (`from_preset`). Configs name one in
# `model.preset` (big_vision's variant pattern: the library owns the shapes).
PRESETS: dict[str, dict] = {
    "tiny_llama": dict(family="llama", d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64),
    "mini_llama": dict(family="llama", d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=192),
    "small_llama": dict(family="llama", d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384),
    "medium_llama": dict(
        family="llama", d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=768
    ),  # 3.1M without embeddings: experiments/text.py --scale large
    "small_gpt2": dict(family="gpt2", d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, d_ff=512),
    "gpt2_124m": dict(
        family="gpt2", d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, d_ff=3072
    ),
    "smollm2_135m": dict(
        family="llama",
        d_model=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        d_ff=1536,
        rope_theta=100_000.0,
        use_bias=False,
    ),
    "llama_7b": dict(
        family="llama",
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=32,
        d_ff=11008,
        tie_embeddings=False,
        rope_theta=10_000.0,
        use_bias=False,
    ),
}

# The vocabulary the published weights of a preset's shape come with (GPT-2 BPE, SmolLM2,
# Llama 2's SentencePiece), for building such a model without its tokenizer files
# (factory.abstract_model, for the pod plan).
VOCAB_SIZES: dict[str, int] = {"gpt2_124m": 50257, "smollm2_135m": 49152, "llama_7b": 32000}


def from_preset(name: str, *, vocab_size: int, max_positions: int, **overrides) -> ModelConfig:
    """The ModelConfig of preset `name` for a vocabulary and a position table."""
    if name not in PRESETS:
        raise ValueError(f"model.preset={name!r} is unknown; choose one of {sorted(PRESETS)}")
    fields = {**PRESETS[name], **overrides}
    return ModelConfig(vocab_size=vocab_size, max_positions=max_positions, **fields)


def gpt2_124m() -> ModelConfig:
    """GPT-2 small (124M): 12 layers, d=768, 12 heads, 1024 positions, vocab 50257."""
    return from_preset("gpt2_124m", vocab_size=50257, max_positions=1024)


def smollm2_135m() -> ModelConfig:
    """SmolLM2-135M: llama with 30 layers, d=576, 9 q / 3 kv heads of 64, SwiGLU 1536."""
    return from_preset("smollm2_135m", vocab_size=49152, max_positions=8192)
