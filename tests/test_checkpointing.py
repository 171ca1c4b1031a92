"""Checkpointing: bit-exact round trips, retention, async completion, sharded restore,
preemption (SIGTERM) and fallback past corrupted or unfinished checkpoints."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from smatch_jax.checkpointing import (
    Checkpointer,
    CheckpointError,
    abstract_like,
    decode_json_state,
    encode_json_state,
)
from smatch_jax.preemption import PreemptionHandler

REPO = Path(__file__).resolve().parents[1]


def make_state(seed=0):
    rng = np.random.default_rng(seed)
    params = {
        "w": jnp.asarray(rng.standard_normal((8, 16)), jnp.float32),
        "emb": jnp.asarray(rng.standard_normal((5, 4)), jnp.bfloat16),
        "b": jnp.zeros((16,), jnp.float32),
    }
    tx = optax.adamw(1e-3)
    opt_state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = tx.update(grads, opt_state, params)
    return {
        "params": params,
        "opt_state": opt_state,
        "key": jax.random.split(jax.random.key(seed))[1],  # typed key
        "rbg_key": jax.random.key(seed, impl="rbg"),
        "key_data": jax.random.key_data(jax.random.key(seed + 1)),  # raw uint32
        "buffer": {"tokens": rng.integers(0, 255, (4, 7)).astype(np.uint8), "n": np.int32(3)},
        "step": jnp.int32(17),
    }


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            assert x.dtype == y.dtype
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


DATA_STATE = {
    "iterator": b'{"last_seen_indices": {"0": 41}}\x00\xff',
    "epoch": 2,
    "nested": {"blobs": [b"a", b"\x01\x02"], "name": "train"},
}
EXTRA = {"config_hash": "abc123", "wall_time": 12.5, "tags": ["x", "y"]}


def test_json_state_encoding_roundtrip():
    enc = encode_json_state(DATA_STATE)
    assert enc["iterator"].keys() == {"__bytes_b64__"}
    assert decode_json_state(enc) == DATA_STATE


@pytest.mark.parametrize("async_save", [True, False])
def test_roundtrip_bit_exact(tmp_path, async_save):
    state = make_state()
    with Checkpointer(tmp_path, async_save=async_save) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.restore_latest_valid(abstract_state=abstract_like(state)) is None
        assert ckpt.save(5, state=state, data_state=DATA_STATE, extra=EXTRA)
        assert not ckpt.save(5, state=state, data_state=DATA_STATE)  # existing step: skipped
        ckpt.wait()
        assert ckpt.latest_step() == 5
    with Checkpointer(tmp_path) as ckpt:
        step, restored, data_state, extra = ckpt.restore(abstract_state=abstract_like(state))
    assert step == 5
    assert_trees_equal(state, restored)
    assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)
    assert str(jax.random.key_impl(restored["rbg_key"])) == "rbg"
    assert data_state == DATA_STATE
    assert extra == EXTRA


def test_restore_missing_raises(tmp_path):
    with Checkpointer(tmp_path) as ckpt, pytest.raises(FileNotFoundError):
        ckpt.restore(abstract_state={"x": jax.ShapeDtypeStruct((2,), jnp.float32)})


def test_keep_last_n(tmp_path):
    state = {"x": jnp.zeros(3)}
    with Checkpointer(tmp_path, keep=2) as ckpt:
        for step in range(1, 6):
            assert ckpt.save(step, state={"x": state["x"] + step}, data_state={})
        ckpt.wait()
        assert ckpt.all_steps() == [4, 5]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["4", "5"]
    with Checkpointer(tmp_path, keep=2) as ckpt:
        step, restored, _, extra = ckpt.restore(4, abstract_state=abstract_like(state))
    assert step == 4 and extra == {}
    np.testing.assert_array_equal(restored["x"], np.full(3, 4.0))


def test_async_save_then_immediate_close_is_complete(tmp_path):
    big = {"w": jnp.arange(4 * 1024 * 1024, dtype=jnp.float32).reshape(1024, 4096)}
    ckpt = Checkpointer(tmp_path, async_save=True)
    assert ckpt.save(1, state=big, data_state={"pos": 1})
    ckpt.close()  # must wait for the background write
    ckpt.close()  # idempotent
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name]
    with Checkpointer(tmp_path) as ckpt2:
        assert ckpt2.all_steps() == [1]
        _, restored, data_state, _ = ckpt2.restore(abstract_state=abstract_like(big))
    assert_trees_equal(big, restored)
    assert data_state == {"pos": 1}


EXIT_WITHOUT_CLOSE = """
    import sys
    import jax.numpy as jnp
    from smatch_jax.checkpointing import Checkpointer

    ckpt = Checkpointer(sys.argv[1], async_save=True)
    ckpt.save(7, state={"w": jnp.ones((1024, 2048))}, data_state={"a": 1})
    # No wait()/close(): the exit hook must finish the write.
"""


@pytest.mark.skipif(
    (3, 12) <= sys.version_info[:3] < (3, 12, 3),
    reason="CPython 3.12.0-3.12.2 start no thread once the main thread is done (cpython#113964)",
)
def test_exit_without_close_finishes_async_save(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(EXIT_WITHOUT_CLOSE), str(tmp_path)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [7]
        _, state, data_state, _ = ckpt.restore(
            abstract_state={"w": jax.ShapeDtypeStruct((1024, 2048), jnp.float32)}
        )
    assert data_state == {"a": 1} and float(state["w"].sum()) == 1024 * 2048


def _save_steps(path, steps, state):
    with Checkpointer(path, keep=5) as ckpt:
        for s in steps:
            scaled = {k: v if k == "k" else v * s for k, v in state.items()}
            ckpt.save(s, state=scaled, data_state={"s": s})


def test_unfinished_tmp_checkpoint_is_ignored(tmp_path):
    state = {"x": jnp.ones(4)}
    _save_steps(tmp_path, [1, 2], state)
    # What an interrupted write leaves behind: a temporary dir that was never renamed.
    tmp = tmp_path / "3.orbax-checkpoint-tmp-1700000000000000"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "_METADATA").write_text('{"trunc')
    with Checkpointer(tmp_path, keep=5) as ckpt:
        assert ckpt.all_steps() == [1, 2]
        assert ckpt.latest_step() == 2
        step, restored, data_state, _ = ckpt.restore_latest_valid(
            abstract_state=abstract_like(state)
        )
    assert step == 2 and data_state == {"s": 2}
    np.testing.assert_array_equal(restored["x"], np.full(4, 2.0))


# A failed tensorstore read can fire a late callback into Orbax's already-closed event loop
# ("Event loop is closed", reported as unraisable); it is harmless noise from the failed step.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["truncate_data", "truncate_metadata", "delete_item"])
def test_corrupted_latest_falls_back(tmp_path, damage):
    state = {"x": jnp.arange(64, dtype=jnp.float32), "k": jax.random.key(0)}
    _save_steps(tmp_path, [1, 2, 3], state)
    latest = tmp_path / "3"
    if damage == "truncate_data":
        files = [p for p in (latest / "state").rglob("*") if p.is_file() and "d" in p.parts]
        assert files
        for p in files:
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    elif damage == "truncate_metadata":
        p = latest / "state" / "_METADATA"
        p.write_bytes(p.read_bytes()[:10])
    else:
        for p in sorted((latest / "data_state").rglob("*"), reverse=True):
            p.unlink()
    with Checkpointer(tmp_path, keep=5) as ckpt:
        assert ckpt.latest_step() == 3
        with pytest.warns(RuntimeWarning, match="step 3 .* could not be restored"):
            step, restored, data_state, _ = ckpt.restore_latest_valid(
                abstract_state=abstract_like(state)
            )
    assert step == 2 and data_state == {"s": 2}
    np.testing.assert_array_equal(restored["x"], np.arange(64, dtype=np.float32) * 2)


def test_all_corrupted_raises(tmp_path):
    state = {"x": jnp.ones(4)}
    _save_steps(tmp_path, [1], state)
    (tmp_path / "1" / "state" / "_METADATA").write_text("")
    with (
        Checkpointer(tmp_path) as ckpt,
        pytest.warns(RuntimeWarning),
        pytest.raises(CheckpointError, match=r"no checkpoint in .* could be restored"),
    ):
        ckpt.restore_latest_valid(abstract_state=abstract_like(state))


def test_preemption_handler_flag_and_restore():
    before = signal.getsignal(signal.SIGTERM)
    handler = PreemptionHandler(handle_sigint=True)
    with handler:
        assert not handler.should_stop(3)
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not handler.should_stop() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert handler.should_stop(3) and handler.received == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):  # second Ctrl-C aborts for real
            handler._handle(signal.SIGINT, None)
    assert signal.getsignal(signal.SIGTERM) is before


SIGTERM_LOOP = """
    import sys, time
    import jax.numpy as jnp
    from smatch_jax.checkpointing import Checkpointer
    from smatch_jax.preemption import PreemptionHandler

    ckpt = Checkpointer(sys.argv[1], keep=2, async_save=True)
    state = {"w": jnp.zeros(1000)}
    with PreemptionHandler() as preempt:
        for step in range(1, 100_000):
            state = {"w": state["w"] + 1}
            if step % 20 == 0:
                ckpt.save(step, state=state, data_state={"step": step})
            if step == 3:
                print("READY", flush=True)
            if preempt.should_stop(step):
                ckpt.save(step, state=state, data_state={"step": step}, force=True)
                ckpt.close()
                print("SAVED", step, flush=True)
                sys.exit(0)
            time.sleep(0.005)
    sys.exit(3)
"""


def test_sigterm_saves_and_exits_zero(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(SIGTERM_LOOP), str(tmp_path)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "READY"
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    saved_step = int(out.split()[-1])
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == saved_step
        step, state, data_state, _ = ckpt.restore(
            abstract_state={"w": jax.ShapeDtypeStruct((1000,), jnp.float32)}
        )
    assert step == saved_step and data_state == {"step": saved_step}
    np.testing.assert_array_equal(state["w"], np.full(1000, float(saved_step)))


SHARDED = """
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from smatch_jax.checkpointing import Checkpointer, abstract_like

    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("data",))
    w = jax.device_put(jnp.arange(8 * 16, dtype=jnp.float32).reshape(8, 16),
                       NamedSharding(mesh, P("data", None)))
    r = jax.device_put(jnp.arange(5, dtype=jnp.int32), NamedSharding(mesh, P()))
    k = jax.device_put(jax.random.key(7), NamedSharding(mesh, P()))
    state = {"w": w, "r": r, "k": k}
    with Checkpointer(sys.argv[1]) as ckpt:
        ckpt.save(1, state=state, data_state={})
    # Restore onto a different layout: a 2x4 mesh, w sharded along its second axis.
    mesh2 = Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b"))
    target = {
        "w": jax.ShapeDtypeStruct((8, 16), jnp.float32, sharding=NamedSharding(mesh2, P("a", "b"))),
        "r": jax.ShapeDtypeStruct((5,), jnp.int32, sharding=NamedSharding(mesh2, P())),
        "k": jax.ShapeDtypeStruct((), k.dtype, sharding=NamedSharding(mesh2, P())),
    }
    with Checkpointer(sys.argv[1]) as ckpt:
        step, out, _, _ = ckpt.restore(abstract_state=target)
        _, same, _, _ = ckpt.restore(abstract_state=abstract_like(state))
    for name in target:
        assert out[name].sharding == target[name].sharding, (name, out[name].sharding)
        assert same[name].sharding == state[name].sharding, name
    assert len(out["w"].addressable_shards) == 8
    assert out["w"].addressable_shards[0].data.shape == (4, 4)
    np.testing.assert_array_equal(np.asarray(out["w"]), np.asarray(w))
    np.testing.assert_array_equal(np.asarray(out["r"]), np.arange(5))
    np.testing.assert_array_equal(jax.random.key_data(out["k"]), jax.random.key_data(k))
    print("OK")
"""


def test_restore_onto_named_sharding_8_devices(tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
    }
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SHARDED), str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "OK"
