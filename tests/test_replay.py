"""Replay buffer: FIFO order, capacity, uniform draws from the filled part only."""

import jax
import numpy as np
import pytest

from smatch_jax import replay


def _rows(start, B, T=4):
    tok = np.arange(start, start + B)[:, None] * np.ones((1, T), np.int32)
    return tok.astype(np.int32), np.full(B, 1, np.int32), np.full(B, T, np.int32)


def test_fifo_and_capacity():
    buf = replay.init(5, 4, pad_id=0)
    buf = replay.push(buf, *_rows(10, 3))
    assert int(buf.size) == 3 and int(buf.next) == 3
    buf = replay.push(buf, *_rows(20, 4))  # wraps: 20, 21 fill slots 3, 4; 22, 23 replace 10, 11
    assert int(buf.size) == 5 and int(buf.next) == 2
    assert np.asarray(buf.tokens[:, 0]).tolist() == [22, 23, 12, 20, 21]
    buf = replay.push(buf, *_rows(30, 7))  # more than capacity: the newest 5 survive
    assert sorted(np.asarray(buf.tokens[:, 0]).tolist()) == [32, 33, 34, 35, 36]


def test_sample_only_filled_rows():
    buf = replay.push(replay.init(100, 4, pad_id=0), *_rows(1, 3))
    tok, m, n = replay.sample(buf, jax.random.key(0), 3000)
    vals = np.asarray(tok[:, 0])
    assert set(vals.tolist()) == {1, 2, 3}
    assert np.abs(np.bincount(vals)[1:] / 3000 - 1 / 3).max() < 0.05
    assert (np.asarray(m) == 1).all() and (np.asarray(n) == 4).all()


def test_push_wrong_width_raises():
    with pytest.raises(ValueError, match="T="):
        replay.push(replay.init(4, 6, pad_id=0), *_rows(0, 2, T=4))
