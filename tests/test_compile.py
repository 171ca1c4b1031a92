"""The compile program on a small TPU topology (v5e:2x2), on this CPU host: the report's
fields, and the table that prints them. Needs the TPU compiler (requirements-tpu.txt)."""

import importlib.util

import jax
import pytest

from configs import arithmetic, paper
from smatch_jax import topologies, validate

pytestmark = pytest.mark.skipif(
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
    table = compile_main.format_report(r)
    assert "PROJECTED" in table and "FITS" in table and "train_sm" in table
    assert jax.devices()[0].platform == "cpu"  # the TPU is only a compile target


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


def test_the_program_parses_its_flags_and_names_a_bad_topology():
    """Run as a program (its flags are defined only then): an unknown slice is one clear
    error, not a traceback."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "smatch_jax.main.compile", "--config=configs/arithmetic.py:smoke",
         "--topology=v9z-3"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode != 0 and "error:" in out.stderr and "v9z-3" in out.stderr
    assert "Traceback" not in out.stderr
