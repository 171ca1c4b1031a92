"""Quiet what a failed Orbax read leaves behind (README "When something goes wrong").

A checkpoint read that fails part-way (a truncated file) leaves asyncio tasks whose exceptions
nobody retrieves: when they are collected asyncio logs each one ("Task exception was never
retrieved", with a page of TensorStore spec), Python reports their coroutines' errors as
unraisable, and TensorStore's callbacks into the finished read's event loop report
`RuntimeError: Event loop is closed`: about 650 lines for one recovered fault. The failure
itself is reported once, by `checkpointing.Checkpointer.restore_latest_valid` or its caller.
`quiet_failed_reads()` (called before every restore) drops only these messages.
"""

from __future__ import annotations

import logging
import sys


def skipped_steps(caught) -> str:
    """The "could not be restored" warnings of `restore_latest_valid` (recorded with
    `warnings.catch_warnings(record=True)`) as one clause, for one log line."""
    why = [str(w.message).partition("; trying")[0] for w in caught]
    return " and ".join(w for w in why if "could not be restored" in w)


def first_line(e: BaseException, limit: int = 200) -> str:
    """`Type: the first line of the message`, at most `limit` characters."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text.partition(" See full TensorStore details")[0]
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


_READ_NOISE = ("orbax", "tensorstore", "TensorStore", "OCDBT")
_QUIETED = False


def _is_read_noise(text: str) -> bool:
    return any(word in text for word in _READ_NOISE)


class _DropReadNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not ("never retrieved" in msg and _is_read_noise(msg))


def quiet_failed_reads() -> None:
    """Install the filters (once per process): an `asyncio` log filter and an unraisable
    hook that drop the messages above and pass everything else on."""
    global _QUIETED
    if _QUIETED:
        return
    _QUIETED = True
    logging.getLogger("asyncio").addFilter(_DropReadNoise())
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        code = getattr(unraisable.object, "cr_code", None)
        where = f"{unraisable.exc_value} {getattr(code, 'co_filename', '')}"
        closed = isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == (
            "Event loop is closed"
        )  # TensorStore's callbacks into the finished read's loop
        if not (closed or _is_read_noise(where)):
            previous(unraisable)

    sys.unraisablehook = hook
