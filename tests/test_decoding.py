"""Evaluation decodings and the corrupted prompts of the recovery evaluation (Table 2)."""

import numpy as np
import pytest

from smatch_jax.eval import decoding

EOS = 9


def test_corrupt_keeps_the_question_and_a_reference_prefix_then_one_wrong_token():
    rng = np.random.default_rng(0)
    B, T = 200, 12
    m = rng.integers(2, 5, B)
    n = m + rng.integers(2, 6, B)  # answers of 1..4 tokens, then eos
    tokens = rng.integers(0, EOS, (B, T))
    tokens[np.arange(B), n - 1] = EOS
    probs = np.full(EOS + 1, 1.0 / EOS)
    probs[EOS] = 0.0  # eos is never noise
    prompts, js, wrong = decoding.corrupt(tokens, m, n, probs, eos_id=EOS, seed=3)
    seen_j = set()
    for b in range(B):
        answer = tokens[b, m[b] : n[b] - 1].tolist()
        j = js[b]
        assert 0 <= j < len(answer)
        assert prompts[b] == tokens[b, : m[b]].tolist() + answer[:j] + [wrong[b]]
        assert wrong[b] != answer[j] and wrong[b] != EOS  # an error, from the noise tokens
        seen_j.add((len(answer), j))
    assert {(4, j) for j in range(4)} <= seen_j  # j uniform over the answer's positions
    again = decoding.corrupt(tokens, m, n, probs, eos_id=EOS, seed=3)
    assert again[0] == prompts  # every method sees the same corrupted prompts


def test_parse_decodings_and_configs():
    assert decoding.parse_decodings("all") == decoding.DECODINGS
    assert decoding.parse_decodings("sample, greedy") == ("sample", "greedy")
    with pytest.raises(ValueError, match="unknown decoding 'beam'"):
        decoding.parse_decodings("greedy,beam")
    cfg = decoding.decoding_config("greedy_no_repeat", 8)
    assert cfg.greedy and cfg.no_repeat_deleted
    cfg = decoding.decoding_config("sample", 8, temperature=0.7)
    assert not cfg.greedy and cfg.temperature == 0.7 and not cfg.no_repeat_deleted
    assert decoding.HEADLINE in decoding.DECODINGS
