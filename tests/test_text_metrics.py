"""Hand-computed checks of `smatch_jax.eval.text_metrics` (expected values derived in comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from smatch_jax.eval.text_metrics import (
    backspace_stats,
    diversity,
    mean_length,
    mean_rep_n,
    ngram_entropy,
    rep_n,
    repetition_rate,
)


def test_ngram_entropy():
    # unigrams of [1,2,1,2]: {1: 2, 2: 2} -> H = ln 2
    assert ngram_entropy([[1, 2, 1, 2]], 1) == pytest.approx(math.log(2))
    # bigrams (1,2),(2,1),(1,2): p = 2/3, 1/3 -> H = ln 3 - (2/3) ln 2
    assert ngram_entropy([[1, 2, 1, 2]], 2) == pytest.approx(math.log(3) - 2 / 3 * math.log(2))
    # pooled over sequences, never across them: (1,2) and (2,1) only (no (2,2)) -> ln 2
    assert ngram_entropy([[1, 2], [2, 1]], 2) == pytest.approx(math.log(2))
    # strings are split into words: {a: 2, b: 2} -> ln 2; a single n-gram type -> 0
    assert ngram_entropy(["a b a", "b"], 1) == pytest.approx(math.log(2))
    assert ngram_entropy([[7, 7, 7]], 2) == 0.0
    assert ngram_entropy([[1], []], 2) == 0.0  # no bigram at all
    with pytest.raises(ValueError):
        ngram_entropy([[1]], 0)


def test_rep_n_and_mean():
    assert rep_n([1, 1, 1, 1], 2) == pytest.approx(2 / 3)  # 3 bigrams (1,1), 1 unique
    assert rep_n([1, 2, 3], 2) == 0.0
    assert rep_n([1], 2) == 0.0  # too short
    assert rep_n("the cat the cat", 2) == pytest.approx(1 / 3)  # (the,cat) x2, (cat,the)
    assert rep_n(np.array([4, 4]), 1) == pytest.approx(1 / 2)
    # the too-short [5] is left out of the mean: (2/3 + 0) / 2
    assert mean_rep_n([[1, 1, 1, 1], [1, 2, 3], [5]], 2) == pytest.approx(1 / 3)
    assert mean_rep_n([[5]], 2) == 0.0


def test_diversity():
    # [1,2,1,2,1]: rep-2 = 1 - 2/4 = 1/2; rep-3 = 1 - 2/3 = 1/3 ((1,2,1) twice, (2,1,2));
    # rep-4 = 1 - 2/2 = 0  ->  diversity = (1/2)(2/3)(1) = 1/3
    assert diversity([[1, 2, 1, 2, 1]]) == pytest.approx(1 / 3)
    assert diversity([[1, 2, 3, 4, 5]]) == 1.0
    # [3]*5: rep-2 = 1 - 1/4, rep-3 = 1 - 1/3, rep-4 = 1 - 1/2 -> (1/4)(1/3)(1/2) = 1/24
    assert diversity([[3, 3, 3, 3, 3]]) == pytest.approx(1 / 24)


def test_repetition_rate():
    # [1,2,1,3,1]: t=1 2 new, t=2 1 seen, t=3 3 new, t=4 1 seen -> 2/4
    assert repetition_rate([[1, 2, 1, 3, 1]]) == pytest.approx(0.5)
    # window 1: t=2 looks at [2], t=4 at [3] -> no repeat
    assert repetition_rate([[1, 2, 1, 3, 1]], window=1) == 0.0
    # window 2: t=2 looks at [1,2] (hit), t=4 at [1,3] (hit) -> 2/4
    assert repetition_rate([[1, 2, 1, 3, 1]], window=2) == pytest.approx(0.5)
    # pooled: (2 + 1) / (4 + 1); a one-token sequence has no prediction
    assert repetition_rate([[1, 2, 1, 3, 1], [7, 7], [9]]) == pytest.approx(0.6)
    assert repetition_rate(["to be or not to be"]) == pytest.approx(2 / 5)  # to, be repeat
    assert repetition_rate([[1]]) == 0.0


def test_mean_length():
    assert mean_length([[1, 2], [3], "a b c"]) == pytest.approx(2.0)  # (2 + 1 + 3) / 3
    assert mean_length([]) == 0.0


BK = 9
# prompt [5, 6] everywhere (prompt_len 2); entries past `length` are padding (also 9 here).
ACTIONS = np.array(
    [
        # +1 +3 (state 5 6 1 3), bk deletes 3 (p=3), bk deletes 1 (p=2), +3 +0 -> run of 2
        [5, 6, 1, 3, BK, BK, 3, 0, BK],
        # bk at the prompt: no-op (run 1), +4, bk deletes 4 (p=2), 2 no-ops -> run of 3
        [5, 6, BK, 4, BK, BK, BK, BK, BK],
        # +1 +2 +3, bk deletes 3 (p=4) -> run of 1 at the end
        [5, 6, 1, 2, 3, BK, BK, BK, BK],
    ]
)
LENGTH = [8, 7, 6]


def test_backspace_stats_counts_and_runs():
    s = backspace_stats(ACTIONS, 2, LENGTH, BK)
    np.testing.assert_array_equal(s["n_bkspc"], [2, 4, 1])
    assert s["bkspc_per_sample"] == pytest.approx(7 / 3)
    assert s["bkspc_sample_frac"] == 1.0
    assert s["n_noop"] == 3
    assert s["run_hist"] == {1: 2, 2: 1, 3: 1}  # row1 run 1, row2 run 1, row0 run 2, row1 run 3
    assert s["mean_run_length"] == pytest.approx(7 / 4)  # (1 + 1 + 2 + 3) / 4
    assert "deleted_wrong_frac" not in s
    # no backspace anywhere; prompt_len as an array
    s = backspace_stats([[5, 6, 1, 0]], np.array([2]), [4], BK)
    assert s["bkspc_per_sample"] == 0.0 and s["run_hist"] == {} and s["mean_run_length"] == 0.0


def test_backspace_stats_against_reference():
    reference = [[5, 6, 3, 3, 0], [5, 6, 4, 0], [5, 6, 1]]
    s = backspace_stats(ACTIONS, [2, 2, 2], LENGTH, BK, reference=reference)
    # deletions: row0 '3' at p=3 (ref 3: right token, but prefix 5 6 1 is off the reference),
    # row0 '1' at p=2 (ref 3: wrong, off path), row1 '4' at p=2 (ref 4: right, on path),
    # row2 '3' at p=4 >= len(ref) = 3 (wrong, off path)
    assert s["n_deleted"] == 4
    assert s["deleted_wrong_frac"] == pytest.approx(2 / 4)
    assert s["deleted_off_path_frac"] == pytest.approx(3 / 4)
    s = backspace_stats([[5, 6, 1, 0]], 2, [4], BK, reference=[[5, 6, 1, 0]])
    assert s["n_deleted"] == 0 and s["deleted_wrong_frac"] == 0.0
