"""What a reader reads for one SequenceMatch update, counted: `python -m benchmarks.read_path`.

From the training program to the optimiser update, the model excluded (README "What is
here" quotes the count). The functions counted are

1. the loop's path, traced: the package's frames on the Python call stack when the
   SequenceMatch train step (model rows from the replay buffer) applies its update
   (`optax.apply_updates`), in a one-step arithmetic run (warm-up 0, a refill first);
2. the compiled step's body, traced: every package function that runs while that step is
   traced (from the frame jax calls, the jitted function, down);
3. named in `READ_ALSO`: the program's `main`; what the loop calls and its types (`Run`,
   `Built`, `Program`); the builder that jits the step (`build`, with the helpers that made
   its optimiser and settings at 9eb6fe2); the makers of what the step closes over (the loss
   function, the optimiser); the types the step reads and builds.

`smatch_jax/models/` (the model) and other packages (optax, jax) are left out. A closure
counts as its enclosing top-level function, a method as itself, a class as a whole, a lambda
outside any function as its statement; overlapping ranges once. "lines of functions" sums
those ranges (decorators and docstrings included); "lines of files" the whole files they are
in.

Before the step was rearranged, at commit 9eb6fe2 (`git archive 9eb6fe2 | tar -x -C DIR`,
then in DIR `python <this file> --root . --before`; run as a file, so that DIR's package is
the one imported): 11 files, 1,052 lines of functions, 2,453 lines of files.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Part 3 of the method (module docstring): (file under smatch_jax/, qualified name).
READ_ALSO = (
    ("main/train.py", "main"),  # the program
    ("steps.py", "Run"),  # what the loop calls: its train_step
    ("steps.py", "Built"),
    ("steps.py", "Program"),
    ("steps.py", "build"),  # jits the step; makes its optimiser and settings
    ("steps.py", "TrainState"),
    ("steps.py", "NoiseTables"),
    ("steps.py", "StepSettings"),
    ("objective.py", "Batch"),
    ("objective.py", "make_loss_fn"),  # the loss function the step closes over
    ("optimizer.py", "OptimizerConfig.build"),  # the optimiser it closes over
    ("optimizer.py", "OptimizerConfig.learning_rate"),
)
# The same at commit 9eb6fe2: `Run`, `Built`, `Program` and `build` were in run.py, and `build`
# made the optimiser and the settings with two helpers. (`setup` is on the loop's path there:
# it held the loop's `train_step`.)
READ_ALSO_BEFORE = (
    ("main/train.py", "main"),
    ("run.py", "Run"),
    ("run.py", "Built"),
    ("run.py", "Program"),
    ("run.py", "build"),
    ("run.py", "build_optimizer"),
    ("run.py", "step_settings"),
    ("steps.py", "TrainState"),
    ("steps.py", "NoiseTables"),
    ("steps.py", "StepSettings"),
    ("objective.py", "Batch"),
    ("objective.py", "make_loss_fn"),
    ("optimizer.py", "OptimizerConfig.build"),
    ("optimizer.py", "OptimizerConfig.learning_rate"),
)


def trace(root: Path) -> tuple[list[tuple[str, str, int]], list[tuple[str, str, int]]]:
    """(the loop's path, the step's body) as (file under smatch_jax/, qualified name, first
    line)."""
    sys.path.insert(0, str(root))
    import optax

    from configs import arithmetic
    from smatch_jax import train

    pkg = str(root / "smatch_jax") + os.sep
    c = arithmetic.get_config("smoke")
    c.data.train_size, c.data.test_size = 64, 8
    c.train.batch_size = c.train.model_rows = 8
    c.train.num_steps, c.train.log_every = 2, 1
    c.train.eval_every = c.train.ckpt_every = 1000
    c.loss.bc_warmup_steps, c.sampling.sample_every = 0, 1
    update = optax.apply_updates.__code__
    calls = []  # (code, frame id, the package's frames above it: (id, code, called by jax))

    def ours(f):
        return f is not None and f.f_code.co_filename.startswith(pkg)

    def profile(frame, event, arg):
        if event != "call" or not (ours(frame) or frame.f_code is update):
            return
        stack, f = [], frame.f_back
        while f is not None:
            if ours(f):
                stack.append((id(f), f.f_code, not ours(f.f_back)))
            f = f.f_back
        calls.append((frame.f_code, id(frame), stack))

    with tempfile.TemporaryDirectory() as wd:
        c.data.data_dir = os.path.join(wd, "data")
        sys.setprofile(profile)
        try:
            train.train(c, os.path.join(wd, "run"), stop_after=1, progress_every_s=1e9)
        finally:
            sys.setprofile(None)

    def name(co):
        return co.co_filename[len(pkg) :], co.co_qualname, co.co_firstlineno

    sampled = False
    for co, _, stack in calls:
        sampled |= name(co)[:2] == ("replay.py", "sample")
        if co is update and sampled:  # the step with model rows
            spine = stack
            break
    else:
        raise RuntimeError("no update of a SequenceMatch step was traced")
    jitted = next(fid for fid, _, called_by_jax in spine if called_by_jax)
    body = {
        name(co) for co, _, stack in calls if co is not update and jitted in {s[0] for s in stack}
    }
    return [name(co) for _, co, _ in reversed(spine)], sorted(body)


def _span(tree: ast.Module, qualname: str, line: int | None) -> tuple[int, int]:
    """First and last line of the top-level function, method or class `qualname` names (a
    closure: its enclosing function; a lambda outside any: the statement holding `line`)."""
    if qualname.startswith("<lambda>") and line is not None:
        node = next(n for n in tree.body if n.lineno <= line <= n.end_lineno)
        return node.lineno, node.end_lineno
    node: ast.AST = tree
    for part in qualname.split(".<locals>")[0].split("."):
        defs = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
        found = [n for n in node.body if isinstance(n, defs) and n.name == part]
        if not found:
            raise LookupError(f"no definition of {qualname}")
        node = found[0]
    start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    return start, node.end_lineno


def count(root: Path, names: list[tuple[str, str, int | None]]) -> dict:
    """Files, lines of functions and lines of files of `names` (models/ left out)."""
    spans: dict[str, set[int]] = {}
    for file, qualname, line in names:
        if file.startswith("models/"):
            continue
        text = (root / "smatch_jax" / file).read_text()
        try:
            a, b = _span(ast.parse(text), qualname, line)
        except LookupError as e:
            raise LookupError(f"smatch_jax/{file}: {e} (update READ_ALSO)") from None
        spans.setdefault(file, set()).update(range(a, b + 1))
    file_lines = {f: len((root / "smatch_jax" / f).read_text().splitlines()) for f in spans}
    return {
        "files": len(spans),
        "function_lines": sum(len(s) for s in spans.values()),
        "file_lines": sum(file_lines.values()),
        "per_file": {f: [len(spans[f]), file_lines[f]] for f in sorted(spans)},
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=str(ROOT), help="the checkout to measure")
    ap.add_argument("--before", action="store_true", help="READ_ALSO as at commit 9eb6fe2")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    root = Path(args.root).resolve()
    spine, body = trace(root)
    also = [(f, q, None) for f, q in (READ_ALSO_BEFORE if args.before else READ_ALSO)]
    names = also + spine + body
    result = count(root, names)
    result["functions"] = sorted({(f, q.split(".<locals>")[0]) for f, q, _ in names})
    if args.json:
        print(json.dumps(result, indent=1))
        return
    for f, q in result["functions"]:
        print(f"  {f}: {q}{'  (model: not counted)' if f.startswith('models/') else ''}")
    for f, (fn, total) in result["per_file"].items():
        print(f"{f:24} {fn:5} lines of functions  {total:5} lines")
    print(
        f"one SequenceMatch update: {result['files']} files, {result['function_lines']} lines "
        f"of functions, {result['file_lines']} lines of files"
    )


if __name__ == "__main__":
    main()
