"""The training objective: `config.loss` as a typed config, and the loss function of a step.

`make_loss_fn(LossConfig, eos_id)` combines the kernels of losses.py into
`bc_weight * L_BC + sm_weight * L_SM + unlikelihood_weight * L_UL` (method.md §2.5), with
`bc_warmup_steps` of pure BC first. `LossConfig` is the only home of the objective's defaults:
the kernels take their options as keyword arguments without defaults, named as its fields
(`LossConfig.kernel_args`).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Collection, Mapping
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from smatch_jax import losses, unlikelihood
from smatch_jax.sections import Section


@dataclasses.dataclass(frozen=True)
class LossConfig(Section):
    """`config.loss`: the objective (method.md §2). Its defaults are the config defaults."""

    NAME: ClassVar[str] = "loss"
    bc_weight: float = 1.0  # weight of L_BC
    sm_weight: float = 1.0  # weight of L_SM (0: no SequenceMatch, no sampling)
    bc_warmup_steps: int = 200  # pure BC steps before SequenceMatch starts [ours]
    divergence: str = "chi2_mix"  # chi2_mix | chi2 | kl | js | hellinger | a registered one
    gamma: float = 0.998  # discount
    chi2_coef: float = 0.25  # c, weight of the r^2 term (of chi2_mix and chi2)
    value_on: str = "mix"  # 'mix' (on-policy rows) or 'data' (offline)
    # Revision 2 (method.md §2.7), chosen on validation questions by `python -m
    # experiments.arithmetic --objective` (experiments/results/arithmetic_objective.md: mean
    # validation accuracy over noise 0 and 0.1 and 3 seeds 0.252, revision 1 0.140; the
    # settings with alpha <= 0.1 are within 0.01 of each other), and the truncated rows by
    # `python -m experiments.text --objective` (text_objective.md).
    temperature: float = 0.01  # alpha: Q = alpha * logits, the objective divided by alpha
    terminal: str = "bootstrap"  # V after eos: 'zero' or 'bootstrap' (read at the eos position)
    masked_actions: str = "environment"  # weight-0 (noise) actions: 'unrewarded' | 'environment'
    normalize: str = "token"  # expectations per 'token' (action count) or per 'row' (episode)
    truncated_weight: float = 0.0  # model rows cut off before eos are dropped [ours]; text:
    # MAUVE 0.558 and 100% ending with eos, against 0.384 and 62% when kept (all4)
    clamp_margin: float = 1e-3  # clamp r to a domain bound (js, hellinger) + margin [ours]
    unlikelihood_weight: float = 0.0  # token-level unlikelihood weight (the MLE + UL baseline)

    CHOICES: ClassVar[dict[str, Collection[str]]] = {
        "divergence": losses.DIVERGENCES.keys(),  # a live view: registered ones are choices
        "value_on": losses.VALUE_ON,
        "terminal": losses.TERMINAL,
        "masked_actions": losses.MASKED_ACTIONS,
        "normalize": losses.NORMALIZE,
    }
    RANGES: ClassVar[tuple[tuple[str, Any, Any, bool], ...]] = (
        ("bc_weight", 0.0, None, True),
        ("sm_weight", 0.0, None, True),
        ("bc_warmup_steps", 0, None, True),
        ("gamma", 0.0, 1.0, False),
        ("chi2_coef", 0.0, None, True),
        ("temperature", 0.0, None, False),
        ("truncated_weight", 0.0, 1.0, True),
        ("clamp_margin", 0.0, None, True),
        ("unlikelihood_weight", 0.0, None, True),
    )

    @classmethod
    def cross_problems(cls, values: dict[str, Any]) -> list[str]:
        if values["bc_weight"] + values["sm_weight"] + values["unlikelihood_weight"] <= 0:
            return ["loss.bc_weight, sm_weight and unlikelihood_weight are all 0: no loss"]
        return []

    @property
    def samples_model_rows(self) -> bool:
        """SequenceMatch with its value term on the data/model mixture trains on rows sampled
        from the model (the replay buffer); offline SequenceMatch, BC and MLE do not."""
        return self.sm_weight > 0 and self.value_on == "mix"

    def kernel_args(self, kernel: Callable[..., Any]) -> dict[str, Any]:
        """{field: value} of the fields that `kernel` (a loss of losses.py) takes as keyword
        arguments of the same name. The kernels have no defaults, so a field and a parameter
        that drift apart fail loudly (a missing argument), never silently."""
        params = inspect.signature(kernel).parameters
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in params}

    # A config saved before revision 2 has none of its fields: it ran revision 1
    # (`LossConfig(**LossConfig.REVISION_1)` is the revision-1 objective).
    REVISION_1: ClassVar[dict[str, Any]] = {
        "temperature": 1.0,
        "terminal": "zero",
        "masked_actions": "unrewarded",
        "normalize": "token",
        "truncated_weight": 1.0,
    }


class Batch(NamedTuple):
    """A training batch of rows (data and model rows together)."""

    tokens: jax.Array  # int32 [B, T]
    prompt_len: jax.Array  # int32 [B]
    length: jax.Array  # int32 [B]
    is_model: jax.Array  # bool [B]
    action_weight: jax.Array  # float32 [B, T]


LossFn = Callable[[jax.Array, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def make_loss_fn(cfg: LossConfig | Mapping[str, Any], *, eos_id: int) -> LossFn:
    """`loss_fn(logits, batch, step) -> (loss, metrics)`.

    The total is `bc_weight * L_BC + sm_weight * L_SM + unlikelihood_weight * L_UL`.

    During the first `bc_warmup_steps` steps the SequenceMatch weight is 0 (pure BC). `step`
    may be traced, so the same compiled step serves both phases.
    """
    cfg = cfg if isinstance(cfg, LossConfig) else LossConfig.from_mapping(cfg)
    bc_args = cfg.kernel_args(losses.bc_loss)
    sm_args = cfg.kernel_args(losses.sequence_match_loss)

    def loss_fn(logits, batch: Batch, step):
        args = (logits, batch.tokens, batch.prompt_len, batch.length, batch.is_model)
        metrics: dict[str, jax.Array] = {}
        total = jnp.float32(0.0)
        if cfg.bc_weight > 0:
            bc, m = losses.bc_loss(
                *args, eos_id=eos_id, action_weight=batch.action_weight, **bc_args
            )
            total += cfg.bc_weight * bc
            metrics.update(m)
        if cfg.unlikelihood_weight > 0:
            ul, m = unlikelihood.unlikelihood_loss(*args, eos_id=eos_id)
            total += cfg.unlikelihood_weight * ul
            metrics.update(m)
        if cfg.sm_weight > 0:
            sm, m = losses.sequence_match_loss(
                *args, eos_id=eos_id, action_weight=batch.action_weight, **sm_args
            )
            sm_w = jnp.where(step < cfg.bc_warmup_steps, 0.0, cfg.sm_weight)
            total += sm_w * sm
            metrics.update(m)
            metrics["sm/weight"] = sm_w
        metrics["loss"] = total
        return total, metrics

    return loss_fn
