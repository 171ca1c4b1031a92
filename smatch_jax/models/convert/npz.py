"""Our own small-checkpoint format: a model's parameters, its `ModelConfig` and its tokenizer's
vocabulary in one `.npz`, with a content hash.

For committing a small base model next to the code (`experiments/assets/`), so that a run can
start from it without pretraining: `model.init = 'npz:<path>'` with `model.init_sha256` the
hash printed by `save_npz`. The hash covers the arrays (names, dtypes, shapes, bytes), the
config and the vocabulary, not the zip container, so it is the same for the same weights
whatever the file's timestamps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence

import numpy as np

from smatch_jax.models.config import ModelConfig
from smatch_jax.models.convert.common import model_from_params, model_params
from smatch_jax.models.transformer import Transformer

_META = ("__config__", "__vocab__")


def content_sha256(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_npz(model: Transformer, path: str | os.PathLike, vocab: Sequence[str]) -> str:
    """Writes the model's float32 parameters, config and `vocab` (the text of every token id);
    returns the content hash to pin as `model.init_sha256`."""
    arrays = {k: np.asarray(v, np.float32) for k, v in model_params(model).items()}
    config = dataclasses.asdict(model.config)
    del config["scan_layers"]  # a layout, not the weights: the file loads into either
    arrays["__config__"] = np.frombuffer(json.dumps(config, sort_keys=True).encode(), np.uint8)
    arrays["__vocab__"] = np.frombuffer(json.dumps(list(vocab)).encode(), np.uint8)
    np.savez(path, **arrays)
    return content_sha256(arrays)


def load_npz(
    path: str | os.PathLike, *, sha256: str = "", dtype: str = "float32", scan_layers: bool = False
) -> tuple[Transformer, list[str]]:
    """(model, vocab) of a file written by `save_npz`, its blocks in the layout `scan_layers`
    names; with `sha256`, the content must match."""
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    missing = [k for k in _META if k not in arrays]
    if missing:
        raise ValueError(f"{path} is not a smatch_jax npz checkpoint (no {missing})")
    got = content_sha256(arrays)
    if sha256 and got != sha256:
        raise ValueError(
            f"{path} has content hash {got}, expected {sha256}: the file is not the one this "
            "config was written for; regenerate it with the command that made it"
        )
    cfg = json.loads(arrays.pop("__config__").tobytes().decode())
    vocab = json.loads(arrays.pop("__vocab__").tobytes().decode())
    config = ModelConfig(**{**cfg, "dtype": dtype, "param_dtype": dtype}, scan_layers=scan_layers)
    return model_from_params(config, arrays), vocab
