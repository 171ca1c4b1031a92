"""Mechanism diagnostics: deletion precision / recall and the separation of still-correct
from already-wrong states, against hand counts and a per-state reference."""

import itertools

import jax
import numpy as np
import pytest

from smatch_jax.eval import mechanism
from tests.test_sampling import EOS, PAD, _setup

BK = 17  # <bkspc> of the tiny models (V = 17)


def test_deletion_precision_and_recall_by_hand():
    ref = [9, 1, 2, 3, EOS]  # prompt [9], answer 1 2 3
    rows = [
        [9, 1, 5, BK, 2, 3, EOS],  # 5 wrong, deleted: precision 1/1, recall 1/1
        [9, 1, 2, BK, 2, 3, EOS],  # deleted a right token (2), no wrong emitted
        [9, 4, 6, BK, 3, EOS],  # 4 (off path), 6 (deleted), 3 and eos wrong: 1 of 4
        [9, BK, 1, 2, 3, EOS],  # a no-op at the prompt is no deletion
    ]
    got = mechanism.deletion_stats(rows, [1] * 4, [ref] * 4, BK)
    assert got["deletions"] == 3
    assert got["deletion_precision"] == pytest.approx(2 / 3)  # 5 and 6 wrong, 2 right
    assert got["wrong_emitted"] == 1 + 4
    assert got["deletion_recall"] == pytest.approx(2 / 5)


def test_auc_equals_the_pairwise_definition():
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 5, 30).astype(float), rng.integers(0, 5, 40).astype(float)
    pairs = [(p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg)]
    assert mechanism.auc(pos, neg) == pytest.approx(np.mean(pairs))
    assert mechanism.auc([2.0], [1.0]) == 1.0 and np.isnan(mechanism.auc([], [1.0]))


def test_separation_scores_every_state_against_per_state_forward_passes():
    model, _, params, forward = _setup("llama")
    ref = [3, 4, 1, 2, 6, EOS]  # prompt [3, 4], answer 1 2 6
    rows = [[3, 4, 1, 2, 6, EOS], [3, 4, 1, 7, BK, 2, 6, EOS], [3, 4, 8, 9, EOS]]
    got = mechanism.separation(model, rows, [2, 2, 2], [ref] * 3, BK, PAD)
    # The reference: every state (before each action) by its own causal pass.
    scores = {"correct": [], "wrong": []}
    for row in rows:
        state = row[:2]
        for j in range(1, len(row) - 1):
            if j >= 2:
                state = state[:-1] if row[j] == BK else [*state, row[j]]
            W = len(state)
            causal = np.tril(np.ones((1, W, W), bool))
            lg = np.asarray(forward(params, np.array([state]), np.arange(W)[None], causal))[0, -1]
            v = float(jax.nn.logsumexp(lg))
            side = "correct" if ref[:W] == state else "wrong"
            scores[side].append((float(np.exp(lg[BK] - v)), v))
    c, w = np.array(scores["correct"]), np.array(scores["wrong"])
    assert got["states_correct"] == len(c) and got["states_wrong"] == len(w) == 3
    assert got["pi_bkspc_wrong"] == pytest.approx(w[:, 0].mean(), rel=1e-4)
    assert got["v_correct"] == pytest.approx(c[:, 1].mean(), rel=1e-4)
    assert got["auc_pi_bkspc"] == pytest.approx(mechanism.auc(w[:, 0], c[:, 0]))
    assert got["auc_neg_v"] == pytest.approx(mechanism.auc(-w[:, 1], -c[:, 1]))
