"""Workdirs on a local disk or in object storage (`gs://bucket/run`, any URL etils.epath opens).

Everything a run writes goes through here or through Orbax (which writes checkpoints to a
bucket itself, through tensorstore). A local path stays a `pathlib.Path` (the same calls as
before); a URL becomes an `etils.epath.Path` (gcsfs for `gs://`). Object stores differ from a
disk in three ways that matter here:

* no appends: `append_text` reads and rewrites the object (one object write is atomic);
* no atomic rename: `write_atomic` writes the object in one request instead of tmp + rename;
* no `flock`: `ObjectLock` is a lock object created only if absent (a generation-0
  precondition), refreshed by a heartbeat thread and taken over once its lease has run out
  (`SMATCH_JAX_LOCK_LEASE_S`, default 120 s), since a killed holder cannot release it.

Test against an emulator: `STORAGE_EMULATOR_HOST` (google-cloud-storage, gcsfs) and
`TENSORSTORE_GCS_HTTP_URL` (tensorstore) point the clients at it (tests/test_gcs.py).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

LEASE_ENV = "SMATCH_JAX_LOCK_LEASE_S"


def is_remote(path: Any) -> bool:
    return "://" in str(path)


def path(p: Any) -> Any:
    """A `pathlib.Path` for a local path, an `etils.epath.Path` for a URL."""
    if not is_remote(p):
        return Path(p)
    from etils import epath

    return epath.Path(str(p))


def append_text(p: Any, text: str) -> None:
    """Append `text` to the file `p` (an object store: read and rewrite it)."""
    if not is_remote(p):
        with open(p, "a", encoding="utf-8") as f:
            f.write(text)
        return
    p = path(p)
    old = p.read_text() if p.exists() else ""
    p.write_text(old + text)


def write_atomic(p: Any, text: str) -> None:
    """Write the file `p` whole or not at all (locally: a temporary file, then a rename)."""
    p = path(p)
    if is_remote(p):
        p.write_text(text)  # one object upload: atomic
        return
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(p)


def _bucket_blob(url: str) -> tuple[str, str]:
    scheme, _, rest = str(url).partition("://")
    if scheme != "gs":
        raise ValueError(f"a workdir lock in object storage needs gs://, not {scheme}://")
    bucket, _, name = rest.partition("/")
    return bucket, name


class ObjectLock:
    """`<workdir>/.train_lock.<process>` as a GCS object (see the module docstring)."""

    def __init__(self, url: str, holder: str):
        from google.cloud import storage

        bucket, name = _bucket_blob(url)
        self.url, self.holder = url, holder
        self.lease = float(os.environ.get(LEASE_ENV, "120"))
        self.blob = storage.Client().bucket(bucket).blob(name)
        self.generation: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> ObjectLock:
        """Take the lock; `LockHeldError` (the holder's text, the lock's age) if it is held
        and fresh, or if another process took it in between."""
        from google.api_core.exceptions import NotFound, PreconditionFailed

        try:
            self.blob.upload_from_string(self.holder, if_generation_match=0)
        except PreconditionFailed:
            held_by, age = "another process", 0.0
            try:
                self.blob.reload()
                held_by = self.blob.download_as_text()
                age = time.time() - self.blob.updated.timestamp()
                if age < self.lease:
                    raise LockHeldError(held_by, age, self.lease) from None
                # A holder that stopped refreshing (killed): take it over, unless another
                # process took it over first (then its generation changed: 412).
                self.blob.upload_from_string(self.holder, if_generation_match=self.blob.generation)
            except NotFound:  # released in between: try once more
                try:
                    self.blob.upload_from_string(self.holder, if_generation_match=0)
                except PreconditionFailed:
                    raise LockHeldError(held_by, 0.0, self.lease) from None
            except PreconditionFailed:
                raise LockHeldError(held_by, 0.0, self.lease) from None
        self.blob.reload()
        self.generation = self.blob.generation
        self._thread = threading.Thread(target=self._heartbeat, daemon=True)
        self._thread.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.lease / 4):
            try:
                self.blob.upload_from_string(self.holder, if_generation_match=self.generation)
                self.blob.reload()
                self.generation = self.blob.generation
            except Exception:  # lost it (taken over) or the store is away: try again later
                continue

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with contextlib.suppress(Exception):  # gone or taken over: nothing of ours to delete
            self.blob.delete(if_generation_match=self.generation)

    def __enter__(self) -> ObjectLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class LockHeldError(RuntimeError):
    def __init__(self, holder: str, age: float, lease: float):
        super().__init__(holder)
        self.holder, self.age, self.lease = holder, age, lease


def holder_text() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}"
