"""Multi-host: one train step on 2 processes x 4 CPU devices (127.0.0.1) equals 1 device.

Two subprocesses join a `jax.distributed` cluster (CPU collectives: gloo, jax's default) and
run the real path: `run.setup` -> per-process batch -> `sharding.global_batch` -> refill ->
train step, on a `(data=1, fsdp=8)` mesh with FSDP forced on every parameter, so both the batch
and the parameters are split across the two processes. Process 0 writes the gathered result;
this process replays the same global batch on its own devices and compares.
"""

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from smatch_jax import config, sharding
from smatch_jax import run as run_lib
from smatch_jax.data import train_data as data_lib
from tests.test_train import tiny_config

ROOT = Path(__file__).resolve().parents[1]
N_PROC, DEV_PER_PROC = 2, 4
TIMEOUT_S = 300  # whole 2-process job; it takes ~40 s on 2 cores


def step_config(data_dir):
    c = tiny_config(data_dir)
    c.loss.bc_warmup_steps = 0  # a SequenceMatch step: refill + model rows from the replay
    c.optim.warmup_steps = 0  # lr > 0 at step 0, so the parameters move
    return c


_WORKER = """
import sys, numpy as np, jax
jax.distributed.initialize(
    coordinator_address={coord!r}, num_processes={nproc}, process_id={pid},
    initialization_timeout=120,
)
sys.path.insert(0, {root!r})
from jax.experimental import multihost_utils
from smatch_jax import run as run_lib
from smatch_jax import sharding, train
from tests.test_multihost import step_config
sharding.MIN_SHARD_SIZE = 0  # FSDP-shard the tiny model's parameters too
cfg = step_config({data!r})
cfg.mesh.data, cfg.mesh.fsdp = 1, {ndev}
run = run_lib.setup(cfg)
batch = sharding.global_batch(run.data.next(), run.mesh)
state, _ = run.refill(run.init_state(), batch)
state, met = run.train_step(state, batch, use_model_rows=True)
host = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
params = jax.tree.leaves(run.abstract_state().params)
n_sharded = sum(not x.sharding.is_fully_replicated for x in params)
out = dict(loss=met["loss"], grad_norm=met["grad_norm"], replay=state.replay.tokens, **batch)
out = {{k: host(v) for k, v in out.items()}}
for name, tree in (("param", state.params), ("opt", state.opt_state)):
    out.update({{f"{{name}}{{i}}": host(x) for i, x in enumerate(jax.tree.leaves(tree))}})
if jax.process_index() == 0:
    np.savez({out!r}, **out)
print("processes", jax.process_count(), "devices", jax.device_count(), "sharded", n_sharded)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(data_dir, tmp_path) -> tuple[dict[str, np.ndarray], list[str]]:
    out = tmp_path / "multihost.npz"
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEV_PER_PROC}",
        "JAX_PLATFORMS": "cpu",
    }
    coord = f"127.0.0.1:{_free_port()}"
    procs, logs = [], []
    try:
        for pid in range(N_PROC):
            script = _WORKER.format(
                coord=coord,
                nproc=N_PROC,
                pid=pid,
                root=str(ROOT),
                data=str(data_dir),
                ndev=N_PROC * DEV_PER_PROC,
                out=str(out),
            )
            log = open(tmp_path / f"worker{pid}.log", "w+")  # noqa: SIM115 (closed below)
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", script],
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        deadline = time.time() + TIMEOUT_S
        # One worker failing leaves the other blocked in a collective: stop at the first error.
        while any(p.poll() is None for p in procs) and time.time() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)
        texts = []
        for log in logs:
            log.seek(0)
            texts.append(log.read())
            log.close()
    codes = [p.returncode for p in procs]
    report = "\n".join(
        f"--- worker {i} (rc={c})\n{t[-3000:]}"
        for i, (c, t) in enumerate(zip(codes, texts, strict=True))
    )
    assert codes == [0] * N_PROC, report
    return dict(np.load(out)), texts


def _rows(batch) -> list[tuple]:
    return [
        (tuple(t), int(m), int(n))
        for t, m, n in zip(batch["tokens"], batch["prompt_len"], batch["length"], strict=True)
    ]


@pytest.mark.slow
def test_one_step_equal_on_1_device_and_2_processes_x_4_devices(tmp_path):
    data_dir = tmp_path / "data"
    cfg = step_config(data_dir)
    run = run_lib.setup(cfg)  # builds the dataset before the workers only read it
    own = run.data.next()

    mh, logs = _run_workers(data_dir, tmp_path)
    n_dev = N_PROC * DEV_PER_PROC
    assert all(f"processes {N_PROC} devices {n_dev}" in t for t in logs), logs
    n_sharded = int(re.search(r"sharded (\d+)", logs[0]).group(1))
    assert n_sharded > 0  # the parameters really are split over the processes

    # The 2-process global batch is this process's batch row for row, so the step is the same.
    mh_batch = {k: mh[k] for k in own}
    assert _rows(mh_batch) == _rows(own)
    batch = sharding.global_batch(own, run.mesh)
    state, _ = run.refill(run.init_state(), batch)
    state, met = run.train_step(state, batch, use_model_rows=True)

    np.testing.assert_array_equal(mh["replay"], np.asarray(state.replay.tokens))
    assert float(mh["loss"]) == pytest.approx(float(met["loss"]), rel=1e-5, abs=1e-6)
    assert float(mh["grad_norm"]) == pytest.approx(float(met["grad_norm"]), rel=1e-4)
    before = jax.tree.leaves(run.init_state().params)
    for i, x in enumerate(jax.tree.leaves(state.params)):
        # atol: 1e-3 of the step's update (lr 1e-3); measured differences are ~2e-7
        np.testing.assert_allclose(
            mh[f"param{i}"], np.asarray(x), rtol=1e-4, atol=1e-6, err_msg=f"param{i}"
        )
    moved = sum(
        bool(np.any(np.asarray(a) != np.asarray(b)))
        for a, b in zip(before, jax.tree.leaves(state.params), strict=True)
    )
    assert moved == len(before)
    for i, x in enumerate(jax.tree.leaves(state.opt_state)):  # Adam moments: the gradients
        x = np.asarray(x)  # second moments are ~1e-12: tolerance relative to each leaf's scale
        atol = 1e-5 * float(np.abs(x).max()) if x.dtype.kind == "f" else 0
        np.testing.assert_allclose(mh[f"opt{i}"], x, rtol=1e-4, atol=atol, err_msg=f"opt{i}")


def test_global_batch_row_order_is_the_same_for_any_process_count(tmp_path):
    """P processes' batches, in process order (how `global_batch` lays them out on a
    process-contiguous mesh), must be the 1-process batch row for row: the noise, the sampler
    and the replay draw are keyed by row position, so a permutation changes the loss."""
    cfg = step_config(tmp_path / "data")
    d, kw = config.typed(cfg).data, dict(seed=cfg.seed, batch_size=cfg.train.batch_size)
    one = data_lib.build_train_data(d, **kw).next()
    parts = [
        data_lib.build_train_data(d, **kw, process_index=p, process_count=N_PROC).next()
        for p in range(N_PROC)
    ]
    two = {k: np.concatenate([b[k] for b in parts]) for k in one}
    assert _rows(one) == _rows(two)
