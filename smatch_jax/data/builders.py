"""TFDS builders (array_record files) for the built-in tasks' rows, and split accessors.
The builders check nothing the task's config section already has (`smatch_jax/tasks`).

    builder = build("arithmetic", train_size=5000, difficulty="all", seed=0, T=96)
    builder = build("text", corpus="shakespeare", tokenizer="bpe_train:1000", T=129)
    source = builder.as_data_source("train")        # random access, len(), for make_iterator
    tok = load_tokenizer(builder)                    # the tokenizer the rows were encoded with
    rows = load_split(builder, "test")               # numpy arrays (+ question/answer strings)

Storage: a `tfds.core.GeneratorBasedBuilder` with `file_format="array_record"` (TFDS 4.9.10
needs no TensorFlow), in `data_dir` (default `$SMATCH_JAX_DATA`, else `~/tensorflow_datasets`)
under `<builder>/<config>/<version>`; the config name encodes the parameters and their hash,
so `build` is idempotent (well under a second once a dataset exists); a failed preparation
leaves no directory it made. Each example has `index` (generation order; `load_split` sorts
by it). Statistics, alphabet / tokenizer and parameters are in `builder.info.metadata`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from smatch_jax.data import arithmetic, grammar, text
from smatch_jax.data.rows import make_row
from smatch_jax.data.tokenizer_base import Tokenizer

log = logging.getLogger(__name__)
VERSION = "1.0.0"


def default_data_dir() -> str:
    return os.environ.get("SMATCH_JAX_DATA", str(Path.home() / "tensorflow_datasets"))


def _config_name(prefix: str, params: dict[str, Any]) -> str:
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]
    return f"{prefix}-{digest}"


def _row_features(T: int, **extra: tfds.features.FeatureConnector) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict(
        {
            "tokens": tfds.features.Tensor(shape=(T,), dtype=np.int32),
            "prompt_len": tfds.features.Scalar(dtype=np.int32),
            "length": tfds.features.Scalar(dtype=np.int32),
            "index": tfds.features.Scalar(dtype=np.int32),
            **extra,
        }
    )


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Works around TFDS 4.9.10 needing `importlib_resources` (declared only for Python < 3.9)
    to find a packaged builder's source (we have no checksums file: any path will do)."""

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)


_BASE_FIELDS = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}


@dataclasses.dataclass(eq=False)
class _Config(tfds.core.BuilderConfig):
    def params(self) -> dict[str, Any]:
        """The task parameters of a config (its fields minus TFDS's name, version, ...)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in _BASE_FIELDS}  # fmt: skip

    def canonical(self) -> dict[str, Any]:
        """The parameters as the dataset's identity (its config's name hashes them)."""
        return self.params()


@dataclasses.dataclass(eq=False)
class ArithmeticConfig(_Config):
    """Parameters of `arithmetic.generate_splits`."""

    train_size: int = 5000
    test_size: int = 200
    test_large_size: int = 2000
    validation_size: int = 500
    difficulty: str = "all"
    test_difficulty: str = "interpolate"
    seed: int = 0
    T: int = 96
    sep: str = " "
    tokenizer: str = "char"  # 'char' (the task's characters) or a `get_tokenizer` name
    prompt_format: str = "auto"  # arithmetic.PROMPT_FORMATS ('auto' is resolved by make_config)

    def canonical(self) -> dict[str, Any]:
        """`arithmetic.resolve_params`: e.g. the prompt format resolved."""
        return arithmetic.resolve_params(self.params())


class SmatchArithmetic(_Builder):
    """add_or_sub_in_base questions as rows in any tokenizer (see `smatch_jax.data.arithmetic`)."""

    VERSION = tfds.core.Version(VERSION)
    BUILDER_CONFIGS = [ArithmeticConfig(name="default")]  # noqa: RUF012 (TFDS API)

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=_row_features(
                cfg.T,
                question=tfds.features.Text(),
                answer=tfds.features.Text(),
                base=tfds.features.Scalar(dtype=np.int32),
            ),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        del dl_manager
        cfg = self.builder_config
        splits, stats, tok, meta = arithmetic.generate_dataset(cfg.params())
        self.info.metadata.update(
            params=cfg.params(), **meta, stats={k: dataclasses.asdict(s) for k, s in stats.items()}
        )
        for name, s in stats.items():
            log.info("arithmetic %s: %s", name, s)
        return {name: self._generate_examples(pairs, tok) for name, pairs in splits.items()}

    def tokenizer(self) -> Tokenizer:
        meta = self.info.metadata
        if "alphabet" in meta:  # its own characters
            return arithmetic.tokenizer_for(meta["alphabet"])
        return text.load_tokenizer(meta["tokenizer"])

    def _generate_examples(self, pairs: list[tuple[str, str]], tok: Tokenizer) -> Any:
        cfg = self.builder_config
        for i, (q, a) in enumerate(pairs):
            ex = arithmetic.encode_example(
                q, a, tok, T=cfg.T, sep=cfg.sep, prompt_format=cfg.prompt_format
            )
            yield i, {**ex, "index": np.int32(i)}


@dataclasses.dataclass(eq=False)
class TextConfig(_Config):
    """Parameters of the text task (see `smatch_jax.data.text`)."""

    corpus: str = "shakespeare"
    tokenizer: str = "bpe_train:1000"
    prompt_tokens: int = 64
    completion_tokens: int = 64
    T: int = 129
    doc_chars: int = 20_000
    val_frac: float = 0.05
    test_frac: float = 0.05
    seed: int = 0
    max_files: int = 0  # 0: all files

    def canonical(self) -> dict[str, Any]:
        """A corpus directory's path resolved."""
        p = self.params()
        if p["corpus"] != "shakespeare":
            p["corpus"] = str(Path(p["corpus"]).expanduser().resolve())
        return p


class SmatchText(_Builder):
    """(prompt, continuation) chunks of a text corpus (see `smatch_jax.data.text`)."""

    VERSION = tfds.core.Version(VERSION)
    BUILDER_CONFIGS = [TextConfig(name="default")]  # noqa: RUF012 (TFDS API)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=_row_features(self.builder_config.T, doc=tfds.features.Text()),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        del dl_manager
        cfg = self.builder_config
        files = text.corpus_files(cfg.corpus, cfg.max_files)
        docs = text.split_documents(
            files,
            doc_chars=cfg.doc_chars,
            seed=cfg.seed,
            val_frac=cfg.val_frac,
            test_frac=cfg.test_frac,
        )
        for name, d in docs.items():
            if not d:
                raise ValueError(
                    f"text split {name!r} got no documents ({len(files)} files); use more files, "
                    "a smaller doc_chars or larger val_frac/test_frac"
                )
        tok, stored = text.make_tokenizer(cfg.tokenizer, [t for _, t in docs["train"]])
        rows: dict[str, list[tuple[str, list[int], list[int]]]] = {}
        stats: dict[str, text.ChunkStats] = {}
        for name, d in docs.items():
            stats[name] = text.ChunkStats()
            rows[name] = [
                (key, p, c)
                for key, t in d
                for p, c in text.chunk_ids(
                    tok.encode(t), cfg.prompt_tokens, cfg.completion_tokens, stats[name]
                )
            ]
            if not rows[name]:
                raise ValueError(f"text split {name!r} has no chunks: documents are too short")
            log.info("text %s: %s", name, stats[name])
        self.info.metadata.update(
            params=cfg.params(),
            tokenizer=stored,
            vocab_size=tok.vocab_size,
            stats={k: dataclasses.asdict(s) for k, s in stats.items()},
        )
        return {name: self._generate_examples(r, tok) for name, r in rows.items()}

    def tokenizer(self) -> Tokenizer:
        return text.load_tokenizer(self.info.metadata["tokenizer"])

    def _generate_examples(self, rows: list[tuple[str, list[int], list[int]]], tok: Tokenizer):
        T = self.builder_config.T
        for i, (key, p, c) in enumerate(rows):
            row = make_row(p, c, T=T, eos_id=tok.eos_id, pad_id=tok.pad_id)
            yield i, {**row, "index": np.int32(i), "doc": key}


@dataclasses.dataclass(eq=False)
class GrammarConfig(_Config):
    """Parameters of the grammar task (see `smatch_jax.data.grammar`)."""

    max_depth: int = 6
    max_len: int = 40
    p_end: float = 0.3
    p_open: float = 0.5
    train_size: int = 5000
    validation_size: int = 500
    test_size: int = 500
    seed: int = 0
    T: int = 64

    def spec(self) -> grammar.GrammarSpec:
        return grammar.GrammarSpec(self.max_depth, self.max_len, self.p_end, self.p_open)


class SmatchGrammar(_Builder):
    """Dyck-2 words of a known generator (see `smatch_jax.data.grammar`)."""

    VERSION = tfds.core.Version(VERSION)
    BUILDER_CONFIGS = [GrammarConfig(name="default")]  # noqa: RUF012 (TFDS API)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=_row_features(self.builder_config.T, word=tfds.features.Text()),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        del dl_manager
        cfg = self.builder_config
        sizes = {"train": cfg.train_size, "validation": cfg.validation_size}
        sizes["test"] = cfg.test_size
        words = grammar.generate_splits(cfg.spec(), sizes=sizes, seed=cfg.seed)
        ex = grammar.exact(cfg.spec())
        self.info.metadata.update(
            params=cfg.params(),
            alphabet=grammar.ALPHABET,
            tokenizer="char:" + grammar.ALPHABET,
            entropy=ex["entropy"],
            mean_length=ex["mean_length"],
        )
        tok = grammar.tokenizer()
        return {name: self._generate_examples(w, tok) for name, w in words.items()}

    def tokenizer(self) -> Tokenizer:
        return grammar.tokenizer()

    def _generate_examples(self, words: list[str], tok: Tokenizer) -> Any:
        T = self.builder_config.T
        for i, w in enumerate(words):
            yield i, {**grammar.encode_example(w, tok, T=T), "index": np.int32(i)}


DATASETS: dict[str, tuple[type[tfds.core.GeneratorBasedBuilder], type, str]] = {
    "arithmetic": (SmatchArithmetic, ArithmeticConfig, "arith"),
    "grammar": (SmatchGrammar, GrammarConfig, "dyck"),
    "text": (SmatchText, TextConfig, "text"),
}


def make_config(task: str, **params: Any) -> tfds.core.BuilderConfig:
    """The builder config of `task` with `params` (unknown names raise TypeError)."""
    if task not in DATASETS:
        raise ValueError(f"unknown data task {task!r}; valid: {sorted(DATASETS)}")
    _, config_cls, prefix = DATASETS[task]
    full = config_cls(name="tmp", **params).canonical()
    return config_cls(name=_config_name(prefix, full), **full)


@contextlib.contextmanager
def _quiet_tfds() -> Iterator[None]:
    """TFDS's progress bars, its printed banners and its absl warnings ("Using custom data
    configuration") silenced while it prepares a dataset: `build` logs one line instead."""
    from absl import logging as absl_logging

    verbosity = absl_logging.get_verbosity()
    tfds.display_progress_bar(False)
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        absl_logging.set_verbosity(verbosity)
        tfds.display_progress_bar(True)


def build(
    task: str, *, data_dir: str | os.PathLike | None = None, **params: Any
) -> tfds.core.DatasetBuilder:
    """The prepared builder of `task` (generated and written on first use, then cached)."""
    config = make_config(task, **params)
    data_dir = str(data_dir or default_data_dir())
    make = lambda: DATASETS[task][0](config=config, data_dir=data_dir, file_format="array_record")
    root, name = Path(data_dir), DATASETS[task][0].name
    ours = (root, root / name, root / name / config.name, root / "downloads")
    made = [d for d in ours if not d.exists()]  # a failed preparation removes these
    with _quiet_tfds():
        builder = make()
        try:
            if builder.is_prepared():
                return builder
            builder.download_and_prepare()
        except FileExistsError:  # another process prepared the same dataset at the same time
            builder = make()
            if not builder.is_prepared():
                raise
        except BaseException:
            for d in made:
                shutil.rmtree(d, ignore_errors=True)
            raise
    log.info("prepared %s/%s in %s", task, config.name, data_dir)
    return builder


def load_tokenizer(builder: tfds.core.DatasetBuilder) -> Tokenizer:
    """The tokenizer a built dataset was encoded with (bkspc_id == vocab_size)."""
    return builder.tokenizer()


def data_source(builder: tfds.core.DatasetBuilder, split: str) -> Any:
    """Random-access source of `split` (raises naming the valid splits)."""
    if split not in builder.info.splits:
        raise ValueError(f"unknown split {split!r}; valid: {sorted(builder.info.splits)}")
    source = builder.as_data_source(split=split)
    if len(source) == 0:
        raise ValueError(f"split {split!r} of {builder.info.full_name} is empty")
    return source


def load_split(builder: tfds.core.DatasetBuilder, split: str) -> dict[str, Any]:
    """Every example of `split` in generation order, as numpy arrays.

    tokens [N, T], prompt_len [N], length [N], index [N] (int32); plus question / answer (lists
    of str) and base [N] for arithmetic, doc (list of str) for text, word for grammar.
    """
    source = data_source(builder, split)
    exs = sorted(source.__getitems__(list(range(len(source)))), key=lambda e: int(e["index"]))
    out: dict[str, Any] = {}
    for k in exs[0]:
        vals = [e[k] for e in exs]
        if isinstance(vals[0], bytes | str):
            out[k] = [v.decode() if isinstance(v, bytes) else v for v in vals]
        else:
            out[k] = np.stack(vals).astype(np.int32)
    return out
