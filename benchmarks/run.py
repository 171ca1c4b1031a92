"""`python -m benchmarks.run [--quick] [--json out.json]`: every figure of issue #7.

Prints one table per figure and writes everything (plus the headline numbers at the top
level and the machine it ran on) to `--json`. `--quick` is the small configuration (< 5 min
on 2 CPU cores); the default runs more sizes and repetitions. Each figure is a median of
per-repetition ratios of interleaved timings (see `benchmarks/harness.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import jax

from benchmarks import figures, scaling
from benchmarks import harness as h
from smatch_jax import metrics, sampling

PROFILES = {
    "quick": dict(
        sizes=("s", "m"), reps=9, sampler_reps=5, sampler_size="s", step_size="s", scaling_reps=3
    ),
    "full": dict(
        sizes=("s", "m", "l"),
        reps=15,
        sampler_reps=9,
        sampler_size="m",
        step_size="m",
        scaling_reps=5,
    ),
}
SAMPLER_LENGTHS = (64, 256, 1024)
DEFAULT_SAMPLE_EVERY = sampling.PolicySamplingConfig.sample_every  # the config default


def machine() -> dict:
    dev = jax.devices()[0]
    return {
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        "devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "load_avg_1m": os.getloadavg()[0],
        "jax": jax.__version__,
        "git": metrics.git_revision(Path(__file__).resolve().parents[1]),
    }


def _table(title: str, header: list[str], rows: list[list]) -> str:
    fmt = lambda x: f"{x:.3g}" if isinstance(x, float) else str(x)
    lines = [f"\n## {title}", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def tables(res: dict) -> str:
    pick = lambda r, keys: [r[k] for k in keys]
    lay_keys = ["size", "params", "tokens_per_step", "sm_step_ms", "mle_step_ms"]
    lay_keys += ["layout_overhead_ratio", "iqr", "layout_only_ratio", "parallel_layout_ratio"]
    lay_keys += ["mfu"]
    lay_head = ["size", "params", "tokens", "SM ms", "MLE ms", "SM/MLE", "SM/MLE quartiles"]
    lay_head += ["layout-only/MLE", "SM parallel layout/MLE", "MFU"]
    iqr = lambda r: "{:.2f}-{:.2f}".format(*r["layout_overhead_iqr"])
    out = [
        _table(
            "1+4. Layout overhead and MFU (train step: SM on <bkspc> rows vs MLE)",
            lay_head,
            [pick({**r, "iqr": iqr(r)}, lay_keys) for r in res["layout"]],
        )
    ]
    s, samplers = res["sampler"], ["bkspc", "plain", "no_repeat", "recompute"]
    ratios = ["bkspc_vs_plain", "no_repeat_vs_plain", "cache_speedup"]
    out.append(
        _table(
            f"2. Sampling (size {s['size']}, batch {s['batch']}): tokens/s",
            [
                "new tokens",
                "bkspc",
                "plain",
                "no_repeat_deleted",
                "recompute",
                "bkspc/plain",
                "no_repeat/plain",
                "cache speedup",
            ],
            [
                [n, *pick(v["tokens_per_s"], samplers), *pick(v, ratios)]
                for n, v in s["lengths"].items()
            ],
        )
    )
    c = res["sm_cost"]
    out.append(
        _table(
            f"3. SequenceMatch step incl. amortised sampling vs MLE (size {c['size']}; "
            f"SM step {c['sm_step_ms']:.1f} ms, refill {c['refill_ms']:.1f} ms, "
            f"MLE {c['mle_step_ms']:.1f} ms)",
            ["sample_every", "reuse per sampled row", "SM/MLE"],
            [
                pick(r, ["sample_every", "reuse_per_sampled_row", "sm_step_ratio"])
                for r in c["by_sample_every"]
            ],
        )
    )
    cm_keys = ["size", "train_compile_s", "sampler_compile_s", "train_peak_mb", "sampler_peak_mb"]
    out.append(
        _table(
            "5. Compile time and peak memory (XLA estimate)",
            ["size", "train compile s", "sampler compile s", "train MB", "sampler MB"],
            [pick(res["compile"], cm_keys)],
        )
    )
    sc = res["scaling"]
    out.append(
        _table(
            f"6. Scaling (size {sc['size']}, fake devices: {sc['fake_devices']}, losses equal: "
            f"{sc['losses_equal']}, max loss diff {sc['max_loss_diff']:.2g})",
            ["devices", "step ms", "tokens/s", "vs 1 device", "loss after 1 update"],
            [
                pick(r, ["devices", "step_ms", "tokens_per_s", "throughput_vs_1", "loss1"])
                for r in sc["runs"]
            ],
        )
    )
    return "\n".join(out)


def headline(res: dict) -> dict:
    """The top-level numbers: worst case over sizes for the targets, largest size for MFU."""
    n256 = res["sampler"]["lengths"].get("256") or next(iter(res["sampler"]["lengths"].values()))
    by_k = {r["sample_every"]: r["sm_step_ratio"] for r in res["sm_cost"]["by_sample_every"]}
    return {
        "layout_overhead_ratio": max(r["layout_overhead_ratio"] for r in res["layout"]),
        "bkspc_sampler_ratio": n256["bkspc_vs_plain"],
        "no_repeat_sampler_ratio": n256["no_repeat_vs_plain"],
        "cache_speedup_256": n256["cache_speedup"],
        "sm_step_ratio": by_k.get(DEFAULT_SAMPLE_EVERY, next(iter(by_k.values()))),
        "mfu": res["layout"][-1]["mfu"],
        "train_compile_s": res["compile"]["train_compile_s"],
        "sampler_compile_s": res["compile"]["sampler_compile_s"],
        "scaling_losses_equal": res["scaling"]["losses_equal"],
        "greedy_recompute_equals_cached": res["sampler"]["greedy_recompute_equals_cached"],
    }


def run(
    sizes,
    reps: int,
    sampler_reps: int,
    sampler_size: str,
    step_size: str,
    scaling_reps: int,
    *,
    lengths=SAMPLER_LENGTHS,
    device_counts=(1, 2, 4, 8),
    dtype: str = "float32",
    fake_devices: bool = True,
    log=print,
) -> dict:
    """Runs every figure; returns the result dict (headline numbers at the top level)."""
    size = lambda name: dataclasses.replace(h.SIZES[name], dtype=dtype)
    t0 = time.perf_counter()
    res: dict = {"machine": machine(), "dtype": dtype, "reps": reps}
    res["layout"] = []
    for name in sizes:
        log(f"[{time.perf_counter() - t0:6.1f}s] layout + MFU, size {name}")
        res["layout"].append(figures.layout_and_mfu(size(name), reps))
    log(f"[{time.perf_counter() - t0:6.1f}s] sampler, size {sampler_size}")
    res["sampler"] = figures.sampler(size(sampler_size), sampler_reps, lengths)
    log(f"[{time.perf_counter() - t0:6.1f}s] SequenceMatch cost, size {step_size}")
    res["sm_cost"] = figures.sm_cost(size(step_size), reps)
    log(f"[{time.perf_counter() - t0:6.1f}s] compile time and memory, size {step_size}")
    res["compile"] = figures.compile_and_memory(size(step_size))
    log(f"[{time.perf_counter() - t0:6.1f}s] scaling, size {step_size}")
    res["scaling"] = scaling.scaling(step_size, scaling_reps, device_counts, fake_devices, dtype)
    res["wall_s"] = time.perf_counter() - t0
    return {**headline(res), **res}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small sizes, fewer repetitions")
    ap.add_argument("--json", default="", help="write the results here")
    ap.add_argument("--reps", type=int, default=0, help="override the repetitions")
    ap.add_argument("--dtype", default="float32", help="model and matmul-peak dtype")
    ap.add_argument(
        "--real_devices", action="store_true", help="scale over real devices (not fake CPU ones)"
    )
    args = ap.parse_args(argv)
    prof = dict(PROFILES["quick" if args.quick else "full"])
    if args.reps:
        prof["reps"] = prof["sampler_reps"] = args.reps
    res = run(**prof, dtype=args.dtype, fake_devices=not args.real_devices)
    print(tables(res))
    top = {k: v for k, v in res.items() if not isinstance(v, dict | list)}
    print("\nheadline:", json.dumps(top))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
