"""What every experiment shares: resumable runs, provenance, markdown tables and plots.

An experiment is a list of `Job`s (a config and a workdir each). `run_all` trains the runs that
have no `result.json` yet (a run interrupted half-way resumes from its checkpoint), so
re-running an experiment's command continues a sweep instead of starting over. The results
file of an experiment names the command, the git revision and the wall time that made it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_collections

from smatch_jax import metrics, train
from smatch_jax.eval.accuracy import mean_ci

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"


@dataclasses.dataclass
class Job:
    name: str  # unique within the experiment; the workdir's name
    method: str  # the row of the results table
    config: ml_collections.ConfigDict
    noise: float = 0.0
    seed: int = 0


# The training progress line in an experiment's log: a stage's first and last line, and one
# every 5 minutes in between (a run alone logs every minute without a terminal).
PROGRESS_S = 300.0


def enable_compilation_cache(path: str | Path) -> None:
    """Runs with equal shapes (e.g. the seeds of one method) reuse each other's compiles."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def run_all(
    runs: list[Job], root: Path, train_fn: Callable[[Job, Path], dict], *, train: bool = True
) -> list[dict]:
    """Each run's result (its `result.json`), training the missing ones in order
    (`train=False`: only the finished runs' results, e.g. to summarise a sweep half-way)."""
    results = []
    for i, r in enumerate(runs):
        out = root / r.name / "result.json"
        if out.exists():
            res = json.loads(out.read_text())
            print(f"[{i + 1}/{len(runs)}] {r.name}: done earlier", flush=True)
        elif not train:
            print(f"[{i + 1}/{len(runs)}] {r.name}: not run", flush=True)
            continue
        else:
            print(f"[{i + 1}/{len(runs)}] {r.name}: training", flush=True)
            t0 = time.time()
            res = train_fn(r, root / r.name)
            res.update(
                name=r.name, method=r.method, noise=r.noise, seed=r.seed, wall_s=time.time() - t0
            )
            out.write_text(json.dumps(res, indent=2))
        results.append(res)
    return results


def parse_shard(spec: str, pretrain_wd: Path | None) -> tuple[int, int]:
    """`--shard i/n`: this process runs every n-th planned run from the i-th. Only shard 0
    pretrains: the others refuse to start before the pretraining has finished (`pretrain_wd`;
    None: nothing to pretrain)."""
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise SystemExit(f"--shard={spec!r}: use i/n with 0 <= i < n") from None
    if not 0 <= i < n:
        raise SystemExit(f"--shard={spec!r}: use i/n with 0 <= i < n")
    if i > 0 and pretrain_wd is not None and not (pretrain_wd / "result.json").exists():
        raise SystemExit("pretraining is not finished: run shard 0 first (it pretrains)")
    return i, n


def run_sharded(
    runs: list[Job], root: Path, train_fn, shard: tuple[int, int], *, train: bool = True
) -> list[dict]:
    """`run_all` of this process's shard (`--shard i/n`: every n-th run from the i-th), then
    the finished results of every shard (the report covers what all processes finished)."""
    results = run_all(runs[shard[0] :: shard[1]], root, train_fn, train=train)
    if shard[1] > 1:
        results = run_all(runs, root, train_fn, train=False)
    return results


def results_header(t0: float, module: str, results: list[dict], pre: dict, planned: int) -> str:
    """Provenance of a results file (training time summed over the runs and the pretraining)."""
    run_s = sum(r["wall_s"] for r in results) + pre.get("wall_s", 0.0)
    header = provenance(t0, module, run_s)
    return header + f"Runs: {len(results)} of the {planned} planned finished.\n"


def last_eval(workdir: Path) -> dict:
    """The last evaluation a run wrote to its metrics.jsonl (also when it finished earlier)."""
    last = {}
    for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if any(k.startswith("eval/") for k in rec):
            last = rec
    return last


def last_texts(workdir: Path) -> dict[str, str]:
    """The texts (samples, recovery examples, ...) of a run's last evaluation dump."""
    dumps = sorted(
        (Path(workdir) / "samples").glob("step_*.txt"), key=lambda p: int(p.stem.split("_")[1])
    )
    if not dumps:
        return {}
    texts, name = {}, None
    for line in dumps[-1].read_text().splitlines():
        if line.startswith("=== ") and line.endswith(" ==="):
            name = line[4:-4]
            texts[name] = []
        elif name is not None and line:
            texts[name].append(line)
    return {k: "\n".join(v) for k, v in texts.items()}


def git_revision() -> str:
    return metrics.git_revision(ROOT)


# Flags that say where and how a run executes, not what it computes: left out of the command
# a results file gives for reproducing it.
_LOCAL_FLAGS = {"--shard": 1, "--workdir": 1, "--out": 1, "--summarise_only": 0, "--only": 1}


def reproduce_command(module: str, argv: list[str]) -> str:
    """`python -m module argv` without the flags of `_LOCAL_FLAGS` (`--shard 1/2`, `--out=x`)."""
    kept, skip = [], 0
    for a in argv:
        if skip:
            skip -= 1
            continue
        flag = a.split("=", 1)[0]
        if flag in _LOCAL_FLAGS:
            skip = _LOCAL_FLAGS[flag] if "=" not in a else 0
            continue
        kept.append(a)
    return " ".join(["python -m", module, *kept])


def provenance(t0: float, module: str, run_seconds: float, what: str = "training") -> str:
    """`run_seconds`: the summed `what` time of every run, also of runs finished earlier."""
    argv = sys.argv[1:]
    cmd = " ".join(["python -m", module, *argv])
    repro = reproduce_command(module, argv)
    this = f"This file was written by `{cmd}`" + (
        ", from runs trained earlier (their training time is the sum below)  \n"
        if "--summarise_only" in argv
        else "  \n"
    )
    return (
        f"Command: `{repro}` (from the repository root)  \n"
        + (this if cmd != repro else "")
        + f"Git revision: `{git_revision()}`  \n"
        f"Wall time: {(time.time() - t0) / 60:.1f} min for this invocation, "
        f"{run_seconds / 60:.1f} min of {what} summed over all runs, on {os.cpu_count()} "
        f"CPU cores ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})  \n"
        f"Machine: {cpu_model()}. XLA's CPU code differs between CPU models: runs are "
        "bit-identical on one machine, and differ slightly on another.\n"
    )


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo; the platform's processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown CPU"


def measured(rs: list[dict] | None, key: str) -> list[float]:
    """The runs' values of `key`; a figure with nothing to measure (None, NaN) is left out."""
    vals = [r.get(key) for r in rs or []]
    return [v for v in vals if v is not None and math.isfinite(v)]


def cell(r: dict, key: str) -> str:
    """One run's `key` for a table: 3 significant figures, "-" where nothing was measured."""
    return f"{r[key]:.3g}" if measured([r], key) else "-"


OUT_HELP = (
    "where the results files go (default: <workdir>/results, so that running an experiment "
    "leaves the checkout clean; pass --out experiments/results to update the committed files)"
)


def out_dir(out: str, workdir: str) -> Path:
    """`--out`, or `<workdir>/results` when it is empty (created)."""
    path = Path(out) if out else Path(workdir) / "results"
    path.mkdir(parents=True, exist_ok=True)
    return path


def prepare_root(workdir: str) -> tuple[Path, str]:
    """An experiment's root directory (created, with its compilation cache) and data dir."""
    root = Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    enable_compilation_cache(root / "jax_cache")
    return root, str(root / "data")


def pretrain(wd: Path, config: ml_collections.ConfigDict) -> Path:
    """MLE pretraining of `config` in `wd`, once: `wd/result.json` holds its last evaluation
    and wall time; an interrupted run resumes when called again."""
    if not (wd / "result.json").exists():
        print(f"pretraining (MLE) in {wd} ...", flush=True)
        t0 = time.time()
        state, _ = train.train(config, str(wd), progress_every_s=PROGRESS_S)
        if int(state.step) < config.train.num_steps:
            raise SystemExit(f"pretraining stopped at step {int(state.step)}; rerun to resume")
        res = {**last_eval(wd), "wall_s": time.time() - t0}
        (wd / "result.json").write_text(json.dumps(res, indent=2))
    return wd


def verdict(by: dict, levels: list[float], labels: dict[str, str], key: str, what: str) -> str:
    """One clause per noise level: the method with the highest mean `key` over seeds and
    whether its 95% interval overlaps the runner-up's. `by[(method, noise)]`: result dicts;
    MLE (`("mle", 0.0)`) sees no noise and competes at every level."""
    parts = []
    for n in levels:
        stats = []
        for method, label in labels.items():
            vals = measured(by.get(("mle", 0.0) if method == "mle" else (method, n)), key)
            if vals:
                stats.append((*mean_ci(vals), label, len(vals)))
        if len(stats) < 2:
            continue
        stats.sort(key=lambda s: s[0], reverse=True)
        (m1, h1, l1, k1), (m2, h2, l2, _) = stats[0], stats[1]
        overlap = m1 - h1 <= m2 + h2
        parts.append(
            f"at noise {n:g}, {l1} is highest ({m1:.3f} vs {l2} {m2:.3f}; "
            + (
                "one seed: no interval over seeds)"
                if k1 == 1
                else "the 95% intervals overlap)"
                if overlap
                else "the 95% intervals do not overlap)"
            )
        )
    return f"{what}: " + "; ".join(parts) + "." if parts else ""


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
