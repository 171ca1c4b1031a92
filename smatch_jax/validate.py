"""Checks that run before any expensive work, each failure one message naming the fix.

* `check_config(config)`: unknown keys (with a did-you-mean), wrong value types, values out of
  range and incompatible settings, all reported together as one `ConfigError`.
* `check_override_keys(config, keys)`: the same did-you-mean for `--config.a.b=...` flags.
* `check_tokenizer(tok)`: `<bkspc>` must be the id just past the base vocabulary.
* `prepare_workdir(workdir, config, force=...)`: the workdir must be writable, and a workdir
  holding another config's `config.json` is refused (with a diff) unless forced. Fields that
  only change how long or how often a run does things (`RESUMABLE_CHANGES`) may change.
* `check_free_space(path, bytes_per_ckpt, keep)`: refuse to start when one checkpoint does not
  fit on the disk; warn when `keep + 1` do not.

The schema is `configs.common.base_config()`: every field a config may have is defined there.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from smatch_jax.data.train_data import EVAL_SPLITS
from smatch_jax.eval import decoding
from smatch_jax.losses import LossConfig

log = logging.getLogger(__name__)

# Fields a resumed run may change: run length, cadences, where the data lives, the mesh. A
# resumed run stays bit-identical to an uninterrupted one except for `train.num_steps` (the
# cosine schedule is recomputed for the new length) and the mesh (equal to float tolerance).
RESUMABLE_CHANGES = (
    "train.num_steps",
    "train.log_every",
    "train.eval_every",
    "train.ckpt_every",
    "train.keep_ckpts",
    "data.data_dir",
    "mesh.data",
    "mesh.fsdp",
    "distributed",
)

CHOICES = {
    "data.task": ("arithmetic", "text"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "noise.kind": ("ground_truth", "random"),
    "optim.schedule": ("cosine", "constant"),
    "train.nonfinite": ("stop", "skip"),
}

# (key, lowest allowed, highest allowed, inclusive low); None = unbounded.
RANGES = (
    ("seed", 0, None, True),
    ("data.seq_len", 2, None, True),
    ("data.prompt_max", 0, None, True),
    ("noise.rate", 0.0, 1.0, True),
    ("noise.max_burst", 1, None, True),
    ("sampling.sample_every", 1, None, True),
    ("sampling.temperature", 0.0, None, False),
    ("sampling.top_k", 0, None, True),
    ("sampling.top_p", 0.0, 1.0, False),
    ("replay.capacity", 1, None, True),
    ("optim.lr", 0.0, None, True),
    ("optim.warmup_steps", 0, None, True),
    ("optim.clip_norm", 0.0, None, True),
    ("train.num_steps", 1, None, True),
    ("train.batch_size", 1, None, True),
    ("train.model_rows", 0, None, True),
    ("train.log_every", 1, None, True),
    ("train.eval_every", 1, None, True),
    ("train.ckpt_every", 1, None, True),
    ("train.keep_ckpts", 1, None, True),
    ("train.max_skips", 0, None, True),
    ("mesh.fsdp", 1, None, True),
    ("eval.num_samples", 1, None, True),
    ("eval.temperature", 0.0, None, False),
)
# The loss section's choices and ranges are written once, in its typed config.
CHOICES.update({f"loss.{k}": v for k, v in LossConfig.CHOICES.items()})
RANGES += tuple((f"loss.{k}", *rest) for k, *rest in LossConfig.RANGES)


class ConfigError(ValueError):
    """The config cannot run; the message lists every problem and its fix."""


class WorkdirError(RuntimeError):
    """The workdir cannot be used (unwritable, full, or made by a different config)."""


def schema():
    """Every field a config may have, with its default (configs/common.py)."""
    from configs.common import base_config  # configs/ lives at the repository root

    return base_config()


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a.b': value} of a nested mapping (a ConfigDict or a dict)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if hasattr(value, "items"):  # a section (dict or ConfigDict)
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def did_you_mean(key: str, known: Iterable[str]) -> str:
    """The message for an unknown key: the closest known key, else the section's keys."""
    known = sorted(known)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f"unknown config key {key!r}; did you mean {close[0]!r}?"
    section = key.rpartition(".")[0]
    siblings = [k for k in known if k.rpartition(".")[0] == section]
    hint = f"; {section or 'the top level'} has {siblings}" if siblings else ""
    return f"unknown config key {key!r}{hint}"


def check_override_keys(config: Mapping[str, Any], keys: Iterable[str]) -> None:
    """Raise ConfigError for `--config.<key>` overrides naming no field of `config`."""
    known = flatten(config)
    sections = {k.rsplit(".", i)[0] for k in known for i in range(1, k.count(".") + 1)}
    bad = [did_you_mean(k, known) for k in keys if k not in known and k not in sections]
    if bad:
        raise ConfigError("\n".join(bad))


def _type_problem(key: str, value: Any, default: Any) -> str | None:
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    else:
        return None
    if ok:
        return None
    want = type(default).__name__
    return f"{key}={value!r} has type {type(value).__name__}; it must be of type {want}"


def _range_problem(key: str, value: Any, low, high, inclusive: bool) -> str | None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None  # reported as a type problem
    too_low = low is not None and (value < low if inclusive else value <= low)
    too_high = high is not None and value > high
    if not (too_low or too_high):
        return None
    lo = "-inf" if low is None else low
    hi = "inf" if high is None else high
    return f"{key}={value} is out of range; it must be in {'[' if inclusive else '('}{lo}, {hi}]"


def _schema_problems(flat: dict[str, Any], defaults: dict[str, Any]) -> list[str]:
    problems = [did_you_mean(k, defaults) for k in flat if k not in defaults]
    for key, value in flat.items():
        if key in defaults:
            problems.append(_type_problem(key, value, defaults[key]))
    return [p for p in problems if p]


def _value_problems(flat: dict[str, Any]) -> list[str]:
    problems = []
    for key, choices in CHOICES.items():
        if key in flat and flat[key] not in choices:
            problems.append(f"{key}={flat[key]!r} is unknown; choose one of {list(choices)}")
    for key, low, high, inclusive in RANGES:
        if key in flat:
            problems.append(_range_problem(key, flat[key], low, high, inclusive))
    if flat["mesh.data"] != -1 and flat["mesh.data"] < 1:
        problems.append(f"mesh.data={flat['mesh.data']} must be -1 (all devices) or >= 1")
    return [p for p in problems if p]


def _model_problems(flat: dict[str, Any]) -> list[str]:
    from configs.common import MODEL_PRESETS

    init, preset = flat.get("model.init", "scratch"), flat.get("model.preset")
    if init == "scratch" and preset not in MODEL_PRESETS:
        return [f"model.preset={preset!r} is unknown; choose one of {sorted(MODEL_PRESETS)}"]
    if init != "scratch" and init != "smollm2" and not init.startswith(("hf:", "ckpt:")):
        return [f"model.init={init!r}; use 'scratch', 'smollm2', 'hf:<dir>' or 'ckpt:<workdir>'"]
    return []


def _compatibility_problems(flat: dict[str, Any]) -> list[str]:
    problems = []
    sm_on = flat["loss.sm_weight"] > 0
    if sm_on and flat["loss.value_on"] == "mix" and flat["train.model_rows"] == 0:
        problems.append(
            "loss.value_on='mix' needs rows sampled from the model, but train.model_rows=0; "
            "set train.model_rows > 0, or loss.value_on='data' (offline SequenceMatch)"
        )
    if flat["loss.bc_weight"] + flat["loss.sm_weight"] + flat["loss.unlikelihood_weight"] <= 0:
        problems.append("loss.bc_weight, sm_weight and unlikelihood_weight are all 0: no loss")
    T, prompt_max = flat["data.seq_len"], flat["data.prompt_max"]
    if prompt_max and prompt_max >= T:
        problems.append(
            f"data.prompt_max={prompt_max} leaves no room for actions in data.seq_len={T}; "
            "raise data.seq_len or lower data.prompt_max (0: the longest prompt in the data)"
        )
    try:
        decoding.parse_decodings(flat["eval.decodings"])
    except ValueError as e:
        problems.append(f"eval.decodings={flat['eval.decodings']!r}: {e}")
    splits = EVAL_SPLITS.get(flat["data.task"], ())
    if flat["data.eval_split"] and flat["data.eval_split"] not in splits:
        problems.append(
            f"data.eval_split={flat['data.eval_split']!r} is not a split of "
            f"{flat['data.task']}; choose one of {list(splits)} ('' for {splits[0]!r})"
        )
    if flat["data.task"] == "arithmetic":
        for key in ("data.train_size", "data.test_size", "data.validation_size"):
            if flat[key] < 1:
                problems.append(f"{key}={flat[key]} would make an empty split; set it >= 1")
    if flat["data.task"] == "text":
        need = flat["data.prompt_tokens"] + flat["data.completion_tokens"] + 1
        if flat["data.prompt_tokens"] < 1:
            problems.append("data.prompt_tokens must be >= 1 for the text task")
        if need > T:
            problems.append(
                f"data.seq_len={T} is shorter than a text row: prompt_tokens + "
                f"completion_tokens + 1 (eos) = {need}; raise data.seq_len to at least {need}"
            )
    return problems


def check_config(config: Mapping[str, Any]) -> None:
    """Raise ConfigError listing every problem of `config` (one line each, naming the fix)."""
    flat = flatten(config)
    defaults = flatten(schema())
    problems = _schema_problems(flat, defaults)
    if not problems:  # the rest assumes known keys of the right types
        full = {**defaults, **flat}
        problems = _value_problems(full) + _model_problems(full)
        problems += [] if problems else _compatibility_problems(full)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def check_tokenizer(tok) -> None:
    """`<bkspc>` must be the id just past the base vocabulary; the specials inside it."""
    V = tok.vocab_size
    if tok.bkspc_id != V:
        raise ConfigError(
            f"the <bkspc> id {tok.bkspc_id} must be vocab_size={V} (the id just past the base "
            "vocabulary, which the model's output layer adds); do not reuse a token id for it"
        )
    for name in ("eos_id", "pad_id", "bos_id"):
        i = getattr(tok, name, None)
        if i is not None and not 0 <= i < V:
            raise ConfigError(f"the tokenizer's {name}={i} is outside its vocabulary [0, {V})")


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{key: (old, new)} of the leaves that differ (a missing key counts as its default)."""
    defaults = flatten(schema())
    a, b = flatten(old), flatten(new)
    keys = sorted(set(a) | set(b))
    missing = object()
    out = {}
    for k in keys:
        x, y = a.get(k, defaults.get(k, missing)), b.get(k, defaults.get(k, missing))
        if x != y:
            out[k] = (None if x is missing else x, None if y is missing else y)
    return out


def prepare_workdir(workdir: str | Path, config: Mapping[str, Any], *, force: bool = False):
    """Create `workdir`, check it is writable and not another config's; return the diff.

    Raises WorkdirError if it cannot be written, or if its `config.json` differs from `config`
    outside `RESUMABLE_CHANGES` (unless `force`). The returned diff (possibly empty) is what
    this run changes; the caller logs it and writes the new config.json.
    """
    wd = Path(workdir)
    try:
        wd.mkdir(parents=True, exist_ok=True)
        probe = wd / f".write_test.{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise WorkdirError(
            f"workdir {wd} is not writable ({e.strerror or e}); choose another --workdir or "
            "fix its permissions / free space"
        ) from e
    saved = wd / "config.json"
    if not saved.exists():
        return {}
    try:
        old = json.loads(saved.read_text())
    except ValueError as e:
        raise WorkdirError(f"{saved} is not valid JSON ({e}); move it away to start over") from e
    diff = config_diff(old, config)
    refused = {k: v for k, v in diff.items() if k not in RESUMABLE_CHANGES}
    if refused and not force:
        lines = [f"  {k}: {a!r} (workdir) -> {b!r} (now)" for k, (a, b) in refused.items()]
        raise WorkdirError(
            f"workdir {wd} holds a run of a different config; refusing to resume it:\n"
            + "\n".join(lines)
            + "\nUse a new --workdir, or pass --force_resume (train(..., force_resume=True)) "
            "to continue this workdir with the new config."
        )
    if refused:
        shutil.copy(saved, wd / "config.previous.json")
        log.warning("force_resume: continuing %s with a changed config: %s", wd, refused)
    return diff


def check_free_space(path: str | Path, bytes_per_ckpt: int, keep: int) -> None:
    """Raise WorkdirError if one checkpoint cannot fit in `path`; warn if keep + 1 cannot."""
    free = shutil.disk_usage(path).free
    mb = 1 << 20
    if free < bytes_per_ckpt:
        raise WorkdirError(
            f"{path} has {free / mb:.1f} MB free but one checkpoint needs about "
            f"{bytes_per_ckpt / mb:.1f} MB; free disk space or choose another --workdir"
        )
    if free < (keep + 1) * bytes_per_ckpt:
        log.warning(
            "%s has %.1f MB free; keeping %d checkpoints (+1 being written) needs about %.1f MB",
            path,
            free / mb,
            keep,
            (keep + 1) * bytes_per_ckpt / mb,
        )
