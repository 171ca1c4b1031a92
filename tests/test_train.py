"""The training system end to end: outputs, resumption, SIGTERM, 1 vs 8 devices, configs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import arithmetic, text
from smatch_jax import run as run_lib
from smatch_jax import train, validate
from smatch_jax.errors import UserError
from smatch_jax.eval import report
from smatch_jax.main import generate
from smatch_jax.models import Transformer
from smatch_jax.models.config import PRESETS, from_preset

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(data_dir, **train_over):
    c = arithmetic.get_config("smoke")
    c.data.data_dir = str(data_dir)
    c.data.train_size, c.data.test_size = 128, 8
    c.train.num_steps, c.loss.bc_warmup_steps, c.sampling.sample_every = 12, 4, 3
    c.train.batch_size, c.train.model_rows, c.replay.capacity = 8, 8, 32
    c.train.log_every, c.train.eval_every, c.train.ckpt_every = 2, 1000, 1000
    for k, v in train_over.items():
        c.train[k] = v
    return c


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def _params(state):
    return [np.asarray(x) for x in jax.tree.leaves(state.params)]


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    wd = tmp_path_factory.mktemp("full")
    state, metrics = train.train(tiny_config(data_dir), str(wd))
    return wd, state, metrics


@pytest.mark.slow
def test_run_writes_outputs_and_resumes_bit_for_bit(data_dir, trained, tmp_path):
    cfg = tiny_config(data_dir)
    wd, full, metrics = trained
    lines = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*lines)
    # BC warm-up first, then SequenceMatch steps that sampled into the replay buffer.
    assert [x["sm/weight"] for x in lines if "sm/weight" in x][:2] == [0.0, 0.0]
    assert lines[-2]["sm/weight"] == 1.0 and "sample/actions_per_row" in keys
    assert {"sm/r_data", "sm/r_model", "sm/pi_bkspc_model", "bc/loss", "eval/accuracy"} <= keys
    # Where the time went, per step since the last log, and the throughput per device; no MFU
    # on a CPU (no peak to divide by).
    split = {f"time/{k}_s" for k in ("data", "train_step", "refill", "checkpoint", "eval")}
    assert split | {"tokens_per_s_per_device", "optim/lr"} <= keys and "mfu" not in keys
    sm_logs = [x for x in lines if x.get("sm/weight") == 1.0 and "time/refill_s" in x]
    assert sm_logs and all(x["time/train_step_s"] > 0 for x in sm_logs)
    assert any(x["time/refill_s"] > 0 for x in sm_logs)
    assert list((wd / "tensorboard").glob("events.out.tfevents.*"))
    assert (wd / "checkpoints" / "12").is_dir() and (wd / "config.json").exists()
    assert (wd / "samples" / "step_12.txt").exists()
    assert int(full.step) == 12 and np.isfinite(metrics["loss"])

    part = tmp_path / "part"
    first, _ = train.train(cfg, str(part), stop_after=5)  # stops inside the SM phase
    assert int(first.step) == 5
    resumed, _ = train.train(cfg, str(part))
    assert int(resumed.step) == 12
    for a, b in zip(_params(full), _params(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.asarray(full.replay.tokens), np.asarray(resumed.replay.tokens))


@pytest.mark.slow
def test_sigterm_saves_a_restorable_checkpoint_and_exits_0(data_dir, tmp_path):
    wd = tmp_path / "w"
    cmd = [
        sys.executable,
        "-m",
        "smatch_jax.main",
        "--config=configs/arithmetic.py:smoke",
        f"--workdir={wd}",
        f"--config.data.data_dir={data_dir}",
        "--config.data.train_size=128",
        "--config.data.test_size=8",
        "--config.train.num_steps=100000",
        "--config.train.log_every=1",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    # The first logged step means the loop runs (metrics.jsonl itself is created earlier, before
    # the preemption handler is installed, while a SIGTERM still ends the process at once).
    deadline, metrics_file = time.time() + 240, wd / "metrics.jsonl"
    while time.time() < deadline and not (metrics_file.exists() and metrics_file.read_text()):
        time.sleep(0.5)
    assert metrics_file.exists(), proc.communicate(timeout=30)[0].decode()[-3000:]
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 0, out[-3000:]
    steps = sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and 0 < steps[-1] < 100000
    cfg = ml_collections.ConfigDict(json.loads((wd / "config.json").read_text()))
    cfg.train.num_steps = steps[-1] + 1  # the run's own config, one step longer
    state, _ = train.train(cfg, str(wd))  # restores it and takes one more step
    assert int(state.step) == steps[-1] + 1


_STEP_SCRIPT = """
import sys, numpy as np, jax
sys.path.insert(0, {root!r})
from tests.test_train import tiny_config
from flax import nnx
from smatch_jax import run as run_lib, sampling, sharding, steps
cfg = tiny_config({data!r})
cfg.loss.bc_warmup_steps = 0
cfg.optim.warmup_steps = 0  # lr > 0 at step 0, so the parameters move
cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = {mesh}
run = run_lib.setup(cfg)
batch = sharding.global_batch(run.data.next(), run.mesh)
state, _ = run.refill(run.init_state(), batch)  # the sampler in the decode layout
replay_rows = np.asarray(state.replay.tokens)
state, met = run.train_step(state, batch, use_model_rows=True)
leaves = [np.asarray(x) for x in jax.tree.leaves(state.params)]
before = [np.asarray(x) for x in jax.tree.leaves(run.init_state().params)]
moved = sum(bool(np.any(a != b)) for a, b in zip(before, leaves))
# The evaluation's sampler on the sharded weights (sampling.layout_of picks the decode layout).
model = nnx.merge(run.graphdef, state.params, run.frozen)
prompts, m = steps.sampler_prompts(batch, run.settings.prompt_max, run.settings.pad_id)
cfg_s = sampling.SamplingConfig(max_new_tokens=8, temperature=1.0)
ids = dict(eos_id=run.settings.eos_id, pad_id=run.settings.pad_id)
out = sampling.sample(model, prompts, m, jax.random.key(1), cfg=cfg_s, **ids)
layout = sampling.layout_of(*nnx.split(model), prompts.shape[0])
sampled = np.asarray(out.actions)
np.savez({out!r}, loss=np.asarray(met["loss"]), replay=replay_rows, sampled=sampled, *leaves)
print("devices", jax.device_count(), "moved", moved, "of", len(leaves))
print("cache layout", None if layout is None else layout.cache.spec)
"""


@pytest.mark.slow
def test_one_step_equal_on_1_and_8_devices(data_dir, tmp_path):
    run_lib.setup(tiny_config(data_dir))  # builds the dataset once, in this process
    results = {}
    for n_dev, mesh in ((1, (1, 1, 1)), (8, (2, 2, 2))):
        out = tmp_path / f"step{n_dev}.npz"
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n_dev}"}
        script = _STEP_SCRIPT.format(root=str(ROOT), data=str(data_dir), mesh=mesh, out=str(out))
        proc = subprocess.run(
            [sys.executable, "-c", script],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"devices {n_dev}" in proc.stdout
        moved, total = proc.stdout.split("moved")[1].split("\n")[0].split("of")
        assert int(moved) == int(total)  # every parameter took a step
        cache_spec = proc.stdout.split("cache layout")[1].strip()
        # 8 devices: rows over data and fsdp, the 2 kv heads over tensor
        spec = "P(None, ('data', 'fsdp'), None, 'tensor', None)"
        assert cache_spec == ("None" if n_dev == 1 else spec)
        results[n_dev] = np.load(out)
    a, b = results[1], results[8]
    assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-5)
    np.testing.assert_array_equal(a["replay"], b["replay"])  # the refill's samples
    np.testing.assert_array_equal(a["sampled"], b["sampled"])  # the evaluation sampler's
    for k in a.files:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6, err_msg=k)


@pytest.mark.parametrize(
    "variant", ["smoke", "mle", "mle_ul", "bc", "sm_chi2", "sm_random", "sm_kl", "sm_nobkspc"]
)
def test_every_config_variant_loads(variant):
    c = arithmetic.get_config(variant)
    assert c.data.task == "arithmetic" and c.train.num_steps > 0
    if variant == "mle":
        assert c.loss.sm_weight == 0 and c.noise.rate == 0
    _build_abstractly(c)


def _build_abstractly(c):
    """The config's model, shapes only (no weights are loaded or initialised)."""
    if c.model.init != "scratch":
        return
    validate.check_config(c)
    cfg = from_preset(c.model.preset, vocab_size=64, max_positions=c.data.seq_len)
    nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_model_preset_builds_abstractly(preset):
    cfg = from_preset(preset, vocab_size=50257, max_positions=1024)
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n > 0
    if preset == "llama_7b":
        assert 6.5e9 < n < 7.2e9


def test_unknown_variant_is_rejected():
    with pytest.raises(ValueError, match="unknown variant"):
        arithmetic.get_config("sm_chi3")


@pytest.mark.parametrize(
    "variant", ["smoke", "mle", "mle_ul", "bc", "sm_chi2", "gpt2", "smollm2", "smoke,bc"]
)
def test_every_text_variant_loads(variant):
    c = text.get_config(variant)
    assert c.data.task == "text"
    assert c.data.seq_len >= c.data.text.prompt_tokens + c.data.text.completion_tokens + 1
    _build_abstractly(c)


@pytest.mark.slow
def test_text_smoke_run(tmp_path):
    c = text.get_config("smoke")
    c.data.data_dir = str(tmp_path / "data")
    c.train.num_steps, c.loss.bc_warmup_steps, c.train.eval_every = 8, 4, 8
    state, met = train.train(c, str(tmp_path / "w"))
    assert int(state.step) == 8 and np.isfinite(met["loss"])
    assert "eval/bkspc_per_sample" in met and "sm/r_model" in met
    assert (tmp_path / "w" / "samples" / "step_8.txt").read_text().count("->") >= 8


@pytest.mark.slow
def test_evaluate_and_generate_from_a_workdir(trained, capsys):
    wd = trained[0]
    a = report.evaluate_workdir(str(wd))
    b = report.evaluate_workdir(str(wd))
    assert a["step"] == 12 and a["metrics"] == b["metrics"]  # deterministic (no NaN: None)
    saved = json.loads((wd / "eval_12.json").read_text())
    assert saved["metrics"]["n"] == 8 and "accuracy_ci_low" in saved["metrics"]
    assert "| accuracy |" in (wd / "eval_12.md").read_text()
    assert saved["protocol"]["split"] == "test"
    m = saved["metrics"]
    for mode in ("greedy", "greedy_no_repeat", "sample"):
        assert 0 <= m[f"accuracy_{mode}"] <= 1 and 0 <= m[f"recovery_{mode}"] <= 1
    assert m["accuracy"] == m["accuracy_greedy_no_repeat"] and m["accuracy_sample_k"] == 4
    assert m["accuracy_sample_ci_low"] <= m["accuracy_sample"] <= m["accuracy_sample_ci_high"]
    assert m["recovery"] == m["recovery_greedy_no_repeat"]
    assert 0 <= m["recovery_exact_delete_frac"] <= min(1, m["recovery_deletions"])
    assert len(saved["recovery_examples"]) == 4
    assert all(len(e.split("\t")) == 6 for e in saved["recovery_examples"])
    # Your own questions: a JSONL file; a malformed line is an error naming it.
    qs = wd / "qs.jsonl"
    lines = ['{"question": "In base 7, what is 12 + 3?", "answer": "15"}', ""]
    lines.append('{"question": "In base 10, what is 2 - 5?", "answer": "-3"}')
    qs.write_text("\n".join(lines))
    own = report.evaluate_workdir(str(wd), questions=str(qs), decodings=("greedy",))
    assert own["metrics"]["n"] == 2 and own["protocol"]["decodings"] == ["greedy"]
    assert own["metrics"]["accuracy"] == own["metrics"]["accuracy_greedy"]
    assert len(list(wd.glob("eval_questions_qs-*_12.json"))) == 1
    for bad, why in (
        ('{"question": "In base 7, what is 1 + 1?"}', "exactly"),
        ('{"question": "What is 1 + 1?", "answer": "2"}', "'W' is not in the alphabet"),
        ('{"question": "In base 7, what is 1?", "answer": "1"}', "not an add_or_sub_in_base"),
        ("not json", "Expecting value"),
    ):
        qs.write_text(lines[0] + "\n" + bad + "\n")
        with pytest.raises(UserError, match=rf"qs.jsonl:2: .*{why}"):
            report.evaluate_workdir(str(wd), questions=str(qs))
    val = report.evaluate_workdir(str(wd), split="validation")  # another split, own file
    assert val["protocol"]["split"] == "validation" and val["metrics"]["n"] == 500
    assert json.loads((wd / "eval_validation_12.json").read_text())["metrics"] == val["metrics"]
    generate.main(
        [
            "--workdir",
            str(wd),
            "--prompt",
            "In base 7, what is 12 + 3? ",
            "--greedy",
            "--max_new_tokens",
            "4",
        ]
    )
    assert "--- sample 0" in capsys.readouterr().out


def test_profile_of_chosen_steps_is_written_for_tensorboard(data_dir, tmp_path):
    cfg = tiny_config(data_dir, num_steps=3, profile_steps=1, profile_start=1)
    train.train(cfg, str(tmp_path))
    traces = list((tmp_path / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
