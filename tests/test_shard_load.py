"""Hugging Face checkpoints loaded shard by shard (`convert.load_hf_sharded`).

On 8 CPU devices (a subprocess: the session has one), every parameter equals `load_hf` then
`jax.device_put` with the same shardings bit for bit: its sharding, dtype and every device's
block, for llama (tied and untied, one file and three, float32 and bfloat16 files, unrolled and
scanned, stored in float32, bfloat16 and float16) and GPT-2 ("transformer." names, the
causal-mask buffers, a tied lm_head copy), on meshes and rules that split the `<bkspc>` table's
columns one per device and its rows so that one device holds row V. On 2 processes x 4 CPU
devices (127.0.0.1, as tests/test_multihost.py) each process's peak memory grows by a fraction
of what `load_hf` + `device_put` costs it, it reads its half of the elements, and the gathered
parameters equal `load_hf`'s (the values it builds in one process, before `device_put`).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from smatch_jax import sharding
from smatch_jax.models import convert
from tests.test_importers import GPT2, LLAMA, _hf_gpt2_arrays, _write_hf

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300  # one subprocess job; they take 10-25 s on 2 cores


def _llama_arrays(cfg: dict, tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """A HF llama checkpoint's tensors (torch Linear weights [out, in]) for `cfg`, float32."""
    rng = np.random.default_rng(seed)
    V, d, L, F = (
        cfg[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size")
    )
    kv = cfg["num_key_value_heads"] * d // cfg["num_attention_heads"]

    def normal(*shape, scale=1.0):
        x = rng.standard_normal(shape, dtype=np.float32)
        x *= np.float32(scale)
        return x

    t = {"model.embed_tokens.weight": normal(V, d)}
    for i in range(L):
        p = f"model.layers.{i}"
        t[f"{p}.input_layernorm.weight"] = 1 + normal(d, scale=0.2)
        t[f"{p}.post_attention_layernorm.weight"] = 1 + normal(d, scale=0.2)
        for name, (o, n) in {"q": (d, d), "k": (kv, d), "v": (kv, d), "o": (d, d)}.items():
            t[f"{p}.self_attn.{name}_proj.weight"] = normal(o, n, scale=n**-0.5)
        for name, (o, n) in {"gate": (F, d), "up": (F, d), "down": (d, F)}.items():
            t[f"{p}.mlp.{name}_proj.weight"] = normal(o, n, scale=n**-0.5)
    t["model.norm.weight"] = 1 + normal(d, scale=0.2)
    if not tied:
        t["lm_head.weight"] = normal(V, d)
    return t


def _llama_config(cfg: dict, tied: bool) -> dict:
    return {"model_type": "llama", "hidden_act": "silu", "tie_word_embeddings": tied, **cfg}


def _digest(x) -> str:
    x = np.ascontiguousarray(np.asarray(x))
    return hashlib.sha256(f"{x.dtype}|{x.shape}|".encode() + x.tobytes()).hexdigest()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(scripts: list[str], tmp_path: Path, devices: int) -> list[str]:
    """Runs the scripts as concurrent processes with `devices` CPU devices each; their logs.
    The first failure stops the others (one left alone would wait in a collective)."""
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
    }
    procs, logs = [], []
    try:
        for i, script in enumerate(scripts):
            log = open(tmp_path / f"worker{i}.log", "w+")  # noqa: SIM115 (closed below)
            logs.append(log)
            cmd = [sys.executable, "-c", script]
            procs.append(
                subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            )
        deadline = time.time() + TIMEOUT_S
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
        f"--- worker {i} (rc={c})\n{t[-4000:]}"
        for i, (c, t) in enumerate(zip(codes, texts, strict=True))
    )
    assert codes == [0] * len(procs), report
    return texts


# --------------------------------------------------------------------------- one process, 8 devices

_COMPARE = """
import sys
sys.path.insert(0, {root!r})
from tests.test_shard_load import compare_cases
compare_cases({cases!r})
"""


def compare_cases(cases_json: str) -> None:
    """The equality check of each case (run in a process with 8 devices): `load_hf_sharded`
    against `load_hf` + `device_put`; prints each case's name and the embedding tables'
    partition specs."""
    sharding.MIN_SHARD_SIZE = 0  # split the norms and biases too
    for case in json.loads(cases_json):
        mesh = sharding.make_mesh(*case["mesh"])
        place = lambda a, mesh=mesh, case=case: sharding.param_shardings(a, mesh, case["rules"])
        got = convert.load_hf_sharded(case["dir"], place, **case["kw"])
        full = convert.load_hf(case["dir"], **case["kw"])
        assert got.config == full.config, (got.config, full.config)
        want_state = nnx.state(full, nnx.Param)
        want = jax.device_put(want_state, place(want_state))
        got_leaves = jax.tree_util.tree_flatten_with_path(nnx.state(got, nnx.Param))[0]
        want_leaves = jax.tree_util.tree_flatten_with_path(want)[0]
        assert [p for p, _ in got_leaves] == [p for p, _ in want_leaves]
        specs = {}
        for (path, a), (_, b) in zip(got_leaves, want_leaves, strict=True):
            name = sharding.path_name(path)
            assert isinstance(a, jax.Array) and a.sharding == b.sharding, (name, a, b.sharding)
            assert (a.shape, a.dtype) == (b.shape, b.dtype), (name, a.shape, a.dtype, b.dtype)
            for sa, sb in zip(a.addressable_shards, b.addressable_shards, strict=True):
                assert (sa.device, sa.index) == (sb.device, sb.index), name
                x, y = np.asarray(sa.data), np.asarray(sb.data)
                assert x.tobytes() == y.tobytes(), (name, sa.index, np.abs(x - y).max())
            specs[name] = str(a.sharding.spec)
        tables = {k: v for k, v in specs.items() if k in ("tok_embed.embedding", "lm_head.kernel")}
        split = sum(not x.sharding.is_fully_replicated for _, x in got_leaves)
        print("CASE", case["name"], len(specs), split, json.dumps(tables), flush=True)


def test_shard_load_equals_load_hf_then_device_put_on_8_devices(tmp_path):
    cases = []

    def case(name, config, tensors, mesh, rules="", shards=1, **kw):
        d = tmp_path / name
        d.mkdir()
        _write_hf(d, config, tensors, shards=shards)
        cases.append(dict(name=name, dir=str(d), mesh=mesh, rules=rules, kw=kw))

    untied, tied = _llama_arrays(LLAMA, tied=False), _llama_arrays(LLAMA, tied=True, seed=1)
    case("llama_untied", _llama_config(LLAMA, False), untied, [1, 4, 2])
    # V + 1 = 30 rows split over fsdp: the second block holds row V (<bkspc>), the mean of all.
    rows = r"tok_embed\.embedding$=fsdp,tensor"
    case(
        "llama_tied_scan_bf16",
        _llama_config(LLAMA, True),
        tied,
        [2, 2, 2],
        rows,
        shards=3,
        param_dtype="bfloat16",
        scan_layers=True,
    )
    bf16_file = {k: v.astype(jnp.bfloat16) for k, v in untied.items()}
    out_rows = r"lm_head\.kernel$=tensor,fsdp"  # [d, V + 1]: its V + 1 columns split
    case(
        "llama_bf16_file_scan_f16",
        _llama_config(LLAMA, False),
        bf16_file,
        [1, 2, 4],
        out_rows,
        dtype="float16",
        scan_layers=True,
    )
    narrow = dict(
        LLAMA, hidden_size=8, num_attention_heads=2, num_key_value_heads=1, intermediate_size=16
    )
    case(
        "llama_one_column_a_device",
        _llama_config(narrow, False),
        _llama_arrays(narrow, tied=False, seed=2),
        [1, 8, 1],
    )
    g = {f"transformer.{k}": v for k, v in _hf_gpt2_arrays().items()}
    g["transformer.h.0.attn.bias"] = np.tril(np.ones((16, 16), np.float32))
    g["lm_head.weight"] = g["transformer.wte.weight"]
    gpt2 = {"model_type": "gpt2", "activation_function": "gelu_new", **GPT2}
    case("gpt2_scan", gpt2, g, [1, 8, 1], scan_layers=True)
    case("gpt2_bf16", gpt2, g, [2, 4, 1], param_dtype="bfloat16")

    script = _COMPARE.format(root=str(ROOT), cases=json.dumps(cases))
    (log,) = _run([script], tmp_path, devices=8)
    seen = {
        line.split()[1]: line.split(maxsplit=4)[2:]
        for line in log.splitlines()
        if line.startswith("CASE ")
    }
    assert sorted(seen) == sorted(c["name"] for c in cases), log[-3000:]
    for name, (n, split, _) in seen.items():
        assert int(split) == int(n), (name, n, split)  # every parameter is split
    tables = {name: json.loads(t) for name, (_, _, t) in seen.items()}
    # The cases split what they are there for: the rows of the table (row V in the second
    # block), the V + 1 columns of the output layer, and the table one column a device.
    assert tables["llama_tied_scan_bf16"]["tok_embed.embedding"] == str(P("fsdp", "tensor"))
    assert tables["llama_bf16_file_scan_f16"]["lm_head.kernel"] == str(P("tensor", "fsdp"))
    assert tables["llama_one_column_a_device"]["tok_embed.embedding"] == str(P(None, "fsdp"))


def test_shard_load_column_means_are_the_whole_tables():
    """What the `<bkspc>` row of a block of columns relies on (`sharded._bkspc_row`): numpy
    sums the columns of a [V, w >= 2] table row after row, as those of the whole [V, D]
    table, to the last bit in float64; a [V, 1] column it sums pairwise, so it is summed
    beside a zero column."""
    rng = np.random.default_rng(0)
    V, D = 20_000, 37
    table = rng.standard_normal((V, D), dtype=np.float32) * np.exp(3 * rng.standard_normal((V, 1)))
    whole = table.mean(axis=0, dtype=np.float64)
    for w in (2, 3, 5, 8, D):
        for a in range(0, D - w + 1, w):
            part = np.ascontiguousarray(table[:, a : a + w]).mean(axis=0, dtype=np.float64)
            assert part.tobytes() == whole[a : a + w].tobytes(), (w, a)
    for a in range(D):
        padded = np.pad(table[:, a : a + 1], ((0, 0), (0, 1))).mean(axis=0, dtype=np.float64)
        assert padded[0] == whole[a], a
    one = [np.ascontiguousarray(table[:, a : a + 1]).mean(dtype=np.float64) for a in range(D)]
    assert np.asarray(one).tobytes() != whole.tobytes()  # why the zero column is there


# --------------------------------------------------------------------------- errors, in process


def _one_device(a):
    return sharding.param_shardings(a, sharding.make_mesh(devices=jax.devices()[:1]))


def test_shard_load_reports_what_load_hf_reports(tmp_path):
    t = _llama_arrays(LLAMA, tied=True)
    cfg = _llama_config(LLAMA, True)
    for name, tensors in {
        "missing": {k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight"},
        "unknown": {**t, "x": t["model.norm.weight"]},
    }.items():
        d = tmp_path / name
        d.mkdir()
        _write_hf(d, cfg, tensors)
        with pytest.raises(ValueError) as full:
            convert.load_hf(d)
        with pytest.raises(ValueError) as ours:
            convert.load_hf_sharded(d, _one_device)
        assert str(ours.value) == str(full.value)
    d = tmp_path / "shape"
    d.mkdir()
    _write_hf(
        d,
        cfg,
        {
            **t,
            "model.layers.0.self_attn.k_proj.weight": t["model.layers.0.self_attn.q_proj.weight"],
        },
    )
    bad = r"shape mismatches \['blocks.0.attn.k_proj.kernel: got \(32, 32\), expected \(32, 16\)"
    with pytest.raises(ValueError, match=bad):
        convert.load_hf_sharded(d, _one_device)
    with pytest.raises(ValueError, match="use load_hf for 'normal'"):
        convert.load_hf_sharded(tmp_path / "missing", _one_device, bkspc_init="normal")
    d = tmp_path / "gpt2_untied"
    d.mkdir()
    g = _hf_gpt2_arrays()
    _write_hf(d, {"model_type": "gpt2", **GPT2}, {**g, "lm_head.weight": g["wte.weight"] + 1})
    with pytest.raises(ValueError, match="only tied gpt2 is supported"):
        convert.load_hf_sharded(d, _one_device)


def test_shard_load_zeros_row_on_one_device(tmp_path):
    """One device: the model equals `load_hf`'s, `bkspc_init="zeros"`, stored in bfloat16."""
    t = _llama_arrays(LLAMA, tied=False)
    _write_hf(tmp_path, _llama_config(LLAMA, False), t)
    kw = dict(param_dtype="bfloat16", bkspc_init="zeros", scan_layers=True)
    got = convert.model_params(convert.load_hf_sharded(tmp_path, _one_device, **kw))
    want = convert.model_params(convert.load_hf(tmp_path, **kw))
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].tobytes() == want[k].tobytes(), k
    assert not got["lm_head.kernel"][:, -1].astype(np.float32).any()


# --------------------------------------------------------------------------- 2 processes x 4 CPUs

# 80 M parameters, 305 MB of float32: big enough that a process's share stands out of the
# runtime's own memory, small enough to load in seconds.
BIG = dict(
    vocab_size=16_000,
    hidden_size=1024,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    intermediate_size=2816,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
)
N_PROC, DEV_PER_PROC = 2, 4

_WORKER = """
import gc, json, re, sys, time
import numpy as np, jax
jax.distributed.initialize(
    coordinator_address={coord!r}, num_processes={nproc}, process_id={pid},
    initialization_timeout=120,
)
sys.path.insert(0, {root!r})
from flax import nnx
from jax.experimental import multihost_utils
from smatch_jax import sharding
from smatch_jax.models import convert
from smatch_jax.models.convert import sharded
from tests.test_shard_load import _digest

def memory_mb():
    text = open("/proc/self/status").read()
    kb = {{k: re.search(k + r":\\s+(\\d+) kB", text).group(1) for k in ("VmRSS", "VmHWM")}}
    return {{k: int(v) / 1024 for k, v in kb.items()}}

read = [0]
plain_read = sharded._read
def counting_read(file, name, at):
    x = plain_read(file, name, at)
    read[0] += x.size
    return x
sharded._read = counting_read

mesh = sharding.make_mesh(1, 4, 2)  # fsdp 4 x tensor 2: every weight split over 8 devices
place = lambda a: sharding.param_shardings(a, mesh)
jax.block_until_ready(jax.device_put(np.zeros(8, np.float32), sharding.replicated(mesh)))
gc.collect()
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts again from here
    reset = True
except OSError:
    reset = False
before = memory_mb()
t0 = time.time()
if {mode!r} == "sharded":
    params = nnx.state(convert.load_hf_sharded({ckpt!r}, place, scan_layers=True), nnx.Param)
else:  # as run.setup: build the model, take its parameters to the host, place them
    model = convert.load_hf({ckpt!r}, scan_layers=True)
    host = jax.device_get(nnx.state(model, nnx.Param))
    params = jax.device_put(host, place(host))
jax.block_until_ready(params)
seconds = time.time() - t0
after = memory_mb()
leaves = jax.tree_util.tree_flatten_with_path(params)[0]
out = dict(
    before=before, after=after, reset=reset, seconds=seconds, read=read[0],
    elements=sum(x.size for _, x in leaves),
    split=sum(not x.sharding.is_fully_replicated for _, x in leaves),
)
if {mode!r} == "sharded":
    whole = [multihost_utils.process_allgather(x, tiled=True) for _, x in leaves]
else:  # load_hf's values: a single-process load
    whole = jax.tree.leaves(host)
if jax.process_index() == 0:
    out["digests"] = {{sharding.path_name(p): _digest(x) for (p, _), x in zip(leaves, whole)}}
with open({out!r}, "w") as f:
    json.dump(out, f)
"""


def _load_on_2_processes(ckpt: Path, mode: str, tmp_path: Path) -> list[dict]:
    coord = f"127.0.0.1:{_free_port()}"
    outs = [tmp_path / f"{mode}{pid}.json" for pid in range(N_PROC)]
    scripts = [
        _WORKER.format(
            coord=coord,
            nproc=N_PROC,
            pid=pid,
            root=str(ROOT),
            mode=mode,
            ckpt=str(ckpt),
            out=str(outs[pid]),
        )
        for pid in range(N_PROC)
    ]
    run_dir = tmp_path / mode
    run_dir.mkdir()
    _run(scripts, run_dir, devices=DEV_PER_PROC)
    return [json.loads(o.read_text()) for o in outs]


@pytest.mark.slow
def test_shard_load_on_2_processes_holds_a_share_of_the_memory(tmp_path, capsys):
    ckpt = tmp_path / "llama"
    ckpt.mkdir()
    tensors = _llama_arrays(BIG, tied=False)
    total_mb = sum(v.nbytes for v in tensors.values()) / 2**20
    _write_hf(ckpt, _llama_config(BIG, False), tensors, shards=2)
    del tensors
    ours = _load_on_2_processes(ckpt, "sharded", tmp_path)
    full = _load_on_2_processes(ckpt, "full", tmp_path)

    growth = lambda r: r["after"]["VmHWM"] - r["before"]["VmRSS"]
    with capsys.disabled():
        print(
            f"\nshard_load: a {total_mb:.0f} MB float32 llama on {N_PROC} processes x "
            f"{DEV_PER_PROC} CPU devices (fsdp 4 x tensor 2)"
        )
        for pid in range(N_PROC):
            o, f = ours[pid], full[pid]
            print(
                f"  process {pid}: peak RSS growth sharded {growth(o):.0f} MB "
                f"({o['seconds']:.1f} s, {o['read'] / o['elements']:.2f} of the elements read), "
                f"load_hf + device_put "
                f"{growth(f):.0f} MB ({f['seconds']:.1f} s), ratio {growth(o) / growth(f):.2f}"
                f"{'' if o['reset'] and f['reset'] else ' (peak not reset: upper bounds)'}"
            )
    # Every parameter is split but the 3 norms (fewer than sharding.MIN_SHARD_SIZE elements).
    assert ours[0]["split"] == len(ours[0]["digests"]) - 3
    assert ours[0]["digests"] == full[0]["digests"]
    for o, f in zip(ours, full, strict=True):
        assert o["read"] <= 0.55 * o["elements"]  # its half, and the norms whole
        assert growth(o) < 0.7 * growth(f)


# ------------------------------------------------------------------------ in a run (run.setup)

_RUN = """
import sys
sys.path.insert(0, {root!r})
from tests.test_shard_load import run_from_hf
run_from_hf({ckpt!r}, {data!r})
"""


def run_from_hf(ckpt: str, data_dir: str) -> None:
    """`run.setup` of a LoRA run initialised from an HF checkpoint, on fsdp 4 x tensor 2: its
    frozen weights (read shard by shard) and trainable parameters equal a `load_hf` build's."""
    from smatch_jax import config
    from smatch_jax import run as run_lib
    from smatch_jax.data import train_data as data_lib
    from smatch_jax.models import factory, lora
    from tests.test_train import tiny_config

    c = tiny_config(data_dir)
    c.model.lora_rank, c.model.scan_layers = 4, True
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 4, 2
    typed = config.typed(c)
    tok = data_lib.build_train_data(typed.data, seed=0, batch_size=8).tokenizer
    hf = dict(LLAMA, vocab_size=tok.vocab_size, max_position_embeddings=128)
    Path(ckpt).mkdir()
    _write_hf(Path(ckpt), _llama_config(hf, tied=False), _llama_arrays(hf, tied=False))
    c.model.init = f"hf:{ckpt}"
    sharding.MIN_SHARD_SIZE = 0  # shard the tiny model's weights too
    r = run_lib.setup(c)
    ref = factory.build_model(
        config.typed(c).model, vocab_size=tok.vocab_size, seq_len=c.data.seq_len, seed=c.seed
    )  # load_hf: every tensor read whole
    _, params, frozen = nnx.split(ref, lora.trainable_filter(True), ...)
    got = (jax.tree.leaves(r.init_state().params), jax.tree.leaves(r.frozen))
    for mine, theirs in zip(got, (jax.tree.leaves(params), jax.tree.leaves(frozen)), strict=True):
        assert len(mine) == len(theirs)
        for a, b in zip(mine, theirs, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    split = sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(r.frozen))
    assert split > 0, "the frozen weights should be split over the devices"
    print("frozen leaves split over the devices:", split)


def test_shard_load_in_a_lora_run_equals_the_whole_read(tmp_path):
    script = _RUN.format(root=str(ROOT), ckpt=str(tmp_path / "ckpt"), data=str(tmp_path / "d"))
    (log,) = _run([script], tmp_path, devices=8)
    assert "frozen leaves split over the devices:" in log
