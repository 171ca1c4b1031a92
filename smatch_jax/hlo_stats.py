"""What a compiled function costs per chip: memory, flops, bytes, collectives, a roofline.

* `memory(compiled)`: `memory_analysis()` per chip: arguments, outputs, temporaries,
  generated code and aliased bytes; `peak = args + out + temp - alias + code`.
* `cost(compiled)`: `cost_analysis()` flops and bytes accessed (a loop body counted once).
* `matmul_loops(hlo_text)`: XLA's own loops around matmuls (windowed matmuls), whose flops
  its cost analysis mostly leaves out; the plan counts the flops of the program compiled
  again with `FLAT_MATMULS`, which turns them off (compile_plan.py). `COST_OPTIONS`: the
  compiler options of the programs a plan costs (no copies between HBM and VMEM counted).
* `collectives(hlo_text, loop_trips)`: the collectives of the optimised HLO (all-gather,
  all-reduce, reduce-scatter, all-to-all, collective-permute and their async starts), each
  transfer once with the bytes of its largest buffer, times the trip count of the loops
  around it: a while loop's `known_trip_count`, else N for a condition `i < N` (XLA's own
  loops, e.g. a windowed matmul over N shards), else `loop_trips` (the caller's bound, e.g.
  the sampler's action budget). One iteration of the loops of unknown length is also summed
  apart (`in_loops`: a sampler's bytes per token). XLA's TPU compiler splits one transfer
  into a start and continuation steps inside several fused computations, each a copy of the
  collective with the same `channel_id` and the full result shape: a channel is one
  transfer, counted once, at the largest trip count of the places it appears.
* `peak_buffers(dump_dir)`: XLA's own account of the buffers live at the peak of its heap
  simulation (the entry computation's; a loop body's own temporaries are in the peak, not in
  the list), from the buffer assignment the compiler writes when compiled with `DUMP_OPTIONS`
  (on TPU `memory_analysis()` carries no buffer assignment).
* `roofline_seconds(...)`: max(flops / peak, bytes / HBM bandwidth) + collective bytes / ICI
  bandwidth, a projection from the chip table (topologies.py), never a measurement. XLA's own
  `optimal_seconds` is not used: it comes out negative on these steps.
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from pathlib import Path
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
_CHANNEL = re.compile(r"\bchannel_id=(\d+)")
_OP_NAME = re.compile(r'\bop_name="((?:[^"\\]|\\.)*)"')


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
    """Collective bytes per chip, by kind, each transfer once, loop bodies counted per trip."""

    by_kind: dict[str, float]  # kind -> bytes (all executions)
    count: dict[str, int]  # kind -> transfers in the HLO text (channels)
    in_loops: float  # bytes of one iteration of the loops of unknown length (per token)

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


def _callees(line: str) -> list[str]:
    """The computations an instruction's line calls (`_CALLEE`), without their `%`."""
    return [c.strip().lstrip("%") for group in _CALLEE.findall(line) for c in group.split(",")]


_COUNTED = re.compile(r"ROOT %\S+ = pred\[\]\S* compare\(.*%(constant[\w.\-]*)\), direction=LT")
_CONST = re.compile(r"^\s*%(constant[\w.\-]*) = [su]\d+\[\]\S* constant\((\d+)\)")


def _counted_trips(cond: list[str]) -> int | None:
    """N of a condition `i < N`, N a constant (XLA's own loops, e.g. a windowed matmul that
    circulates the N shards of an operand); None for any other condition."""
    consts = {m.group(1): int(m.group(2)) for m in map(_CONST.match, cond) if m}
    for line in cond:
        m = _COUNTED.search(line)
        if m and m.group(1) in consts:
            return consts[m.group(1)]
    return None


def collectives(hlo_text: str, loop_trips: int = 1) -> Collectives:
    """The collectives of an optimised HLO module's text (see the module docstring).

    A while loop runs its `known_trip_count`, else N when its condition is `i < N` for a
    constant N (the loops XLA writes, e.g. windowed matmuls), else `loop_trips`: the loops of
    unknown length are the program's own (the sampler's), and `in_loops` is the bytes of one
    of their iterations, XLA's loops inside them included."""
    comps, entry = _computations(hlo_text)
    calls: dict[str, list[tuple[str, float, bool]]] = defaultdict(list)  # (callee, trips, ?)
    for name, lines in comps.items():
        for line in lines:
            m = _INSTR.match(line)
            if not m:
                continue
            factor, unknown = 1.0, False
            if m.group(3) == "while":
                t = _TRIPS.search(line)
                cond = re.search(r"condition=%([\w.\-]+)", line)
                n = int(t.group(1)) if t else _counted_trips(comps.get(cond.group(1), []))
                unknown = n is None
                factor = float(loop_trips if n is None else n)
            for callee in _callees(line):
                if callee in comps:
                    calls[name].append((callee, factor, unknown))
    # Callers before callees (the call graph is a DAG); a computation called from several
    # places runs the sum of their counts.
    order: list[str] = []
    visited: set[str] = set()

    def visit(name: str) -> None:
        if name not in visited:
            visited.add(name)
            for callee, _, _ in calls[name]:
                visit(callee)
            order.append(name)

    called = {c for edges in calls.values() for c, _, _ in edges}
    roots = [entry] if entry else [n for n in comps if n not in called]
    for r in roots:
        visit(r)
    mult: dict[str, float] = defaultdict(float, {r: 1.0 for r in roots})
    per_trip: dict[str, float] = defaultdict(float)  # runs per iteration of an unknown loop
    for name in reversed(order):
        for callee, factor, unknown in calls[name]:
            mult[callee] += mult[name] * factor
            per_trip[callee] += mult[name] if unknown else per_trip[name] * factor
    # One transfer per channel: (kind, bytes, runs, runs per unknown-loop iteration).
    transfers: dict[Any, tuple[str, float, float, float]] = {}
    for name, lines in comps.items():
        for i, line in enumerate(lines):
            m = _INSTR.match(line)
            if not m:
                continue
            op = m.group(3)
            kind = op.removesuffix("-start")
            if kind not in COLLECTIVES or op.endswith("-done"):
                continue
            channel = _CHANNEL.search(line)
            key = ("channel", int(channel.group(1))) if channel else (name, i)
            seen = transfers.get(key, (kind, 0.0, 0.0, 0.0))
            transfers[key] = (
                kind,
                max(seen[1], array_bytes(m.group(2))),
                max(seen[2], mult[name]),
                max(seen[3], per_trip[name]),
            )
    by_kind: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    in_loops = 0.0
    for kind, b, runs, per_token in transfers.values():
        by_kind[kind] += b * runs
        count[kind] += 1
        in_loops += b * per_token
    return Collectives(dict(by_kind), dict(count), in_loops)


# Compiler options of the programs whose flops and bytes a plan counts (compile_plan.py): no
# memory-space assignment. With it, XLA's cost analysis counts its copies into and out of
# VMEM as bytes accessed besides the reads and writes they serve, so a prefetched weight
# counts two to three times (the 7B train step 92.9 against 67.2 GB, a decode step's layer
# 287 against 97 MB: benchmarks/RESULTS.md, issue 35). Without it, every operand is read
# from HBM and every result written there once per use: an upper bound on the HBM traffic.
COST_OPTIONS = {"xla_msa_enable": "DISABLED"}
# Compiler options under which XLA's TPU compiler writes no windowed (collective) matmul
# loops: the same matmuls, each one counted by its cost analysis (`matmul_loops`).
FLAT_MATMULS = {
    "xla_tpu_enable_windowed_einsum_for_all_gather": False,
    "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False,
}


def matmul_loops(hlo_text: str) -> int:
    """How many of XLA's own while loops (not a jax loop: its op_name is not the `.../while`
    of a scan or while_loop; e.g. a windowed matmul that circulates the shards of an operand)
    hold a dot or convolution. XLA's cost analysis counts a loop body once, so it leaves out
    most of their matmuls: count the flops of the program compiled with `FLAT_MATMULS`."""
    comps, _ = _computations(hlo_text)
    callees = {name: {c for line in lines for c in _callees(line)} for name, lines in comps.items()}
    matmul = {
        name for name, lines in comps.items()
        if any((m := _INSTR.match(x)) and m.group(3) in ("dot", "convolution") for x in lines)
    }  # fmt: skip

    def holds(name: str, seen: set[str]) -> bool:
        seen.add(name)
        return name in matmul or any(holds(c, seen) for c in callees.get(name, ()) - seen)

    loops = 0
    for lines in comps.values():
        for line in lines:
            m = _INSTR.match(line)
            if m and m.group(3) == "while":
                op, body = _OP_NAME.search(line), re.search(r"body=%([\w.\-]+)", line)
                xla = not (op and op.group(1).endswith("/while"))
                loops += bool(xla and body and holds(body.group(1), set()))
    return loops


def accounted_cost(lowered: Any) -> tuple[dict[str, float], bool]:
    """`(flops and bytes, flat)`: XLA's cost analysis of `lowered` compiled with
    `COST_OPTIONS`, and again without XLA's windowed-matmul loops (`flat`) when it wrote
    any (`matmul_loops`)."""
    compiled = lowered.compile(compiler_options=COST_OPTIONS)
    if not matmul_loops(compiled.as_text()):
        return cost(compiled), False
    return cost(lowered.compile(compiler_options=COST_OPTIONS | FLAT_MATMULS)), True


# Compiler options that make XLA write its buffer assignment and live ranges (with
# `xla_dump_to`): the TPU compiler's `*-live-range.txt` names the buffers live at its peak.
DUMP_OPTIONS = {"xla_dump_hlo_as_text": True, "xla_dump_buffer_assignment_analysis": True}
_LIVE = re.compile(r"^\s+(\S+?)\{[\d,]*\}: (\d+) bytes")
_PEAK = re.compile(r"^\s+Stack trace breakdown for peak usage: ([\d ]+) bytes")


@dataclasses.dataclass(frozen=True)
class PeakBuffer:
    bytes: int
    instruction: str  # in the optimised HLO
    source: str  # its op_name: the jax operation (or the argument's path) that made it
    argument: bool  # an argument of the program (counted in `Memory.args`, not a temporary)


def peak_buffers(dump_dir: str | Path) -> tuple[int, list[PeakBuffer]]:
    """`(bytes, buffers)` live at the peak of XLA's heap simulation of the module compiled
    into `dump_dir` (`DUMP_OPTIONS`), the entry computation's, largest first (a while loop
    running at the peak holds its body's temporaries on top: XLA's peak minus these bytes)."""
    ranges = sorted(Path(dump_dir).glob("*-live-range.txt"), key=lambda p: p.stat().st_size)
    if not ranges:
        raise FileNotFoundError(f"no *-live-range.txt in {dump_dir}: compile with DUMP_OPTIONS")
    live, total, at_peak = [], 0, False
    for line in ranges[-1].read_text().splitlines():
        if line.strip().startswith("Live ranges at") and "(peak)" in line:
            at_peak = True
        elif (m := _PEAK.match(line)) is not None:
            total = int(m.group(1).replace(" ", ""))
            break
        elif at_peak and (m := _LIVE.match(line)) is not None:
            live.append((int(m.group(2)), m.group(1)))
    hlo = ranges[-1].with_name(ranges[-1].name.replace("-live-range", ""))
    comps, entry = _computations(hlo.read_text() if hlo.exists() else "")
    sources, arguments = {}, set()
    for name, lines in comps.items():
        for line in lines:
            if (m := _INSTR.match(line)) is not None:
                op = _OP_NAME.search(line)
                sources[m.group(1)] = op.group(1).replace("\\'", "'") if op else ""
                if name == entry and m.group(3) == "parameter":
                    arguments.add(m.group(1))
    buffers = [PeakBuffer(b, n, sources.get(n, ""), n in arguments) for b, n in live]
    return total or sum(b.bytes for b in buffers), sorted(buffers, key=lambda b: -b.bytes)


def roofline_seconds(flops: float, bytes_accessed: float, collective_bytes: float, chip) -> float:
    """Projected seconds on one chip: max(compute, HBM) + ICI (no overlap of the ICI time)."""
    compute = flops / chip.peak_bf16_flops
    hbm = bytes_accessed / chip.hbm_bytes_per_s
    return max(compute, hbm) + collective_bytes / chip.ici_bytes_per_s
