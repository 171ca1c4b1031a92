"""The optimiser of a run: `config.optim` as a typed config that builds its optax chain."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import optax

from smatch_jax.models import lora
from smatch_jax.sections import Section


@dataclasses.dataclass(frozen=True)
class OptimizerConfig(Section):
    """`config.optim`: AdamW with warm-up, a schedule and global-norm clipping."""

    NAME: ClassVar[str] = "optim"
    lr: float = 1e-3  # peak learning rate
    warmup_steps: int = 50  # linear warm-up
    schedule: str = "cosine"  # 'cosine' (to 10% of peak) or 'constant'
    weight_decay: float = 0.0  # AdamW decay
    b1: float = 0.9  # Adam beta1
    b2: float = 0.98  # Adam beta2
    clip_norm: float = 1.0  # global gradient-norm clip (0: off)

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"schedule": ("cosine", "constant")}
    RANGES: ClassVar[tuple[tuple[str, Any, Any, bool], ...]] = (
        ("lr", 0.0, None, True),
        ("warmup_steps", 0, None, True),
        ("clip_norm", 0.0, None, True),
    )

    def learning_rate(self, num_steps: int) -> optax.Schedule:
        """The learning rate of update `k` (0-based) in a run of `num_steps`."""
        if self.schedule == "cosine":
            return optax.warmup_cosine_decay_schedule(
                0.0,
                self.lr,
                self.warmup_steps,
                max(num_steps, self.warmup_steps + 1),
                end_value=0.1 * self.lr,
            )
        return optax.join_schedules(
            [
                optax.linear_schedule(0.0, self.lr, self.warmup_steps),
                optax.constant_schedule(self.lr),
            ],
            [self.warmup_steps],
        )

    def build(self, num_steps: int, mask=None) -> optax.GradientTransformation:
        """The optax chain for a run of `num_steps`; `mask` (LoRA): only those leaves move."""
        lr = self.learning_rate(num_steps)
        parts = [optax.clip_by_global_norm(self.clip_norm)] if self.clip_norm else []
        parts.append(optax.adamw(lr, b1=self.b1, b2=self.b2, weight_decay=self.weight_decay))
        if mask is not None:
            parts.append(lora.masked_updates(mask))
        return optax.chain(*parts)
