"""Device mesh, parameter shardings and global batches: one code path from 1 CPU to a pod.

* The mesh has axes `('data', 'fsdp')` (`jax.make_mesh`). Batches are split over both axes
  (every device holds a slice of the batch); parameters are sharded over `fsdp` and
  replicated over `data`.
* Parameter rules: an ordered list of `(regex, PartitionSpec)` matched against the parameter
  path (`blocks.3.attn.q_proj.kernel`); the first match wins. Parameters no rule matches are
  FSDP-sharded on their largest dimension divisible by the `fsdp` size (replicated when none
  is, or when the parameter is small).
* Global batches are assembled from process-local numpy data with
  `jax.make_array_from_process_local_data`, so the same code runs on several hosts.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from smatch_jax.sections import Section

AXES = ("data", "fsdp")
MIN_SHARD_SIZE = 2**14  # parameters with fewer elements are replicated


@dataclasses.dataclass(frozen=True)
class MeshConfig(Section):
    """`config.mesh`: the device mesh."""

    NAME: ClassVar[str] = "mesh"
    data: int = -1  # data-parallel axis size (-1: all devices not used by fsdp)
    fsdp: int = 1  # parameter-sharding axis size

    RANGES: ClassVar[tuple[tuple[str, Any, Any, bool], ...]] = (("fsdp", 1, None, True),)

    @classmethod
    def cross_problems(cls, values: dict[str, Any]) -> list[str]:
        if values["data"] != -1 and values["data"] < 1:
            return [f"mesh.data={values['data']} must be -1 (all devices) or >= 1"]
        return []


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `('data', 'fsdp')` mesh; `data=-1` takes every device not used by `fsdp`."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"mesh.fsdp={fsdp} must divide the device count {n}")
    if data == -1:
        data = n // fsdp
    if data * fsdp != n:
        raise ValueError(
            f"mesh data={data} x fsdp={fsdp} = {data * fsdp} devices, but {n} are available; "
            "set mesh.data=-1 to use all of them"
        )
    # Auto axes: XLA propagates shardings from the inputs (no sharding-in-types).
    auto = (jax.sharding.AxisType.Auto,) * 2
    return jax.make_mesh((data, fsdp), AXES, axis_types=auto, devices=devices)


def _path_name(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


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


def param_shardings(abstract_params, mesh: Mesh, rules: Sequence[tuple[str, P]] = ()) -> object:
    """A pytree of `NamedSharding` matching `abstract_params` (arrays or ShapeDtypeStructs)."""
    compiled = [(re.compile(rx), spec) for rx, spec in rules]
    fsdp = mesh.shape["fsdp"]

    def one(path, x):
        name = _path_name(path)
        for rx, spec in compiled:
            if rx.search(name):
                return NamedSharding(mesh, spec)
        return NamedSharding(mesh, _default_spec(tuple(x.shape), fsdp))

    return jax.tree_util.tree_map_with_path(one, abstract_params)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every device of the mesh."""
    return NamedSharding(mesh, P(AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays from this process's rows (each process passes its own slice)."""
    sharding = batch_sharding(mesh)
    n_dev = mesh.devices.size
    out = {}
    for k, v in local.items():
        v = np.asarray(v)
        global_rows = v.shape[0] * jax.process_count()
        if global_rows % n_dev:
            raise ValueError(
                f"global batch of {global_rows} rows does not split over {n_dev} devices; "
                "make the batch size a multiple of the device count"
            )
        out[k] = jax.make_array_from_process_local_data(sharding, v)
    return out


def local_batch_size(global_batch_size: int) -> int:
    """Rows each process loads for a global batch of `global_batch_size`."""
    if global_batch_size % jax.process_count():
        raise ValueError(
            f"batch size {global_batch_size} must be a multiple of the process count "
            f"{jax.process_count()}"
        )
    return global_batch_size // jax.process_count()
