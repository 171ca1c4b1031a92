"""SIGTERM (and optionally SIGINT) as a flag the train loop polls: a preemption ends in a
checkpoint and exit 0, never in lost work.

`PreemptionHandler` turns SIGTERM (and optionally SIGINT) into a flag the
train loop polls; the loop then saves with ``force=True`` and exits 0. In a multi-process run
the processes must agree on the stopping step, so :meth:`PreemptionHandler.should_stop` with a
``step`` also consults ``jax.experimental.multihost_utils.reached_preemption_sync_point``
(which needs ``jax.distributed.initialize`` with the preemption service enabled); the local
signal flag alone is used only when ``jax.process_count() == 1``.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterable
from typing import Any

import jax


class PreemptionHandler:
    """Turn termination signals into a flag polled by the train loop.

    Usage::

        with PreemptionHandler() as preempt:
            for step in ...:
                ...
                if preempt.should_stop(step):
                    ckpt.save(step, ..., force=True); ckpt.close(); sys.exit(0)

    ``install`` must run in the main thread. The first SIGINT sets the flag; a second one
    raises ``KeyboardInterrupt`` so an interactive user can still abort. Previous handlers are
    restored by :meth:`uninstall` (or leaving the ``with`` block).
    """

    def __init__(
        self,
        signals: Iterable[int] = (signal.SIGTERM,),
        *,
        handle_sigint: bool = False,
        use_sync_point: bool | None = None,
        announce: bool = False,
    ) -> None:
        """`announce`: say on stderr, when a signal arrives, what happens next."""
        sigs = list(signals)
        if handle_sigint and signal.SIGINT not in sigs:
            sigs.append(signal.SIGINT)
        self._signals = sigs
        self._use_sync_point = use_sync_point
        self._announce = announce
        self._previous: dict[int, Any] = {}
        self._event = threading.Event()
        self.received: int | None = None

    def install(self) -> PreemptionHandler:
        """Install the handlers (idempotent); return self."""
        for sig in self._signals:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Restore the handlers that were active before :meth:`install`."""
        for sig, prev in self._previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self._event.is_set():
            raise KeyboardInterrupt
        self.received = signum
        self._event.set()
        if self._announce:
            again = " (Ctrl-C again quits at once)" if signum == signal.SIGINT else ""
            name = signal.Signals(signum).name
            sys.stderr.write(f"{name}: saving a checkpoint after this step, then exiting{again}\n")
            sys.stderr.flush()

    def request_stop(self) -> None:
        """Set the flag by hand (tests, custom triggers)."""
        self._event.set()

    def should_stop(self, step: int | None = None) -> bool:
        """True once a handled signal arrived (or, multi-process, at a preemption sync point).

        With several processes, pass ``step``: the answer then comes from
        ``reached_preemption_sync_point(step)`` so that all processes stop at the same step.
        """
        sync = self._use_sync_point
        if sync is None:
            sync = jax.process_count() > 1
        if sync and step is not None:
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(int(step)))
        return self._event.is_set()

    def __enter__(self) -> PreemptionHandler:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()
