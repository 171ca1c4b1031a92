"""What the time split (`train.time_split`) costs, and the split itself, on this machine:
`python -m benchmarks.time_split [--config arithmetic.py:smoke] [--steps 60] [--reps 3]`.

The split waits for each phase's result (throughput.StepTimer), which stops the host from
preparing the next batch while the device runs. Runs of the same config with the split on and
off alternate (A B A B ..., each in a fresh workdir, the compilation cache shared so that
only the first run compiles); each run's figure is the median `sec_per_step` of its logs after
the first. Prints the median ratio on / off and the split of the last run with it on.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
from pathlib import Path

from benchmarks.scan_layers import load
from smatch_jax import train


def one_run(spec: str, steps: int, split: bool, root: Path, k: int) -> tuple[float, dict]:
    c = load(spec)
    c.train.num_steps, c.train.log_every = steps, 5
    c.train.eval_every = c.train.ckpt_every = 10 * steps  # the loop alone (and the end)
    c.train.time_split = split
    wd = root / f"{'on' if split else 'off'}_{k}"
    train.train(c, str(wd))
    logs = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    logs = [r for r in logs if "sec_per_step" in r][1:-1]  # not the compile's or the last
    return statistics.median(r["sec_per_step"] for r in logs), logs[-1]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="arithmetic.py:smoke")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    ratios, last = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.reps):
            order = (True, False) if k % 2 == 0 else (False, True)
            got = {s: one_run(args.config, args.steps, s, Path(tmp), k) for s in order}
            ratios.append(got[True][0] / got[False][0])
            last = got[True][1]
            print(f"rep {k}: on {got[True][0] * 1e3:.1f} ms/step, off {got[False][0] * 1e3:.1f}")
    print(f"{args.config}: sec_per_step with the split / without: {statistics.median(ratios):.3f}")
    split = {k: round(v * 1e3, 2) for k, v in last.items() if k.startswith("time/")}
    print(f"split of the last logged interval (ms per step): {split}")
    print(f"sec_per_step {last['sec_per_step'] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
