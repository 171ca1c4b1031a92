"""Arithmetic in any tokenizer: rows in a pretrained LM's format, noise, evaluation on decoded
text, --questions with rows that do not fit, and a tiny Llama fine-tuned end to end on a BPE."""

import json

import numpy as np
import pytest

from configs import arithmetic as arith_config
from smatch_jax import config as config_lib
from smatch_jax import noise, train
from smatch_jax.data import arithmetic, builders
from smatch_jax.data.tokenizers import BpeTokenizer, CharTokenizer
from smatch_jax.errors import UserError
from smatch_jax.eval import mechanism, report

SMALL = dict(train_size=60, test_size=12, test_large_size=12, validation_size=12, seed=5)


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory):
    """A small byte-level BPE trained on rendered arithmetic rows (multi-digit tokens)."""
    pairs, _ = arithmetic.generate_problems(400, seed=11, difficulty="easy")
    texts = ["".join(arithmetic.render(q, a, "qa")) for q, a in pairs]
    path = tmp_path_factory.mktemp("bpe") / "arith_bpe.json"
    BpeTokenizer.train(texts, 300).save(path)
    return path


@pytest.fixture(scope="module")
def bpe_builder(bpe_path, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    return builders.build(
        "arithmetic", data_dir=data_dir, tokenizer=f"bpe:{bpe_path}", T=48, **SMALL
    )


def test_render_formats():
    q, a = "In base 7, what is -1403 + 62?", "-1311"
    assert arithmetic.render(q, a, "compact") == (q + " ", a)
    assert arithmetic.render(q, a, "qa") == (f"Question: {q}\nAnswer:", " -1311")
    assert arithmetic.resolve_format("auto", "char") == "compact"
    assert arithmetic.resolve_format("auto", "smollm2") == "qa"
    with pytest.raises(ValueError, match="resolve"):
        arithmetic.render(q, a, "auto")


def test_rows_in_a_bpe_tokenizer_decode_to_the_qa_text(bpe_builder):
    tok = builders.load_tokenizer(bpe_builder)
    assert isinstance(tok, BpeTokenizer) and tok.vocab_size == 300
    split = builders.load_split(bpe_builder, "train")
    for b in range(len(split["answer"])):
        n, m = int(split["length"][b]), int(split["prompt_len"][b])
        row = split["tokens"][b, :n].tolist()
        q, a = split["question"][b], split["answer"][b]
        assert row[-1] == tok.eos_id
        assert tok.decode(row[:m]) == f"Question: {q}\nAnswer:"
        assert tok.decode(row[m:-1]) == " " + a
        assert arithmetic.check_answer(q, a)
    meta = bpe_builder.info.metadata
    assert meta["params"]["prompt_format"] == "qa" and "alphabet" not in meta
    # Subword tokens: some answers take fewer tokens than characters.
    n_ans = split["length"] - split["prompt_len"] - 1
    assert (n_ans < np.array([len(a) + 1 for a in split["answer"]])).any()


def test_ground_truth_noise_is_the_answers_token_distribution(bpe_builder):
    tok = builders.load_tokenizer(bpe_builder)
    split = builders.load_split(bpe_builder, "train")
    rows = (split["tokens"], split["prompt_len"], split["length"])
    probs = noise.noise_probs("ground_truth", rows, tok)
    answer_ids = {t for a in split["answer"] for t in tok.encode(" " + a)}
    assert probs.shape == (tok.vocab_size,) and probs.sum() == pytest.approx(1.0)
    assert set(np.flatnonzero(probs).tolist()) == answer_ids - set(tok.special_ids)


def test_rows_that_do_not_fit_t_tokens_are_resampled_and_counted(bpe_path, tmp_path):
    b = builders.build("arithmetic", data_dir=tmp_path, tokenizer=f"bpe:{bpe_path}", T=30, **SMALL)
    stats = b.info.metadata["stats"]
    assert sum(s["too_long_row"] for s in stats.values()) > 0
    assert int(builders.load_split(b, "train")["length"].max()) <= 30


def test_char_default_is_unchanged():
    q, a = "In base 3, what is 1 + 2?", "10"
    tok = arithmetic.make_tokenizer("char", {"train": [(q, a)]}, prompt_format="compact")
    assert isinstance(tok, CharTokenizer)
    assert tok.chars == arithmetic.alphabet([q + " " + a])
    ex = arithmetic.encode_example(q, a, tok, T=40)
    assert tok.decode(ex["tokens"][: ex["length"] - 1]) == q + " " + a


def test_text_on_path_accepts_other_spellings_of_a_right_prefix(bpe_builder):
    tok = builders.load_tokenizer(bpe_builder)
    on_path = mechanism.text_on_path(tok)
    prompt = tok.encode("Question: In base 10, what is 1000 + 234?\nAnswer:")
    ref = prompt + tok.encode(" 1234") + [tok.eos_id]
    spelled = prompt + [t for c in " 12" for t in tok.encode(c)]  # one token per character
    assert on_path(spelled, ref)
    assert not on_path(prompt + tok.encode(" 13"), ref)
    assert on_path(ref, ref) and not on_path([*ref[:-2], tok.eos_id], ref)


def test_data_config_checks_the_tokenizer_per_task():
    c = arith_config.get_config("smoke")
    c.data.tokenizer = "bpe_train:300"
    with pytest.raises(ValueError, match="arithmetic cannot use tokenizer"):
        config_lib.typed(c)
    from configs import grammar as grammar_config

    g = grammar_config.get_config("smoke")
    g.data.tokenizer = "smollm2"
    with pytest.raises(ValueError, match="grammar task is character-level"):
        config_lib.typed(g)


def _bpe_smoke_config(bpe_path, data_dir):
    c = arith_config.get_config("smoke,sm_chi2")
    c.data.tokenizer, c.data.data_dir, c.data.seq_len = f"bpe:{bpe_path}", str(data_dir), 48
    c.data.train_size, c.data.test_size, c.data.validation_size = 64, 8, 8
    c.train.num_steps, c.loss.bc_warmup_steps, c.sampling.sample_every = 8, 4, 2
    c.train.batch_size, c.train.model_rows, c.replay.capacity = 8, 8, 16
    c.train.log_every, c.train.eval_every, c.train.ckpt_every = 2, 8, 8
    c.noise.rate = 0.2
    c.eval.num_samples = 1  # every decoding and recovery, one sampling seed (test time)
    return c


@pytest.mark.slow
def test_tiny_llama_on_bpe_arithmetic_end_to_end_and_questions_file(bpe_path, tmp_path):
    c = _bpe_smoke_config(bpe_path, tmp_path / "data")
    state, met = train.train(c, str(tmp_path / "w"))
    assert int(state.step) == 8 and np.isfinite(met["loss"]) and "sm/r_model" in met
    for k in ("eval/accuracy", "eval/recovery", "eval/mech_auc_neg_v", "eval/accuracy_sample"):
        assert k in met
    assert met["noise/tokens_per_row"] > 0  # ground-truth noise in BPE tokens was inserted
    dump = (tmp_path / "w" / "samples" / "step_8.txt").read_text()
    assert "Question: In base" in dump and "\\nAnswer:" in dump
    recovery = dump.split("=== recovery ===\n")[1].strip().splitlines()
    assert len(recovery) == 4 and all(len(x.split("\t")) == 6 for x in recovery)
    # --questions: a row longer than the run's rows is skipped and counted, not fatal.
    qs = tmp_path / "qs.jsonl"
    long_q = "In base 10, what is " + "9" * 40 + " + 1?"
    lines = [
        {"question": "In base 10, what is 12 + 30?", "answer": "42"},
        {"question": long_q, "answer": "1" + "0" * 40},
        {"question": "In base 2, what is 1 + 1?", "answer": "10"},
    ]
    qs.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    rep = report.evaluate_workdir(str(tmp_path / "w"), questions=str(qs), decodings=["greedy"])
    assert rep["protocol"]["n"] == 2 and rep["protocol"]["skipped_too_long"] == 1
    bad = tmp_path / "all_long.jsonl"
    bad.write_text(json.dumps(lines[1]) + "\n")
    with pytest.raises(UserError, match="1 too long"):
        report.evaluate_workdir(str(tmp_path / "w"), questions=str(bad), decodings=["greedy"])


def test_zero_shot_eval_of_an_untrained_model(bpe_path, tmp_path):
    """experiments.arithmetic_smollm2's zero-shot figure on a tiny model: exact match and the
    lenient first-number match, on the run's evaluation split, with samples."""
    from experiments import arithmetic_smollm2

    c = _bpe_smoke_config(bpe_path, tmp_path / "data")
    row = arithmetic_smollm2.zero_shot_eval(c)
    assert row["method"] == "zero_shot" and row["split"] == "test" and row["eval/n"] == 8
    assert 0 <= row["eval/accuracy"] <= row["eval/accuracy_first_number"] <= 1
    assert len(row["samples"]) == 4 and "Question: In base" in row["samples"][0]
    assert arithmetic_smollm2.FIRST_NUMBER.findall(" -1a2 = 3")[0] == "-1a2"
