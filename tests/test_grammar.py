"""The grammar task: exact figures against brute force, the automaton and the error noise against
the slow viability check, the builder, the evaluation and a smoke run."""

import itertools
import json
import math

import jax
import numpy as np
import pytest

from configs import grammar as grammar_config
from experiments import grammar as grammar_exp
from smatch_jax import noise, train, validate
from smatch_jax.data import builders
from smatch_jax.data import grammar as g
from smatch_jax.eval import grammar as grammar_eval
from smatch_jax.eval import report

SMALL = g.GrammarSpec(max_depth=2, max_len=6, p_end=0.4, p_open=0.3)


def _support(spec):
    words = (
        "".join(w) for n in range(1, spec.max_len + 1) for w in itertools.product("()[]", repeat=n)
    )
    return [w for w in words if g.is_valid(spec, w)]


def test_exact_figures_equal_brute_force_enumeration():
    ex = g.exact(SMALL)
    words = _support(SMALL)
    p = np.array([math.exp(g.log_prob(SMALL, w)) for w in words])
    assert p.sum() == pytest.approx(1.0, abs=1e-12)
    assert ex["entropy"] == pytest.approx(-(p * np.log(p)).sum(), abs=1e-12)
    length, depth = np.zeros(SMALL.max_len + 1), np.zeros(SMALL.max_depth + 1)
    for w, pw in zip(words, p, strict=True):
        length[len(w)] += pw
        depth[g.max_depth_of(w)] += pw
    np.testing.assert_allclose(ex["length"], length, atol=1e-12)
    np.testing.assert_allclose(ex["depth"], depth, atol=1e-12)


def test_sampler_draws_the_exact_distribution():
    rng = np.random.default_rng(0)
    words = [g.sample_word(SMALL, rng) for _ in range(20000)]
    assert all(g.is_valid(SMALL, w) for w in words)
    support = _support(SMALL)
    freq = np.array([words.count(w) for w in support]) / len(words)
    p = np.array([math.exp(g.log_prob(SMALL, w)) for w in support])
    assert g.total_variation(freq, p) < 0.02  # 42 words, 20k samples: TV ~ 0.01


def test_classify_names_each_error():
    spec = g.GrammarSpec(max_depth=2, max_len=6)
    cases = {
        ("()[]", True): "valid",
        ("(]", True): "wrong_close",
        (")", True): "close_at_0",
        ("(((", True): "too_deep",
        ("(()", True): "early_eos",
        ("", True): "early_eos",
        ("()", False): "no_eos",
        ("()()()()", True): "too_long",
        ("((", False): "no_eos",
        ("()>", True): "bad_token",
    }
    for (w, ended), kind in cases.items():
        assert g.classify(spec, w, ended) == kind, w
    assert g.log_prob(spec, "(]") == -math.inf and g.log_prob(spec, "(") == -math.inf
    assert not g.is_viable(spec, "((((") and g.is_viable(spec, "([")


def test_automaton_agrees_with_the_viability_check():
    spec = g.GrammarSpec(max_depth=3, max_len=40)
    tok = g.tokenizer()
    table, start = g.automaton(spec, tok)
    prompt = tok.encode(g.START)[0]
    for n in range(7):
        for prefix in itertools.product("()[]", repeat=n):
            s = table[start, prompt]
            for c in prefix:
                s = table[s, tok.encode(c)[0]] if s >= 0 else -1
            assert (s >= 0) == g.is_viable(spec, "".join(prefix)), prefix


def _rows(spec, n, T=64, seed=0):
    tok = g.tokenizer()
    rng = np.random.default_rng(seed)
    ex = [g.encode_example(g.sample_word(spec, rng), tok, T=T) for _ in range(n)]
    return tok, *(np.stack([e[k] for e in ex]) for k in ("tokens", "prompt_len", "length"))


def test_error_noise_is_always_an_error_and_only_there():
    spec = g.GrammarSpec()
    tok, tokens, m, n = _rows(spec, 48)
    probs = noise.ground_truth_noise_probs(
        tokens, m, n, vocab_size=tok.vocab_size, special_ids=tok.special_ids
    )
    kw = dict(noise_probs=probs, bkspc_id=tok.bkspc_id, noise_rate=0.3, max_burst=2)
    nz = noise.add_noise(jax.random.key(1), tokens, m, n, **kw, automaton=g.automaton(spec, tok))
    plain = noise.add_noise(jax.random.key(1), tokens, m, n, **kw)
    np.testing.assert_array_equal(nz.is_noise, plain.is_noise)  # same places, other tokens
    seen, viable_plain = 0, 0
    for rows, check in ((nz, True), (plain, False)):
        toks, isn = np.asarray(rows.tokens), np.asarray(rows.is_noise)
        for b in range(len(m)):
            state = ""
            for t in range(1, int(rows.length[b])):
                x = int(toks[b, t])
                if isn[b, t]:
                    viable = g.is_viable(spec, state + tok.decode([x]))
                    if check:
                        assert not viable, (state, tok.decode([x]))
                        seen += 1
                    else:
                        viable_plain += viable
                elif x != tok.bkspc_id and x != tok.eos_id:
                    state += tok.decode([x])
    assert seen > 100 and viable_plain > 20  # without the automaton, many "errors" are not


def test_builder_is_deterministic_per_seed(tmp_path):
    kw = dict(train_size=64, validation_size=8, test_size=8, T=64)
    a = builders.load_split(builders.build("grammar", data_dir=tmp_path / "a", **kw), "train")
    b = builders.load_split(builders.build("grammar", data_dir=tmp_path / "b", **kw), "train")
    c = builders.load_split(
        builders.build("grammar", data_dir=tmp_path / "a", seed=1, **kw), "train"
    )
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    assert a["word"] == b["word"] and a["word"] != c["word"]
    assert all(g.is_valid(g.GrammarSpec(), w) for w in a["word"])
    # Rows that cannot fit are the config section's to refuse, before any data is built.
    c = grammar_config.get_config("smoke")
    c.data.seq_len = 30
    with pytest.raises(validate.ConfigError, match=r"max_len \+ 2 \(prompt, eos\) = 42"):
        validate.check_config(c)


def test_recovery_prompts_end_in_the_first_error():
    spec, tok = g.GrammarSpec(), g.tokenizer()
    rng = np.random.default_rng(0)
    words = [g.sample_word(spec, rng) for _ in range(200)]
    probs = np.zeros(tok.vocab_size)
    probs[[tok.encode(c)[0] for c in "()[]"]] = 0.25
    prompts = grammar_eval.corrupt(words, spec, probs, tok)
    assert prompts == grammar_eval.corrupt(words, spec, probs, tok)  # deterministic
    for w, p in zip(words, prompts, strict=True):
        text = tok.decode(p[1:])
        assert w.startswith(text[:-1]) and g.is_viable(spec, text[:-1])
        assert not g.is_viable(spec, text)


def test_config_variants_and_validation():
    c = grammar_config.get_config("finetune,sm_chi2")
    assert c.data.task == "grammar" and c.noise.kind == "errors"
    assert grammar_config.get_config("sm_random").noise.kind == "random"
    assert grammar_config.get_config("bc").noise.kind == "errors"
    runs = grammar_exp.plan(quick=False, seeds=3)
    assert len({r.name for r in runs}) == len(runs) == 3 * 12
    own = [r for r in grammar_exp.plan(quick=False, seeds=1, model_noise=True) if "model" in r.name]
    assert [(r.method, r.config.noise.kind, r.config.noise.rate) for r in own] == [
        ("bc_model", "model", 0.1),
        ("sm_model", "model", 0.1),
    ]
    assert own[0].config.loss.sm_weight == 0 and own[1].config.loss.sm_weight > 0


def _fake(method, noise_, seed, valid):
    return {
        "method": method, "noise": noise_, "seed": seed, "wall_s": 1.0, "eval/valid": valid,
        "eval/recovery": valid / 2, "eval/n": 500.0, "eval/valid_k": 4.0, "eval/entropy": 12.4,
    }  # fmt: skip


def test_summary_states_the_verdict_from_the_numbers(tmp_path):
    res = [_fake("mle", 0.0, s, 0.60 + 0.01 * s) for s in range(3)]
    res += [_fake("bc", 0.1, s, 0.70 + 0.01 * s) for s in range(3)]
    res += [_fake("sm_gt", 0.1, s, 0.72 + 0.05 * s) for s in range(3)]
    text = grammar_exp.summarise(res, {"eval/valid": 0.8}, "", tmp_path / "g")
    assert "at noise 0.1, SequenceMatch, error noise is highest (0.770 vs BC" in text
    assert "the 95% intervals overlap" in text
    assert (tmp_path / "g.png").exists()


@pytest.mark.slow
def test_grammar_smoke_run_and_evaluation(tmp_path):
    c = grammar_config.get_config("smoke,sm_chi2")
    c.data.data_dir = str(tmp_path / "data")
    c.train.num_steps, c.train.eval_every, c.train.ckpt_every = 20, 20, 20
    state, met = train.train(c, str(tmp_path / "w"))
    assert int(state.step) == 20 and np.isfinite(met["loss"])
    assert met["noise/tokens_per_row"] > 0 and "eval/valid" in met
    rep = report.evaluate_workdir(str(tmp_path / "w"))
    m = rep["metrics"]
    assert m["valid"] == pytest.approx(met["eval/valid"])  # the same protocol as in training
    assert 0 <= m["valid_ci_low"] <= m["valid"] <= m["valid_ci_high"] <= 1
    kinds = [m[f"invalid_{k}"] for k in grammar_eval.KINDS]
    assert sum(kinds) + m["valid"] == pytest.approx(1.0)
    assert m["entropy"] == pytest.approx(g.exact(g.GrammarSpec())["entropy"])
    assert 0 <= m["tv_length"] <= 1 and len(rep["recovery_examples"]) == 4
    saved = json.loads((tmp_path / "w" / "eval_20.json").read_text())
    assert saved["task"] == "grammar" and saved["protocol"]["split"] == "test"


def test_model_noise_on_the_grammar_is_the_policys_own_errors():
    """Noise kind 'model' with the automaton: drawn from the policy restricted to errors. Here
    the "policy" prefers `(` (often valid) and then `]`: every noise token is an error, and
    `]` wherever it is one."""
    spec = g.GrammarSpec()
    tok, tokens, m, n = _rows(spec, 32)
    probs = noise.random_noise_probs(tok.vocab_size, tok.special_ids)
    pref = np.full(tok.vocab_size, -30.0, np.float32)
    pref[tok.encode("(")[0]], pref[tok.encode("]")[0]] = 0.0, -1.0
    pos = np.broadcast_to(pref, (*tokens.shape, tok.vocab_size))
    nz = noise.add_noise(
        jax.random.key(2), tokens, m, n, noise_probs=probs, bkspc_id=tok.bkspc_id,
        noise_rate=0.3, automaton=g.automaton(spec, tok), position_logits=pos,
    )  # fmt: skip
    toks, isn = np.asarray(nz.tokens), np.asarray(nz.is_noise)
    seen = 0
    for b in range(len(m)):
        state = ""
        for t in range(1, int(nz.length[b])):
            x = int(toks[b, t])
            if isn[b, t]:
                assert not g.is_viable(spec, state + tok.decode([x]))
                if g.is_viable(spec, state + "(") and not g.is_viable(spec, state + "]"):
                    assert tok.decode([x]) == "]"  # the policy's likeliest error
                    seen += 1
            elif x != tok.bkspc_id and x != tok.eos_id:
                state += tok.decode([x])
    assert seen > 30
