"""Figure 6: throughput and correctness of the SequenceMatch step on 1, 2, 4, 8 devices.

`XLA_FLAGS=--xla_force_host_platform_device_count=N` must be set before jax is imported, so
each device count runs in its own subprocess (`python -m benchmarks.scaling --worker ...`),
which prints one JSON line. On a machine with real accelerators set `fake=False`: the same
code shards the batch over the first N real devices instead.

Every device count trains the same global batch from the same initial parameters for two
steps (data-parallel mesh from `smatch_jax.sharding`); the losses must agree across counts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np


def worker(n_dev: int, size_name: str, reps: int, dtype: str = "float32") -> dict:
    """Runs inside the subprocess: two steps on an `n_dev`-device mesh, then timings."""
    import jax
    import jax.numpy as jnp

    from benchmarks import figures
    from benchmarks import harness as h
    from smatch_jax import sharding

    size = dataclasses.replace(h.SIZES[size_name], dtype=dtype)
    devices = jax.devices()[:n_dev]
    mesh = sharding.make_mesh(-1, 1, devices=devices)
    fns, params, opt_state = figures.make_step_fns(h.build_model(size), size)
    params = jax.device_put(params, sharding.param_shardings(params, mesh))
    opt_state = jax.device_put(opt_state, sharding.replicated(mesh))
    tokens, _, m, n = h.synthetic_rows(size)
    is_model = np.arange(size.batch) >= size.batch // 2
    rows = [jax.device_put(jnp.asarray(x), sharding.batch_sharding(mesh)) for x in (tokens, m, n)]
    rows.append(jax.device_put(jnp.asarray(is_model), sharding.batch_sharding(mesh)))
    step = fns["sm"]
    p1, o1, loss0 = step(params, opt_state, *rows)
    p2, _, loss1 = step(p1, o1, *rows)
    t = h.interleave({"step": lambda: step(params, opt_state, *rows)}, reps)["step"]
    return {
        "devices": len(devices),
        "platform": devices[0].platform,
        "loss0": float(loss0),
        "loss1": float(loss1),
        "param_sum": float(sum(jnp.sum(x.astype(jnp.float64)) for x in jax.tree.leaves(p2))),
        "step_ms": 1e3 * h.med(t),
        "tokens_per_s": size.batch * size.seq_len / h.med(t),
    }


def run_one(n_dev: int, size_name: str, reps: int, fake: bool, dtype: str) -> dict:
    env = dict(os.environ)
    if fake:
        flags = env.get("XLA_FLAGS", "")
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n_dev}".strip()
        env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, "-m", "benchmarks.scaling", "--worker", f"--devices={n_dev}"]
    cmd += [f"--size={size_name}", f"--reps={reps}", f"--dtype={dtype}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    result = _result_line(proc.stdout)
    if result is None:
        raise RuntimeError(
            f"scaling worker ({n_dev} devices) failed with exit code {proc.returncode} before "
            f"printing its result:\n{proc.stderr[-3000:]}"
        )
    if proc.returncode != 0:  # finished and reported, then died on the way out: keep it, say so
        result["worker_exit_code"] = proc.returncode
    return result


def _result_line(stdout: str) -> dict | None:
    """The worker's JSON result (its last line), or None if it never printed it."""
    lines = stdout.strip().splitlines()
    try:
        return json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        return None


def scaling(
    size_name: str,
    reps: int,
    device_counts=(1, 2, 4, 8),
    fake: bool = True,
    dtype: str = "float32",
) -> dict:
    """Runs every device count; checks the losses and parameters against 1 device."""
    runs = [run_one(n, size_name, reps, fake, dtype) for n in device_counts]
    base = runs[0]
    loss_diff = max(abs(r[k] - base[k]) for r in runs for k in ("loss0", "loss1"))
    param_diff = max(abs(r["param_sum"] - base["param_sum"]) for r in runs)
    for r in runs:
        r["throughput_vs_1"] = r["tokens_per_s"] / base["tokens_per_s"]
    return {
        "size": size_name,
        "fake_devices": fake,
        "runs": runs,
        "max_loss_diff": loss_diff,
        "max_param_sum_diff": param_diff,
        "losses_equal": bool(loss_diff <= 1e-5 * max(1.0, abs(base["loss1"]))),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--size", default="s")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.devices, args.size, args.reps, args.dtype)), flush=True)
        # Skip interpreter teardown: jaxlib can abort while shutting down its threads on small
        # machines (jax-ml/jax#769), which turned finished measurements into failures.
        os._exit(0)
    else:
        print(json.dumps(scaling(args.size, args.reps, dtype=args.dtype), indent=2))


if __name__ == "__main__":
    main()
