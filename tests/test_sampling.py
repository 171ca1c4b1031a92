"""The backspace sampler (method.md §5) against naive decoding and the training layout."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from smatch_jax import masks, models, sampling
from tests import reference

EOS, PAD = 15, 16  # tiny models have V = 17 (ids 0..16); <bkspc> = 17
P = 5


def random_model(family: str, seed: int = 0):
    """A tiny model with unit-scale random weights: peaked logits, no argmax ties."""
    cfg = models.tiny(family)
    model = nnx.eval_shape(lambda: models.Transformer(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    state = nnx.state(model, nnx.Param)

    def draw(path, value):
        x = rng.standard_normal(value.shape)
        name = path[-1].key
        if name == "scale":
            x = 1.0 + 0.1 * x
        elif name == "bias":
            x = 0.1 * x
        elif name == "kernel":
            x = x / np.sqrt(value.shape[0])
        else:  # embeddings: logits of std ~1.5, so a moderate bias makes <bkspc> win sometimes
            x = 0.25 * x
        return jnp.asarray(x, value.dtype)

    pure = jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return model


@functools.cache
def _setup(family):
    model = random_model(family)
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda p, ids, pos, mask: nnx.merge(graphdef, p)(ids, pos, mask))
    return model, graphdef, params, forward


def prompts(seed, B=4):
    rng = np.random.default_rng(seed)
    m = np.array([1, 3, 5, 2][:B], np.int32)
    ids = rng.integers(0, EOS, (B, P)).astype(np.int32)
    ids[np.arange(P)[None] >= m[:, None]] = PAD
    return ids, m


def naive_greedy(forward, params, ids, m, cfg: sampling.SamplingConfig, bk):
    """Greedy decoding by a full causal pass over each state, one row at a time (no cache)."""
    W = P + cfg.max_new_tokens
    causal = jnp.tril(jnp.ones((1, W, W), bool))
    out = []
    for b in range(len(ids)):
        state, acts = list(ids[b, : m[b]]), []
        banned = {}  # no_repeat_deleted: state length -> tokens deleted from that state
        while len(acts) < cfg.n_actions:
            row = np.full((1, W), PAD, np.int32)
            row[0, : len(state)] = state
            logits = np.array(forward(params, row, np.arange(W)[None], causal))[0, len(state) - 1]
            force = False
            if cfg.value_drop_bkspc and len(state) > m[b] and cfg.allow_bkspc:
                v = lambda x: float(jax.nn.logsumexp(jnp.asarray(x, jnp.float32)))
                parent = np.array(forward(params, row, np.arange(W)[None], causal))[0]
                force = v(logits) - v(parent[len(state) - 2]) < -cfg.value_drop_bkspc
            logits[bk] += cfg.bkspc_logit_bias
            if len(state) <= m[b] or not cfg.allow_bkspc:
                logits[bk] = -np.inf
            if cfg.no_repeat_deleted:
                logits[list(banned.get(len(state), ()))] = -np.inf
            a = int(np.argmax(logits)) if np.isfinite(logits).any() else EOS
            a = bk if force else a
            acts.append(a)
            if a == bk:
                banned.setdefault(len(state) - 1, set()).add(state.pop())
            else:
                banned[len(state) + 1] = set()  # a new state of this length
                state.append(a)
            if a == EOS or len(state) >= m[b] + cfg.max_new_tokens:
                break
        out.append((acts, state))
    return out


def _assert_same_rows(out, want, m, bk):
    """The sampler's rows equal the reference decoder's (actions, final state, backspaces)."""
    for b, (acts, state) in enumerate(want):
        n = int(out.length[b]) - m[b]
        assert out.actions[b, m[b] : m[b] + n].tolist() == acts
        assert out.final[b, : int(out.final_length[b])].tolist() == state
        assert int(out.n_bkspc[b]) == acts.count(bk)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("bias", [0.0, 2.5])
def test_cached_greedy_equals_uncached(family, bias):
    model, graphdef, params, forward = _setup(family)
    bk = model.config.vocab_size
    cfg = sampling.SamplingConfig(max_new_tokens=8, greedy=True, bkspc_logit_bias=bias)
    ids, m = prompts(0)
    out = sampling.sample(
        graphdef, ids, m, jax.random.key(0), eos_id=EOS, pad_id=PAD, cfg=cfg, params=params
    )
    want = naive_greedy(forward, params, ids, m, cfg, bk)
    _assert_same_rows(out, want, m, bk)
    n_bk = sum(a.count(bk) for a, _ in want)
    assert n_bk > 0 or bias == 0, "the bias must force some backspaces"


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("bias", [2.5, 6.0])
def test_no_repeat_deleted_greedy_equals_the_reference_decoder(family, bias):
    """With a <bkspc> bias, plain greedy loops on `x <bkspc> x <bkspc>`; with the ban it walks
    down the ranking at each state, exactly as the Python decoder does."""
    model, graphdef, params, forward = _setup(family)
    bk = model.config.vocab_size
    cfg = sampling.SamplingConfig(
        max_new_tokens=8, max_actions=24, greedy=True, bkspc_logit_bias=bias, no_repeat_deleted=True
    )
    ids, m = prompts(5)
    out = sampling.sample(
        graphdef, ids, m, jax.random.key(0), eos_id=EOS, pad_id=PAD, cfg=cfg, params=params
    )
    want = naive_greedy(forward, params, ids, m, cfg, bk)
    _assert_same_rows(out, want, m, bk)
    assert sum(a.count(bk) for a, _ in want) >= 4  # the ban was exercised
    plain = naive_greedy(
        forward, params, ids, m, dataclasses.replace(cfg, no_repeat_deleted=False), bk
    )
    assert plain != want  # and it changes the decoding


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_value_guided_deletion_equals_the_reference_decoder(family):
    """`value_drop_bkspc`: <bkspc> whenever V fell by more than the threshold since the parent
    state; with the ban, greedy then tries the next token there, as the Python decoder does."""
    model, graphdef, params, forward = _setup(family)
    bk = model.config.vocab_size
    cfg = sampling.SamplingConfig(
        max_new_tokens=8, max_actions=24, greedy=True, no_repeat_deleted=True, value_drop_bkspc=0.3
    )
    ids, m = prompts(7)
    out = sampling.sample(
        graphdef, ids, m, jax.random.key(0), eos_id=EOS, pad_id=PAD, cfg=cfg, params=params
    )
    want = naive_greedy(forward, params, ids, m, cfg, bk)
    _assert_same_rows(out, want, m, bk)
    assert sum(a.count(bk) for a, _ in want) >= 3  # the rule fired (no bias: never on its own)
    off = naive_greedy(forward, params, ids, m, dataclasses.replace(cfg, value_drop_bkspc=0), bk)
    assert all(a.count(bk) == 0 for a, _ in off)


def _check_never_repeats(rows, m, n, bk):
    """Replays each action row: no token is chosen at a state it was deleted from."""
    for b in range(len(rows)):
        state, banned = list(rows[b][: m[b]]), {}
        for a in rows[b][m[b] : n[b]]:
            assert a not in banned.get(len(state), set()), (b, rows[b][: n[b]])
            if a == bk:
                banned.setdefault(len(state) - 1, set()).add(state.pop())
            else:
                banned[len(state) + 1] = set()
                state.append(a)


def test_no_repeat_deleted_sampling_never_repeats_a_deleted_token():
    model, graphdef, params, _ = _setup("llama")
    bk = model.config.vocab_size
    ids, m = prompts(6)
    ids, m = np.tile(ids, (16, 1)), np.tile(m, 16)
    kw = dict(max_new_tokens=6, max_actions=30, bkspc_logit_bias=3.0, top_k=8, temperature=1.2)
    rows = {}
    for ban in (False, True):
        cfg = sampling.SamplingConfig(no_repeat_deleted=ban, **kw)
        out = jax.device_get(
            sampling.sample(
                graphdef, ids, m, jax.random.key(8), eos_id=EOS, pad_id=PAD, cfg=cfg, params=params
            )
        )
        rows[ban] = (out.actions.tolist(), out.length)
        assert out.n_bkspc.sum() > 50
    _check_never_repeats(*rows[True][:1], m, rows[True][1], bk)
    with pytest.raises(AssertionError):  # the check can fail: plain sampling repeats
        _check_never_repeats(*rows[False][:1], m, rows[False][1], bk)


def test_every_action_banned_ends_the_row_with_eos():
    logits = jnp.zeros((2, 5))
    banned = jnp.array([[True] * 5, [True, False, True, True, True]])
    cfg = sampling.SamplingConfig(greedy=True)
    a = sampling._choose(None, logits, jnp.array([3, 3]), jnp.array([1, 1]), cfg, (4, 2), banned)
    assert a.tolist() == [2, 1]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_step_logits_equal_the_training_layout(family):
    """The logits the sampler acted on equal one forward pass under backspace_layout."""
    model, graphdef, params, forward = _setup(family)
    bk = model.config.vocab_size
    cfg = sampling.SamplingConfig(max_new_tokens=8, bkspc_logit_bias=2.0, return_logits=True)
    ids, m = prompts(1)
    out = sampling.sample(
        graphdef, ids, m, jax.random.key(3), eos_id=EOS, pad_id=PAD, cfg=cfg, params=params
    )
    assert int(out.n_bkspc.sum()) > 0
    lay = masks.backspace_layout(out.actions, m, out.length, bkspc_id=bk)
    logits = np.asarray(forward(params, lay.input_ids, lay.positions, lay.attn_mask))
    for b in range(len(ids)):
        n = int(out.length[b]) - m[b]
        np.testing.assert_allclose(
            np.asarray(out.step_logits[b, :n]), logits[b, m[b] - 1 : m[b] - 1 + n], atol=3e-5
        )
    # And the final rows are apply_backspaces of the action rows.
    fin, fin_len = masks.apply_backspaces(out.actions, m, out.length, bkspc_id=bk, pad_id=PAD)
    np.testing.assert_array_equal(fin_len, out.final_length)
    W = out.final.shape[1]
    np.testing.assert_array_equal(fin[:, :W], out.final)


def test_row_invariants_under_sampling():
    model, graphdef, params, _ = _setup("llama")
    bk = model.config.vocab_size
    cfg = sampling.SamplingConfig(
        max_new_tokens=6, max_actions=10, bkspc_logit_bias=1.5, top_k=5, top_p=0.9, temperature=0.8
    )
    ids, m = prompts(2)
    ids, m = np.tile(ids, (8, 1)), np.tile(m, 8)
    out = jax.device_get(
        sampling.sample(
            graphdef, ids, m, jax.random.key(5), eos_id=EOS, pad_id=PAD, cfg=cfg, params=params
        )
    )
    assert out.n_bkspc.sum() > 0
    for b in range(len(ids)):
        row, n = out.actions[b].tolist(), int(out.length[b])
        assert row[: m[b]] == ids[b, : m[b]].tolist()
        assert n - m[b] <= cfg.n_actions and (row[n:] == [PAD] * (len(row) - n))
        states = reference.states_row(row, m[b], n, bk)
        for k in range(m[b], n):  # never a backspace while the state is the prompt
            if row[k] == bk:
                assert len(states[k - 1]) > m[b]
        assert states[-1] == out.final[b, : out.final_length[b]].tolist()
        assert out.ended[b] == (EOS in row[m[b] : n])
        if out.ended[b]:
            assert row[n - 1] == EOS
        else:  # truncated: out of actions or of state room
            assert n - m[b] == cfg.n_actions or out.final_length[b] == m[b] + cfg.max_new_tokens
    plain = sampling.SamplingConfig(max_new_tokens=6, allow_bkspc=False, bkspc_logit_bias=50.0)
    out = sampling.sample(
        graphdef, ids, m, jax.random.key(6), eos_id=EOS, pad_id=PAD, cfg=plain, params=params
    )
    assert int(out.n_bkspc.sum()) == 0 and not (np.asarray(out.actions) == bk).any()


def test_first_action_distribution_matches_softmax():
    model, graphdef, params, forward = _setup("gpt2")
    ids, m = prompts(3, B=1)
    n = 4000
    cfg = sampling.SamplingConfig(max_new_tokens=1, temperature=1.5)
    out = sampling.sample(
        graphdef,
        np.repeat(ids, n, 0),
        np.repeat(m, n),
        jax.random.key(7),
        eos_id=EOS,
        pad_id=PAD,
        cfg=cfg,
        params=params,
    )
    W = P
    causal = jnp.tril(jnp.ones((1, W, W), bool))
    logits = np.array(forward(params, ids, np.arange(W)[None], causal))[0, m[0] - 1]
    logits[model.config.vocab_size] = -np.inf  # the state is the prompt
    p = np.asarray(jax.nn.softmax(logits / 1.5))
    freq = np.bincount(np.asarray(out.actions[:, m[0]]), minlength=len(p)) / n
    np.testing.assert_allclose(freq, p, atol=5 * np.sqrt(0.25 / n))


def test_top_k_1_and_tiny_top_p_are_greedy():
    _, graphdef, params, _ = _setup("llama")
    ids, m = prompts(4)
    run = lambda **kw: (
        sampling.sample(
            graphdef,
            ids,
            m,
            jax.random.key(9),
            eos_id=EOS,
            pad_id=PAD,
            cfg=sampling.SamplingConfig(max_new_tokens=6, **kw),
            params=params,
        ).actions
    )
    greedy = np.asarray(run(greedy=True))
    np.testing.assert_array_equal(np.asarray(run(top_k=1)), greedy)
    np.testing.assert_array_equal(np.asarray(run(top_p=1e-6)), greedy)


def test_config_errors():
    with pytest.raises(ValueError, match="greedy=True"):
        sampling.SamplingConfig(temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        sampling.SamplingConfig(top_p=0.0)
