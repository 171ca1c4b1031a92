"""Where a run's numbers came from: `provenance.jsonl` in its workdir, one line per start.

Each line records the time, the command line, the git revision of the source tree and
whether it had uncommitted changes (as results files write it: `metrics.git_revision`), the
versions of Python and the libraries that decide the numbers, the devices, and the step the
start resumed from. Written by process 0 once the run's checkpoint is restored (train.py), so
a start that fails leaves nothing.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import platform
import socket
import sys
import time
from pathlib import Path

import jax

from smatch_jax import metrics, storage

PACKAGES = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "numpy",
    "ml-collections",
    "tensorflow-datasets",
    "libtpu",
)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


def devices() -> dict:
    d = jax.devices()
    return {
        "platform": d[0].platform,
        "kind": d[0].device_kind,
        "count": len(d),
        "local_count": jax.local_device_count(),
        "processes": jax.process_count(),
    }


def collect(argv: list[str] | None = None, resumed_from: int | None = None) -> dict:
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": list(sys.argv if argv is None else argv),
        "host": socket.gethostname(),
        "git": metrics.git_revision(Path(__file__).parent),  # '<short>[+uncommitted changes]'
        "versions": versions(),
        "devices": devices(),
        "resumed_from": resumed_from,
    }


def record(workdir: str | Path, argv: list[str] | None = None, resumed_from=None) -> dict:
    """Append this start's provenance to `workdir/provenance.jsonl`; return it."""
    entry = collect(argv, resumed_from)
    storage.append_text(storage.path(workdir) / "provenance.jsonl", json.dumps(entry) + "\n")
    return entry
