"""The non-finite guard of the training loop (README "Reliability").

The compiled step never applies a non-finite update (its `finite` flag says whether it did).
`NonFiniteGuard` reads that flag one step late, so the device is never left idle, and decides
whether the run stops (`train.nonfinite='stop'`, naming the step and its diagnostics) or goes
on (`'skip'`, at most `train.max_skips` times).
"""

from __future__ import annotations

import logging

import jax

from smatch_jax import checkpointing
from smatch_jax.errors import FailureError

log = logging.getLogger(__name__)


class NonFiniteError(FailureError, FloatingPointError):
    """A non-finite loss or gradient stopped the run (its update was not applied)."""


class NonFiniteGuard:
    """Checks each step's `finite` flag one step late, so the device is never left idle.

    The train step itself never applies a non-finite update; this decides whether the run
    stops (policy 'stop') or goes on (policy 'skip', at most `max_skips` times).
    """

    def __init__(self, policy: str, max_skips: int, ckpt: checkpointing.Checkpointer):
        self.policy, self.max_skips, self.ckpt = policy, max_skips, ckpt
        self.skipped = 0
        self._held: tuple[int, dict] | None = None  # (step, device metrics) not yet checked

    def push(self, step: int, met: dict) -> None:
        """Check the previous step, hold this one."""
        self.check()
        self._held = (step, met)

    def check(self) -> None:
        """Check the held step (blocks until it is computed)."""
        if self._held is None:
            return
        step, met = self._held
        self._held = None
        if bool(jax.device_get(met["finite"])):
            return
        diag = jax.device_get({k: v for k, v in met.items() if k not in ("finite", "tokens")})
        text = ", ".join(f"{k}={float(v):.4g}" for k, v in sorted(diag.items()))
        if self.policy == "skip" and self.skipped < self.max_skips:
            self.skipped += 1
            log.warning(
                "step %d: non-finite loss or gradient, update skipped (%d of at most %d): %s",
                *(step, self.skipped, self.max_skips, text),
            )
            return
        last = self.ckpt.latest_step()
        why = f"after {self.skipped} skipped updates " if self.policy == "skip" else ""
        raise NonFiniteError(
            f"non-finite loss or gradient at step {step} {why}(the update was not applied): "
            f"{text}\nThe last checkpoint is step {last} in {self.ckpt.workdir}. Lower "
            "optim.lr or raise optim.warmup_steps, check the data, or set "
            "train.nonfinite='skip' to skip such updates."
        )
