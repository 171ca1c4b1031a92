"""The package as a user gets it: it stands alone (installed with pip, imported from anywhere,
never importing configs/ or experiments/), and its compiled functions are traced once."""

import ast
import collections
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from smatch_jax import sampling, steps, train
from smatch_jax.eval import report
from tests.test_train import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_module_of_the_package_imports_configs_or_experiments():
    offenders = {
        str(p.relative_to(ROOT)): sorted(
            m for m in _imported_modules(p) if m.split(".")[0] in ("configs", "experiments")
        )
        for p in (ROOT / "smatch_jax").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_module_of_the_package_is_over_400_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for p in (ROOT / "smatch_jax").rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 400
    }
    assert long == {}


_INSTALLED_RUN = """
import json, sys
import smatch_jax
assert smatch_jax.__file__.startswith(sys.argv[1]), smatch_jax.__file__
from smatch_jax import config, train
c = config.base_config()
c.data.task, c.data.data_dir, c.data.seq_len = "arithmetic", sys.argv[2], 48
c.data.arithmetic.difficulty = "easy"
c.data.train_size, c.data.test_size, c.data.validation_size = 64, 8, 8
c.model.preset = "tiny_llama"
c.train.num_steps, c.train.batch_size, c.train.model_rows, c.train.log_every = 1, 8, 8, 1
c.loss.bc_warmup_steps, c.sampling.sample_every, c.replay.capacity = 0, 1, 16
c.eval.decodings, c.eval.recovery = "greedy", False
state, metrics = train.train(c, sys.argv[3])
print(json.dumps({"step": int(state.step), "loss": metrics["loss"], "sm": "sm/loss" in metrics}))
"""


@pytest.mark.slow
def test_pip_installed_package_trains_from_an_unrelated_directory(tmp_path):
    """`pip install .` (the package alone) into a fresh target, then a preset model trained for
    one SequenceMatch step with the schema of the package, from a directory that is not the
    repository."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copytree(
        ROOT / "smatch_jax", src / "smatch_jax", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"]
    pip += ["--no-build-isolation", "--no-index", "--target", str(site), str(src)]
    subprocess.run(pip, check=True, capture_output=True)
    assert (site / "smatch_jax" / "config.py").exists()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "run.py").write_text(_INSTALLED_RUN)
    env = {**os.environ, "PYTHONPATH": str(site), "JAX_PLATFORMS": "cpu"}
    args = [str(site), str(tmp_path / "data"), str(tmp_path / "work")]
    out = subprocess.run(
        [sys.executable, "run.py", *args], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["step"] == 1 and res["sm"] and res["loss"] == res["loss"]  # finite


@pytest.mark.slow
def test_train_step_refill_and_sampler_are_traced_once(tmp_path, monkeypatch):
    """Across steps and batches of one shape: the train step is traced once per phase (BC
    warm-up, then with model rows), the refill once, and a second evaluation traces no
    sampler again (a retrace would recompile every step on an accelerator)."""
    traces = collections.Counter()

    def counting(factory, name):
        def make(*args, **kwargs):
            fn = factory(*args, **kwargs)

            def traced(*a, **k):
                traces[name if "use_model_rows" not in k else f"{name}[{k['use_model_rows']}]"] += 1
                return fn(*a, **k)

            return traced

        return make

    monkeypatch.setattr(steps, "make_train_step", counting(steps.make_train_step, "step"))
    monkeypatch.setattr(steps, "make_refill", counting(steps.make_refill, "refill"))
    sample_traced = sampling.sample_traced

    def counting_sampler(*a, **k):
        traces["sampler"] += 1
        return sample_traced(*a, **k)

    monkeypatch.setattr(sampling, "sample_traced", counting_sampler)
    per_eval = []
    evaluate = report.evaluate_in_training

    def recording_eval(*a, **k):
        out = evaluate(*a, **k)
        per_eval.append(traces["sampler"])
        return out

    monkeypatch.setattr(report, "evaluate_in_training", recording_eval)
    c = tiny_config(tmp_path / "data", num_steps=12, eval_every=6)
    train.train(c, str(tmp_path / "w"))
    # refill: its own jit (training) plus the eval sampler's; the step: one trace per phase.
    assert traces["step[False]"] == 1 and traces["step[True]"] == 1
    assert traces["refill"] == 1
    assert len(per_eval) == 2 and per_eval[1] == per_eval[0]  # the 2nd evaluation: no retrace
