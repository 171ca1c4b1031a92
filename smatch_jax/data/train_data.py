"""What the training loop needs from the data layer, built from `config.data`.

`TrainData` bundles the tokenizer, the resumable training iterator (process-local batches),
the training rows (for the ground-truth noise distribution) and the evaluation split.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
import numpy as np

from smatch_jax import masks
from smatch_jax.data import builders, pipeline
from smatch_jax.data.tokenizer_base import Tokenizer

TASKS = ("arithmetic", "text")
# The splits `data.eval_split` may name per task; the first is the default ('').
EVAL_SPLITS = {"arithmetic": ("test", "validation", "test_large"), "text": ("validation", "test")}


@dataclasses.dataclass
class TrainData:
    tokenizer: Tokenizer
    train_rows: tuple[np.ndarray, np.ndarray, np.ndarray]  # tokens, prompt_len, length
    eval_split: dict[str, Any]  # tokens, prompt_len, length (+ question / answer)
    eval_name: str  # which split `eval_split` is ('test', 'validation', ...)
    prompt_max: int  # longest prompt in train and eval
    iterator: Any  # grain DatasetIterator of process-local batches

    def next(self) -> dict[str, np.ndarray]:
        return next(self.iterator)

    def get_state(self) -> dict:
        return self.iterator.get_state()

    def set_state(self, state: dict) -> None:
        self.iterator.set_state(state)


def build_train_data(
    config: ml_collections.ConfigDict, process_index: int = 0, process_count: int = 1
) -> TrainData:
    d = config.data
    if d.task not in TASKS:
        raise ValueError(f"data.task={d.task!r} is unknown; choose one of {TASKS}")
    eval_name = d.get("eval_split") or EVAL_SPLITS[d.task][0]
    if eval_name not in EVAL_SPLITS[d.task]:
        raise ValueError(
            f"data.eval_split={eval_name!r} is not a split of {d.task}; choose one of "
            f"{list(EVAL_SPLITS[d.task])}"
        )
    common = dict(data_dir=d.data_dir or None, T=d.seq_len, seed=config.seed)
    if d.task == "arithmetic":
        b = builders.build(
            "arithmetic",
            train_size=d.train_size,
            test_size=d.test_size,
            difficulty=d.difficulty,
            test_difficulty=d.get("test_difficulty") or "interpolate",
            validation_size=d.get("validation_size", 500),
            **common,
        )
    else:
        b = builders.build(
            "text",
            corpus=d.corpus,
            tokenizer=d.tokenizer,
            prompt_tokens=d.prompt_tokens,
            completion_tokens=d.completion_tokens,
            max_files=d.max_files,
            **{**common, "seed": _split_seed(config)},
        )
    tok = builders.load_tokenizer(b)
    train = builders.load_split(b, "train")
    ev = builders.load_split(b, eval_name)
    # Text: evaluate on the first test_size chunks (arithmetic splits have their own sizes).
    if d.task == "text" and d.test_size and len(ev["prompt_len"]) > d.test_size:
        ev = {k: v[: d.test_size] for k, v in ev.items()}
    for name, split in (("train", train), (eval_name, ev)):
        if len(split["prompt_len"]) == 0:
            raise ValueError(f"the {name} split is empty; check data.train_size / data.test_size")
        masks.check_rows(
            split["tokens"], split["prompt_len"], split["length"], n_actions=tok.vocab_size + 1
        )
    longest = int(max(train["prompt_len"].max(), ev["prompt_len"].max()))
    prompt_max = d.prompt_max or longest
    if longest > prompt_max or prompt_max >= d.seq_len:
        raise ValueError(
            f"data.prompt_max={prompt_max} must cover the longest prompt ({longest}) and leave "
            f"room for actions in data.seq_len={d.seq_len}; raise seq_len or set prompt_max=0"
        )
    global_batch = config.train.batch_size
    if global_batch % process_count:
        raise ValueError(
            f"train.batch_size={global_batch} must divide over {process_count} processes"
        )
    it = pipeline.make_iterator(
        pipeline.ArraySource(train),
        batch_size=global_batch // process_count,
        seed=config.seed,
        process_index=process_index,
        process_count=process_count,
    )
    rows = (train["tokens"], train["prompt_len"], train["length"])
    return TrainData(tok, rows, ev, eval_name, prompt_max, it)


def _split_seed(config: ml_collections.ConfigDict) -> int:
    """Text: the seed of the document split and the trained BPE (`data.split_seed`, or the
    run's seed when it is -1 or absent), so runs of several seeds can share one dataset."""
    split_seed = config.data.get("split_seed", -1)
    return config.seed if split_seed is None or split_seed < 0 else split_seed
