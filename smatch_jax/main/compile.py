"""Compile a run for a TPU topology on this machine, and report what it would cost there.

    python -m smatch_jax.main.compile --config=configs/paper.py:arithmetic_sm --topology=v5e-32
    python -m smatch_jax.main.compile --config=configs/paper.py:text_sm,v4 --topology=v4-64 \\
        --json=plan.json [--num_slices=2] [--vocab_size=32000] [--config.train.batch_size=32]
    python -m smatch_jax.main.compile --config=configs/paper.py:arithmetic_mle \\
        --topology=v5e-32 --pieces=train_mle

The run is built abstractly (no weights, no data: `compile_plan.abstract_run`) on the
topology's compile-only devices (`topologies.py`; needs requirements-tpu.txt, no TPU) with
the config's mesh, and its jitted pieces are compiled by XLA's TPU compiler. One row per
piece: bytes per chip against the chip's HBM (FITS / DOES NOT FIT, and the knob to turn),
flops and HBM bytes per chip (counted on the program compiled without memory-space
assignment: `hlo_stats.COST_OPTIONS`), collective bytes per chip, and a roofline time. Loop pieces
(`refill`, `eval_decode`) count their loop body A times (the sampler's action budget, an upper
bound: rows stop at eos), and a scanned model's pieces count its block once per layer
(`compile_plan.py`). The last line projects a SequenceMatch step (train step with model rows
+ refill / sampling.sample_every) over the MLE step of the same data batch. `--pieces`
compiles only the pieces it names (`compile_plan.PIECES`; a loop piece brings the decode step
it is costed with).

`--config=FILE --list` lists a config's variants and fields; a missing flag, a bad config or
topology is one `error:` line (exit 2).

Every time printed is a PROJECTION from the chip table (max(flops / peak, bytes / HBM
bandwidth) + collective bytes / ICI bandwidth), not a measurement; XLA's `optimal_seconds`
is not used (it is negative on these steps).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import resource
import sys
import time

from absl import flags

from smatch_jax.errors import UserError
from smatch_jax.main import cli

# `--config` and its overrides: `cli.CONFIG`, the entry every program with a config shares.
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice, e.g. v5e-32, v4-64, v5e:2x2")
_SLICES = flags.DEFINE_integer("num_slices", 1, "slices (the mesh spans all of them)")
_JSON = flags.DEFINE_string("json", None, "also write the report here")
_VOCAB = flags.DEFINE_integer(
    "vocab_size", None, "vocabulary size (default: the pretrained preset's, VOCAB_SIZES)"
)
_PIECES = flags.DEFINE_list(
    "pieces",
    None,
    "compile only these pieces (default all; the names are compile_plan.PIECES, which an "
    "unknown name lists)",
)
_WRAP = flags.DEFINE_boolean(
    "wraparound", True, "the slice's torus links where it has them (false: a mesh)"
)
_THREADS = flags.DEFINE_integer(
    "threads", 2, "programs compiled at a time (each can take GBs of host memory)"
)
_BUFFERS = flags.DEFINE_integer(
    "buffers",
    0,
    "also list the N largest buffers live at XLA's own peak of each piece, from the "
    "compiler's buffer assignment (hlo_stats.peak_buffers; dumps it to a temporary directory)",
)


GIB = 1 << 30


def _knob(name: str, mem) -> str:
    """What to turn when a piece does not fit (`mem` None: XLA refused it)."""
    if name.startswith("train"):
        if mem is not None and mem.args + mem.out - mem.alias > mem.temp:
            return "state dominates: larger mesh.fsdp x mesh.tensor"
        return (
            "activations dominate: model.remat='full' (or 'save_dots'), "
            "train.batch_size / train.model_rows, mesh.tensor"
        )
    # The sampler holds 1/mesh.tensor of the weights per chip (sharding.decode_layout).
    if name.startswith("refill"):
        return "train.batch_size (rows sampled per refill), larger mesh.tensor"
    return "the evaluation batch (256), larger mesh.tensor"


def build_report(
    config,
    topology: str,
    num_slices: int = 1,
    vocab_size: int | None = None,
    pieces: tuple[str, ...] | None = None,
    wraparound: bool = True,
    threads: int = 2,
    buffers: int = 0,
):
    """The report (a JSON-able dict) of `config` compiled for `topology` (`pieces`: only
    these, names of `compile_plan.PIECES`; `wraparound=False`: without torus links;
    `buffers`: the N largest buffers live at each piece's peak)."""
    from smatch_jax import compile_plan, hlo_stats, topologies

    topo = topologies.get(topology)
    unknown = sorted(set(pieces or ()) - set(compile_plan.PIECES))
    if unknown:
        raise UserError(f"--pieces names {unknown}; choose from {','.join(compile_plan.PIECES)}")
    chip = topo.chip
    t0 = time.time()
    devices = topologies.compile_devices(topology, num_slices, wraparound)
    ar = compile_plan.abstract_run(config, devices, vocab_size=vocab_size)
    done = lambda p: print(
        f"compiled {p.name} in {p.seconds:.0f} s" + (" (does not fit)" if p.error else ""),
        file=sys.stderr,
        flush=True,
    )
    compiled = compile_plan.compile_pieces(
        ar, on_piece=done, only=pieces, workers=threads, buffers=buffers > 0
    )
    compile_s = time.time() - t0
    rows = {}
    for name, p in compiled.items():
        if pieces is not None and name not in pieces:
            continue  # compiled for another piece's loop body only
        if p.error:  # XLA refused it: its temporaries alone exceed the HBM
            rows[name] = {
                "peak_bytes_per_chip": p.needed_bytes,
                "hbm_bytes_per_chip": chip.hbm_bytes,
                "fits": False,
                "knob": "temporaries exceed HBM: " + _knob(name, None),
                "error": p.error,
                "flops": None,
                "optimal_seconds": None,
                "collective_bytes": None,
                "loop_trips": p.loop_trips,
                "donated": p.donated,
                "compile_seconds": p.seconds,
            }
            continue
        mem, cst, coll = p.memory, dict(p.cost), p.collectives
        step = compiled.get(p.step_name)
        if step is not None and step.cost is not None:  # the token loop: XLA counts it once
            cst = {k: cst[k] + (p.loop_trips - 1) * step.cost[k] for k in cst}
        secs = hlo_stats.roofline_seconds(cst["flops"], cst["bytes"], coll.total, chip)
        fits = mem.peak <= chip.hbm_bytes
        rows[name] = {
            "peak_bytes_per_chip": mem.peak,
            "hbm_bytes_per_chip": chip.hbm_bytes,
            "fits": fits,
            "knob": "" if fits else _knob(name, mem),
            "memory": {
                "args": mem.args,
                "out": mem.out,
                "temp": mem.temp,
                "alias": mem.alias,
                "code": mem.code,
                "xla_peak": mem.xla_peak,
            },
            "flops": cst["flops"],
            "bytes_accessed": cst["bytes"],
            # XLA's own count of the real program: every loop body once, its HBM-VMEM copies in
            "xla_flops": p.xla_cost["flops"],
            "xla_bytes": p.xla_cost["bytes"],
            "flat_flops": p.flat_flops,  # flops from a compile without XLA's matmul loops
            "optimal_seconds": secs,  # the roofline projection (XLA's is unusable)
            "collective_bytes": coll.total,
            "collectives": {k: {"bytes": v, "ops": coll.count[k]} for k, v in coll.by_kind.items()},
            "loop_trips": p.loop_trips,
            "loop_body_costed": step is not None and step.cost is not None,
            "layers_counted": p.layers_counted,  # n_layers unless a scanned probe failed
            "donated": p.donated,  # the state's buffers reused (steps.Program donates it)
            "compile_seconds": p.seconds,
        }
        if name in ("refill", "eval_decode"):
            rows[name]["collective_bytes_per_token"] = coll.in_loops
        if buffers:  # what is live at XLA's peak (the entry computation's buffers)
            temps = [dataclasses.asdict(b) for b in p.peak_buffers if not b.argument]
            rows[name]["peak_live_bytes"] = p.peak_live
            rows[name]["peak_argument_bytes"] = sum(b.bytes for b in p.peak_buffers if b.argument)
            rows[name]["peak_buffers"] = temps[:buffers]
    c = ar.typed
    secs = {k: v["optimal_seconds"] for k, v in rows.items()}
    sm = None
    if all(secs.get(k) for k in ("train_mle", "train_sm", "refill")):
        refill = secs["refill"] / c.sampling.sample_every
        sm = (secs["train_sm"] + refill) / secs["train_mle"]
    return {
        "topology": topo.name,
        "topology_name": topo.topology_name,
        "wraparound": [w and wraparound for w in topo.wrap],
        "num_slices": num_slices,
        "chips": topo.chips * num_slices,
        "chip": {
            "kind": chip.kind,
            "hbm_bytes": chip.hbm_bytes,
            "peak_bf16_flops": chip.peak_bf16_flops,
            "hbm_bytes_per_s": chip.hbm_bytes_per_s,
            "ici_bytes_per_s": chip.ici_bytes_per_s,
        },
        "mesh": dict(ar.mesh.shape),
        "vocab_size": ar.vocab_size,
        "scan_layers": c.model.scan_layers,
        "n_layers": ar.built.model_config.n_layers,
        "pieces": rows,
        "sm_over_mle_projected": sm,
        "sample_every": c.sampling.sample_every,
        "model_rows": ar.settings.model_rows,
        "data_rows": c.train.batch_size,
        "weight_bytes": ar.model_bytes,
        "refill_collective_bytes_per_token": rows.get("refill", {}).get(
            "collective_bytes_per_token"
        ),
        "compile_seconds": compile_s,
        "note": "times are roofline projections from the chip table, not measurements",
    }


def _gib(b: float) -> str:
    return f"{b / GIB:.2f}"


def format_report(r: dict) -> str:
    """The report as a text table (one row per piece)."""
    chip = r["chip"]
    lines = [
        f"{r['topology']} ({r['topology_name']} x {r['num_slices']}): {r['chips']} chips of "
        f"{_gib(chip['hbm_bytes'])} GiB HBM, mesh {r['mesh']}, weights "
        f"{_gib(r['weight_bytes'])} GiB, vocabulary {r['vocab_size']}",
        f"{'piece':<19}{'args':>7}{'out':>7}{'temp':>7}{'code':>6}{'peak':>7} GiB  "
        f"{'fits':<12}{'TFLOP':>9}{'HBM GB':>9}{'coll GB':>9}{'proj. s':>9}  collectives",
    ]
    for name, p in r["pieces"].items():
        if p.get("error"):
            lines.append(
                f"{name:<19}{'':>27}{_gib(p['peak_bytes_per_chip']):>7}      DOES NOT FIT "
                f"(XLA refused: temporaries {_gib(p['peak_bytes_per_chip'])} GiB > HBM)"
            )
            lines.append(f"{'':<19}-> {p['knob']}")
            continue
        m = p["memory"]
        colls = ", ".join(
            f"{k} {v['ops']}x {v['bytes'] / 1e9:.2f} GB" for k, v in p["collectives"].items()
        )
        loop = f" (loop x{p['loop_trips']})" if p["loop_trips"] > 1 else ""
        lines.append(
            f"{name:<19}{_gib(m['args']):>7}{_gib(m['out']):>7}{_gib(m['temp']):>7}"
            f"{m['code'] / GIB:>6.2f}{_gib(p['peak_bytes_per_chip']):>7}      "
            f"{'FITS' if p['fits'] else 'DOES NOT FIT':<12}{p['flops'] / 1e12:>9.3f}"
            f"{p['bytes_accessed'] / 1e9:>9.2f}{p['collective_bytes'] / 1e9:>9.2f}"
            f"{p['optimal_seconds']:>9.4f}  {colls or '-'}{loop}"
        )
        if p["knob"]:
            lines.append(f"{'':<19}-> {p['knob']}")
    for name, p in r["pieces"].items():
        if "peak_buffers" in p:
            xla_peak, live, args = (
                p["memory"]["xla_peak"], p["peak_live_bytes"], p["peak_argument_bytes"]
            )  # fmt: skip
            lines.append(
                f"{name}: XLA's own peak {_gib(xla_peak)} GiB = arguments {_gib(args)} + "
                f"buffers {_gib(live - args)} + a loop's temporaries {_gib(xla_peak - live)}; "
                "the largest buffers (MiB):"
            )
            lines += [
                f"  {b['bytes'] / 2**20:9.1f}  {b['instruction']:<28} {b['source']}"
                for b in p["peak_buffers"]
            ]
    if r["refill_collective_bytes_per_token"] is not None:
        per = r["refill_collective_bytes_per_token"]
        lines.append(
            f"refill collectives per generated token: {per / 1e9:.3f} GB per chip = "
            f"{per / r['weight_bytes']:.1%} of the weight bytes"
        )
    if r["sm_over_mle_projected"] is not None:
        lines.append(
            f"SequenceMatch step (train_sm + refill / {r['sample_every']}) over the MLE step, "
            f"{r['model_rows']} model + {r['data_rows']} data rows: "
            f"{r['sm_over_mle_projected']:.2f}x (PROJECTION)"
        )
    flat = [n for n, p in r["pieces"].items() if p.get("flat_flops")]
    if flat:
        lines.append(
            f"TFLOP of {', '.join(flat)}: compiled again without XLA's windowed-matmul loops, "
            "whose bodies its cost analysis counts once (hlo_stats.matmul_loops)"
        )
    lines.append(
        "proj. s: PROJECTED seconds, max(flops / peak, bytes / HBM bw) + collective bytes / "
        "ICI bw (topologies.py), not measured; per chip; peak = args + out + temp - alias + "
        "code; TFLOP and HBM GB counted without memory-space assignment (hlo_stats.COST_OPTIONS)"
    )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    config = cli.parse_config_flags(
        argv, doc=__doc__, module_name=__name__, required=("config", "topology")
    )
    cli.setup_logging(logging.WARNING)
    import jax

    # Executables for compile-only devices cannot be loaded back from JAX's persistent cache
    # (JAX_COMPILATION_CACHE_DIR): writing them would only spend time and disk.
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        t0 = time.time()
        pieces = tuple(_PIECES.value) if _PIECES.value else None
        r = build_report(
            config,
            _TOPOLOGY.value,
            _SLICES.value,
            _VOCAB.value,
            pieces,
            _WRAP.value,
            _THREADS.value,
            _BUFFERS.value,
        )
    except ValueError as e:  # a topology name, or a config that does not fit its chips
        raise UserError(str(e)) from None
    r["wall_seconds"] = time.time() - t0
    r["host_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux
    print(format_report(r))
    rss = _gib(r["host_peak_rss_bytes"])
    print(f"wall time {r['wall_seconds']:.0f} s, host memory peak {rss} GiB")
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(r, f, indent=2)


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the TPU is only a compile target here
    cli.run(main)
