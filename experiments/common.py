"""The experiment driver: the command line, the plan, resumption, provenance, cells and plots.

An experiment module declares an `Experiment` (its plan, the training and evaluation of one run,
its summary) and calls `main(EXPERIMENT)`. Its record is its results file `<out>/<name>.json`:
one row (a dict) per finished run, merged in under a lock as soon as the run finishes. A run
whose row is there is skipped, so rerunning a command continues the sweep, also on a new
machine when the file is committed (`--out experiments/results`). Processes share a sweep: the
same command started again beside the first takes the runs nobody is training (a run's claim
is a lock on `<workdir>/<runs>/.<name>.lock`), and `--only a,b` runs just those.
`--summarise_only` rewrites the tables and plots from the rows, with no training. Every results
file names the command, the git revision and the wall time that made it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import matplotlib
import ml_collections

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after the backend; the modules plot with it

from smatch_jax import metrics, train
from smatch_jax.eval.accuracy import mean_ci

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
BASE = "pretrain"  # the name of the row a setup adds for the model every run starts from


@dataclasses.dataclass
class Job:
    name: str  # unique within the experiment: its row's name and its workdir's
    method: str  # the row of the results table
    config: ml_collections.ConfigDict | None = None
    noise: float = 0.0
    seed: int = 0


@dataclasses.dataclass
class Context:
    """What an experiment's functions are given."""

    args: argparse.Namespace  # the shared flags and the module's own
    root: Path  # --workdir
    out: Path  # the results files' stem, `<out>/<name>`: .json (the rows), .md, plots beside
    runs: Path  # the runs' workdirs: `<runs>/<job name>`
    jobs: list[Job] = dataclasses.field(default_factory=list)  # the plan
    header: str = ""  # the provenance header (for `summarise`)
    t0: float = dataclasses.field(default_factory=time.time)

    @property
    def data_dir(self) -> str:
        return str(self.root / "data")

    def rows(self) -> list[dict]:
        """The rows in the results file now (another process may have added some)."""
        return read_rows(self.out)


@dataclasses.dataclass(frozen=True)
class Experiment:
    module: str  # `python -m <module>`: the command in the provenance header
    doc: str  # --help
    workdir: str  # the default --workdir
    name: Callable[[argparse.Namespace], str]  # the results file's stem for these flags
    plan: Callable[[Context], list[Job]]
    run: Callable[[Job, Path, Context], dict]  # train and evaluate one job in its workdir: a row
    summarise: Callable[[list[dict], Context], str]  # every row -> markdown; plots beside ctx.out
    seeds: int = 3  # the default --seeds
    flags: dict[str, dict] = dataclasses.field(default_factory=dict)  # --name: argparse keywords
    # Once before the runs, under a lock (a second process waits): rows it adds or replaces,
    # e.g. the pretraining's (named BASE) or the pretrained model's zero-shot score.
    setup: Callable[[Context], list[dict]] | None = None
    # When every planned job has its row: the rows it changes (e.g. a test evaluation of the
    # setting chosen on validation questions).
    finish: Callable[[list[dict], Context], list[dict]] | None = None
    commands: dict[str, Callable[[Context], None]] = dataclasses.field(default_factory=dict)
    runs_dir: Callable[[argparse.Namespace], str] = lambda args: "runs"
    out: str = ""  # the default --out; "": <workdir>/results, leaving the checkout clean
    what: str = "training"  # what a row's wall time measures (the header)


def switch(help: str) -> dict:
    return {"action": "store_true", "help": help}


def parser(exp: Experiment) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=f"python -m {exp.module}",
        description=exp.doc,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    for flag, kwargs in exp.flags.items():
        ap.add_argument(f"--{flag}", **kwargs)
    ap.add_argument("--seeds", type=int, default=exp.seeds)
    ap.add_argument(
        "--only",
        default="",
        help="comma list of run names to run now (e.g. mle_n0_s0), the others left for later",
    )
    ap.add_argument(
        "--summarise_only",
        action="store_true",
        help="no training: the tables and plots from the rows in the results file",
    )
    ap.add_argument("--workdir", default=exp.workdir)
    ap.add_argument(
        "--out",
        default=exp.out,
        help="where the results files go; a run whose row is there is skipped (default: "
        + (
            "the committed experiments/results: its rows are this sweep's record)"
            if exp.out
            else "<workdir>/results, so that running an experiment leaves the checkout clean; "
            "pass --out experiments/results to update the committed files)"
        ),
    )
    return ap


def context(exp: Experiment, argv: list[str] | None = None) -> Context:
    """The context of a command line (nothing created)."""
    args = parser(exp).parse_args(argv)
    root = Path(args.workdir)
    out = Path(args.out) if args.out else root / "results"
    return Context(args, root, out / exp.name(args), root / exp.runs_dir(args))


def main(exp: Experiment, argv: list[str] | None = None) -> list[dict]:
    """Runs the plan's jobs that have no row (`--only`: those named), merging each row into
    the results file at once, then writes the summary; returns every row."""
    ctx = context(exp, argv)
    args = ctx.args
    ctx.root.mkdir(parents=True, exist_ok=True)
    ctx.out.parent.mkdir(parents=True, exist_ok=True)
    for flag, command in exp.commands.items():
        if getattr(args, flag):
            enable_compilation_cache(ctx.root / "jax_cache")
            command(ctx)
            return []
    ctx.jobs = exp.plan(ctx)
    planned = {j.name for j in ctx.jobs}
    only = {x for x in args.only.split(",") if x}
    if only - planned:
        raise SystemExit(f"--only names no planned run: {sorted(only - planned)}")
    if not args.summarise_only:
        enable_compilation_cache(ctx.root / "jax_cache")
        if exp.setup is not None:
            with _lock(ctx.root / ".setup.lock", "setup (e.g. pretraining)"):
                write(exp, ctx, exp.setup(ctx))
    found = _in_workdir(ctx) if args.summarise_only else []
    text = ""  # the summary as last written
    for i, job in enumerate(ctx.jobs, 1):
        tag = f"[{i}/{len(ctx.jobs)}] {job.name}"
        if job.name in {r["name"] for r in ctx.rows()}:
            print(f"{tag}: done earlier", flush=True)
        elif only and job.name not in only:
            continue
        elif args.summarise_only:
            print(
                f"{tag}: "
                + ("in the workdir" if job.name in {r["name"] for r in found} else "not run")
            )
        elif (row := _run_one(exp, ctx, job, ctx.runs / job.name, tag)) is not None:
            text = write(exp, ctx, [row])  # the next session skips this run
    done = {r["name"] for r in ctx.rows() + found}
    if not args.summarise_only and exp.finish and planned <= done:
        text = write(exp, ctx, exp.finish(ctx.rows(), ctx)) or text
    if not planned & done:
        raise SystemExit(f"no finished runs: no planned run has a row in {rows_path(ctx.out)}")
    if found or not text:  # (else the last row's summary stands)
        text = write(exp, ctx, found, summarise=True)
    print(text.split("\n## ")[0])  # the headline
    print(f"wrote {ctx.out}.md, .json and its plots", flush=True)
    return ctx.rows()


def _in_workdir(ctx: Context) -> list[dict]:
    """The rows this workdir holds and the results file does not (a sweep run with the
    default --out, then published with --out experiments/results): its results file's (the
    setup's rows too), else its finished runs'."""
    rows = {r["name"]: r for r in read_rows(ctx.root / "results" / ctx.out.name)}
    for job in ctx.jobs:
        if job.name not in rows and _done(ctx.runs / job.name):
            rows[job.name] = json.loads((ctx.runs / job.name / "result.json").read_text())
    known = {r["name"] for r in ctx.rows()}
    return [r for name, r in rows.items() if name not in known]


def _run_one(exp: Experiment, ctx: Context, job: Job, wd: Path, tag: str) -> dict | None:
    """The job's row: trained now, or from its workdir's `result.json` (None: another process
    is running it)."""
    if _done(wd):
        print(f"{tag}: done earlier (its workdir)", flush=True)
        return json.loads((wd / "result.json").read_text())
    wd.parent.mkdir(parents=True, exist_ok=True)
    with open(wd.with_name(f".{job.name}.lock"), "a") as claim:
        try:
            fcntl.flock(claim, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"{tag}: running in another process", flush=True)
            return None
        if _done(wd):  # finished by the other process just before
            return json.loads((wd / "result.json").read_text())
        print(f"{tag}: {exp.what.split()[0]}", flush=True)
        t0 = time.time()
        row = exp.run(job, wd, ctx)
        row.update(
            name=job.name, method=job.method, noise=job.noise, seed=job.seed,
            wall_s=time.time() - t0,
        )  # fmt: skip
        wd.mkdir(parents=True, exist_ok=True)
        (wd / "result.json").write_text(json.dumps(row, indent=2))
    return row


def _done(wd: Path) -> bool:
    return (wd / "result.json").exists()


@contextlib.contextmanager
def _lock(path: Path, what: str) -> Iterator[None]:
    """An exclusive lock on `path` (created), waited for when another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process's {what} ({path})", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def rows_path(out: Path) -> Path:
    return out.with_name(out.name + ".json")


def read_rows(out: Path) -> list[dict]:
    """The rows of the results file `<out>.json` (none if it is missing or empty)."""
    path = rows_path(out)
    return json.loads(path.read_text() or "[]") if path.exists() else []


def write(exp: Experiment, ctx: Context, rows: list[dict], summarise: bool = False) -> str:
    """Merges `rows` into the results file under its lock: a row replaces the one of its name,
    a new one is appended, and the rows another process wrote meanwhile stay. Then, if any
    planned run has a row (or `summarise`), rewrites the summary from every row; returns it."""
    path = rows_path(ctx.out)
    if not rows and not summarise:
        return ""
    with open(path, "a") as lock:  # created empty if missing; locks the file itself
        fcntl.flock(lock, fcntl.LOCK_EX)
        theirs = read_rows(ctx.out)
        mine = {r["name"]: r for r in rows}
        names = {r["name"] for r in theirs}
        merged = [mine.get(r["name"], r) for r in theirs] + [
            r for r in rows if r["name"] not in names
        ]
        path.write_text(json.dumps(merged, indent=2))
        if not summarise and not {r["name"] for r in merged} & {j.name for j in ctx.jobs}:
            return ""
        ctx.header = header(exp, ctx, merged)
        text = exp.summarise(merged, ctx)
        ctx.out.with_name(ctx.out.name + ".md").write_text(text)
    return text


def header(exp: Experiment, ctx: Context, rows: list[dict]) -> str:
    """Provenance of a results file: the time of every row (`train_s` where a row has it:
    training alone, over all of a resumed run's invocations; else `wall_s`)."""
    timed = [r for r in rows if "wall_s" in r or "train_s" in r]
    run_s = sum(r.get("train_s", r.get("wall_s", 0.0)) for r in timed)
    what = exp.what
    if any("train_s" in r for r in timed) and not all("train_s" in r for r in timed):
        what += (
            " (for a run that predates the record of training time: the wall time of its "
            "last invocation, evaluation included)"
        )
    done = {r["name"] for r in rows} & {j.name for j in ctx.jobs}
    return provenance(ctx.t0, exp.module, run_s, what) + (
        f"Runs: {len(done)} of the {len(ctx.jobs)} planned finished.\n"
    )


def split(rows: list[dict], name: str = BASE) -> tuple[dict, list[dict]]:
    """The row named `name` ({} if none) and the others."""
    return next((r for r in rows if r["name"] == name), {}), [r for r in rows if r["name"] != name]


def group(rows: list[dict], *keys: str) -> dict[Any, list[dict]]:
    """Rows by their values of `keys` (one key: the value; more: a tuple), in order."""
    by: dict[Any, list[dict]] = {}
    for r in rows:
        k = tuple(r[x] for x in keys) if len(keys) > 1 else r[keys[0]]
        by.setdefault(k, []).append(r)
    return by


# The training progress line in an experiment's log: a stage's first and last line, and one
# every 5 minutes in between (a run alone logs every minute without a terminal).
PROGRESS_S = 300.0


def enable_compilation_cache(path: str | Path) -> None:
    """Runs with equal shapes (e.g. the seeds of one method) reuse each other's compiles."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


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
_LOCAL_FLAGS = {"--workdir": 1, "--out": 1, "--summarise_only": 0, "--only": 1}


def reproduce_command(module: str, argv: list[str]) -> str:
    """`python -m module argv` without the flags of `_LOCAL_FLAGS` (`--only x`, `--out=x`)."""
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


def base_row(wd: Path) -> dict:
    """The row of a finished pretraining (its `result.json`), named BASE."""
    return {"name": BASE, **json.loads((wd / "result.json").read_text())}


# Table cells.


def measured(rs: list[dict] | None, key: str) -> list[float]:
    """The runs' values of `key`; a figure with nothing to measure (None, NaN) is left out."""
    vals = [r.get(key) for r in rs or []]
    return [v for v in vals if v is not None and math.isfinite(v)]


def cell(r: dict, key: str) -> str:
    """One run's `key` for a table: 3 significant figures, "-" where nothing was measured."""
    return f"{r[key]:.3g}" if measured([r], key) else "-"


def mean_cell(rs: list[dict] | None, key: str, fmt: str = "{:.3f}", bootstrap: bool = False) -> str:
    """Runs' `key` for a table: the mean ± half-width of its 95% t-interval over seeds; one
    run: its value (`bootstrap`: with the run's own interval, `<key>_ci_low/high`)."""
    vals = measured(rs, key)
    if not vals:
        return "-"
    m, h = mean_ci(vals)
    if len(vals) > 1:
        return f"{fmt.format(m)} ± {fmt.format(h)}"
    if bootstrap:
        r = next(r for r in rs or [] if measured([r], key))
        return f"{fmt.format(m)} [{r[key + '_ci_low']:.2f}, {r[key + '_ci_high']:.2f}]"
    return fmt.format(m)


def noise_table(by: dict, levels: list[float], labels: dict[str, str], key: str, **kw) -> str:
    """One row per method (that has a figure), one column per noise level: `mean_cell` of the
    runs `by[(method, noise)]`; MLE sees no noise, so its runs `("mle", 0.0)` fill every level."""
    mle, rows = by.get(("mle", 0.0)), []
    for method, label in labels.items():
        cells = [
            mean_cell(mle if method == "mle" else by.get((method, n)), key, **kw) for n in levels
        ]
        if any(c != "-" for c in cells):
            rows.append([label, *cells])
    return markdown_table(["method", *[f"noise {n:g}" for n in levels]], rows)


def run_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Every run (by noise, method, seed) with its `cell` of each (key, heading) column."""
    body = [
        [r["method"], f"{r['noise']:g}", r["seed"], *[cell(r, k) for k, _ in columns]]
        for r in sorted(rows, key=lambda r: (r["noise"], r["method"], r["seed"]))
    ]
    return markdown_table(["method", "noise", "seed", *[h for _, h in columns]], body)


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


def save(fig, path: Path) -> None:
    """Every experiment's figure tail: laid out, 120 dpi, closed."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
