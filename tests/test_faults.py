"""Fault injection on real training runs (README "Reliability").

Each run is `python -m smatch_jax.main` (through a wrapper that can SIGKILL itself while a
checkpoint is being written) on a tiny arithmetic config that checkpoints every 2 steps.
Subprocesses share a JAX compilation cache so that a restart costs seconds, not a compile.

* SIGKILL at random moments and in the middle of a checkpoint write: every restart resumes
  from the last complete checkpoint, and the finished run has the parameters, replay buffer
  and metrics.jsonl of an uninterrupted run, bit for bit.
* A truncated latest checkpoint is reported, set aside, and the previous one is used.
* A disk that refuses writes (RLIMIT_FSIZE: the kernel fails writes past a size) stops the
  run with one error line naming the cause and the fix.
* Two runs of one config give bit-identical metrics.
"""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from smatch_jax import run as run_lib

ROOT = Path(__file__).resolve().parents[1]
N_STEPS = 16
# wall-clock quantities
TIMING_KEYS = {"time", "tokens_per_s", "tokens_per_s_per_device", "sec_per_step", "mfu"}
TIMING_KEYS |= {"host/rss_mb", "host/first_step_s"}  # and time/<phase>_s

# Runs smatch_jax.main; with KILL_IN_SAVE=s it SIGKILLs itself right after the asynchronous
# save of step s has started, i.e. while that checkpoint is being written. With
# FSIZE_LIMIT=b the kernel fails every write past b bytes of a file (EFBIG), as a full disk
# fails writes (ENOSPC).
_WRAPPER = """
import os, resource, signal, sys
limit = int(os.environ.get("FSIZE_LIMIT", "0"))
if limit:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from smatch_jax import checkpointing
from smatch_jax.main import train as main
kill_step = int(os.environ.get("KILL_IN_SAVE", "0"))
save = checkpointing.Checkpointer.save
def save_then_die(self, step, **kw):
    out = save(self, step, **kw)
    if step == kill_step:
        os.kill(os.getpid(), signal.SIGKILL)
    return out
checkpointing.Checkpointer.save = save_then_die
main.run_cli()
"""


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    env = {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": str(root / "jax_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    return {"root": root, "data": root / "data", "env": env}


def _cmd(shared, wd):
    over = dict(
        data_dir=shared["data"],
        train_size=128,
        test_size=8,
        num_steps=N_STEPS,
        bc_warmup_steps=4,
        sample_every=3,
        batch_size=8,
        model_rows=8,
        capacity=32,
        log_every=1,
        eval_every=1000,
        ckpt_every=2,
        keep_ckpts=3,
    )
    section = {"data_dir": "data", "train_size": "data", "test_size": "data"}
    section |= {"bc_warmup_steps": "loss", "sample_every": "sampling", "capacity": "replay"}
    flags = [f"--config.{section.get(k, 'train')}.{k}={v}" for k, v in over.items()]
    return [
        sys.executable,
        "-c",
        _WRAPPER,
        "--config=configs/arithmetic.py:smoke",
        f"--workdir={wd}",
        *flags,
    ]


def _start(shared, wd, kill_in_save=0, fsize_limit=0):
    env = {**shared["env"], "KILL_IN_SAVE": str(kill_in_save), "FSIZE_LIMIT": str(fsize_limit)}
    return subprocess.Popen(
        _cmd(shared, wd), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def _run(shared, wd, **kw):
    proc = _start(shared, wd, **kw)
    out = proc.communicate(timeout=600)[0].decode()
    return proc.returncode, out


def _records(wd):
    lines = (Path(wd) / "metrics.jsonl").read_text().splitlines()
    timing = lambda k: k in TIMING_KEYS or k.startswith("time/")
    return [{k: v for k, v in json.loads(x).items() if not timing(k)} for x in lines]


def _last_logged(wd):
    """The last step in metrics.jsonl; a line the run is writing at this moment is skipped
    (polled while the run is alive: a read can see the first part of a line)."""
    path = Path(wd) / "metrics.jsonl"
    steps = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            steps.append(json.loads(line)["step"])
        except json.JSONDecodeError:
            continue
    return max(steps, default=0)


def _ckpt_dirs(wd):
    d = Path(wd) / "checkpoints"
    names = [p.name for p in d.iterdir()] if d.exists() else []
    return sorted(int(n) for n in names if n.isdigit()), sorted(n for n in names if "tmp" in n)


def _resumed_from(out):
    found = re.findall(r"resumed from step (\d+)", out)
    return int(found[-1]) if found else 0


def _final_state(wd):
    _, state = run_lib.load_trained(str(wd))
    return [np.asarray(x) for x in jax.tree.leaves((state.params, state.replay))]


def _assert_same_run(wd, ref):
    for a, b in zip(_final_state(wd), _final_state(ref), strict=True):
        np.testing.assert_array_equal(a, b)
    assert _records(wd) == _records(ref)


@pytest.fixture(scope="module")
def reference(shared):
    wd = shared["root"] / "reference"
    code, out = _run(shared, wd)
    assert code == 0, out[-3000:]
    return wd


@pytest.mark.slow
def test_two_runs_of_one_config_give_bit_identical_metrics(shared, reference):
    wd = shared["root"] / "again"
    code, out = _run(shared, wd)
    assert code == 0, out[-3000:]
    assert len(_records(wd)) == N_STEPS + 1  # every step, and the final evaluation
    _assert_same_run(wd, reference)


def _kill_at_random(shared, wd, target, rng):
    """Start a run, SIGKILL it a random moment after it logs step `target`."""
    proc = _start(shared, wd)
    t0, metrics = time.time(), Path(wd) / "metrics.jsonl"
    while proc.poll() is None and time.time() - t0 < 300:
        fresh = metrics.exists() and metrics.stat().st_mtime >= t0
        if fresh and _last_logged(wd) >= target:
            time.sleep(rng.uniform(0.0, 0.3))
            break
        time.sleep(0.02)
    proc.kill()
    return proc.communicate()[0].decode()


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_matches_uninterrupted(shared, reference, capsys):
    wd, rng = shared["root"] / "killed", random.Random(0)
    report, outs = [], []
    plan = [("random", 3), ("mid-save", 8), ("random", 11), ("random", 14)]
    for kind, at in plan:
        if kind == "random":
            out = _kill_at_random(shared, wd, at, rng)
        else:
            code, out = _run(shared, wd, kill_in_save=at)
            assert code == -signal.SIGKILL, out[-3000:]
        committed, tmp = _ckpt_dirs(wd)
        if kind == "mid-save":  # killed while step `at` was being written
            assert at not in committed and any(n.startswith(f"{at}.") for n in tmp), tmp
        report.append([kind, at, _last_logged(wd), max(committed, default=0)])
        outs.append(out)
    code, out = _run(shared, wd)
    assert code == 0, out[-3000:]
    outs.append(out)
    # Each restart resumed from the last checkpoint that was complete when it was killed.
    for row, out in zip(report, outs[1:], strict=True):
        row.append(_resumed_from(out))
        assert row[4] == row[3], (row, out[-2000:])
    assert _ckpt_dirs(wd)[1] == []  # unfinished writes were cleaned up
    assert len(_ckpt_dirs(wd)[0]) == 3  # retention: keep_ckpts
    _assert_same_run(wd, reference)
    with capsys.disabled():
        print("\nkill, at step, last logged, last complete ckpt, resumed from:")
        for row in report:
            print("  ", row, "lost:", row[2] - row[4], "steps")


def _truncate_arrays(step_dir):
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "d" in p.parts]
    assert files
    for p in files:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


@pytest.mark.slow
def test_truncated_latest_checkpoint_is_reported_and_the_previous_used(shared, reference):
    wd = shared["root"] / "truncated"
    shutil.copytree(reference, wd)
    _truncate_arrays(wd / "checkpoints" / str(N_STEPS))
    code, out = _run(shared, wd)
    assert code == 0, out[-3000:]
    assert f"checkpoint step {N_STEPS}" in out and "could not be restored" in out
    assert f"resuming from step {N_STEPS - 2}" in out
    assert (wd / "checkpoints" / f"{N_STEPS}.unreadable").is_dir()  # kept for inspection
    _assert_same_run(wd, reference)  # the two lost steps were recomputed identically


@pytest.mark.slow
def test_disk_refusing_writes_stops_with_a_clear_error_then_resumes(shared, reference):
    wd = shared["root"] / "full"
    code, out = _run(shared, wd, kill_in_save=6)  # leaves complete checkpoints 2 and 4
    assert code == -signal.SIGKILL and _ckpt_dirs(wd)[0] == [2, 4], out[-3000:]
    # 32 KB per file: metrics and config fit, a checkpoint's array file (>= 50 KB) does not.
    code, out = _run(shared, wd, fsize_limit=32 << 10)
    assert code == 1, out[-3000:]
    error = out[out.rindex("error: ") :]
    assert "writing checkpoint step" in error and "File too large" in error, error
    assert "free space (df -h) or use another --workdir" in error
    assert "resume from the last complete checkpoint (step 4)" in error
    assert _ckpt_dirs(wd)[0] == [2, 4]  # the earlier checkpoints are intact
    code, out = _run(shared, wd)  # space freed: rerun
    assert code == 0, out[-3000:]
    assert _resumed_from(out) == 4
    _assert_same_run(wd, reference)
