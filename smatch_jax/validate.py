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
* `lock_workdir(workdir, process)`: refuse a second process training the same workdir.

The schema is `smatch_jax.config.base_config()`; each section's allowed values and ranges are
its typed config's (`sections.Section`), checked here all at once.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from smatch_jax import config as config_lib
from smatch_jax import storage, tasks
from smatch_jax.errors import UserError
from smatch_jax.sections import did_you_mean, flatten

log = logging.getLogger(__name__)

# Fields a resumed run may change: run length, cadences, where the data lives, how it is
# evaluated, the mesh, rematerialisation. A resumed run stays bit-identical to an uninterrupted
# one except for `train.num_steps` (the cosine schedule is recomputed for the new length), the
# mesh and `model.remat` (equal to float tolerance: XLA may fuse the recomputation otherwise).
RESUMABLE_CHANGES = (
    "train.num_steps",
    "train.log_every",
    "train.eval_every",
    "train.ckpt_every",
    "train.keep_ckpts",
    "train.compilation_cache",
    "train.time_split",
    "train.profile_steps",
    "train.profile_start",
    "train.profile_all_hosts",
    "data.data_dir",
    "eval.decodings",
    "eval.num_samples",
    "eval.temperature",
    "eval.recovery",
    "model.remat",
    "mesh.data",
    "mesh.fsdp",
    "mesh.tensor",
    "mesh.rules",
    "distributed",
)


class ConfigError(UserError, ValueError):
    """The config cannot run; the message lists every problem and its fix."""


class WorkdirError(UserError, RuntimeError):
    """The workdir cannot be used (unwritable, full, or made by a different config)."""


def schema():
    """Every field a config may have, with its default (smatch_jax/config.py)."""
    return config_lib.base_config()


def check_override_keys(config: Mapping[str, Any], keys: Iterable[str]) -> None:
    """Raise ConfigError for `--config.<key>` overrides naming no field of `config`."""
    known = flatten(config)
    sections = {k.rsplit(".", i)[0] for k in known for i in range(1, k.count(".") + 1)}
    bad = [did_you_mean(k, known) for k in keys if k not in known and k not in sections]
    if bad:
        raise ConfigError("\n".join(bad))


def _compatibility_problems(c) -> list[str]:
    """Problems between sections of a typed config (inside one: its `cross_problems`)."""
    problems = []
    if c.loss.samples_model_rows and c.train.model_rows == 0:
        problems.append(
            "loss.value_on='mix' needs rows sampled from the model, but train.model_rows=0; "
            "set train.model_rows > 0, or loss.value_on='data' (offline SequenceMatch)"
        )
    if c.noise.kind == "errors" and not tasks.get(c.data.task).has_automaton:
        with_one = [n for n in tasks.names() if tasks.get(n).has_automaton]
        problems.append(
            f"noise.kind='errors' needs a task with a prefix automaton ({' / '.join(with_one)}), "
            f"not {c.data.task!r}; use noise.kind='ground_truth' or 'random'"
        )
    return problems


def check_config(config: Mapping[str, Any]) -> config_lib.Typed:
    """Raise ConfigError listing every problem of `config` (one line each, naming the fix);
    return the typed config (`config.Typed`)."""
    defaults = flatten(schema())
    problems = [did_you_mean(k, defaults) for k in flatten(config) if k not in defaults]
    typed = None
    if not problems:
        try:
            typed = config_lib.typed(config)  # each section checked once, as it is built
        except ValueError as e:
            problems = str(e).splitlines()
    if typed is not None:
        problems = _compatibility_problems(typed)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    return typed


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
    a, b = flatten(config_lib.upgrade(old)), flatten(new)
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
    this run changes; the caller logs it and, once its checkpoint is restored, writes the new
    config.json (and, if forced, keeps the old one as config.previous.json). Nothing in an
    existing workdir is changed here.
    """
    wd = storage.path(workdir)
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
    return diff


def lock_workdir(workdir: str | Path, process: int = 0):
    """Hold `workdir/.train_lock.<process>` for as long as the returned file stays open (in
    object storage: a lock object, `storage.ObjectLock`, released when the returned object
    exits its `with` block).

    Two processes training one workdir would interleave its checkpoints and metrics; the
    second is refused with a WorkdirError naming the first. The lock is the kernel's (flock),
    so it goes with its process, also on SIGKILL: nothing stale is left to clean up. On a
    file system without locks it warns and goes on. The hosts of a multi-host run each take
    their own (`process` = `jax.process_index()`).
    """
    if storage.is_remote(workdir):
        return _object_lock(workdir, process)
    f = open(Path(workdir) / f".train_lock.{process}", "a+")  # noqa: SIM115 (held by caller)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise WorkdirError(
            f"{holder} is training in {workdir}; wait for it to end, stop it (SIGTERM saves a "
            "checkpoint, and a rerun resumes from it), or choose another --workdir"
        ) from None
    except OSError as e:
        log.warning("cannot lock %s (%s): nothing stops a second run in it", workdir, e)
        return f
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}")
    f.flush()
    return f


def _object_lock(workdir, process: int):
    url = f"{str(workdir).rstrip('/')}/.train_lock.{process}"
    try:
        return storage.ObjectLock(url, storage.holder_text()).acquire()
    except storage.LockHeldError as e:
        raise WorkdirError(
            f"{e.holder} is training in {workdir} (its lock object was refreshed {e.age:.0f} s "
            "ago); wait for it to end, or stop it (SIGTERM saves a checkpoint, and a rerun "
            f"resumes from it). If it was killed, rerun once its lease of {e.lease:.0f} s has "
            f"run out ({storage.LEASE_ENV}), or choose another --workdir"
        ) from None


def check_free_space(path: str | Path, bytes_per_ckpt: int, keep: int) -> None:
    """Raise WorkdirError if one checkpoint cannot fit in `path`; warn if keep + 1 cannot
    (object storage: nothing to check)."""
    if storage.is_remote(path):
        return
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
