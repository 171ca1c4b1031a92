"""The arithmetic task: `add_or_sub_in_base` from DeepMind's mathematics_dataset (1.0.1).

    "In base 7, what is -1403 + 62?"  ->  "-1311"

Questions come from the library's own generator, seeded with `random.seed` (the module uses only
Python's global `random`; we save and restore its state around generation). Difficulty is the
library's entropy range: train "easy" / "medium" / "hard" are the thirds of the train range
(3, 10) exactly as its `generate.py --train_split` makes them, "all" is the whole range, and
"interpolate" is its test entropy (8, 8). Like the library we drop questions longer than 160
characters and answers longer than 30; we also drop rows that do not fit T tokens. Every drop
is replaced by a fresh sample and counted in `GenStats` (nothing is dropped silently).

Splits, generated in this order from independent seeds so that `test` never depends on the
train size or difficulty: `test` (default 200 questions), `test_large` (default 2000, for tight
error bars), `train` (default 5000, as in the paper), `validation` (default 500, of the train
difficulty: where experiments choose their settings). Questions are unique within and across
splits.

Rows, in any tokenizer (`tokenizer`: "char", the default, or a name of `get_tokenizer`:
"smollm2", "gpt2", "bpe:PATH.json"). `render` writes a question and its answer as text in one
of two prompt formats, then the tokenizer encodes prompt and completion separately (completion
= answer tokens + the tokenizer's eos):

    compact   "In base 7, what is -1403 + 62?" + sep  |  "-1311"
    qa        "Question: In base 7, what is -1403 + 62?\nAnswer:"  |  " -1311"

`auto` is `compact` for the character tokenizer (one id per character, short rows) and `qa` for
a pretrained LM's tokenizer: plain text a base or chat model reads naturally. The character
tokenizer's alphabet is the sorted set of characters used by the task (question template,
signs, the digits 0-9a-f of bases 2..16, and every character of the rendered text). Rows that
do not fit T tokens in the chosen tokenizer are resampled and counted.

mathematics_dataset 1.0.1 imports `base_solution_linear` from `sympy.solvers.diophantine`, which
moved to `sympy.solvers.diophantine.diophantine` in sympy 1.7; `_import_module` aliases it back.
"""

from __future__ import annotations

import dataclasses
import importlib
import random
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from smatch_jax.data.rows import make_row
from smatch_jax.data.tokenizer_base import Tokenizer
from smatch_jax.data.tokenizers import CharTokenizer, get_tokenizer
from smatch_jax.errors import UserError

DIFFICULTIES = ("easy", "medium", "hard", "all", "interpolate")
MAX_QUESTION_LENGTH = 160  # mathematics_dataset.generate_settings
MAX_ANSWER_LENGTH = 30
BASE_DIGITS = "0123456789abcdef"  # the module samples bases 2..16
QUESTION_RE = re.compile(r"In base (\d+), what is (-?[0-9a-z]+) ([+-]) (-?[0-9a-z]+)\?")
SPECIALS = ("<eos>", "<pad>")
VALIDATION_SEED_OFFSET = 1_000_003  # the validation split's seed is seed * 3 + this
PROMPT_FORMATS = ("auto", "compact", "qa")
# Tokenizers the task accepts: its own characters, or a pretrained LM's (tokenizers.py).
TOKENIZERS = ("char", "smollm2", "gpt2", "bpe:<path.json>")


def _import_module() -> Any:
    """`mathematics_dataset.modules.arithmetic`, importable with sympy >= 1.7."""
    try:
        dioph = importlib.import_module("sympy.solvers.diophantine")
        if not hasattr(dioph, "base_solution_linear"):
            inner = sys.modules["sympy.solvers.diophantine.diophantine"]
            dioph.base_solution_linear = inner.base_solution_linear
        return importlib.import_module("mathematics_dataset.modules.arithmetic")
    except ImportError as e:
        raise ImportError(
            f"the arithmetic task needs mathematics-dataset==1.0.1 and sympy ({e}); "
            "`pip install mathematics-dataset==1.0.1 sympy==1.14.0`"
        ) from e


def _entropy_fn(difficulty: str) -> Callable[[tuple[float, float]], tuple[float, float]]:
    level = {"easy": 0, "medium": 1, "hard": 2}.get(difficulty)

    def fn(range_: tuple[float, float]) -> tuple[float, float]:
        if level is None:
            return range_
        width = range_[1] - range_[0]
        return (range_[0] + level / 3 * width, range_[0] + (level + 1) / 3 * width)

    return fn


def _module_fn(difficulty: str) -> Callable[[], Any]:
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"unknown difficulty {difficulty!r}; valid: {DIFFICULTIES}")
    arithmetic = _import_module()
    if difficulty == "interpolate":
        return arithmetic.test()["add_or_sub_in_base"]
    return arithmetic.train(_entropy_fn(difficulty))["add_or_sub_in_base"]


@dataclasses.dataclass
class GenStats:
    """How many samples each filter rejected while generating one split."""

    generated: int = 0
    kept: int = 0
    too_long_text: int = 0  # question > 160 or answer > 30 characters (library limits)
    too_long_row: int = 0  # row does not fit T tokens
    duplicate: int = 0  # question already in this or an excluded split


def generate_problems(
    n: int,
    *,
    seed: int,
    difficulty: str,
    exclude: Iterable[str] = (),
    accept: Callable[[str, str], bool] | None = None,
    max_tries_factor: int = 50,
) -> tuple[list[tuple[str, str]], GenStats]:
    """`n` unique (question, answer) pairs, deterministic in (seed, difficulty, exclude, accept).

    `accept(question, answer)` rejects pairs (e.g. rows that do not fit T); rejected and
    duplicate samples are replaced and counted in the returned `GenStats`.
    """
    if n < 1:
        raise ValueError(f"need n >= 1 questions, got {n}")
    module = _module_fn(difficulty)
    seen, out, stats = set(exclude), [], GenStats()
    state = random.getstate()
    try:
        random.seed(seed)
        while len(out) < n:
            if stats.generated >= max_tries_factor * n + 1000:
                raise TooFewQuestionsError(
                    f"only {len(out)}/{n} acceptable unique questions after {stats.generated} "
                    f"samples ({stats}); {stats.too_long_row} did not fit a row (data.seq_len "
                    "tokens): raise data.seq_len, or ask for fewer questions "
                    "(data.train_size, test_size, validation_size) or another "
                    "data.arithmetic.difficulty"
                )
            problem = module()
            stats.generated += 1
            q, a = str(problem.question), str(problem.answer)
            if len(q) > MAX_QUESTION_LENGTH or len(a) > MAX_ANSWER_LENGTH:
                stats.too_long_text += 1
            elif q in seen:
                stats.duplicate += 1
            elif accept is not None and not accept(q, a):
                stats.too_long_row += 1
            else:
                seen.add(q)
                out.append((q, a))
    finally:
        random.setstate(state)
    stats.kept = len(out)
    return out, stats


class TooFewQuestionsError(UserError, RuntimeError):
    """The config asks for more questions than fit its rows and difficulty."""


def parse_question(question: str) -> tuple[int, int, int]:
    """(base, p, q-signed) of a question: the answer is p + q (for "-", q is negated)."""
    m = QUESTION_RE.fullmatch(question)
    if m is None:
        raise ValueError(f"not an add_or_sub_in_base question: {question!r}")
    base = int(m.group(1))
    p, q = int(m.group(2), base), int(m.group(4), base)
    return base, p, q if m.group(3) == "+" else -q


def check_answer(question: str, answer: str) -> bool:
    """True iff `answer` (a string in the question's base) is the correct result."""
    base, p, q = parse_question(question)
    try:
        return int(answer.strip(), base) == p + q
    except ValueError:
        return False


def alphabet(texts: Iterable[str] = ()) -> str:
    """Sorted characters of the task (template + signs + base-16 digits) and of `texts`."""
    chars = set("In base , what is + - ?" + BASE_DIGITS)
    for t in texts:
        chars.update(t)
    return "".join(sorted(chars))


def tokenizer_for(alphabet_: str) -> CharTokenizer:
    """The task's tokenizer; `get_tokenizer("char:" + alphabet_)` is the same tokenizer."""
    return CharTokenizer(alphabet_, specials=SPECIALS)


def resolve_format(prompt_format: str, tokenizer: str) -> str:
    """The prompt format `auto` stands for: compact for "char", qa for any other tokenizer."""
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"unknown prompt format {prompt_format!r}; valid: {PROMPT_FORMATS}")
    if prompt_format != "auto":
        return prompt_format
    return "compact" if tokenizer in ("", "char") else "qa"


def check_tokenizer_name(name: str) -> None:
    """Raises naming the valid choices unless `name` is a tokenizer the task can use."""
    if name in ("", "char", "smollm2", "gpt2") or (name.startswith("bpe:") and len(name) > 4):
        return
    raise ValueError(
        f"arithmetic cannot use tokenizer {name!r}; choose one of {', '.join(TOKENIZERS)} "
        "(a BPE trained on the task is a file: train it, save it, pass bpe:PATH.json)"
    )


def render(question: str, answer: str, prompt_format: str, sep: str = " ") -> tuple[str, str]:
    """(prompt text, completion text) of a question in a resolved prompt format."""
    if prompt_format == "compact":
        return question + sep, answer
    if prompt_format == "qa":
        return f"Question: {question}\nAnswer:", " " + answer
    raise ValueError(f"prompt format {prompt_format!r}: resolve 'auto' first (resolve_format)")


def encode_example(
    question: str,
    answer: str,
    tok: Tokenizer,
    *,
    T: int,
    sep: str = " ",
    prompt_format: str = "compact",
) -> dict[str, Any]:
    """One example in the row format plus `question`, `answer` and `base` (raises
    `rows.RowTooLongError` when it does not fit T tokens)."""
    prompt, completion = render(question, answer, prompt_format, sep)
    row = make_row(
        tok.encode(prompt), tok.encode(completion), T=T, eos_id=tok.eos_id, pad_id=tok.pad_id
    )
    base = parse_question(question)[0]
    return {**row, "question": question, "answer": answer, "base": np.int32(base)}


def fits(
    T: int, sep: str, tok: Tokenizer | None = None, prompt_format: str = "compact"
) -> Callable[[str, str], bool]:
    """Whether a (question, answer) row fits T tokens: one per character without `tok` (the
    character tokenizer, whose alphabet is known only after generation), else as `tok`
    encodes the rendered prompt and completion (plus eos)."""
    if tok is None:
        return lambda q, a: sum(map(len, render(q, a, prompt_format, sep))) + 1 <= T

    def accept(q: str, a: str) -> bool:
        prompt, completion = render(q, a, prompt_format, sep)
        return len(tok.encode(prompt)) + len(tok.encode(completion)) + 1 <= T

    return accept


def make_tokenizer(name: str, splits: dict[str, list[tuple[str, str]]], **kw: str) -> Tokenizer:
    """The tokenizer of the rows: the task's characters for "char" (`kw`: prompt_format, sep),
    else `get_tokenizer(name)`."""
    if name in ("", "char"):
        texts = (p + c for v in splits.values() for q, a in v for p, c in [render(q, a, **kw)])
        return tokenizer_for(alphabet(texts))
    return get_tokenizer(name)


def generate_splits(
    *,
    train_size: int = 5000,
    test_size: int = 200,
    test_large_size: int = 2000,
    validation_size: int = 500,
    difficulty: str = "all",
    test_difficulty: str = "interpolate",
    seed: int = 0,
    T: int = 128,
    sep: str = " ",
    tokenizer: Tokenizer | None = None,
    prompt_format: str = "compact",
) -> tuple[dict[str, list[tuple[str, str]]], dict[str, GenStats]]:
    """The four splits as (question, answer) lists, pairwise disjoint, and their stats.

    `validation` holds questions of the training difficulty that are in no other split, for
    choosing settings without looking at the test questions. It is generated last, from its
    own seed, so the other splits do not depend on it. Rows must fit T tokens of `tokenizer`
    (None: the character tokenizer) in `prompt_format` (resolved).
    """
    accept = fits(T, sep, tokenizer, prompt_format)
    if T < 4:
        raise ValueError(f"T={T} is too small for any arithmetic row")
    splits: dict[str, list[tuple[str, str]]] = {}
    stats: dict[str, GenStats] = {}
    plan = [
        ("test", test_size, test_difficulty, 1),
        ("test_large", test_large_size, test_difficulty, 2),
        ("train", train_size, difficulty, 0),
        ("validation", validation_size, difficulty, VALIDATION_SEED_OFFSET),
    ]
    for name, n, diff, offset in plan:
        exclude = {q for pairs in splits.values() for q, _ in pairs}
        splits[name], stats[name] = generate_problems(
            n, seed=seed * 3 + offset, difficulty=diff, exclude=exclude, accept=accept
        )
    return splits, stats


def resolve_params(params: dict[str, Any]) -> dict[str, Any]:
    """A dataset's parameters (`generate_splits`' plus `tokenizer`) checked and made canonical:
    the tokenizer named ('' is "char"), a BPE file's path resolved (it is part of the dataset's
    identity), the prompt format resolved."""
    p = dict(params)
    if p["difficulty"] not in DIFFICULTIES:
        raise ValueError(f"unknown difficulty {p['difficulty']!r}: {DIFFICULTIES}")
    p["tokenizer"] = p["tokenizer"] or "char"
    check_tokenizer_name(p["tokenizer"])
    if p["tokenizer"].startswith("bpe:"):
        p["tokenizer"] = "bpe:" + str(Path(p["tokenizer"][4:]).expanduser().resolve())
    p["prompt_format"] = resolve_format(p["prompt_format"], p["tokenizer"])
    return p


def generate_dataset(params: dict[str, Any]):
    """(splits, stats, tokenizer, metadata) of resolved `params`: a pretrained LM's tokenizer
    bounds the rows while they are generated; the character tokenizer is made afterwards from
    the characters used (metadata: its alphabet and "char:" name, else the tokenizer's name)."""
    p = dict(params)
    name = p.pop("tokenizer")
    given = None if name == "char" else get_tokenizer(name)
    splits, stats = generate_splits(**p, tokenizer=given)
    if given is not None:
        return splits, stats, given, {"tokenizer": name, "specials": []}
    tok = make_tokenizer(name, splits, prompt_format=p["prompt_format"], sep=p["sep"])
    meta = {"alphabet": tok.chars, "tokenizer": "char:" + tok.chars, "specials": list(SPECIALS)}
    return splits, stats, tok, meta
