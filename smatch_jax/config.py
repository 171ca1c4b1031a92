"""The config schema: every field a config may have, its default and its meaning.

A config is an `ml_collections.ConfigDict` with the top-level fields `seed` and `distributed`
and one section per part of the system. Each section is a typed config (a frozen dataclass,
`sections.Section`) owned by the module that uses it; its fields, defaults and comments are the
documentation, its `CHOICES` / `RANGES` the only statement of what is allowed:

| section | typed config | owner |
|---|---|---|
| `data` | `DataConfig` | `data/train_data.py` |
| `model` | `ModelSpec` | `models/factory.py` (architectures: `models/config.py` PRESETS) |
| `noise` | `NoiseConfig` | `noise.py` |
| `loss` | `LossConfig` | `objective.py` |
| `sampling` | `PolicySamplingConfig` | `sampling.py` |
| `eval` | `EvalConfig` | `eval/decoding.py` |
| `replay` | `ReplayConfig` | `replay.py` |
| `optim` | `OptimizerConfig` | `optimizer.py` |
| `train` | `TrainConfig` | here (the loop's cadences, in train.py) |
| `mesh` | `MeshConfig` | `sharding.py` |

`base_config()` is the schema with its defaults; the files in `configs/` only compose it
(presets, variants). `typed(config)` gives the typed sections of a ConfigDict.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import ml_collections

from smatch_jax import tasks
from smatch_jax.data.train_data import DataConfig
from smatch_jax.eval.decoding import EvalConfig
from smatch_jax.models.factory import ModelSpec
from smatch_jax.noise import NoiseConfig
from smatch_jax.objective import LossConfig
from smatch_jax.optimizer import OptimizerConfig
from smatch_jax.replay import ReplayConfig
from smatch_jax.sampling import PolicySamplingConfig
from smatch_jax.sections import Section
from smatch_jax.sharding import MeshConfig


@dataclasses.dataclass(frozen=True)
class TrainConfig(Section):
    """`config.train`: the length, batch and cadences of the loop (train.py)."""

    NAME: ClassVar[str] = "train"
    num_steps: int = 2000  # optimiser steps
    batch_size: int = 64  # data rows per step (global, all processes)
    model_rows: int = 64  # model rows per SequenceMatch step (global)
    log_every: int = 50  # metrics cadence
    eval_every: int = 500  # evaluation + sample dump cadence (and at the end)
    ckpt_every: int = 500  # checkpoint cadence (and at the end / on SIGTERM)
    keep_ckpts: int = 3  # checkpoints kept
    nonfinite: str = "stop"  # non-finite loss/gradient: 'stop' the run or 'skip' the update
    max_skips: int = 10  # 'skip': stop anyway after this many skipped updates
    # JAX's persistent compilation cache: a restarted run (after a preemption) loads its
    # compiled steps from here instead of compiling them again; a local path or a gs:// URL
    # ('' : off). Trusted: whoever can write to it can run code in this process.
    compilation_cache: str = "~/.cache/smatch_jax/xla"
    # Each phase of a step (data, train step, refill, checkpoint, evaluation) waits for its
    # result, so that the metrics' time/<phase>_s split is true (False: no split, no waits)
    time_split: bool = True
    profile_steps: int = 0  # jax.profiler trace of this many steps (0: off), under tensorboard/
    profile_start: int = 10  # the first step traced (never the first of a start: it compiles)
    profile_all_hosts: bool = False  # trace on every host, not only process 0

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"nonfinite": ("stop", "skip")}
    RANGES: ClassVar[tuple[tuple[str, Any, Any, bool], ...]] = (
        ("num_steps", 1, None, True),
        ("batch_size", 1, None, True),
        ("model_rows", 0, None, True),
        ("log_every", 1, None, True),
        ("eval_every", 1, None, True),
        ("ckpt_every", 1, None, True),
        ("keep_ckpts", 1, None, True),
        ("max_skips", 0, None, True),
        ("profile_steps", 0, None, True),
        ("profile_start", 0, None, True),
    )


@dataclasses.dataclass(frozen=True)
class TopLevel(Section):
    """The fields outside any section."""

    seed: int = 0  # seeds init, data order, noise and sampling
    distributed: bool = False  # call jax.distributed.initialize() (multi-host)

    RANGES: ClassVar[tuple[tuple[str, Any, Any, bool], ...]] = (("seed", 0, None, True),)


SECTIONS: dict[str, type[Section]] = {
    cls.NAME: cls
    for cls in (
        DataConfig,
        ModelSpec,
        NoiseConfig,
        LossConfig,
        PolicySamplingConfig,
        EvalConfig,
        ReplayConfig,
        OptimizerConfig,
        TrainConfig,
        MeshConfig,
    )
}


def section_classes() -> tuple[type[Section], ...]:
    """Every typed config class of the schema: the top level, the sections, and the
    registered tasks' subsections of `data`."""
    own = tuple(tasks.get(name).Config for name in tasks.names())
    return (TopLevel, *SECTIONS.values(), *own)


def base_config() -> ml_collections.ConfigDict:
    """Every field with its default (the comments are in the section classes)."""
    c = ml_collections.ConfigDict()
    c.seed = TopLevel.seed
    for name, cls in SECTIONS.items():
        c[name] = ml_collections.ConfigDict(cls.schema())
    c.distributed = TopLevel.distributed
    return c


@dataclasses.dataclass(frozen=True)
class Typed:
    """The typed view of a whole config."""

    seed: int
    distributed: bool
    data: DataConfig
    model: ModelSpec
    noise: NoiseConfig
    loss: LossConfig
    sampling: PolicySamplingConfig
    eval: EvalConfig
    replay: ReplayConfig
    optim: OptimizerConfig
    train: TrainConfig
    mesh: MeshConfig


def typed(config: Mapping[str, Any]) -> Typed:
    """The typed sections of a ConfigDict or dict (missing fields take their defaults). Every
    problem of every section raises one ValueError, a line each naming the field; cross-section
    checks are `validate.check_config`'s, which calls this."""
    top_values = {k: config[k] for k in ("seed", "distributed") if k in config}
    parts: dict[str, Any] = {}
    problems: list[str] = []
    for name, cls in (("", TopLevel), *SECTIONS.items()):
        try:
            parts[name] = cls.from_mapping(config.get(name, {}) if name else top_values)
        except ValueError as e:
            problems += str(e).splitlines()
    if problems:
        raise ValueError("\n".join(problems))
    top = parts.pop("")
    return Typed(seed=top.seed, distributed=top.distributed, **parts)


def upgrade(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A config read from an older workdir, made explicit:

    * a `loss` section saved before the objective's revision 2 ran revision 1, so its missing
      revision-2 fields get those values (not the current defaults);
    * a `data` section saved before tasks had their own subsections kept every task's fields
      flat: the run's task's move to its subsection (`data.difficulty` to
      `data.arithmetic.difficulty`), the other tasks' (which did nothing) are dropped.
    """
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in saved.items()}
    loss = out.get("loss")
    if isinstance(loss, dict) and "temperature" not in loss:
        out["loss"] = {**LossConfig.REVISION_1, **loss}
    data = out.get("data")
    if isinstance(data, dict) and data.get("task") in tasks.names():
        shared, own = DataConfig.defaults(), tasks.get(data["task"]).Config.defaults()
        others = {k for n in tasks.names() for k in tasks.get(n).Config.defaults()}
        flat = [k for k in data if k not in shared and not isinstance(data[k], Mapping)]
        moved = {k: data.pop(k) for k in flat if k in own}
        for k in flat:  # another task's field: it did nothing in this run
            if k in others and k not in own:
                data.pop(k)
        if moved:
            data[data["task"]] = {**dict(data.get(data["task"], {})), **moved}
    return out
