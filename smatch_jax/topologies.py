"""TPU chips and slice topologies by name, for compiling a run ahead of time on a CPU host.

* `CHIPS`: per chip, the HBM capacity, the peak bf16 FLOP/s, the HBM bandwidth and the ICI
  bandwidth (bidirectional, all ports), each with the public page it comes from. These are
  the only hardware figures the compile program (`main/compile.py`) uses.
* `TOPOLOGIES`: MaxText-style names (`v5e-32`, `v4-64`, ...) -> the topology string of
  `jax.experimental.topologies.get_topology_desc` (`v5e:4x8`), its chip config (`megacore`
  for v4 and v5p: one device per chip, both TensorCores), chips per host, and which axes
  wrap around (a torus: the full v5e-256 and v6e-256 pods on their two axes, v4 and v5p
  slices of 4x4x4 chips and more on all three; smaller slices are meshes). The names, shapes
  and wraparound follow MaxText's `accelerator_to_spec_map.py` (its `wrap` field; read for
  reference, not copied).
* `compile_devices(name, num_slices)`: the topology's compile-only devices (needs the
  `libtpu` wheel, requirements-tpu.txt; no TPU is needed).
* `pin_cpu_without_tpu()`: sets `JAX_PLATFORMS=cpu` on a host without TPU chips, so that an
  installed libtpu does not make every process probe for (and lock) a TPU.

jax is imported lazily: `pin_cpu_without_tpu` must run before jax is imported.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from pathlib import Path
from typing import Any

from smatch_jax.errors import UserError

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip's figures (per chip, not per TensorCore)."""

    kind: str  # e.g. 'v5e'
    hbm_bytes: int  # HBM capacity
    peak_bf16_flops: float  # peak dense bf16 FLOP/s
    hbm_bytes_per_s: float  # HBM bandwidth
    ici_bytes_per_s: float  # inter-chip interconnect, bidirectional, all ports of the chip


CHIPS: dict[str, Chip] = {
    # https://cloud.google.com/tpu/docs/v4 ("Key specifications"): 275 TFLOPs (bf16), HBM2
    # 32 GiB at 1200 GBps. The page gives no ICI figure; the JAX scaling book
    # (jax-ml.github.io/scaling-book/tpus, "TPU specs") has 9e10 B/s bidirectional per link
    # and 6 links per chip (3D torus): 5.4e11 B/s.
    "v4": Chip("v4", 32 * GIB, 275e12, 1200e9, 6 * 90e9),
    # https://cloud.google.com/tpu/docs/v5e ("System architecture"): 197 TFLOPs (bf16),
    # 16 GiB HBM at 819 GBps, bidirectional ICI 400 GBps per chip (4 ports).
    "v5e": Chip("v5e", 16 * GIB, 197e12, 819e9, 400e9),
    # https://cloud.google.com/tpu/docs/v5p ("System architecture"): 459 TFLOPs (bf16), HBM
    # 95 GiB at 2765 GBps, bidirectional ICI 1200 GBps per chip.
    "v5p": Chip("v5p", 95 * GIB, 459e12, 2765e9, 1200e9),
    # https://cloud.google.com/tpu/docs/v6e ("System architecture"): 918 TFLOPs (bf16),
    # 32 GB HBM at 1638 GBps, bidirectional ICI 800 GBps per chip (4 ports).
    "v6e": Chip("v6e", 32 * GIB, 918e12, 1638e9, 800e9),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A slice: its chip, `get_topology_desc` arguments and size."""

    name: str  # e.g. 'v5e-32'
    chip: Chip
    topology_name: str  # e.g. 'v5e:4x8'
    chip_config_name: str  # 'default' (one device per TensorCore) or 'megacore'
    chips_per_host_bounds: tuple[int, int, int]
    chips: int  # chips (= devices: one per chip) per slice
    wrap: tuple[bool, bool, bool] = (False, False, False)  # wraparound links per axis (torus)


_TORUS_2D, _TORUS_3D = (True, True, False), (True, True, True)


def _t(
    name: str,
    kind: str,
    shape: str,
    chips: int,
    megacore: bool = False,
    wrap: tuple[bool, bool, bool] = (False, False, False),
) -> Topology:
    prefix = "v5" if kind == "v5p" else kind  # libtpu names v5p 'v5'
    return Topology(
        name,
        CHIPS[kind],
        f"{prefix}:{shape}",
        "megacore" if megacore else "default",
        (2, 2, 1),
        chips,
        wrap,
    )


# The number in a name counts TensorCores for v4 / v5p (2 per chip) and chips for v5e / v6e.
TOPOLOGIES: dict[str, Topology] = {
    t.name: t
    for t in (
        _t("v5e-4", "v5e", "2x2", 4),  # small: tests
        _t("v5e-8", "v5e", "2x4", 8),
        _t("v5e-16", "v5e", "4x4", 16),
        _t("v5e-32", "v5e", "4x8", 32),
        _t("v5e-64", "v5e", "8x8", 64),
        _t("v5e-256", "v5e", "16x16", 256, wrap=_TORUS_2D),
        _t("v4-8", "v4", "2x2x1", 4, megacore=True),
        _t("v4-16", "v4", "2x2x2", 8, megacore=True),
        _t("v4-32", "v4", "2x2x4", 16, megacore=True),
        _t("v4-64", "v4", "2x4x4", 32, megacore=True),
        _t("v4-128", "v4", "4x4x4", 64, megacore=True, wrap=_TORUS_3D),
        _t("v5p-8", "v5p", "2x2x1", 4, megacore=True),
        _t("v5p-64", "v5p", "2x4x4", 32, megacore=True),
        _t("v5p-128", "v5p", "4x4x4", 64, megacore=True, wrap=_TORUS_3D),
        _t("v6e-4", "v6e", "2x2", 4),
        _t("v6e-32", "v6e", "4x8", 32),
        _t("v6e-256", "v6e", "16x16", 256, wrap=_TORUS_2D),
    )
}


def get(name: str) -> Topology:
    """The topology `name`: a key of `TOPOLOGIES` or its topology string (`v5e:2x2`)."""
    if name in TOPOLOGIES:
        return TOPOLOGIES[name]
    for t in TOPOLOGIES.values():
        if t.topology_name == name:
            return t
    raise ValueError(
        f"unknown TPU topology {name!r}; choose one of {sorted(TOPOLOGIES)} "
        "(or their topology strings, e.g. 'v5e:2x2')"
    )


class LibtpuMissingError(UserError, RuntimeError):
    """The TPU compiler (the libtpu wheel) is not installed."""


def libtpu_available() -> bool:
    """Whether the libtpu wheel is importable (it carries the TPU compiler)."""
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None


def compile_devices(name: str, num_slices: int = 1, wraparound: bool = True) -> list[Any]:
    """The compile-only devices of `num_slices` slices of topology `name` (no TPU needed);
    `wraparound=False` drops the torus links (how every slice was built before they were
    known: benchmarks/RESULTS.md compares the two)."""
    if not libtpu_available():
        raise LibtpuMissingError(
            "compiling for a TPU topology needs the TPU compiler: "
            "pip install -r requirements-tpu.txt (libtpu, the version jax[tpu] pins)"
        )
    # Compile-only use: other processes may hold libtpu's lock (e.g. a TPU job on a TPU VM).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    t = get(name)
    desc = topologies.get_topology_desc(
        platform="tpu",
        topology_name=t.topology_name,
        chip_config_name=t.chip_config_name,
        chips_per_host_bounds=t.chips_per_host_bounds,
        num_slices=num_slices,
        wrap=t.wrap if wraparound else (False, False, False),
    )
    devices = list(desc.devices)
    if len(devices) != t.chips * num_slices:
        raise RuntimeError(
            f"{name}: libtpu gave {len(devices)} devices, the table says {t.chips} chips per "
            f"slice x {num_slices}; fix the entry in smatch_jax/topologies.py"
        )
    return devices


# PCI device ids of TPU chips (vendor 0x1ae0, Google); the same table as jax's hardware_utils.
_TPU_PCI_IDS = ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076")


def tpu_chips_attached() -> int:
    """TPU chips on this host's PCI bus (0 on a CPU machine)."""
    n = 0
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        d = Path(vendor).parent
        try:
            if Path(vendor).read_text().strip() == "0x1ae0":
                n += (d / "device").read_text().strip() in _TPU_PCI_IDS
        except OSError:
            continue
    return n


def pin_cpu_without_tpu() -> None:
    """`JAX_PLATFORMS=cpu` unless it is set or the host has TPU chips or a GPU: with libtpu
    installed, jax would otherwise initialise the TPU plugin in every process, take libtpu's
    lock file and log errors, before falling back to the CPU."""
    gpu = os.path.exists("/dev/nvidia0") or os.path.exists("/dev/kfd")
    if "JAX_PLATFORMS" not in os.environ and not gpu and not tpu_chips_attached():
        os.environ["JAX_PLATFORMS"] = "cpu"
