"""What a compiled function costs per chip: memory, flops, bytes, collectives, a roofline.

* `memory(compiled)`: `memory_analysis()` per chip: arguments, outputs, temporaries,
  generated code and aliased bytes; `peak = args + out + temp - alias + code`.
* `cost(compiled)`: `cost_analysis()` flops and bytes accessed (a loop body counted once).
* `collectives(hlo_text, loop_trips)`: the collectives of the optimised HLO (all-gather,
  all-reduce, reduce-scatter, all-to-all, collective-permute and their async starts), each
  with the bytes of its largest buffer, times the trip count of the loops around it: a
  while loop's `known_trip_count`, else `loop_trips` (the caller's bound, e.g. the sampler's
  action budget). Bytes inside loop bodies are also summed apart (`in_loops`).
* `roofline_seconds(...)`: max(flops / peak, bytes / HBM bandwidth) + collective bytes / ICI
  bandwidth, a projection from the chip table (topologies.py), never a measurement. XLA's own
  `optimal_seconds` is not used: it comes out negative on these steps.
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from typing import Any

COLLECTIVES = (
    "all-gather",
    "all-reduce",
    "reduce-scatter",
    "all-to-all",
    "ragged-all-to-all",
    "collective-permute",
    "collective-broadcast",
)
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s4": 0.5, "u4": 0.5, "bf16": 2, "f16": 2, "s16": 2}
_BYTES |= {"u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8}
_BYTES |= {"c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY )?%([^\s(]+) \(")
_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*?) ([a-z][a-z0-9\-]*)\(")
# A callee list: `body=%b`, `calls=%f`, `branch_computations={%t, %f}`. Each attribute on its
# own: "condition=%c, body=%b" is two (a greedy match once took "%c, body" and lost the body).
_CALLEE = re.compile(
    r"\b(?:calls|to_apply|body|condition|branch_computations)=\{?(%[\w.\-]+(?:, ?%[\w.\-]+)*)"
)
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


@dataclasses.dataclass
class Memory:
    args: int
    out: int
    temp: int
    alias: int
    code: int
    xla_peak: int  # memory_analysis().peak_memory_in_bytes (0 when not reported)

    @property
    def peak(self) -> int:
        """Bytes live on one chip: arguments + outputs + temporaries - aliased + code."""
        return self.args + self.out + self.temp - self.alias + self.code


def memory(compiled: Any) -> Memory:
    """Per-chip memory of a compiled function."""
    m = compiled.memory_analysis()
    return Memory(
        args=int(m.argument_size_in_bytes),
        out=int(m.output_size_in_bytes),
        temp=int(m.temp_size_in_bytes),
        alias=int(m.alias_size_in_bytes),
        code=int(m.generated_code_size_in_bytes),
        xla_peak=int(getattr(m, "peak_memory_in_bytes", 0) or 0),
    )


def cost(compiled: Any) -> dict[str, float]:
    """Per-chip `flops` and `bytes` accessed (XLA's cost analysis: loop bodies once)."""
    ca = compiled.cost_analysis()
    if isinstance(ca, list | tuple):
        ca = ca[0] if ca else {}
    ca = ca or {}
    return {"flops": float(ca.get("flops", 0.0)), "bytes": float(ca.get("bytes accessed", 0.0))}


def array_bytes(shape: str) -> int:
    """Bytes of the largest array in an HLO shape string (a tuple's largest element)."""
    best = 0.0
    for dtype, dims in _ARRAY.findall(shape):
        n = 1
        for d in dims.split(","):
            if d:
                n *= int(d)
        best = max(best, n * _BYTES.get(dtype, 4))
    return int(best)


@dataclasses.dataclass
class Collectives:
    """Collective bytes per chip, by kind, with loop bodies counted per trip."""

    by_kind: dict[str, float]  # kind -> bytes (all executions)
    count: dict[str, int]  # kind -> instructions in the HLO text
    in_loops: float  # bytes of the collectives inside loop bodies, per loop iteration

    @property
    def total(self) -> float:
        return sum(self.by_kind.values())


def _computations(text: str) -> tuple[dict[str, list[str]], str]:
    comps: dict[str, list[str]] = {}
    entry, current = "", None
    for line in text.splitlines():
        h = _HEADER.match(line)
        if h and line.rstrip().endswith("{"):
            current = h.group(1)
            comps[current] = []
            if line.startswith("ENTRY"):
                entry = current
        elif line.startswith("}"):
            current = None
        elif current is not None:
            comps[current].append(line)
    return comps, entry


def collectives(hlo_text: str, loop_trips: int = 1) -> Collectives:
    """The collectives of an optimised HLO module's text (see the module docstring)."""
    comps, entry = _computations(hlo_text)
    mult: dict[str, float] = defaultdict(float)
    looped: set[str] = set()
    order = [entry] if entry else list(comps)
    for name in order:
        mult[name] = max(mult[name], 1.0)
    seen: set[str] = set()
    while order:  # propagate multipliers from callers to callees (the call graph is a DAG)
        name = order.pop(0)
        if name in seen or name not in comps:
            continue
        seen.add(name)
        for line in comps[name]:
            m = _INSTR.match(line)
            if not m:
                continue
            factor = 1.0
            if m.group(3) == "while":
                t = _TRIPS.search(line)
                factor = float(t.group(1)) if t else float(loop_trips)
            for group in _CALLEE.findall(line):
                for callee in group.split(","):
                    callee = callee.strip().lstrip("%")
                    if callee in comps:
                        mult[callee] = max(mult[callee], mult[name] * factor)
                        if m.group(3) == "while" or name in looped:
                            looped.add(callee)
                        order.append(callee)
    by_kind: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    in_loops = 0.0
    for name, lines in comps.items():
        for line in lines:
            m = _INSTR.match(line)
            if not m:
                continue
            op = m.group(3)
            kind = op.removesuffix("-start")
            if kind not in COLLECTIVES or op.endswith("-done"):
                continue
            b = array_bytes(m.group(2))
            by_kind[kind] += b * max(mult[name], 1.0)
            count[kind] += 1
            if name in looped:
                in_loops += b
    return Collectives(dict(by_kind), dict(count), in_loops)


def roofline_seconds(flops: float, bytes_accessed: float, collective_bytes: float, chip) -> float:
    """Projected seconds on one chip: max(compute, HBM) + ICI (no overlap of the ICI time)."""
    compute = flops / chip.peak_bf16_flops
    hbm = bytes_accessed / chip.hbm_bytes_per_s
    return max(compute, hbm) + collective_bytes / chip.ici_bytes_per_s
