"""Activation sharding by logical axis name, as MaxText's logical axis rules and levanter's
axis mapping do: the model and the train step name the axes of the arrays they constrain,

    x = activations.constrain(x, ("batch", "length", "embed"))

and the `axis_rules(mesh, rules)` in force when they are traced maps each name to mesh axes
(those that do not divide the dimension are dropped: `fit_spec`); a name without a rule is
copied, and outside `axis_rules` nothing is constrained, so a model needs no sharding
arguments. The train step traces its forward pass under `TRAIN_RULES`, the sampler its
decoding under its decode layout's rules (`sharding.DecodeLayout.activations`).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")  # rows of a training batch; `tensor` shards hold the same rows

# The train step's activations: a batch's rows split over `data` x `fsdp` (left alone, XLA
# followed the embedding table's feature split and gathered the whole batch's activations on
# every chip), and the output layer's actions ("vocab", padded to split: Transformer.head)
# over `tensor`, its weight gathered over `fsdp` only ("head_in"). The residual stream's
# "length" and "embed" are copied; the copy of a block's input that full remat keeps for the
# backward pass ("kept_embed", transformer._full_remat) has its features split over `tensor`.
TRAIN_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("head_in", "fsdp"),
    ("kept_embed", "tensor"),
)

# (mesh, rules) of the innermost `axis_rules`; each thread has its own.
_RULES: contextvars.ContextVar[tuple[Mesh | None, dict[str, Any]]] = contextvars.ContextVar(
    "smatch_jax_axis_rules", default=(None, {})
)


def fit_spec(spec: Sequence[Any], shape: tuple[int, ...], mesh: Mesh) -> P:
    """`spec` (per dimension: None, an axis, or a tuple of axes) with every axis that does not
    divide its dimension (or has size 1) dropped."""
    out = []
    for entry, dim in zip(spec, shape, strict=True):
        axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
        kept, size = [], 1
        for a in axes:
            if mesh.shape[a] > 1 and dim % (size * mesh.shape[a]) == 0:
                kept.append(a)
                size *= mesh.shape[a]
        out.append(kept[0] if len(kept) == 1 else (tuple(kept) or None))
    return P(*out)


@contextlib.contextmanager
def axis_rules(mesh: Mesh | None, rules: Sequence[tuple[str, Any]] = ()) -> Iterator[None]:
    """Within: `constrain` maps logical axis names to the mesh axes `rules` give them (an
    axis, a tuple of them, or None) on `mesh` (None: nothing is constrained). Enter it inside
    the jitted function, where the model is traced (a jit's cache does not see it); the
    innermost is in force."""
    token = _RULES.set((mesh, dict(rules)))
    try:
        yield
    finally:
        _RULES.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """`x` (inside jit) with each dimension split over the mesh axes its logical name maps to
    under the `axis_rules` in force (module docstring); `x` itself outside them."""
    return placer(names)(x)


def placer(names: Sequence[str | None]) -> Callable[[jax.Array], jax.Array]:
    """`constrain(., names)` under the rules in force now, to apply later (a custom VJP's
    backward pass is traced after the forward pass has left `axis_rules`)."""
    mesh, rules = _RULES.get()

    def place(x: jax.Array) -> jax.Array:
        if mesh is None:
            return x
        spec = fit_spec([rules.get(n) for n in names], x.shape, mesh)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    return place


def split(name: str) -> int:
    """How many ways the rules in force split a dimension named `name` (its mesh axes' sizes
    multiplied; 1 without a rule or outside `axis_rules`), before `fit_spec` drops the axes
    that do not divide it: the caller pads to a multiple of it."""
    mesh, rules = _RULES.get()
    axes = rules.get(name) if mesh is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return math.prod(mesh.shape[a] for a in axes)


def constraining() -> bool:
    """Whether `constrain` places arrays here (`axis_rules` with a mesh are in force)."""
    return _RULES.get()[0] is not None
