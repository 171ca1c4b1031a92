"""Scanned against unrolled layers (`model.scan_layers`) on this machine, side by side:
`python -m benchmarks.scan_layers [--configs arithmetic.py,arithmetic.py:smollm2] [--reps 5]`.

For each config, both layouts are built by `run.setup` in one process; per layout it times
the compilation of the train step with model rows and of the replay refill (`lower` +
`compile`), then the compiled train step, interleaved with the other layout's (A B A B ...,
the order alternating) and reported as the median ratio scanned / unrolled. The two layouts
start from the same weights; their first-step losses are printed to show it.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
from ml_collections import config_flags  # noqa: F401 (the configs import ml_collections)

from benchmarks import harness as h
from smatch_jax import run, sharding


def load(spec: str):
    """`configs/<file>[:variants]` as a ConfigDict."""
    import importlib

    name, _, variant = spec.partition(":")
    module = importlib.import_module("configs." + name.removesuffix(".py"))
    return module.get_config(variant or None)


def one_layout(spec: str, scan: bool) -> dict:
    c = load(spec)
    c.model.scan_layers = scan
    c.train.compilation_cache = ""  # compile for real
    t0 = time.perf_counter()
    r = run.setup(c)
    setup_s = time.perf_counter() - t0
    batch = sharding.global_batch(r.data.next(), r.mesh)
    state = r.init_state()
    t0 = time.perf_counter()
    refill = r.program.refill.lower(state, batch, r.frozen).compile()
    refill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    step = r.program.train_step.lower(state, batch, r.frozen, r.tables, use_model_rows=True)
    step = step.compile()
    step_s = time.perf_counter() - t0
    state, _ = refill(state, batch, r.frozen)
    box = {"state": state}

    def call():
        box["state"], met = step(box["state"], batch, r.frozen, r.tables)
        return met["loss"]

    loss = float(call())
    return {
        "layers": r.typed.model.preset if r.typed.model.init == "scratch" else r.typed.model.init,
        "setup_s": setup_s,
        "compile_train_step_s": step_s,
        "compile_refill_s": refill_s,
        "first_loss": loss,
        "call": call,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="arithmetic.py,arithmetic.py:smollm2")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    out = []
    for spec in args.configs.split(","):
        res = {scan: one_layout(spec, scan) for scan in (False, True)}
        calls = {str(scan): r.pop("call") for scan, r in res.items()}
        for fn in calls.values():  # warm
            jax.block_until_ready(fn())
        t = h.interleave(
            {k: lambda f=f: jax.block_until_ready(f()) for k, f in calls.items()}, args.reps
        )
        row = {
            "config": spec,
            "unrolled": res[False],
            "scanned": res[True],
            "train_step_ms": {k: 1e3 * h.med(v) for k, v in t.items()},
            "step_time_scanned_over_unrolled": h.median_ratio(t["True"], t["False"]),
        }
        out.append(row)
        u, s = res[False], res[True]
        print(
            f"{spec}: compile train step {u['compile_train_step_s']:.1f} s unrolled, "
            f"{s['compile_train_step_s']:.1f} s scanned; refill {u['compile_refill_s']:.1f} / "
            f"{s['compile_refill_s']:.1f} s; step {row['train_step_ms']['False']:.0f} / "
            f"{row['train_step_ms']['True']:.0f} ms (scanned / unrolled "
            f"{row['step_time_scanned_over_unrolled']:.2f}); first loss {u['first_loss']:.6f} / "
            f"{s['first_loss']:.6f}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
