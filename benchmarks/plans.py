"""The committed pod plans as markdown tables: `python -m benchmarks.plans [FILE.json ...]`
(default: every `benchmarks/plans/*.json`, written by `python -m smatch_jax.main.compile
... --json=benchmarks/plans/<name>.json`). One table per plan, one row per piece, per chip;
seconds are the plan's roofline PROJECTIONS, not measurements.

`python -m benchmarks.plans --make` plans every entry of `MAKE` that has no JSON yet, one at a
time (delete a JSON to plan it again), with the compile flags listed there.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PLANS = Path(__file__).resolve().parent / "plans"
GIB = 1 << 30
PAPER = "--config=configs/paper.py:"
# name -> the flags of `python -m smatch_jax.main.compile` that plan it.
MAKE = {
    # Issue 35's step: Llama-2-7B fully fine-tuned, full remat (MaxText's comparison).
    "v5e-32_arithmetic_mle_full_ft": [
        PAPER + "arithmetic_mle",
        "--config.model.lora_rank=0",
        "--config.model.remat=full",
        "--topology=v5e-32",
        "--pieces=train_mle",
        "--buffers=20",
    ],
    "v5e-32_arithmetic_sm": [PAPER + "arithmetic_sm", "--topology=v5e-32"],
    "v5e-32_arithmetic_sm_unrolled": [
        PAPER + "arithmetic_sm",
        "--config.model.scan_layers=False",
        "--topology=v5e-32",
    ],
    "v5e-32_text_sm": [PAPER + "text_sm", "--topology=v5e-32"],
    "v4-64_arithmetic_sm": [PAPER + "arithmetic_sm,v4", "--topology=v4-64"],
    "v5e-256_arithmetic_sm_torus": [
        PAPER + "arithmetic_sm",
        "--config.mesh.data=-1",  # data 8 x fsdp 4 x tensor 8
        "--topology=v5e-256",
        "--pieces=train_mle,train_sm,refill",
    ],
    "v5e-256_arithmetic_sm_mesh": [
        PAPER + "arithmetic_sm",
        "--config.mesh.data=-1",
        "--topology=v5e-256",
        "--pieces=train_mle,train_sm,refill",
        "--wraparound=false",
    ],
}


def table(plan: dict) -> str:
    """One plan as a markdown table (with a header line naming the slice and the run)."""
    head = (
        f"{plan['topology']}, mesh {plan['mesh']}, torus {plan.get('wraparound')}, "
        f"scan_layers={plan.get('scan_layers')}, {plan['data_rows']} data + "
        f"{plan['model_rows']} model rows; planned in {plan.get('wall_seconds', 0):.0f} s, "
        f"host peak {plan.get('host_peak_rss_bytes', 0) / GIB:.1f} GiB"
    )
    rows = [
        head,
        "",
        "| piece | args | out | temp | peak GiB | fits | TFLOP | HBM GB | coll. GB | proj. s "
        "| compile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, p in plan["pieces"].items():
        loop = f" (loop x{p['loop_trips']})" if p.get("loop_trips", 1) > 1 else ""
        if p.get("error"):
            rows.append(
                f"| {name}{loop} | | | | {p['peak_bytes_per_chip'] / GIB:.2f} | DOES NOT FIT "
                f"| | | | | {p['compile_seconds']:.0f} |"
            )
            continue
        m = p["memory"]
        rows.append(
            f"| {name}{loop} | {m['args'] / GIB:.2f} | {m['out'] / GIB:.2f} | "
            f"{m['temp'] / GIB:.2f} | {p['peak_bytes_per_chip'] / GIB:.2f} | "
            f"{'FITS' if p['fits'] else 'DOES NOT FIT'} | {p['flops'] / 1e12:.2f} | "
            f"{p['bytes_accessed'] / 1e9:.1f} | {p['collective_bytes'] / 1e9:.2f} | "
            f"{p['optimal_seconds']:.3f} | {p['compile_seconds']:.0f} |"
        )
    if plan.get("sm_over_mle_projected"):
        rows.append("")
        rows.append(
            f"SequenceMatch step over MLE step (projected): {plan['sm_over_mle_projected']:.2f}"
        )
    return "\n".join(rows)


def make() -> None:
    """Plan every `MAKE` entry without a JSON, one at a time (each prints its report)."""
    for name, flags in MAKE.items():
        out = PLANS / f"{name}.json"
        if out.exists():
            continue
        print(f"planning {name}", flush=True)
        cmd = [sys.executable, "-m", "smatch_jax.main.compile", *flags, f"--json={out}"]
        subprocess.run(cmd, check=True)


def main(paths: list[str]) -> None:
    if paths == ["--make"]:
        return make()
    files = [Path(p) for p in paths] or sorted(PLANS.glob("*.json"))
    for f in files:
        print(f"### {f.stem}\n\n{table(json.loads(f.read_text()))}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
