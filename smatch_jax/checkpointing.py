"""Checkpointing (the only module that imports Orbax); preemption is preemption.py.

A checkpoint step directory ``<workdir>/<step>/`` holds four Orbax items:

* ``state``: an arbitrary pytree of jax/numpy arrays (params, optimizer state, RNG keys,
  replay-buffer arrays; the caller packs them), written with ``StandardSave`` and restored
  with ``StandardRestore`` onto the shardings of a pytree of ``jax.ShapeDtypeStruct``;
* ``data_state``: a JSON-able dict (e.g. the grain iterator state); ``bytes`` anywhere in it
  are stored as ``{"__bytes_b64__": "..."}`` and decoded back on restore. JSON turns tuples
  into lists;
* ``extra``: a JSON-able dict (config hash, wall time, ...);
* ``meta``: our own bookkeeping (format version, PRNG implementation of typed key leaves).

Typed PRNG keys (``jax.random.key``) may be leaves of ``state``: they are stored as their
``jax.random.key_data`` and re-wrapped on restore with the implementation recorded at save
time (the abstract leaf is the typed key's ``ShapeDtypeStruct``). Raw uint32 key data works
as an ordinary array.

Atomicity: Orbax writes a step into ``<step>.orbax-checkpoint-tmp[-<ts>]`` and renames it when
complete, so an interrupted write (SIGKILL) is never listed (``cleanup_tmp=True`` deletes it).
A step damaged later is detected when read: :meth:`Checkpointer.restore_latest_valid` falls
back to older steps, warning about each (`read_noise.py` quiets Orbax's own noise); with
``quarantine=True`` unreadable newer steps become ``<step>.unreadable[-k]``, so the resumed
run can write them again. Bit flips in array data are not detected (Orbax keeps no checksums).

Write failures (disk full, quota, permissions) surface, asynchronously, at the next
:meth:`Checkpointer.save`, :meth:`~Checkpointer.wait` or :meth:`~Checkpointer.close` as a
:class:`CheckpointWriteError` naming the step, the cause and the last complete checkpoint.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import threading
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from smatch_jax import read_noise, storage
from smatch_jax.errors import FailureError

__all__ = [
    "CheckpointError",
    "CheckpointWriteError",
    "Checkpointer",
    "abstract_like",
    "decode_json_state",
    "encode_json_state",
]

_FORMAT_VERSION = 1
_ITEMS = ("state", "data_state", "extra", "meta")
_B64_KEY = "__bytes_b64__"


class CheckpointError(FailureError, RuntimeError):
    """No usable checkpoint could be restored."""


class CheckpointWriteError(FailureError, RuntimeError):
    """A checkpoint could not be written (disk full, quota, permissions, ...)."""


def encode_json_state(obj: Any) -> Any:
    """Return ``obj`` with every ``bytes`` value replaced by a base64 marker dict."""
    if isinstance(obj, bytes | bytearray):
        return {_B64_KEY: base64.b64encode(bytes(obj)).decode("ascii")}
    if isinstance(obj, dict):
        return {k: encode_json_state(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [encode_json_state(v) for v in obj]
    return obj


def decode_json_state(obj: Any) -> Any:
    """Inverse of :func:`encode_json_state` (tuples come back as lists)."""
    if isinstance(obj, dict):
        if set(obj) == {_B64_KEY}:
            return base64.b64decode(obj[_B64_KEY])
        return {k: decode_json_state(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode_json_state(v) for v in obj]
    return obj


def _is_typed_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _unwrap_keys(state: Any) -> tuple[Any, dict[str, str]]:
    """Replace typed PRNG key leaves by their key data; return {keystr: impl name}."""
    impls: dict[str, str] = {}

    def unwrap(path, x):
        if _is_typed_key(x):
            impls[jax.tree_util.keystr(path)] = str(jax.random.key_impl(x))
            return jax.random.key_data(x)
        return x

    return jax.tree_util.tree_map_with_path(unwrap, state), impls


def _abstract_key_data(abstract_state: Any) -> Any:
    """Replace abstract typed-key leaves by abstract uint32 key data (same sharding)."""

    def convert(x):
        if _is_typed_key(x):
            data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
            return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=x.sharding)
        return x

    return jax.tree.map(convert, abstract_state)


def _rewrap_keys(state: Any, abstract_state: Any, impls: dict[str, str]) -> Any:
    def rewrap(path, x, abstract):
        if _is_typed_key(abstract):
            name = jax.tree_util.keystr(path)
            if name not in impls:
                raise CheckpointError(f"state leaf {name} was not saved as a typed PRNG key")
            return jax.random.wrap_key_data(x, impl=impls[name])
        return x

    return jax.tree_util.tree_map_with_path(rewrap, state, abstract_state)


_OPEN: set[Checkpointer] = set()
_HOOK_REGISTERED = False


def _close_open_checkpointers() -> None:
    for ckpt in list(_OPEN):
        try:
            ckpt.close()
        except Exception as e:  # keep closing the others; nothing can be raised at exit
            warnings.warn(f"closing {ckpt.workdir} at exit failed: {e}", RuntimeWarning, 2)


def _register_exit_hook() -> None:
    """Finish pending saves at interpreter exit if ``close`` was never called.

    A plain ``atexit`` hook runs too late: by then ``concurrent.futures`` has shut its thread
    pools, which Orbax's finalisation needs. ``threading._register_atexit`` hooks run earlier,
    in reverse registration order, so ours (registered after Orbax created its executors)
    runs before the pools shut down. Falls back to ``atexit`` if that hook is unavailable.
    Not on CPython 3.12.0-3.12.2 (no thread starts once the main thread is done, cpython#113964):
    there a save running at exit fails and the process hangs at exit; close the Checkpointer.
    """
    global _HOOK_REGISTERED
    if _HOOK_REGISTERED:
        return
    try:
        threading._register_atexit(_close_open_checkpointers)
    except (AttributeError, RuntimeError):  # the private hook is gone, or refuses
        atexit.register(_close_open_checkpointers)
    _HOOK_REGISTERED = True


class Checkpointer:
    """Keep-last-N checkpoints of (state pytree, data-iterator state, extra JSON) in ``workdir``.

    All processes of a multi-process run must call ``save``/``restore`` collectively (Orbax
    coordinates the writes). Saves are asynchronous by default: ``save`` returns once the
    arrays are copied off the devices; :meth:`wait` blocks until the write is committed.
    :meth:`close` waits, and an exit hook does the same if ``close`` is never called
    (not on Python 3.12.0-3.12.2: see ``_register_exit_hook``).
    """

    def __init__(
        self,
        workdir: str | Path,
        *,
        keep: int = 3,
        async_save: bool = True,
        cleanup_tmp: bool = False,
    ) -> None:
        """``cleanup_tmp`` deletes unfinished step directories left by a killed writer; only
        the process that writes checkpoints should set it (a reader could delete a step that
        a running trainer is writing)."""
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        remote = storage.is_remote(workdir)
        self.workdir = storage.path(workdir) if remote else Path(workdir).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=cleanup_tmp,
        )
        self._manager = ocp.CheckpointManager(self.workdir, options=options, item_names=_ITEMS)
        self._closed = False
        self._lock = threading.Lock()
        _register_exit_hook()
        _OPEN.add(self)

    def save(
        self,
        step: int,
        *,
        state: Any,
        data_state: dict,
        extra: dict | None = None,
        force: bool = False,
    ) -> bool:
        """Start saving ``step``; return False (and do nothing) if it was not saved.

        A step that already exists, or one not newer than the latest step, is skipped unless
        ``force`` (an existing step is never overwritten). The arrays in ``state`` may be
        modified or donated once this returns.
        """
        self._check_open()
        step = int(step)
        if step in self._manager.all_steps():
            return False
        raw_state, impls = _unwrap_keys(state)
        meta = {"format": _FORMAT_VERSION, "key_impls": impls}
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(raw_state),
            data_state=ocp.args.JsonSave(encode_json_state(dict(data_state))),
            extra=ocp.args.JsonSave(encode_json_state(dict(extra or {}))),
            meta=ocp.args.JsonSave(meta),
        )
        with self._reporting_write_errors(step):
            return bool(self._manager.save(step, args=args, force=force))

    def committed_steps(self) -> list[int]:
        """Steps whose directories are complete on disk (read from the directory)."""
        if not self.workdir.is_dir():
            return []
        return sorted(int(p.name) for p in self.workdir.iterdir() if p.name.isdigit())

    @contextlib.contextmanager
    def _reporting_write_errors(self, step: int | None = None):
        """Turn a failed (possibly earlier, asynchronous) write into a CheckpointWriteError."""
        try:
            yield
        except Exception as e:
            done = self.committed_steps()
            cause = str(e).strip().splitlines()[0][:500] if str(e).strip() else type(e).__name__
            what = "a checkpoint" if step is None else f"checkpoint step {step} (or an earlier one)"
            raise CheckpointWriteError(
                f"writing {what} to {self.workdir} failed: {type(e).__name__}: {cause}\n"
                "The disk may be full or the directory unwritable: free space (df -h) or use "
                "another --workdir, then rerun to resume from the last complete checkpoint "
                f"({'step ' + str(done[-1]) if done else 'none: the run restarts from scratch'})."
            ) from e

    def all_steps(self) -> list[int]:
        """Sorted steps: those on disk at construction plus those saved since.

        A step whose asynchronous save is still running is included; :meth:`wait` first to
        see only committed ones. Temporary (unfinished) step directories are never listed.
        """
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """Newest step of :meth:`all_steps`, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def restore(
        self, step: int | None = None, *, abstract_state: Any
    ) -> tuple[int, Any, dict, dict]:
        """Restore ``step`` (default: latest) as ``(step, state, data_state, extra)``.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` (with ``sharding``) matching
        the saved ``state``; e.g. ``jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape,
        x.dtype, sharding=x.sharding), state)``. Arrays are read directly onto those shardings.
        Raises ``FileNotFoundError`` if there is no checkpoint, and whatever Orbax raises if
        the step is unreadable.
        """
        self._check_open()
        self.wait()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {self.workdir}")
        step = int(step)
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract_key_data(abstract_state)),
            data_state=ocp.args.JsonRestore(),
            extra=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore(),
        )
        read_noise.quiet_failed_reads()  # before the read: its leftovers may report at any time
        restored = self._manager.restore(step, args=args)
        meta = restored.meta or {}
        if meta.get("format") != _FORMAT_VERSION:
            raise CheckpointError(f"step {step}: unknown checkpoint format {meta.get('format')}")
        state = _rewrap_keys(restored.state, abstract_state, meta.get("key_impls", {}))
        return (
            step,
            state,
            decode_json_state(restored.data_state),
            decode_json_state(restored.extra or {}),
        )

    def restore_latest_valid(
        self, *, abstract_state: Any, quarantine: bool = False
    ) -> tuple[int, Any, dict, dict] | None:
        """Restore the newest readable step, falling back to older ones; None if none exist.

        Each unreadable step produces a ``RuntimeWarning`` naming the step and the error; with
        ``quarantine``, unreadable steps newer than the restored one are renamed
        ``<step>.unreadable`` so that they can be written again. Raises
        :class:`CheckpointError` if checkpoints exist but none can be restored.
        """
        steps = self.all_steps()
        if not steps:
            return None
        errors = []
        for step in reversed(steps):
            try:
                restored = self.restore(step, abstract_state=abstract_state)
            except Exception as e:  # any read/parse/shape failure means "try an older step"
                cause = read_noise.first_line(e)
                errors.append(f"step {step}: {cause}")
                warnings.warn(
                    f"checkpoint step {step} in {self.workdir} could not be restored "
                    f"({cause}); trying an older step",
                    RuntimeWarning,
                    stacklevel=2,
                )
                continue
            if quarantine and step != steps[-1]:
                self._quarantine([s for s in steps if s > step])
            return restored
        raise CheckpointError(
            f"no checkpoint in {self.workdir} could be restored ({'; '.join(errors)}). If the "
            "config changed, run with the workdir's own (its config.json); if the files are "
            "damaged, move the directory away to start from scratch"
        )

    def _quarantine(self, steps: list[int]) -> None:
        """Rename unreadable step directories out of Orbax's view (process 0 renames)."""
        if jax.process_index() == 0:
            for step in steps:
                src = self.workdir / str(step)
                dst, k = self.workdir / f"{step}.unreadable", 1
                while dst.exists():
                    dst, k = self.workdir / f"{step}.unreadable-{k}", k + 1
                src.rename(dst)
                warnings.warn(f"moved unreadable checkpoint {src} to {dst}", RuntimeWarning, 3)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("smatch_jax checkpoint quarantine")
        self._manager.reload()

    def wait(self) -> None:
        """Block until every pending asynchronous save is committed."""
        if not self._closed:
            with self._reporting_write_errors():
                self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release resources (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                with self._reporting_write_errors():
                    self._manager.wait_until_finished()
            finally:
                self._manager.close()
                _OPEN.discard(self)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("Checkpointer is closed")

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def abstract_like(tree: Any) -> Any:
    """Pytree of ``jax.ShapeDtypeStruct`` (with each array's sharding) describing ``tree``.

    Typed PRNG keys keep their key dtype; numpy leaves get the first local device.
    """

    def to_abstract(x):
        sharding = getattr(x, "sharding", None)
        if sharding is None:  # numpy / Python scalars: restore onto the default device
            sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        dtype = x.dtype if hasattr(x, "dtype") else np.result_type(x)
        return jax.ShapeDtypeStruct(np.shape(x), dtype, sharding=sharding)

    return jax.tree.map(to_abstract, tree)
