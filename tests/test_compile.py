"""The pod plan. It compiles the program that trains: `run.setup` and the plan's abstract
build lower the train step and the refill to the same program on 8 CPU devices. On a small TPU
topology (v5e:2x2), on this CPU host: the report's fields and the table that prints them, the
scanned plan's flops against the unrolled plan's, and the tori. The TPU tests need the TPU
compiler (requirements-tpu.txt)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from configs import arithmetic, paper
from smatch_jax import topologies, validate
from smatch_jax.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu (the TPU compiler) is not installed: pip install -r requirements-tpu.txt",
)

PIECE_FIELDS = {
    "peak_bytes_per_chip",
    "hbm_bytes_per_chip",
    "fits",
    "flops",
    "optimal_seconds",
    "collective_bytes",
}


def _tiny():
    c = arithmetic.get_config("smoke")
    c.data.seq_len, c.data.prompt_max = 32, 16
    c.train.batch_size = c.train.model_rows = 8
    c.sampling.sample_every = 4
    c.mesh.data, c.mesh.fsdp = 2, 2
    return c


@needs_libtpu
def test_tiny_config_compiles_for_v5e_2x2_and_reports_every_field():
    from smatch_jax.main import compile as compile_main

    r = compile_main.build_report(_tiny(), "v5e:2x2", vocab_size=20)
    assert (
        r["topology"] == "v5e-4"
        and r["chips"] == 4
        and r["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    )
    assert {"train_mle", "train_sm", "refill", "eval_decode"} <= set(r["pieces"])
    for name, p in r["pieces"].items():
        assert set(p) >= PIECE_FIELDS, name
        assert p["hbm_bytes_per_chip"] == 16 * 2**30 and p["fits"], name
        assert 0 < p["peak_bytes_per_chip"] < p["hbm_bytes_per_chip"], name
        assert p["flops"] > 0 and p["optimal_seconds"] > 0, name
    # The sampler's loop is counted per action: more flops than one decode step alone.
    refill = r["pieces"]["refill"]
    assert (
        refill["loop_trips"] == 16 and refill["flops"] > r["pieces"]["decode_step_refill"]["flops"]
    )
    assert refill["collective_bytes_per_token"] >= 0
    assert r["pieces"]["train_mle"]["collective_bytes"] > 0  # gradients reduced over the mesh
    assert r["sample_every"] == 4 and r["model_rows"] == r["data_rows"] == 8
    assert r["weight_bytes"] > 0 and r["sm_over_mle_projected"] > 1
    assert r["scan_layers"] is False and r["n_layers"] == 2
    assert r["pieces"]["train_sm"]["donated"] and r["pieces"]["refill"]["donated"]
    assert not r["pieces"]["eval_decode"]["donated"]
    assert r["pieces"]["train_sm"]["memory"]["alias"] > 0  # the donated state is reused
    table = compile_main.format_report(r)
    assert "PROJECTED" in table and "FITS" in table and "train_sm" in table
    assert jax.devices()[0].platform == "cpu"  # the TPU is only a compile target
    # --pieces: only those, with the same fields; a loop piece still costs its decode step.
    some = compile_main.build_report(_tiny(), "v5e:2x2", vocab_size=20, pieces=("refill",))
    assert list(some["pieces"]) == ["refill"]
    assert set(some["pieces"]["refill"]) == set(r["pieces"]["refill"])
    assert some["pieces"]["refill"]["flops"] == pytest.approx(refill["flops"], rel=1e-6)
    with pytest.raises(UserError, match=r"--pieces names \['train_ssm'\]; choose from train_mle"):
        compile_main.build_report(_tiny(), "v5e:2x2", vocab_size=20, pieces=("train_ssm",))
    # --buffers: what is live at XLA's peak, the arguments apart (hlo_stats.peak_buffers).
    b = compile_main.build_report(
        _tiny(), "v5e:2x2", vocab_size=20, pieces=("train_mle",), buffers=3
    )
    mle = b["pieces"]["train_mle"]
    assert len(mle["peak_buffers"]) == 3 and not any(x["argument"] for x in mle["peak_buffers"])
    assert 0 < mle["peak_argument_bytes"] <= mle["memory"]["args"]  # those live at the peak
    assert mle["peak_argument_bytes"] < mle["peak_live_bytes"] <= mle["memory"]["xla_peak"]
    assert "the largest buffers (MiB)" in compile_main.format_report(b)


def test_topology_names_and_an_unknown_one():
    assert topologies.get("v5e-32").topology_name == "v5e:4x8"
    assert topologies.get("v4-64").chips == 32 and topologies.get("v4-64").chip.kind == "v4"
    assert topologies.get("v5e:2x2").name == "v5e-4"
    with pytest.raises(ValueError, match="unknown TPU topology"):
        topologies.get("v5e-33")


@pytest.mark.parametrize("variant", [*paper.VARIANTS, "arithmetic_sm,v4"])
def test_paper_configs_load(variant):
    c = paper.get_config(variant)
    validate.check_config(c)
    assert c.model.preset == "llama_7b" and c.model.lora_rank == 16
    assert c.model.dtype == "bfloat16" and c.model.init.startswith("hf:")
    assert c.mesh.data * c.mesh.fsdp * c.mesh.tensor == 32


@needs_libtpu
def test_the_program_parses_its_flags_and_names_a_bad_topology():
    """Run as a program (its flags parsed by `cli.parse_config_flags`): an unknown slice is
    one clear error, not a traceback."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "smatch_jax.main.compile", "--config=configs/arithmetic.py:smoke",
         "--topology=v9z-3"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode != 0 and "error:" in out.stderr and "v9z-3" in out.stderr
    assert "Traceback" not in out.stderr


@needs_libtpu
@pytest.mark.slow
def test_scanned_plan_counts_every_layer(monkeypatch):
    """XLA counts a loop body once; the plan counts a model's flops and bytes from probes
    with 1 and 2 unrolled layers, in both layouts. On a 3-layer model the scanned plan's
    flops equal those of the whole unrolled program within 2% for the train step and the
    decode step (measured: under 0.001%), and its bytes within 10% (measured: 0.3%; 0.3-4% when
    the costs were XLA's with memory-space assignment on)."""
    from smatch_jax import compile_plan, hlo_stats, topologies
    from smatch_jax.main import compile as compile_main
    from smatch_jax.models import config as model_config

    wide = dict(family="llama", d_model=512, n_layers=3, n_heads=8, n_kv_heads=4, d_ff=1536)
    monkeypatch.setitem(model_config.PRESETS, "wide_3", wide)
    configs = {}
    for scan in (False, True):
        configs[scan] = c = _tiny()
        c.model.preset, c.model.scan_layers = "wide_3", scan
    pieces = ("train_sm", "refill", "decode_step_refill")
    report = compile_main.build_report(configs[True], "v5e:2x2", vocab_size=20, pieces=pieces)
    scanned = report["pieces"]
    assert report["scan_layers"] and list(scanned) == list(pieces)
    ar = compile_plan.abstract_run(
        configs[False], topologies.compile_devices("v5e:2x2"), vocab_size=20
    )
    for name in ("train_sm", "decode_step_refill"):  # the unrolled program, costed whole
        whole, _ = hlo_stats.accounted_cost(compile_plan.lowerings(ar)[name]())
        assert scanned[name]["flops"] == pytest.approx(whole["flops"], rel=0.02), name
        assert scanned[name]["bytes_accessed"] == pytest.approx(whole["bytes"], rel=0.1), name
    for name, p in scanned.items():
        assert p["flops"] > 1.2 * p["xla_flops"], name  # the layers XLA counted once
        assert p["layers_counted"] == 3, name


def one_builder_config(data_dir):
    """A small SequenceMatch run with what a pod run has: LoRA (frozen weights), scanned
    layers with remat, ground-truth noise, and a data x fsdp x tensor mesh."""
    c = arithmetic.get_config("smoke")
    c.data.data_dir = str(data_dir)
    c.data.train_size, c.data.test_size = 64, 8
    c.data.seq_len, c.data.prompt_max = 64, 44
    c.train.batch_size = c.train.model_rows = 8
    c.replay.capacity = 16
    c.model.preset, c.model.lora_rank = "mini_llama", 2
    c.model.scan_layers, c.model.remat = True, "full"
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
    return c


_ONE_BUILDER = """
import json, re, sys
import jax
sys.path.insert(0, {root!r})
from smatch_jax import compile_plan, sharding
from smatch_jax import run as run_lib
from tests.test_compile import one_builder_config
cfg = one_builder_config({data!r})
r = run_lib.setup(cfg)
batch = sharding.global_batch(r.data.next(), r.mesh)
ar = compile_plan.abstract_run(cfg, jax.devices(), tokenizer=r.data.tokenizer)
state = r.init_state()
strip = lambda t: re.sub(r" loc\\([^\\n]*", "", "\\n".join(
    x for x in t.splitlines() if not x.startswith("#loc")))
out = {{}}
train = lambda rows: r.program.train_step.lower(state, batch, r.frozen, r.tables,
                                                use_model_rows=rows)
pairs = {{
    "train_mle": (train(False), compile_plan.lower_train_step(ar, False)),
    "train_sm": (train(True), compile_plan.lower_train_step(ar, True)),
    "refill": (r.program.refill.lower(state, batch, r.frozen), compile_plan.lower_refill(ar)),
}}
for name, (real, plan) in pairs.items():
    a, b = strip(real.as_text()), strip(plan.as_text())
    first = next((i for i, (x, y) in enumerate(zip(a.splitlines(), b.splitlines())) if x != y), -1)
    out[name] = dict(equal=a == b, lines=len(a.splitlines()), first_diff=first,
                     donated="tf.aliasing_output" in a, scanned="stablehlo.while" in a)
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_the_plan_lowers_the_program_that_trains(tmp_path):
    """`run.setup` (real data and weights) and the plan's abstract build (`steps.build` on
    shapes) lower the train step, with and without model rows, and the refill to the same
    StableHLO (source locations dropped) on 8 CPU devices as data 2 x fsdp 2 x tensor 2:
    the same functions, argument order, shardings and donation."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    code = _ONE_BUILDER.format(root=str(ROOT), data=str(tmp_path / "data"))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env,
        cwd=ROOT,
    )  # fmt: skip
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, out.stderr[-3000:]
    result = json.loads(line[0][7:])
    for name, r in result.items():
        assert r["equal"], (name, r)
        assert r["lines"] > 100 and r["donated"] and r["scanned"], (name, r)
