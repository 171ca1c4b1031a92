"""Text evaluation: perplexity against a per-token reference, and the text report on a tiny
model (MAUVE with a stand-in featurizer, perplexity under a reference model, protocol)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from smatch_jax.data.tokenizers import CharTokenizer
from smatch_jax.eval import perplexity as ppl
from smatch_jax.eval import report, text_report
from smatch_jax.models import Transformer
from smatch_jax.models.config import tiny
from tests.test_model import _np_forward, _params, _randomize


def _model(family: str, seed: int = 0) -> Transformer:
    model = nnx.eval_shape(lambda: Transformer(tiny(family), rngs=nnx.Rngs(0)))
    _randomize(model, seed)  # unit-scale weights: far from uniform predictions
    return model


def _slow_row_nll(model, row, start) -> float:
    """Sum over t >= start of -log p(row[t] | row[:t]): one float64 numpy forward per prefix."""
    cfg, p = model.config, _params(model)
    total = 0.0
    for t in range(start, len(row)):
        causal = np.tril(np.ones((t, t), bool))[None]
        logits = _np_forward(cfg, p, [row[:t]], np.arange(t)[None], causal)[0, -1]
        logits = logits[: cfg.vocab_size]
        logz = np.log(np.exp(logits - logits.max()).sum()) + logits.max()
        total += logz - logits[row[t]]
    return total


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_perplexity_equals_a_per_token_reference(family):
    model = _model(family)
    rng = np.random.default_rng(0)
    V = model.config.vocab_size
    lengths = [5, 9, 2, 12, 7, 3, 10]
    starts = [1, 4, 1, 6, 7, 2, 3]  # one row (start == length) scores nothing
    rows = [rng.integers(0, V, n).tolist() + [V] * 3 for n in lengths]  # junk past the end
    res = ppl.perplexity(model, rows, lengths, score_from=starts, batch_size=3)
    want = [_slow_row_nll(model, r[:n], s) for r, n, s in zip(rows, lengths, starts, strict=True)]
    np.testing.assert_allclose(res.row_nll, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(res.row_tokens, np.subtract(lengths, starts))
    assert res.n_tokens == sum(lengths) - sum(starts)
    assert res.perplexity == pytest.approx(np.exp(sum(want) / res.n_tokens), rel=1e-5)


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    model = _model("llama")
    nnx.update(model, jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param)))  # logits 0
    V = model.config.vocab_size
    res = ppl.perplexity(model, [[1, 2, 3, 4]], [4], score_from=1)
    assert res.perplexity == pytest.approx(V, rel=1e-5)  # <bkspc> is not in the normaliser


def test_perplexity_rejects_bad_inputs():
    model = _model("llama")
    V = model.config.vocab_size
    with pytest.raises(ValueError, match="score_from"):
        ppl.perplexity(model, [[1, 2]], [2], score_from=0)
    with pytest.raises(ValueError, match="vocabulary"):
        ppl.perplexity(model, [[1, V]], [2])  # <bkspc> is not text


def _char_setup(n: int = 12, prompt: int = 4, cont: int = 5):
    tok = CharTokenizer("abcdefghijklmnopq"[:15])  # + eos, pad = 17 ids, the tiny vocabulary
    rng = np.random.default_rng(1)
    T = prompt + cont + 1
    tokens = np.full((n, T), tok.pad_id, np.int32)
    tokens[:, : prompt + cont] = rng.integers(0, 15, (n, prompt + cont))
    tokens[:, prompt + cont] = tok.eos_id
    split = {
        "tokens": tokens,
        "prompt_len": np.full(n, prompt, np.int32),
        "length": np.full(n, T, np.int32),
    }
    return tok, split


class _CountingFeaturizer:
    """Deterministic stand-in features (character histograms); counts the texts it embeds."""

    def __init__(self):
        self.calls = 0

    def __call__(self, texts):
        self.calls += len(texts)
        out = np.zeros((len(texts), 26), np.float32)
        for i, t in enumerate(texts):
            for ch in t:
                if "a" <= ch <= "z":
                    out[i, ord(ch) - 97] += 1
        return out + 1e-3


def test_text_report_has_mauve_perplexity_and_protocol():
    tok, split = _char_setup()
    assert _model("llama").config.vocab_size == tok.vocab_size
    model, ref = _model("llama", 0), _model("llama", 1)
    feat = text_report.CachedFeaturizer(_CountingFeaturizer(), name="chars")
    kw = dict(prompt_max=4, max_new_tokens=6, seed=0, featurizer=feat, mauve_seeds=(0, 1))
    a = text_report.text_report(model, split, tok, ref_model=ref, ref_name="ref", **kw)
    m, p = a["metrics"], a["protocol"]
    assert 0.0 <= m["mauve"] <= 1.0 and m["mauve_std"] >= 0.0
    assert len(p["mauve"]["per_seed"]) == 2 and p["mauve"]["featurizer"] == "chars"
    assert p["mauve"]["n_generated"] == p["mauve"]["n_reference"] == 12
    assert p["perplexity"]["reference_model"] == "ref"
    # The reference continuations' perplexity is the per-token computation on the data rows.
    want = sum(_slow_row_nll(ref, r[:9].tolist(), 4) for r in split["tokens"]) / (12 * 5)
    assert m["ppl_reference"] == pytest.approx(np.exp(want), rel=1e-4)
    assert m["ppl_generated"] > 1.0 and m["n"] == 12
    # Features are cached per text: the same evaluation again embeds nothing new.
    calls = feat.fn.calls
    assert 12 < calls <= 24
    b = text_report.text_report(model, split, tok, ref_model=ref, ref_name="ref", **kw)
    assert feat.fn.calls == calls and b["metrics"] == a["metrics"]
    # Without a featurizer: no MAUVE; without a reference model the evaluated one scores.
    c = text_report.text_report(model, split, tok, prompt_max=4, max_new_tokens=6, seed=0)
    assert "mauve" not in c["metrics"] and c["protocol"]["perplexity"]["reference_model"] == (
        "the evaluated model itself"
    )
    assert "featurizer" in report.summary_markdown({"step": 0, "task": "text", **a})


def test_model_featurizer_handles_empty_continuations():
    tok, _ = _char_setup()
    feat = text_report.make_featurizer("model", _model("llama"), tok)
    out = feat(["", "abc", ""])
    assert out.shape == (3, 32) and np.isfinite(out).all()
    np.testing.assert_array_equal(out[0], out[2])
    with pytest.raises(ValueError, match="unknown featurizer"):
        text_report.make_featurizer("gpt2")
