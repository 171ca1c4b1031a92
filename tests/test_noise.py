"""Noise + <bkspc> augmentation (method.md §4): structure, rates, weights, truncation."""

import functools

import jax
import numpy as np
import pytest

from smatch_jax import masks, noise
from tests import reference

V = 12
EOS, PAD = 10, 11
BK = V
T = 24


def make_rows(seed, n_rows, *, min_len=4, max_len=16):
    rng = np.random.default_rng(seed)
    tokens = np.full((n_rows, T), PAD, np.int32)
    m = rng.integers(1, 4, n_rows).astype(np.int32)
    n = np.zeros(n_rows, np.int32)
    for b in range(n_rows):
        n[b] = min(T, m[b] + rng.integers(min_len, max_len))
        tokens[b, : n[b] - 1] = rng.integers(0, EOS, n[b] - 1)
        tokens[b, n[b] - 1] = EOS
    return tokens, m, n


@functools.cache
def _noise_fn(**kw):
    return jax.jit(functools.partial(noise.add_noise, bkspc_id=BK, pad_id=PAD, **kw))


def run(seed, tokens, m, n, probs, **kw):
    out = _noise_fn(**kw)(jax.random.key(seed), tokens, m, n, noise_probs=probs)
    return jax.tree.map(np.asarray, out)


PROBS = noise.random_noise_probs(V, [EOS, PAD])


@pytest.mark.parametrize("max_burst", [1, 3])
def test_structure_and_round_trip(max_burst):
    tokens, m, n = make_rows(0, 64, min_len=1, max_len=4)  # even 3 bursts of 3 fit in T
    out = run(1, tokens, m, n, PROBS, noise_rate=0.3, max_burst=max_burst)
    assert not out.truncated.any()
    fin, fin_len = masks.apply_backspaces(out.tokens, m, out.length, bkspc_id=BK, pad_id=PAD)
    for b in range(len(tokens)):
        row = out.tokens[b].tolist()
        assert row[: m[b]] == tokens[b, : m[b]].tolist(), "the prompt is untouched"
        assert int(fin_len[b]) == n[b]
        np.testing.assert_array_equal(fin[b, : n[b]], tokens[b, : n[b]])
        # Every <bkspc> deletes an inserted noise token, never data or the prompt.
        state = []  # (token, is_noise)
        for t in range(out.length[b]):
            if t >= m[b] and row[t] == BK:
                assert state and state[-1][1], "a backspace deletes a noise token"
                state.pop()
            else:
                state.append((row[t], bool(out.is_noise[b, t])))
        # Bursts: k noise tokens then k backspaces, 1 <= k <= max_burst.
        runs, t = [], m[b]
        while t < out.length[b]:
            k = 0
            while out.is_noise[b, t + k]:
                k += 1
            if k:
                assert row[t + k : t + 2 * k] == [BK] * k
                runs.append(k)
                t += 2 * k
            else:
                t += 1
        assert all(1 <= k <= max_burst for k in runs)
        assert sum(runs) == out.n_noise[b]
    assert (out.tokens[out.is_noise] != BK).all()


def test_rate_within_tolerance_and_burst_sizes():
    tokens, m, n = make_rows(2, 512, max_len=6)
    rate = 0.15
    out = run(3, tokens, m, n, PROBS, noise_rate=rate, max_burst=3, exclude_target=False)
    assert not out.truncated.any()
    n_actions = int((n - m).sum())
    bursts, sizes = 0, []
    for b in range(len(tokens)):
        row, isn = out.tokens[b], out.is_noise[b]
        t = m[b]
        while t < out.length[b]:
            k = 0
            while isn[t + k]:
                k += 1
            if k:
                bursts += 1
                sizes.append(k)
                t += 2 * k
            t += 1 if k == 0 else 0
        del row
    sd = np.sqrt(n_actions * rate * (1 - rate))
    assert abs(bursts - rate * n_actions) < 5 * sd
    counts = np.bincount(sizes, minlength=4)[1:]
    assert (np.abs(counts - bursts / 3) < 5 * np.sqrt(bursts / 3)).all()


def test_weights_and_mask_switch():
    tokens, m, n = make_rows(4, 32, max_len=8)
    on = run(5, tokens, m, n, PROBS, noise_rate=0.4, mask_noise_actions=True)
    off = run(5, tokens, m, n, PROBS, noise_rate=0.4, mask_noise_actions=False)
    np.testing.assert_array_equal(on.tokens, off.tokens)  # same key, same rows
    valid = np.arange(T)[None, :] < on.length[:, None]
    assert on.is_noise.any()
    assert (on.action_weight[on.is_noise] == 0).all()
    assert (on.action_weight[valid & ~on.is_noise] == 1).all()
    assert (off.action_weight[valid] == 1).all()
    assert (on.action_weight[~valid] == 0).all()


def test_noise_tokens_follow_distribution_and_exclude_target():
    tokens, m, n = make_rows(6, 256, max_len=6)
    probs = noise.ground_truth_noise_probs(tokens, m, n, vocab_size=V, special_ids=[EOS, PAD])
    assert probs[EOS] == 0 and probs[PAD] == 0
    acts = np.concatenate([tokens[b, m[b] : n[b]] for b in range(len(tokens))])
    acts = acts[acts < EOS]
    np.testing.assert_allclose(probs[:EOS], np.bincount(acts, minlength=EOS) / len(acts), 1e-6)
    skew = np.zeros(V, np.float32)
    skew[[1, 2, 3]] = [0.7, 0.2, 0.1]
    out = run(7, tokens, m, n, skew, noise_rate=0.5, exclude_target=False)
    drawn = out.tokens[out.is_noise]
    freq = np.bincount(drawn, minlength=V) / len(drawn)
    assert set(np.unique(drawn)) <= {1, 2, 3}
    np.testing.assert_allclose(
        freq[[1, 2, 3]], [0.7, 0.2, 0.1], atol=5 * np.sqrt(0.25 / len(drawn))
    )
    ex = run(7, tokens, m, n, skew, noise_rate=0.5, exclude_target=True)
    for b, t in np.argwhere(ex.is_noise):
        nxt = t
        while ex.is_noise[b, nxt] or ex.tokens[b, nxt] == BK:
            nxt += 1
        assert ex.tokens[b, t] != ex.tokens[b, nxt], "noise equal to the data token it precedes"


def test_truncation_is_reported_and_never_splits_a_burst():
    tokens, m, n = make_rows(8, 64, min_len=14, max_len=20)
    out = run(9, tokens, m, n, PROBS, noise_rate=0.5, max_burst=2)
    assert out.truncated.any() and (out.length <= T).all()
    for b in np.flatnonzero(out.truncated):
        row = out.tokens[b, : out.length[b]].tolist()
        assert row.count(BK) == int(out.n_noise[b]), "each kept noise token keeps its backspace"
        final = reference.final_row(out.tokens[b].tolist(), m[b], out.length[b], BK)
        assert final == tokens[b, : len(final)].tolist(), "a truncated row is a prefix"
    for b in np.flatnonzero(~out.truncated):
        assert out.length[b] == n[b] + 2 * out.n_noise[b]


def test_zero_rate_is_identity_and_bad_args():
    tokens, m, n = make_rows(10, 8)
    out = run(11, tokens, m, n, PROBS, noise_rate=0.0)
    np.testing.assert_array_equal(out.tokens, tokens)
    np.testing.assert_array_equal(out.length, n)
    with pytest.raises(ValueError, match="noise_probs has shape"):
        noise.add_noise(
            jax.random.key(0), tokens, m, n, noise_probs=PROBS[:-1], bkspc_id=BK, noise_rate=0.1
        )
    with pytest.raises(ValueError, match="noise_rate"):
        noise.add_noise(
            jax.random.key(0), tokens, m, n, noise_probs=PROBS, bkspc_id=BK, noise_rate=1.5
        )
    with pytest.raises(ValueError, match="every token is special"):
        noise.random_noise_probs(2, [0, 1])


def test_position_logits_choose_the_noise_per_state():
    """Noise kind `model`: at each state the noise follows `position_logits` (here: one token
    per state, never the target), on top of `noise_probs`."""
    tokens, m, n = make_rows(3, 32)
    probs = noise.random_noise_probs(V, [EOS, PAD])
    want = (tokens + 1) % EOS  # the one allowed noise token before each data token
    pos = np.where(np.arange(V)[None, None] == want[..., None], 0.0, -np.inf).astype(np.float32)
    nz = noise.add_noise(
        jax.random.key(0), tokens, m, n, noise_probs=probs, bkspc_id=BK, noise_rate=0.4,
        position_logits=pos,
    )  # fmt: skip
    toks, isn, L = np.asarray(nz.tokens), np.asarray(nz.is_noise), np.asarray(nz.length)
    seen = 0
    for b in range(len(m)):
        src = [t for t in range(L[b]) if not isn[b, t] and toks[b, t] != BK]
        for j, t in enumerate(src[:-1]):
            if isn[b, t + 1]:  # the noise before the next source token src[j + 1]
                assert toks[b, t + 1] == want[b, j + 1]
                seen += 1
    assert seen > 50
    with pytest.raises(ValueError, match=r"\[B, T, V\]"):
        noise.add_noise(
            jax.random.key(0), tokens, m, n, noise_probs=probs, bkspc_id=BK, noise_rate=0.4,
            position_logits=pos[:, :, :-1],
        )  # fmt: skip


def test_policy_logits_are_the_next_token_log_probs_of_a_plain_forward():
    from flax import nnx

    from smatch_jax import models

    model = models.Transformer(models.tiny("llama"), rngs=nnx.Rngs(0))
    vocab = model.config.vocab_size
    tokens, m, n = make_rows(4, 3)
    tokens = tokens % vocab
    lay = masks.backspace_layout(tokens, m, n, bkspc_id=vocab)
    got = np.asarray(noise.policy_logits(model(lay.input_ids, lay.positions, lay.attn_mask)))
    causal = np.tril(np.ones((1, T, T), bool))
    for b in range(3):
        logits = np.asarray(model(tokens[b : b + 1], np.arange(T)[None], causal))[0, :, :vocab]
        want = np.asarray(jax.nn.log_softmax(logits, axis=-1))
        for t in range(1, int(n[b])):  # the token at t given tokens[:t]
            np.testing.assert_allclose(got[b, t], want[t - 1], atol=1e-5)
        assert np.all(np.isneginf(got[b, 0]))


def test_draw_excluding_is_the_renormalised_distribution_without_the_target():
    """`draw_excluding` (the inverse CDF on the mass left, no [T, V] table) against the exact
    conditional distribution: probs with the target's entry zeroed, renormalised; zero-mass
    tokens never drawn; the target itself only when it holds all the mass."""
    probs = np.zeros(V, np.float32)
    probs[[0, 1, 3, 7, 9]] = [0.05, 0.5, 0.25, 0.15, 0.05]
    n = 40_000
    draw = jax.jit(noise.draw_excluding, static_argnums=3)
    for target in (0, 1, 5, 9):  # first, heaviest, zero-mass, last token with mass
        tok = np.asarray(draw(jax.random.key(target), probs, np.full(n, target, np.int32), True))
        want = probs.copy()
        want[target] = 0.0
        want /= want.sum()
        freq = np.bincount(tok, minlength=V) / n
        assert (freq[want == 0] == 0).all(), (target, freq)
        np.testing.assert_allclose(freq, want, atol=5 * np.sqrt(0.25 / n))
    tok = np.asarray(draw(jax.random.key(5), probs, np.full(n, 1, np.int32), False))
    np.testing.assert_allclose(np.bincount(tok, minlength=V) / n, probs, atol=5 * np.sqrt(0.25 / n))
    only = np.zeros(V, np.float32)
    only[4] = 1.0
    targets = np.array([4, 4, 2, 4], np.int32)
    assert (np.asarray(draw(jax.random.key(0), only, targets, True)) == 4).all()
    # Every slot its own target: never drawn while another token has mass.
    targets = np.asarray(jax.random.choice(jax.random.key(1), V, (n,), p=probs), np.int32)
    tok = np.asarray(draw(jax.random.key(2), probs, targets, True))
    assert not (tok == targets).any() and (probs[tok] > 0).all()
