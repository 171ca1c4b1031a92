"""A checkpoint written on one mesh restores onto another (capacity after a preemption comes
back as whatever slice is free): saved under data 2 x fsdp 2 x tensor 2 on 8 fake CPU
devices, restored under fsdp 4 x tensor 2, under 1 device and under 2 processes x 4 devices.

Each restore reads the same state bit for bit (parameters, optimiser, replay buffer, RNG, step,
data position: Orbax reads every array onto the new shardings), and training continues to the
same losses and parameters as on the saving mesh, to float tolerance (another mesh sums in
another order). A mesh the devices cannot hold is refused before the workdir is touched.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from smatch_jax import sharding, train
from tests.test_bad_inputs import snapshot
from tests.test_train import tiny_config

ROOT = Path(__file__).resolve().parents[1]
SAVED_AT, N_STEPS = 4, 8

# Restores the workdir's checkpoint on this process's mesh, records it, then trains on.
_WORKER = """
import json, sys, numpy as np, jax
nproc = {nproc}
if nproc > 1:
    jax.distributed.initialize(coordinator_address={coord!r}, num_processes=nproc,
                               process_id={pid}, initialization_timeout=120)
sys.path.insert(0, {root!r})
from jax.experimental import multihost_utils
from smatch_jax import checkpointing, sharding, train
from smatch_jax import run as run_lib
from tests.test_reshard_restore import config
sharding.MIN_SHARD_SIZE = 0  # shard the tiny model's parameters too
cfg = config({data!r}, {mesh!r})
host = lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
if {save_to!r}:  # first train to the checkpoint there (this mesh), and go on from a copy
    import shutil
    train.train(cfg, {save_to!r}, stop_after={saved_at})
    shutil.copytree({save_to!r}, {wd!r})
run = run_lib.setup(cfg)
with checkpointing.Checkpointer({wd!r} + "/checkpoints") as ckpt:
    step, state, data_state, _ = ckpt.restore(abstract_state=run.abstract_state())
sharded = sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(state.params))
leaves = jax.tree.leaves(jax.tree.map(
    lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
    else x, state))
restored = {{f"r{{i}}": host(x) for i, x in enumerate(leaves)}}
final, _ = train.train(cfg, {wd!r})
out = {{f"p{{i}}": host(x) for i, x in enumerate(jax.tree.leaves(final.params))}}
if jax.process_index() == 0:
    np.savez({out!r}, **restored, **out)
    print(json.dumps(dict(step=step, data_state=data_state, sharded=sharded,
                          devices=jax.device_count(), processes=jax.process_count())))
"""


def config(data_dir, mesh):
    c = tiny_config(data_dir)
    c.train.num_steps, c.train.ckpt_every, c.train.log_every = N_STEPS, SAVED_AT, 1
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    c.eval.decodings, c.eval.recovery = "greedy", False  # the end's evaluation: one sampler
    return c


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _continue(wd: Path, mesh, data_dir, *, devices: int, nproc: int = 1, save_to: str = ""):
    """Restore `wd` on a mesh of `devices` (per process) x `nproc` processes and train on;
    (the saved arrays as read there, the final parameters, the worker's report). `save_to`:
    first train the checkpoint into that workdir, on this mesh, and copy it to `wd`."""
    out = wd.parent / f"{wd.name}.npz"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    coord = f"127.0.0.1:{_port()}"
    procs = []
    for pid in range(nproc):
        script = _WORKER.format(
            nproc=nproc, coord=coord, pid=pid, root=str(ROOT), data=str(data_dir),
            mesh=tuple(mesh), wd=str(wd), out=str(out), save_to=save_to, saved_at=SAVED_AT,
        )  # fmt: skip
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", script],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    texts = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * nproc, "\n".join(t[-3000:] for t in texts)
    report = json.loads(texts[0].strip().splitlines()[-1])
    arrays = dict(np.load(out))
    restored = [arrays[k] for k in sorted((k for k in arrays if k[0] == "r"), key=_index)]
    final = [arrays[k] for k in sorted((k for k in arrays if k[0] == "p"), key=_index)]
    return restored, final, report


def _index(key: str) -> int:
    return int(key[1:])


def _losses(wd: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r and r["step"] > SAVED_AT}


@pytest.mark.slow
def test_reshard_restore_onto_other_meshes_and_processes(tmp_path):
    data_dir = tmp_path / "data"
    train.train(config(data_dir, (1, 1, 1)), str(tmp_path / "prep"), stop_after=1)  # dataset
    saved = tmp_path / "saved"
    runs = {  # the first saves the checkpoint (on its mesh), the others restore copies of it
        "same mesh (2x2x2)": dict(mesh=(2, 2, 2), devices=8, save_to=str(saved)),
        "fsdp 4 x tensor 2": dict(mesh=(1, 4, 2), devices=8),
        "1 device": dict(mesh=(1, 1, 1), devices=1),
        "2 processes x 4 devices": dict(mesh=(2, 2, 2), devices=4, nproc=2),
    }
    got = {}
    for name, kw in runs.items():
        wd = tmp_path / name.replace(" ", "_")
        if "save_to" not in kw:
            shutil.copytree(saved, wd)
        got[name] = (*_continue(wd, data_dir=data_dir, **kw), _losses(wd))
    assert sorted(p.name for p in (saved / "checkpoints").iterdir()) == [str(SAVED_AT)]
    ref_restored, ref_final, ref_report, ref_losses = got["same mesh (2x2x2)"]
    assert ref_report["sharded"] > 0 and ref_report["step"] == SAVED_AT
    assert sorted(ref_losses) == list(range(SAVED_AT + 1, N_STEPS + 1))
    for name, (restored, final, report, losses) in got.items():
        # What was read is what was saved, bit for bit, on every mesh.
        assert report["step"] == SAVED_AT and report["data_state"] == ref_report["data_state"]
        assert len(restored) == len(ref_restored)
        for i, (a, b) in enumerate(zip(restored, ref_restored, strict=True)):
            np.testing.assert_array_equal(a, b, err_msg=f"{name}: leaf {i}")
        # Training goes on to the same place, up to the summation order of another mesh.
        assert sorted(losses) == sorted(ref_losses), name
        for step, loss in losses.items():
            assert loss == pytest.approx(ref_losses[step], rel=1e-4, abs=1e-5), (name, step)
        for i, (a, b) in enumerate(zip(final, ref_final, strict=True)):
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5, err_msg=f"{name}: param {i}")
    assert got["2 processes x 4 devices"][2]["processes"] == 2


def test_reshard_restore_refuses_a_mesh_the_devices_cannot_hold(tmp_path):
    """Before anything is built or written: the workdir stays as it was."""
    wd = tmp_path / "w"
    train.train(config(tmp_path / "data", (1, 1, 1)), str(wd), stop_after=1)
    before = snapshot(wd)
    with pytest.raises(sharding.MeshError, match=r"data=2 x fsdp=1 x tensor=1 = 2 devices"):
        train.train(config(tmp_path / "data", (2, 1, 1)), str(wd))
    assert snapshot(wd) == before
