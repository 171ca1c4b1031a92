"""The backspace layout and apply_backspaces against the pure-Python reference (method.md §3)."""

import functools

import hypothesis.strategies as st
import jax
import numpy as np
import pytest
from hypothesis import given, settings

from smatch_jax import masks
from tests import reference

BK = 9  # <bkspc> id for these tests: base vocabulary 0..8
T = 12


@functools.cache
def _jitted():
    layout = jax.jit(functools.partial(masks.backspace_layout, bkspc_id=BK))
    final = jax.jit(functools.partial(masks.apply_backspaces, bkspc_id=BK, pad_id=0))
    return layout, final


def _check(rows):
    tokens = np.array([r[0] for r in rows], np.int32)
    m = np.array([r[1] for r in rows], np.int32)
    n = np.array([r[2] for r in rows], np.int32)
    layout_fn, final_fn = _jitted()
    lay = layout_fn(tokens, m, n)
    fin, fin_len = final_fn(tokens, m, n)
    for b in range(len(rows)):
        ids, pos, sets = reference.layout_row(tokens[b].tolist(), m[b], n[b], BK)
        np.testing.assert_array_equal(lay.input_ids[b], ids)
        np.testing.assert_array_equal(lay.positions[b], pos)
        want_mask = np.zeros((T, T), bool)
        for q, s in enumerate(sets):
            want_mask[q, sorted(s)] = True
        np.testing.assert_array_equal(lay.attn_mask[b], want_mask)
        want_final = reference.final_row(tokens[b].tolist(), m[b], n[b], BK)
        assert int(fin_len[b]) == len(want_final)
        np.testing.assert_array_equal(fin[b, : len(want_final)], want_final)
        assert (np.asarray(fin[b, len(want_final) :]) == 0).all()


def test_worked_example_from_spec():
    P0, P1, A, B, C, D, E, EOS = 1, 2, 3, 4, 5, 6, 7, 8
    row = [P0, P1, A, B, BK, C, D, BK, BK, E, EOS, 0]
    lay = masks.backspace_layout(np.array([row]), np.array([2]), np.array([11]), bkspc_id=BK)
    assert lay.input_ids[0].tolist() == [P0, P1, A, B, A, C, D, C, A, E, EOS, 0]
    assert lay.positions[0].tolist() == [0, 1, 2, 3, 2, 3, 4, 3, 2, 3, 4, 0]
    attends = [set(np.flatnonzero(r).tolist()) for r in np.asarray(lay.attn_mask[0])]
    assert attends == [
        {0},
        {0, 1},
        {0, 1, 2},
        {0, 1, 2, 3},
        {0, 1, 4},
        {0, 1, 4, 5},
        {0, 1, 4, 5, 6},
        {0, 1, 4, 7},
        {0, 1, 8},
        {0, 1, 8, 9},
        {0, 1, 8, 9, 10},
        {11},
    ]
    fin, n = masks.apply_backspaces(np.array([row]), np.array([2]), np.array([11]), bkspc_id=BK)
    assert fin[0, : int(n[0])].tolist() == [P0, P1, A, E, EOS]


@pytest.mark.parametrize(
    "row,m,n",
    [
        ([1, BK, BK, BK, BK, BK, BK, BK, BK, BK, BK, BK], 1, 12),  # all backspaces at the prompt
        ([1, 2, 3, BK, BK, BK, BK, 4, 0, 0, 0, 0], 2, 8),  # delete back past the prompt boundary
        ([1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4], 12, 12),  # prompt only
        ([1, 8, 3, BK, 8, 2, BK, 0, 0, 0, 0, 0], 1, 7),  # eos in the middle is an ordinary token
        ([1, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], 1, 2),  # mostly padding
        ([5, 3, BK, 4, BK, BK, BK, 6, 7, BK, 8, 0], 1, 11),
    ],
)
def test_edge_cases(row, m, n):
    _check([(row, m, n)])


@st.composite
def rows(draw):
    m = draw(st.integers(1, 4))
    n = draw(st.integers(m, T))
    p_bk = draw(st.sampled_from([0.0, 0.3, 0.6, 1.0]))
    toks = [draw(st.integers(0, BK - 1)) for _ in range(m)]
    for _ in range(n - m):
        bk = draw(st.floats(0, 1)) < p_bk
        toks.append(BK if bk else draw(st.integers(0, BK - 1)))
    # Padding may hold any id, <bkspc> included: it must be ignored.
    toks += [draw(st.integers(0, BK)) for _ in range(T - n)]
    return toks, m, n


@settings(max_examples=60, deadline=None)
@given(st.lists(rows(), min_size=4, max_size=4))
def test_layout_matches_reference(batch):
    _check(batch)


@functools.cache
def _parallel():
    return jax.jit(functools.partial(masks.backspace_layout, bkspc_id=BK, method="parallel"))


@settings(max_examples=60, deadline=None)
@given(st.lists(rows(), min_size=4, max_size=4))
def test_parallel_layout_equals_the_scan(batch):
    tokens, m, n = (np.array([r[i] for r in batch], np.int32) for i in range(3))
    want, got = _jitted()[0](tokens, m, n), _parallel()(tokens, m, n)
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(a, b)


def test_check_rows_messages():
    ok = np.array([[1, 2, BK, 0]]), np.array([1]), np.array([3])
    masks.check_rows(*ok, n_actions=BK + 1)
    with pytest.raises(ValueError, match="prompt of at least one token"):
        masks.check_rows(ok[0], np.array([0]), ok[2], n_actions=BK + 1)
    with pytest.raises(ValueError, match="length <= T"):
        masks.check_rows(ok[0], ok[1], np.array([5]), n_actions=BK + 1)
    with pytest.raises(ValueError, match="outside"):
        masks.check_rows(np.array([[1, 12, 0, 0]]), ok[1], ok[2], n_actions=BK + 1)
    with pytest.raises(ValueError, match="prompt contains"):
        masks.check_rows(np.array([[BK, 2, 0, 0]]), ok[1], ok[2], n_actions=BK + 1)
