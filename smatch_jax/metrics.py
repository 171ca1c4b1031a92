"""Metric logging (JSON lines + TensorBoard) and a console progress line.

:class:`MetricWriter` appends one JSON object per :meth:`~MetricWriter.write_scalars` call to
``<workdir>/metrics.jsonl`` (``{"step": s, "time": unix_seconds, "<name>": value, ...}``),
flushed at once so a crash loses nothing and a resumed run keeps appending. Non-finite values
(NaN, ±inf) are written as ``null`` so every line is strict JSON; TensorBoard gets them as is.
Text samples go to TensorBoard and to ``<workdir>/samples/step_<step>.txt``.

A run resumed from a checkpoint at step ``s`` opens the writer with ``purge_after=s``: records
of later steps (written before the interruption; the resumed run writes them again) are
dropped from metrics.jsonl (rewritten atomically; a line cut by a kill is dropped too), their
sample files are deleted and TensorBoard is told to hide events from step ``s + 1`` on. So the
outputs of an interrupted and resumed run are those of an uninterrupted one. In object storage
(`gs://` workdirs, `storage.py`) nothing can be appended: metrics.jsonl and the sample files
are rewritten whole at each write, and each TensorBoard writer has its own file.

TensorBoard event files are written with ``tensorboardX`` (pure Python, needs only numpy and
protobuf) into ``<workdir>/tensorboard/``; each writer opens a new event file, which
TensorBoard merges. If tensorboardX is not installed, a warning is issued and only the JSON
outputs are written. In a multi-process run, create the writer with ``enabled=(process_index
== 0)``; a disabled writer accepts every call and writes nothing.

:class:`Progress` prints a compact ``step/total | loss | steps/s | tokens/s | ETA`` line at
most every ``every_s`` seconds, rewriting one line with ``\\r`` on a terminal and printing
separate lines otherwise (CI logs).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from smatch_jax import storage
from smatch_jax.sections import flatten

__all__ = ["MetricWriter", "Progress", "host_rss_mb", "to_json_number"]

_RESERVED = ("step", "time")


def to_json_number(value: Any) -> int | float | None:
    """Convert a scalar (Python, numpy or jax) to int/float; non-finite floats become None."""
    arr = np.asarray(value)
    if arr.size != 1:
        raise ValueError(f"expected a scalar, got shape {arr.shape}")
    item = arr.reshape(()).item()
    if isinstance(item, bool):
        return int(item)
    if isinstance(item, int):
        return item
    item = float(item)
    return item if math.isfinite(item) else None


def host_rss_mb() -> float | None:
    """Resident memory of this process in MB (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def git_revision(repo: str | Path) -> str:
    """The short commit of the git checkout at `repo`, marked when files differ from it (the
    provenance line of results files); 'unknown' outside a checkout."""
    try:
        run = lambda *cmd: subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
        rev = run("git", "rev-parse", "--short", "HEAD").stdout.strip()
        dirty = run("git", "status", "--porcelain", "--untracked-files=no").stdout.strip()
    except OSError:
        return "unknown"
    return (rev or "unknown") + ("+uncommitted changes" if dirty else "")


class MetricWriter:
    """Write scalars to ``metrics.jsonl`` and TensorBoard, and texts to ``samples/``."""

    def __init__(
        self,
        workdir: str | Path,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        purge_after: int | None = None,
    ) -> None:
        self.workdir = storage.path(workdir)
        self.enabled = enabled
        self._jsonl: TextIO | None = None
        self._remote = storage.is_remote(workdir)  # no appends: the object is rewritten
        self._tb: Any = None
        if not enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        if purge_after is not None:
            self._purge_after(int(purge_after))
        if not self._remote:
            self._jsonl = open(self.workdir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                warnings.warn(
                    "tensorboardX is not installed; writing metrics.jsonl only",
                    RuntimeWarning,
                    stacklevel=2,
                )
            else:
                purge = None if purge_after is None else int(purge_after) + 1
                self._tb = SummaryWriter(
                    logdir=str(self.workdir / "tensorboard"),
                    flush_secs=30,
                    purge_step=purge,
                    # its own file: a writer resumed within the second of a killed one's
                    # start must not overwrite that file (an object store has no appends)
                    filename_suffix=f".{os.getpid()}",
                )

    def _purge_after(self, step: int) -> None:
        """Drop metrics records and sample files of steps after `step` (see module doc)."""
        path = self.workdir / "metrics.jsonl"
        if path.exists():
            kept = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    if int(json.loads(line)["step"]) <= step:
                        kept.append(line + "\n")
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by a kill
            storage.write_atomic(path, "".join(kept))
        for f in (self.workdir / "samples").glob("step_*.txt"):
            if f.stem[5:].isdigit() and int(f.stem[5:]) > step:
                f.unlink()

    @property
    def tensorboard_dir(self) -> Path:
        """Directory holding the TensorBoard event files."""
        return self.workdir / "tensorboard"

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Append ``{"step", "time", **scalars}`` to metrics.jsonl and log them to TensorBoard.

        Values may be Python/numpy scalars or size-1 jax arrays (this forces a device sync).
        """
        if not self.enabled:
            return
        step = int(step)
        clash = [k for k in scalars if k in _RESERVED]
        if clash:
            raise ValueError(f"scalar names {clash} are reserved")
        values = {k: to_json_number(v) for k, v in scalars.items()}
        record = {"step": step, "time": round(time.time(), 3), **values}
        line = json.dumps(record, allow_nan=False) + "\n"
        if self._remote:
            storage.append_text(self.workdir / "metrics.jsonl", line)
        else:
            assert self._jsonl is not None
            self._jsonl.write(line)
            self._jsonl.flush()
        if self._tb is not None:
            for name, value in values.items():
                if value is not None:  # nothing measured (NaN): in metrics.jsonl as null only
                    self._tb.add_scalar(name, value, step)

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        """Log texts to TensorBoard and append them to ``samples/step_<step>.txt``."""
        if not self.enabled:
            return
        step = int(step)
        sample_dir = self.workdir / "samples"
        sample_dir.mkdir(exist_ok=True)
        body = "".join(f"=== {name} ===\n{text}\n\n" for name, text in texts.items())
        storage.append_text(sample_dir / f"step_{step}.txt", body)
        if self._tb is not None:
            for name, text in texts.items():
                # TensorBoard renders text as markdown; indent 4 spaces to show it verbatim.
                self._tb.add_text(name, "    " + str(text).replace("\n", "\n    "), step)

    def write_hparams(self, config: Mapping[str, Any]) -> None:
        """Save ``config`` to ``hparams.json`` (overwritten) and as TensorBoard text."""
        if not self.enabled:
            return
        text = json.dumps(config, indent=2, sort_keys=True, default=str)
        (self.workdir / "hparams.json").write_text(text)
        if self._tb is not None:
            rows = [f"| {k} | {v} |" for k, v in sorted(flatten(config).items())]
            self._tb.add_text("hparams", "\n".join(["| name | value |", "|---|---|", *rows]), 0)

    def flush(self) -> None:
        """Flush all outputs to disk."""
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close (idempotent)."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        self.enabled = False

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _format_rate(rate: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if rate >= scale:
            return f"{rate / scale:.1f}{unit}"
    return f"{rate:.2f}" if rate < 10 else f"{rate:.1f}"


def _format_value(value: Any) -> str:
    number = to_json_number(value)
    if number is None:
        return str(float(np.asarray(value)))
    if isinstance(number, int):
        return str(number)
    return f"{number:.4g}"


class Progress:
    """Throttled one-line console progress display for a training loop.

    ``update(step, **scalars)`` prints e.g.
    ``step 120/1000 (12.0%) | loss 2.345 | 15.2 steps/s | 31.1k tok/s | ETA 0:00:58``
    on the first call, then at most every ``every_s`` seconds, and always at ``total_steps``.
    ``every_s`` defaults to 1 s on a terminal (one line, redrawn in place) and to 1 minute on
    a log file or pipe, so that a log has a sign of life at least once a minute, not hundreds
    of lines.
    The first line's rate is measured from ``(start_step, construction time)``; later lines
    measure from the first update, so one-off compilation does not skew steps/s and ETA.
    Pass ``tokens_per_step`` to get tokens/s. ``clock`` is injectable for tests.
    """

    def __init__(
        self,
        total_steps: int,
        *,
        start_step: int = 0,
        stream: TextIO | None = None,
        every_s: float | None = None,
        tokens_per_step: int | None = None,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total_steps = int(total_steps)
        self.start_step = int(start_step)
        self.stream = stream if stream is not None else sys.stderr
        self.tokens_per_step = tokens_per_step
        if tty is None:
            isatty = getattr(self.stream, "isatty", None)
            tty = bool(isatty()) if callable(isatty) else False
        self.tty = tty
        self.every_s = float(every_s if every_s is not None else 1.0 if tty else 60.0)
        self._clock = clock
        self._base = (self.start_step, clock())
        self._rebased = False
        self._last_print: float | None = None
        self._last_len = 0
        self._pending_newline = False

    def format_line(self, step: int, now: float, scalars: Mapping[str, Any]) -> str:
        """The progress text for ``step`` at clock time ``now`` (no line terminator)."""
        width = len(str(self.total_steps))
        pct = 100.0 * step / self.total_steps if self.total_steps else 100.0
        parts = [f"step {step:>{width}}/{self.total_steps} ({pct:.1f}%)"]
        parts += [f"{name} {_format_value(value)}" for name, value in scalars.items()]
        base_step, base_time = self._base
        if now > base_time and step > base_step:
            rate = (step - base_step) / (now - base_time)
            parts.append(f"{_format_rate(rate)} steps/s")
            if self.tokens_per_step:
                parts.append(f"{_format_rate(rate * self.tokens_per_step)} tok/s")
            parts.append(f"ETA {_format_duration(max(0, self.total_steps - step) / rate)}")
        return " | ".join(parts)

    def update(self, step: int, **scalars: Any) -> bool:
        """Maybe print the progress line; return True if something was printed."""
        step = int(step)
        now = self._clock()
        due = self._last_print is None or now - self._last_print >= self.every_s
        if not (due or step >= self.total_steps):
            self._rebase(step, now)
            return False
        self._last_print = now
        line = self.format_line(step, now, scalars)
        self._rebase(step, now)
        if self.tty:
            pad = " " * max(0, self._last_len - len(line))
            self.stream.write("\r" + line + pad)
            self._last_len = len(line)
            self._pending_newline = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        return True

    def _rebase(self, step: int, now: float) -> None:
        if not self._rebased:
            self._base = (step, now)
            self._rebased = True

    def close(self) -> None:
        """End the progress line (a newline on a terminal)."""
        if self._pending_newline:
            self.stream.write("\n")
            self.stream.flush()
            self._pending_newline = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
