"""Where a training step's time goes, its throughput and MFU, and profiles of chosen steps.

* `StepTimer`: wall time per phase of the loop (`PHASES`: data wait, train step, replay refill,
  checkpoint, evaluation), as seconds per step since the last log (`time/<phase>_s`). With
  `sync` (`train.time_split`, the default) each phase ends by waiting for its result, so its
  time is its own, not the next phase's; without it the phases are dispatch times only and no
  split is logged (the device then runs ahead of the host, which can hide data loading).
* `train_flops_per_token`: the model FLOPs of one trained token, analytic (MaxText's
  convention): 2 per weight for the forward pass plus causal attention, times 3 when every
  weight is trained (forward, input gradients, weight gradients) and 2 when the base is frozen
  (LoRA: no weight gradients for it). The replay refill is not counted.
* `mfu`: model FLOP/s per device over the chip's peak bf16 FLOP/s (`topologies.CHIPS`), on a
  TPU whose kind is known; None elsewhere (no made-up peak for a CPU).
* `Profiler`: a `jax.profiler` trace of `train.profile_steps` steps from `train.profile_start`
  (never the first step of a start: it compiles), written under `<workdir>/tensorboard`, where
  TensorBoard's profile plugin (and xprof) find it (`plugins/profile/<time>/*.xplane.pb`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax

from smatch_jax import topologies

log = logging.getLogger(__name__)

PHASES = ("data", "train_step", "refill", "checkpoint", "eval")


class StepTimer:
    """Seconds per phase, summed until `scalars` reads and resets them."""

    def __init__(self, sync: bool = True):
        self.sync = sync
        self.total = dict.fromkeys(PHASES, 0.0)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self.total[name] += time.perf_counter() - t

    def ready(self, tree: Any) -> Any:
        """Wait for `tree` (inside a phase) when timing is synchronous."""
        return jax.block_until_ready(tree) if self.sync else tree

    def scalars(self, steps: int) -> dict[str, float]:
        """{'time/<phase>_s': seconds per step} over the last `steps` steps; resets."""
        out = {f"time/{k}_s": v / max(steps, 1) for k, v in self.total.items()}
        self.total = dict.fromkeys(PHASES, 0.0)
        return out if self.sync else {}


def train_flops_per_token(model_config, seq_len: int, *, base_trained: bool) -> float:
    """Model FLOPs of one trained token (see the module docstring)."""
    c = model_config
    d, f, L = c.d_model, c.d_ff, c.n_layers
    kv = d * c.n_kv_heads // c.n_heads
    per_layer = d * d * 2 + d * kv * 2 + d * f * (3 if c.family == "llama" else 2)
    matmul = L * per_layer + d * (c.vocab_size + 1)  # the output layer, <bkspc> included
    attention = L * 2 * seq_len * d  # QK^T and AV, causal: half of 2 x 2 x T x d
    return 2 * (matmul + attention) * (3 if base_trained else 2)


def chip_of(device_kind: str) -> topologies.Chip | None:
    """The chip table's entry for a jax device kind ('TPU v5 lite', 'TPU v4', ...)."""
    kind = device_kind.lower()
    if "tpu" not in kind:
        return None
    for names, chip in (
        (("v6 lite", "v6e"), "v6e"),
        (("v5 lite", "v5e", "v5litepod"), "v5e"),
        (("v5p", "v5"), "v5p"),
        (("v4",), "v4"),
    ):
        if any(n in kind for n in names):
            return topologies.CHIPS[chip]
    return None


def mfu(flops_per_step: float, sec_per_step: float, devices: list) -> float | None:
    """Model FLOP/s per device over the chip's peak; None off a known TPU."""
    chip = chip_of(devices[0].device_kind)
    if chip is None or sec_per_step <= 0:
        return None
    return flops_per_step / sec_per_step / len(devices) / chip.peak_bf16_flops


class Profiler:
    """Trace steps [start, start + n) of this start (process 0 unless `all_hosts`)."""

    def __init__(self, logdir: Path, start: int, n: int, first_step: int, enabled: bool):
        self.logdir, self.n = logdir, n if enabled else 0
        self.start = max(start, first_step + 1)  # the first step of a start compiles
        self.active = False

    def before(self, step: int) -> None:
        if self.n and step == self.start:
            jax.profiler.start_trace(str(self.logdir))
            self.active = True

    def after(self, step: int, result: Any) -> None:
        """`step`: the step just run (0-based); `result`: waited for before the trace ends."""
        if self.active and step == self.start + self.n - 1:
            jax.block_until_ready(result)
            self.stop()
            log.info(
                "profile of steps %d-%d written under %s (tensorboard --logdir %s: Profile)",
                *(self.start + 1, self.start + self.n, self.logdir / "plugins/profile"),
                self.logdir,
            )

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
