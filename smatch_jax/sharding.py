"""Device mesh, parameter shardings, global batches and the decode layout: one code path from
1 CPU to a pod.

* The mesh has axes `('data', 'fsdp', 'tensor')` (`jax.make_mesh`, `tensor` innermost so that
  its devices are neighbours). Batches are split over `data` and `fsdp` (every `tensor` group
  holds the same rows); parameters are split over `fsdp` (gathered layer by layer when used:
  ZeRO-3 / FSDP) and `tensor` (never gathered: Megatron tensor parallelism).
* Parameter rules (`RULES`, the one table; `mesh.rules` in the config puts rules before it):
  `(regex, spec)` matched against the parameter path (`blocks.3.attn.q_proj.base.kernel`),
  the first match wins. A spec has one entry per dimension: the mesh axes that dimension is
  split over, or None. An axis whose size does not divide the dimension is dropped from that
  dimension (the 32,001 rows of a Llama vocabulary with `<bkspc>` split over nothing).
  Parameters no rule matches (norms, LoRA adapters) are split over `fsdp` on their largest
  divisible dimension, or copied when small. The blocks of a scanned model
  (`blocks.attn.q_proj.kernel [L, ...]`, `model.scan_layers`) carry a leading layer axis that
  no mesh axis splits: the rule applies to the dimensions after it, so each layer is sharded
  as in the unrolled model and the scan gathers one layer's `fsdp` shards at a time.
* Projections are Megatron-oriented: q/k/v, gate and up split their output features over
  `tensor` (column-parallel), o and down their input features (row-parallel), so that
  attention heads and MLP features stay on one `tensor` shard between the pair.
* The decode layout (`decode_layout`): the sampler gathers each weight's `fsdp` shards once
  per call (keeping its `tensor` split), splits its rows over `data` and `fsdp`, copies them
  over `tensor`, and splits the KV cache over its heads. A decode step then multiplies each
  chip's own slice of every weight and moves only activations (partial sums of a few rows),
  where the training layout gathers every weight for every token: see the JAX scaling book,
  "inference", and benchmarks/RESULTS.md "Pod plans". The copy costs 1/tensor of the
  weights per chip while the sampler runs.
* Activations are constrained by logical axis name (activations.py): the model names its
  arrays' axes, the train step's and the sampler's `activations.axis_rules` say where they go.
* Global batches are assembled from process-local numpy data with
  `jax.make_array_from_process_local_data`, so the same code runs on several hosts.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from smatch_jax import activations
from smatch_jax.activations import BATCH_AXES, fit_spec
from smatch_jax.errors import UserError
from smatch_jax.sections import Section

AXES = ("data", "fsdp", "tensor")
MIN_SHARD_SIZE = 2**14  # unmatched parameters with fewer elements are replicated
# A scanned model's block weights (`blocks.` then a name, not a layer number): [L, ...].
_STACKED = re.compile(r"(?:^|\.)blocks\.(?!\d+(?:\.|$))")

Spec = tuple  # one entry per dimension: None, an axis name, or a tuple of axis names

# The parameter sharding rules (module docstring). Kernels are [in, out] (nnx.Linear); under
# LoRA the frozen kernel is `<proj>.base.kernel`.
RULES: tuple[tuple[str, Spec], ...] = (
    (r"attn\.(q|k|v)_proj\.(base\.)?kernel$", ("fsdp", "tensor")),  # column-parallel
    (r"mlp\.(gate|up)_proj\.(base\.)?kernel$", ("fsdp", "tensor")),  # column-parallel
    (r"attn\.o_proj\.(base\.)?kernel$", ("tensor", "fsdp")),  # row-parallel
    (r"mlp\.down_proj\.(base\.)?kernel$", ("tensor", "fsdp")),  # row-parallel
    (r"tok_embed\.embedding$", (None, ("fsdp", "tensor"))),  # [V+1, d]: split the features
    (r"lm_head\.kernel$", (("fsdp", "tensor"), None)),  # [d, V+1]: V+1 is rarely divisible
)


@dataclasses.dataclass(frozen=True)
class MeshConfig(Section):
    """`config.mesh`: the device mesh."""

    NAME: ClassVar[str] = "mesh"
    data: int = -1  # data-parallel axis size (-1: all devices not used by fsdp x tensor)
    fsdp: int = 1  # parameters split, gathered when used; batch rows split
    tensor: int = 1  # parameters split and never gathered (tensor parallelism)
    # Rules put before `RULES`: "REGEX=SPEC;REGEX=SPEC", SPEC one entry per dimension separated
    # by commas, each an axis, axes joined by '+', or '_' (not split). E.g. keep the output
    # layer whole: 'lm_head\.kernel$=_,_'.
    rules: str = ""

    RANGES: ClassVar[tuple[tuple[str, Any, Any, bool], ...]] = (
        ("fsdp", 1, None, True),
        ("tensor", 1, None, True),
    )

    @classmethod
    def cross_problems(cls, values: dict[str, Any]) -> list[str]:
        if values["data"] != -1 and values["data"] < 1:
            return [f"mesh.data={values['data']} must be -1 (all devices) or >= 1"]
        try:
            parse_rules(values["rules"])
        except ValueError as e:
            return [str(e)]
        return []


def parse_rules(text: str) -> tuple[tuple[str, Spec], ...]:
    """`mesh.rules` ("REGEX=SPEC;...", see MeshConfig) as `(regex, spec)` pairs."""
    out = []
    for item in filter(None, (x.strip() for x in text.split(";"))):
        rx, sep, spec = item.rpartition("=")
        if not sep or not rx:
            raise ValueError(f"mesh.rules item {item!r} is not REGEX=SPEC (e.g. 'lm_head=_,_')")
        try:
            re.compile(rx)
        except re.error as e:
            raise ValueError(f"mesh.rules regex {rx!r} does not compile: {e}") from None
        dims = []
        for entry in spec.split(","):
            axes = tuple(a.strip() for a in entry.split("+") if a.strip() not in ("", "_"))
            bad = [a for a in axes if a not in AXES]
            if bad:
                raise ValueError(f"mesh.rules {item!r} names {bad}; the mesh axes are {AXES}")
            dims.append(axes[0] if len(axes) == 1 else (axes or None))
        out.append((rx, tuple(dims)))
    return tuple(out)


class MeshError(UserError, ValueError):
    """The config's mesh does not fit the devices there are."""


def make_mesh(
    data: int = -1,
    fsdp: int = 1,
    tensor: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A `('data', 'fsdp', 'tensor')` mesh; `data=-1` takes every device not used by the
    other two axes."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if fsdp < 1 or tensor < 1 or n % (fsdp * tensor):
        raise MeshError(f"mesh.fsdp={fsdp} x mesh.tensor={tensor} must divide the device count {n}")
    if data == -1:
        data = n // (fsdp * tensor)
    if data * fsdp * tensor != n:
        raise MeshError(
            f"mesh data={data} x fsdp={fsdp} x tensor={tensor} = {data * fsdp * tensor} "
            f"devices, but {n} are available; set mesh.data=-1 to use all of them"
        )
    # Auto axes: XLA propagates shardings from the inputs (no sharding-in-types).
    auto = (jax.sharding.AxisType.Auto,) * len(AXES)
    try:
        return jax.make_mesh((data, fsdp, tensor), AXES, axis_types=auto, devices=devices)
    except NotImplementedError:
        # An axis that is no product of whole physical axes (v4-64 is 2x4x4; data 2 x fsdp 2
        # x tensor 8 needs one of its 4s split): let a physical axis be split.
        grid = mesh_utils.create_device_mesh(
            (data, fsdp, tensor), devices, allow_split_physical_axes=True
        )
        return Mesh(grid, AXES, axis_types=auto)


def mesh_of(c: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The mesh of the config's `mesh` section."""
    return make_mesh(c.data, c.fsdp, c.tensor, devices=devices)


def path_name(path) -> str:
    """`blocks.3.attn.q_proj.base.kernel` (an nnx Variable's trailing `.value` left out)."""
    parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    return ".".join(parts[:-1] if parts and parts[-1] == "value" else parts)


def _default_spec(shape: tuple[int, ...], fsdp: int) -> P:
    if fsdp == 1 or int(np.prod(shape)) < MIN_SHARD_SIZE:
        return P()
    dims = sorted(range(len(shape)), key=lambda d: -shape[d])
    for d in dims:
        if shape[d] % fsdp == 0:
            spec = [None] * len(shape)
            spec[d] = "fsdp"
            return P(*spec)
    return P()


def param_shardings(abstract_params, mesh: Mesh, rules: str | Sequence[tuple[str, Spec]] = ()):
    """A pytree of `NamedSharding` matching `abstract_params` (arrays or ShapeDtypeStructs):
    `rules` (`mesh.rules` text or pairs), then `RULES`, then the FSDP default."""
    extra = parse_rules(rules) if isinstance(rules, str) else tuple(rules)
    compiled = [(re.compile(rx), rx, spec) for rx, spec in (*extra, *RULES)]
    fsdp = mesh.shape["fsdp"]

    def spec_of(name: str, shape: tuple[int, ...]) -> P:
        for crx, rx, spec in compiled:
            if crx.search(name):
                if len(spec) != len(shape):
                    raise ValueError(
                        f"sharding rule {rx!r} has {len(spec)} entries for {name} of shape "
                        f"{shape}; give one per dimension"
                    )
                return fit_spec(spec, shape, mesh)
        return _default_spec(shape, fsdp)

    def one(path, x):
        name, shape = path_name(path), tuple(x.shape)
        if _STACKED.search(name):  # the layer axis stays whole
            return NamedSharding(mesh, P(None, *spec_of(name, shape[1:])))
        return NamedSharding(mesh, spec_of(name, shape))

    return jax.tree_util.tree_map_with_path(one, abstract_params)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over `data` and `fsdp` (copied over `tensor`)."""
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_shards(mesh: Mesh) -> int:
    """How many slices a training batch is split into (`data` x `fsdp`)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


@dataclasses.dataclass(frozen=True)
class DecodeLayout:
    """Where the sampler keeps its arrays (module docstring): `rows` for [B, ...] arrays,
    `cache` for the [layers, B, slots, kv heads, head dim] KV cache, `heads` for the
    attention's q, k and v [B, T, heads, head dim] (split like the cache's heads; the model
    puts them there under `axis_rules()`), and `weights`, `(parameter path, spec)` pairs: each
    weight's training spec without `fsdp` (`decode_weight_specs`), so that the sampler
    gathers the `fsdp` shards once per call."""

    rows: NamedSharding
    cache: NamedSharding
    heads: NamedSharding
    weights: tuple[tuple[str, P], ...] = ()

    def axis_rules(self) -> Any:
        """`activations.axis_rules` for decoding: q, k and v where `heads` puts them."""
        rows, _, heads, _ = self.heads.spec
        return activations.axis_rules(self.rows.mesh, (("batch", rows), ("heads", heads)))

    def put_rows(self, x: jax.Array) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, self.rows)

    def put_cache(self, cache: Any) -> Any:
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, self.cache), cache)

    @functools.cached_property
    def _weight_specs(self) -> dict[str, P]:
        return dict(self.weights)

    def weight_sharding(self, path) -> NamedSharding | None:
        """Where the weight at `path` (a key path into a model's `nnx.split` state) is kept,
        or None when `weights` does not list it."""
        spec = self._weight_specs.get(path_name(path))
        return None if spec is None else NamedSharding(self.rows.mesh, spec)

    def put_weights(self, state: Any) -> Any:
        """The model's state (`nnx.split`) with every weight in `weights` placed there."""

        def one(path, x):
            sh = self.weight_sharding(path)
            return x if sh is None else jax.lax.with_sharding_constraint(x, sh)

        return jax.tree_util.tree_map_with_path(one, state)


def layout_decode(model: Any, layout: DecodeLayout | None) -> Any:
    """`model.decode` with q, k and v [B, T, heads, D] kept where `layout` keeps the cache's
    heads (`layout.axis_rules()`), so that attention is local to each chip's heads; `layout`
    None: where XLA puts them."""

    def decode(*args: Any) -> Any:
        with layout.axis_rules() if layout is not None else activations.axis_rules(None):
            return model.decode(*args)

    return decode


def decode_weight_specs(*trees: Any) -> tuple[tuple[str, P], ...]:
    """`(path, spec)` per weight of `trees` (pytrees of training `NamedSharding`s, or of
    arrays / ShapeDtypeStructs carrying them), `fsdp` and `data` dropped: only the `tensor`
    splits stay, so each chip holds 1/tensor of every weight."""

    def keep(entry):
        axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
        kept = tuple(a for a in axes if a == "tensor")
        return kept[0] if kept else None

    out = []
    for tree in trees:
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            sh = leaf if isinstance(leaf, NamedSharding) else getattr(leaf, "sharding", None)
            if isinstance(sh, NamedSharding):
                out.append((path_name(path), P(*(keep(e) for e in sh.spec))))
    return tuple(out)


def decode_layout(
    mesh: Mesh, batch_size: int, n_kv_heads: int, weights: tuple[tuple[str, P], ...] = ()
) -> DecodeLayout:
    """Rows over `data` and `fsdp` (the axes that divide `batch_size`), copied over `tensor`;
    the cache's kv heads over `tensor` (when it divides them), where a column-parallel
    projection leaves them; `weights` from `decode_weight_specs`. The weights are copied over
    `fsdp` (gathered once per sampler call), so the `fsdp` shards decode rows of their own:
    data + tensor parallelism, as MaxText and Tunix sample for RL. Decoding in the training
    layout instead gathered the `fsdp` shards of every weight for every token
    (benchmarks/RESULTS.md, "Pod plans")."""
    rows = fit_spec((BATCH_AXES,), (batch_size,), mesh)[0]
    heads = fit_spec(("tensor",), (n_kv_heads,), mesh)[0]
    return DecodeLayout(
        rows=NamedSharding(mesh, P(rows)),
        cache=NamedSharding(mesh, P(None, rows, None, heads, None)),
        heads=NamedSharding(mesh, P(rows, None, heads, None)),
        weights=weights,
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_slice(mesh: Mesh) -> tuple[int, int]:
    """`(index, count)`: this process loads slice `index` of `count` equal slices of every
    global batch, the rows of the batch shards (`data` x `fsdp`) its devices hold.
    Processes whose devices hold the same shards (a `tensor` axis spanning hosts, as
    `jax.make_mesh` lays out a v5e-32 slice) load the same slice; which rows of the global
    array a slice becomes is `jax.make_array_from_process_local_data`'s business."""
    held, slices = _host_slices(mesh)
    return slices.index(held[jax.process_index()]), len(slices)


@functools.cache
def _host_slices(mesh: Mesh) -> tuple[dict[int, frozenset[int]], list[frozenset[int]]]:
    """Per process, the batch shards its devices hold; the distinct sets in shard order. Once
    per mesh: `global_batch` asks every step, and a pod's mesh has thousands of devices."""
    fsdp = mesh.shape["fsdp"]
    held: dict[int, set[int]] = {}
    for (i, f, _), d in np.ndenumerate(mesh.devices):
        held.setdefault(d.process_index, set()).add(i * fsdp + f)
    slices = sorted({frozenset(v) for v in held.values()}, key=min)
    flat = [x for sl in slices for x in sl]
    if len(flat) != len(set(flat)) or len({len(sl) for sl in slices}) != 1:
        raise ValueError(
            f"hosts hold overlapping or unequal sets of batch shards "
            f"{[sorted(x) for x in slices]}; "
            "choose mesh.data / mesh.fsdp / mesh.tensor so that each host's chips hold whole, "
            "equal slices of the batch"
        )
    return {k: frozenset(v) for k, v in held.items()}, slices


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays from this process's rows: slice `batch_slice(mesh)` of the batch."""
    sharding = batch_sharding(mesh)
    n_shards = batch_shards(mesh)
    _, count = batch_slice(mesh)
    out = {}
    for k, v in local.items():
        v = np.asarray(v)
        global_rows = v.shape[0] * count
        if global_rows % n_shards:
            raise ValueError(
                f"global batch of {global_rows} rows does not split over mesh.data x mesh.fsdp "
                f"= {n_shards} shards; make the batch size a multiple of {n_shards}"
            )
        shape = (global_rows, *v.shape[1:])
        out[k] = jax.make_array_from_process_local_data(sharding, v, shape)
    return out


def to_host(tree: Any) -> Any:
    """`tree`'s arrays as numpy on this process: `jax.device_get`, except that an array
    spanning other processes' devices (a multi-host run's evaluation) is gathered first."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return jax.device_get(x)

    return jax.tree.map(one, tree)
