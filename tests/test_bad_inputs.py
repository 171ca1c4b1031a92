"""Every program with bad input, run as a user runs it: a subprocess.

Each case asserts the exit code (2: bad input, 1: a failure, 0: recovered), that the last line
of stderr is the one `error:` line (no traceback), and that the workdir's files are unchanged
(their hashes before and after; the lock file, whose text names the last holder, is left out).
README "When something goes wrong" lists what the programs say.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from smatch_jax import sampling
from smatch_jax.errors import UserError
from smatch_jax.main import cli
from smatch_jax.models import Transformer
from smatch_jax.models.config import tiny

ROOT = Path(__file__).resolve().parents[1]
SMOKE = "--config=configs/arithmetic.py:smoke"
# The smoke run made smaller: 4 steps, checkpoints at 2 and 4, SequenceMatch from step 2; a
# GPT-2-family model, whose learned position table (data.seq_len = 96 rows) can run out.
TINY = [
    "--config.model.preset=small_gpt2",
    "--config.train.num_steps=4",
    "--config.train.ckpt_every=2",
    "--config.train.log_every=2",
    "--config.train.eval_every=1000",
    "--config.loss.bc_warmup_steps=2",
    "--config.sampling.sample_every=2",
    "--config.data.train_size=64",
    "--config.data.test_size=8",
    "--config.eval.decodings=greedy",
    "--config.eval.recovery=False",
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    e = {**os.environ, "JAX_PLATFORMS": "cpu", "SMATCH_JAX_DATA": str(root / "data")}
    e.pop("SMATCH_JAX_DEBUG", None)
    return {"root": root, "env": e}


def run(env, *args, timeout=300, **extra_env):
    """(exit code, stdout, stderr) of `python -m <args>` in the repository root."""
    proc = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env={**env["env"], **extra_env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc.returncode, proc.stdout, proc.stderr


def assert_error(res, code: int, *phrases: str) -> str:
    """The run exited with `code` and its stderr ends in its one `error:` line, which holds
    every phrase; returns that line."""
    got, _, err = res
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert got == code, (got, err[-3000:])
    assert lines and lines[-1].startswith("error: "), err[-3000:]
    assert sum(ln.startswith("error:") for ln in lines) == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    for p in phrases:
        assert p in lines[-1], (p, lines[-1])
    return lines[-1]


def snapshot(d: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `d` (the lock file left out)."""
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file() and not p.name.startswith(".train_lock.")
    }


@pytest.fixture(scope="module")
def trained(env):
    """A tiny run trained by the real program: checkpoints at steps 2 and 4."""
    wd = env["root"] / "trained"
    code, out, err = run(env, "smatch_jax.main", SMOKE, f"--workdir={wd}", *TINY)
    assert code == 0, err[-3000:]
    assert "| metric | value |" in out and len(out.splitlines()) < 20  # a short table
    assert (wd / "checkpoints" / "4").is_dir() and (wd / "checkpoints" / "2").is_dir()
    return wd


def copy_of(trained: Path, tmp_path: Path) -> Path:
    wd = tmp_path / "w"
    shutil.copytree(trained, wd)
    return wd


def damage(step_dir: Path) -> None:
    """Cut every array file of a checkpoint in half (a write the disk lost)."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "d" in p.parts]
    assert files
    for p in files:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


# ------------------------------------------------------------------------- train: flags, config


def test_help_lists_the_flags_and_the_config_listing(env):
    code, out, _ = run(env, "smatch_jax.main", "--help")
    assert code == 0
    for flag in ("--config", "--workdir", "--force_resume", "--list", "--debug"):
        assert flag in out


def test_every_missing_flag_is_named_at_once(env):
    assert_error(run(env, "smatch_jax.main"), 2, "--config", "--workdir")


def test_a_config_file_that_does_not_exist(env, tmp_path):
    res = run(env, "smatch_jax.main", "--config=configs/nope.py", f"--workdir={tmp_path / 'w'}")
    assert_error(res, 2, "configs/nope.py", "does not exist")
    assert not (tmp_path / "w").exists()


def test_an_unknown_variant_names_the_variants(env, tmp_path):
    res = run(
        env, "smatch_jax.main", "--config=configs/arithmetic.py:smoek", f"--workdir={tmp_path}"
    )
    assert_error(res, 2, "'smoek'", "smoke")


def test_an_override_typo_names_the_closest_field(env, tmp_path):
    res = run(env, "smatch_jax.main", SMOKE, f"--workdir={tmp_path}", "--config.loss.chi2coef=1")
    assert_error(res, 2, "did you mean 'loss.chi2_coef'")


def test_a_value_out_of_range_names_the_field(env, tmp_path):
    res = run(env, "smatch_jax.main", SMOKE, f"--workdir={tmp_path}", "--config.train.num_steps=0")
    assert_error(res, 2, "train.num_steps=0")


def test_a_value_of_the_wrong_type_names_the_flag(env, tmp_path):
    res = run(env, "smatch_jax.main", SMOKE, f"--workdir={tmp_path}", "--config.train.num_steps=x")
    assert_error(res, 2, "config.train.num_steps")


def test_list_shows_variants_and_fields_with_defaults_and_comments(env):
    code, out, _ = run(env, "smatch_jax.main", SMOKE, "--list")
    assert code == 0
    assert "variants" in out and "  smoke" in out and "  sm_chi2" in out
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("train.num_steps ="))
    assert "40" in line and "(default 2000)" in line and "# optimiser steps" in line
    assert "train.compilation_cache" in out and "persistent compilation cache" in out


def test_list_needs_a_config(env):
    assert_error(run(env, "smatch_jax.main", "--list"), 2, "--config")


def test_debug_shows_the_traceback_and_still_ends_with_the_error(env):
    _, _, err = run(env, "smatch_jax.main", "--debug")
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: missing")


# ------------------------------------------------------------------------------ train: workdirs


def test_a_workdir_that_is_a_file(env, tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    assert_error(run(env, "smatch_jax.main", SMOKE, f"--workdir={f}", *TINY), 2, "not writable")


def test_a_workdir_of_another_config_is_refused_and_left_as_it_was(env, trained):
    before = snapshot(trained)
    res = run(env, "smatch_jax.main", SMOKE, f"--workdir={trained}", *TINY, "--config.seed=3")
    assert_error(res, 2, "different config", "seed", "--force_resume")
    assert snapshot(trained) == before


def test_a_failed_force_resume_leaves_the_workdir_as_it_was(env, trained):
    before = snapshot(trained)
    args = (SMOKE, f"--workdir={trained}", *TINY, "--config.model.preset=mini_llama")
    res = run(env, "smatch_jax.main", *args, "--force_resume")
    assert_error(res, 2, "do not fit the new config", "model.preset", "unchanged")
    assert snapshot(trained) == before  # config.json still the checkpoints' config


def test_a_workdir_another_process_trains_in(env, trained):
    before = snapshot(trained)
    with open(trained / ".train_lock.0", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        res = run(env, "smatch_jax.main", SMOKE, f"--workdir={trained}", *TINY)
    assert_error(res, 2, "is training in", "SIGTERM")
    assert snapshot(trained) == before


def test_a_data_dependent_error_names_the_field_and_leaves_nothing(env, tmp_path):
    data = tmp_path / "data"
    args = (SMOKE, f"--workdir={tmp_path / 'w'}", f"--config.data.data_dir={data}")
    res = run(env, "smatch_jax.main", *args, "--config.data.seq_len=8")
    assert_error(res, 2, "data.seq_len", "data.train_size")
    assert not data.exists() and not (tmp_path / "w").exists()


def test_a_missing_asset_names_the_fetch_command(env, tmp_path):
    cfg = "--config=configs/arithmetic.py:smollm2,smoke"
    res = run(
        env, "smatch_jax.main", cfg, f"--workdir={tmp_path / 'w'}", SMATCH_JAX_ASSETS=str(tmp_path)
    )
    assert_error(res, 2, "python -m smatch_jax.main.assets fetch")


# ------------------------------------------------------------------------- train: faults, signals


def test_a_truncated_checkpoint_is_one_warning_line(env, trained, tmp_path):
    wd = copy_of(trained, tmp_path)
    damage(wd / "checkpoints" / "4")
    code, _, err = run(env, "smatch_jax.main", SMOKE, f"--workdir={wd}", *TINY)
    assert code == 0, err[-3000:]
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1, err
    assert "step 4" in warnings[0] and "could not be restored" in warnings[0]
    assert "resuming from step 2" in warnings[0]
    assert "Traceback" not in err and "never retrieved" not in err and len(err.splitlines()) < 20
    assert (wd / "checkpoints" / "4.unreadable").is_dir()


def test_no_readable_checkpoint_ends_with_the_error_line(env, trained, tmp_path):
    wd = copy_of(trained, tmp_path)
    for step in (2, 4):
        damage(wd / "checkpoints" / str(step))
    before = snapshot(wd)
    res = run(env, "smatch_jax.main", SMOKE, f"--workdir={wd}", *TINY)
    assert_error(res, 1, "no checkpoint", "could be restored", "step 4", "step 2")
    assert len(res[2].splitlines()) < 10 and "never retrieved" not in res[2]
    assert snapshot(wd) == before


def test_ctrl_c_saves_a_checkpoint_and_exits_0(env, tmp_path):
    wd = tmp_path / "w"
    args = [SMOKE, f"--workdir={wd}", *TINY, "--config.train.num_steps=100000"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "smatch_jax.main", *args, "--config.train.ckpt_every=100000"],
        cwd=ROOT,
        env=env["env"],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    lines = []
    for line in proc.stderr:  # the loop has started
        lines.append(line)
        if line.startswith("first step done"):
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=120)
    err = "".join(lines) + rest
    assert proc.returncode == 0, err[-3000:]
    assert "SIGINT: saving a checkpoint" in err and "stopping at step" in err
    steps = [int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(steps) == 1 and 0 < steps[0] < 100000


# --------------------------------------------------------------------------------- evaluate


def test_evaluate_help_documents_the_questions_form(env):
    code, out, _ = run(env, "smatch_jax.main.evaluate", "--help")
    assert code == 0 and "--questions" in out and "In base 7, what is 12 + 3?" in out
    assert "--out" in out and "--debug" in out


def test_evaluate_without_a_workdir(env):
    assert_error(run(env, "smatch_jax.main.evaluate"), 2, "--workdir")


def test_evaluate_a_workdir_that_does_not_exist(env, tmp_path):
    res = run(env, "smatch_jax.main.evaluate", f"--workdir={tmp_path / 'nope'}")
    assert_error(res, 2, "does not exist")


def test_evaluate_a_directory_that_is_not_a_workdir(env, tmp_path):
    res = run(env, "smatch_jax.main.evaluate", f"--workdir={tmp_path}")
    assert_error(res, 2, "config.json not found")
    assert list(tmp_path.iterdir()) == []


def test_evaluate_a_step_that_does_not_exist_lists_the_steps(env, trained):
    before = snapshot(trained)
    res = run(env, "smatch_jax.main.evaluate", f"--workdir={trained}", "--step=999")
    assert_error(res, 2, "--step 999", "[2, 4]")
    assert snapshot(trained) == before


def test_evaluate_a_bad_decoding(env, trained):
    res = run(env, "smatch_jax.main.evaluate", f"--workdir={trained}", "--decoding=beam")
    assert_error(res, 2, "--decoding=beam")


def test_evaluate_a_split_that_does_not_exist(env, trained):
    before = snapshot(trained)
    res = run(env, "smatch_jax.main.evaluate", f"--workdir={trained}", "--split=tset")
    assert_error(res, 2, "tset")
    assert snapshot(trained) == before


def test_evaluate_questions_that_are_not_utf8_name_file_and_line(env, trained, tmp_path):
    qs = tmp_path / "q.jsonl"
    qs.write_bytes(b'{"question": "In base 7, what is 1 + 1?", "answer": "2"}\n\xff\xfe\n')
    res = run(env, "smatch_jax.main.evaluate", f"--workdir={trained}", f"--questions={qs}")
    assert_error(res, 2, f"{qs}:2", "not UTF-8", "0xff")


def test_evaluate_a_malformed_question_names_the_line_and_the_form(env, trained, tmp_path):
    qs = tmp_path / "q.jsonl"
    qs.write_text('{"question": "In base 7, what is 1 + 1?", "answer": "2"}\n{"question": 1}\n')
    res = run(env, "smatch_jax.main.evaluate", f"--workdir={trained}", f"--questions={qs}")
    assert_error(res, 2, f"{qs}:2", "In base N, what is A + B?")


def test_evaluate_a_questions_file_that_does_not_exist(env, trained, tmp_path):
    res = run(env, "smatch_jax.main.evaluate", f"--workdir={trained}", "--questions=nope.jsonl")
    assert_error(res, 2, "nope.jsonl", "does not exist")


@pytest.mark.slow
def test_evaluate_questions_get_their_own_file_and_a_fallback_is_one_line(env, trained, tmp_path):
    """A questions file named like a split (test.jsonl) gets its own output; an unreadable
    latest checkpoint is skipped with one warning, as training does."""
    wd = copy_of(trained, tmp_path)
    damage(wd / "checkpoints" / "4")
    qs = tmp_path / "test.jsonl"
    qs.write_text('{"question": "In base 7, what is 12 + 3?", "answer": "15"}\n')
    before = snapshot(wd)
    code, out, err = run(env, "smatch_jax.main.evaluate", f"--workdir={wd}", f"--questions={qs}")
    assert code == 0, err[-3000:]
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "step 4" in warnings[0] and "using step 2" in warnings[0]
    assert "Traceback" not in err and "never retrieved" not in err
    written = sorted(set(snapshot(wd)) - set(before))
    assert len(written) == 2 and written[0].startswith("eval_questions_test-"), written
    assert written[0].endswith("_2.json") and not list(wd.glob("eval_test_*"))
    assert {k: v for k, v in snapshot(wd).items() if k in before} == before
    report = json.loads((wd / written[0]).read_text())
    assert report["protocol"]["split"] == f"questions:{qs}" and report["metrics"]["n"] == 1
    assert out.index("| metric | value |") < out.index("wrote ")  # printed, then written


@pytest.mark.slow
def test_evaluate_prints_its_results_when_it_cannot_write_them(env, trained, tmp_path):
    before = snapshot(trained)
    out_file = tmp_path / "missing_dir" / "e.json"
    res = run(env, "smatch_jax.main.evaluate", f"--workdir={trained}", f"--out={out_file}")
    assert_error(res, 1, "could not write", "printed above", "--out")
    assert "| metric | value |" in res[1] and "accuracy" in res[1]
    assert snapshot(trained) == before


def test_evaluate_a_checkpoint_that_cannot_be_read_names_the_others(env, trained, tmp_path):
    wd = copy_of(trained, tmp_path)
    damage(wd / "checkpoints" / "4")
    before = snapshot(wd)
    res = run(env, "smatch_jax.main.evaluate", f"--workdir={wd}", "--step=4")
    assert_error(res, 1, "step 4", "could not be restored", "[2]", "--step")
    assert snapshot(wd) == before and "never retrieved" not in res[2]


# --------------------------------------------------------------------------------- generate


def test_generate_help(env):
    code, out, _ = run(env, "smatch_jax.main.generate", "--help")
    assert code == 0 and "--prompt" in out and "--max_new_tokens" in out


def test_generate_needs_a_model(env):
    res = run(env, "smatch_jax.main.generate", "--prompt=hi")
    assert_error(res, 2, "--pretrained", "--workdir")


def test_generate_an_hf_directory_that_does_not_exist(env, tmp_path):
    res = run(env, "smatch_jax.main.generate", f"--pretrained=hf:{tmp_path}/x", "--prompt=hi")
    assert_error(res, 2, "not a directory")


def test_generate_with_bad_sampling_flags(env, trained):
    base = ("smatch_jax.main.generate", f"--workdir={trained}", "--prompt=In base 7, ")
    assert_error(run(env, *base, "--max_new_tokens=0"), 2, "--max_new_tokens=0")
    assert_error(run(env, *base, "--temperature=0"), 2, "--temperature", "greedy")
    assert_error(run(env, *base, "--step=7"), 2, "--step 7", "[2, 4]")
    assert_error(run(env, *base, "--num_samples=0"), 2, "--num_samples")


def test_generate_an_empty_prompt(env, trained):
    res = run(env, "smatch_jax.main.generate", f"--workdir={trained}", "--prompt=")
    assert_error(res, 2, "--prompt")


def test_gpt2_generation_past_its_positions_is_refused(env, trained):
    """A GPT-2-family model has a learned table of positions (here data.seq_len = 96): past
    it the logits are NaN and greedy decoding printed blanks, exit 0."""
    wd = trained
    before = snapshot(wd)
    prompt = "In base 7, what is 12 + 3? " + "1" * 78  # 105 characters
    res = run(env, "smatch_jax.main.generate", f"--workdir={wd}", "--greedy", f"--prompt={prompt}")
    assert_error(res, 2, "137 positions", "has 96", "max_new_tokens")
    assert snapshot(wd) == before
    ok = run(env, "smatch_jax.main.generate", f"--workdir={wd}", "--greedy", "--prompt=In base 7,")
    assert ok[0] == 0, ok[2][-2000:]


# ---------------------------------------------------------------------- compile, assets, demo


def test_compile_names_every_missing_flag_at_once(env):
    assert_error(run(env, "smatch_jax.main.compile"), 2, "--config", "--topology")


def test_compile_help(env):
    code, out, _ = run(env, "smatch_jax.main.compile", "--help")
    assert code == 0 and "--topology" in out and "--pieces" in out and "--list" in out


def test_compile_an_unknown_piece(env):
    res = run(env, "smatch_jax.main.compile", SMOKE, "--topology=v5e:2x2", "--pieces=train_ssm")
    assert_error(res, 2, "train_ssm", "train_mle")


def test_assets_an_unknown_name(env):
    assert_error(run(env, "smatch_jax.main.assets", "fetch", "nope"), 2, "'nope'", "smollm2")


def test_demo_a_bad_flag(env):
    assert_error(run(env, "smatch_jax.main.demo", "--steps=0"), 2, "--steps=0")
    assert_error(run(env, "smatch_jax.main.demo", "--stpes=3"), 2, "--stpes")


# ------------------------------------------------- one config entry: every program with a config

# Every program that takes a config, with the flags it needs besides --config: each parses
# it with `cli.parse_config_flags`, so each says the same about the same mistake, before any
# model, dataset or compile (a few seconds each).
CONFIG_PROGRAMS = {
    "smatch_jax.main": ("--workdir={tmp}/w",),
    "smatch_jax.main.compile": ("--topology=v5e:2x2",),
}


def error_lines(env, tmp_path, *args) -> dict[str, str]:
    """{program: its one `error:` line (exit 2, no traceback)} for `args` after --config."""
    lines = {}
    for program, needed in CONFIG_PROGRAMS.items():
        flags = [f.format(tmp=tmp_path) for f in needed]
        lines[program] = assert_error(run(env, program, SMOKE, *flags, *args), 2)
    assert not (tmp_path / "w").exists()
    return lines


@pytest.mark.parametrize(
    "override, phrase",
    [
        ("--noconfig.eval.recovry", "did you mean 'eval.recovery'"),  # was a traceback
        ("--config.train.num_steps=0", "invalid config: train.num_steps=0"),
        ("--config.train.num_steps=x", "--config.train.num_steps=x"),
    ],
)
def test_every_program_with_a_config_says_the_same_about_an_override(
    env, tmp_path, override, phrase
):
    lines = error_lines(env, tmp_path, override)
    assert len(set(lines.values())) == 1, lines
    assert phrase in lines["smatch_jax.main"], lines


def test_a_misspelled_override_is_named_with_the_closest_field(env, tmp_path):
    lines = error_lines(env, tmp_path, "--config.loss.temprature=0.1")
    want = "error: unknown config key 'loss.temprature'; did you mean 'loss.temperature'?"
    assert set(lines.values()) == {want}, lines


def test_overrides_without_a_config_name_the_missing_flags(env):
    res = run(env, "smatch_jax.main", "--config.loss.temperature=0.1")
    assert_error(res, 2, "missing --config, --workdir")
    res = run(env, "smatch_jax.main.compile", "--config.loss.temperature=0.1")
    assert_error(res, 2, "missing --config, --topology")


def test_the_programs_share_one_config_flag_in_one_process(tmp_path, env):
    """Both programs imported together (no flag defined twice), each parsing the argv it is
    given rather than sys.argv: the config check of the compile program fires."""
    script = (
        "from smatch_jax.main import cli, compile, train\n"
        f"cli.run(compile.main, [{SMOKE!r}, '--topology=v5e:2x2', '--config.train.num_steps=0'])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env["env"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_error((proc.returncode, proc.stdout, proc.stderr), 2, "train.num_steps=0")


def test_a_program_without_a_config_refuses_one(env, tmp_path):
    """evaluate and generate read the config saved in --workdir; demo and assets have none."""
    override = "--config.loss.temprature=0.1"
    for program, args in [
        ("smatch_jax.main.evaluate", (f"--workdir={tmp_path}",)),
        ("smatch_jax.main.generate", (f"--workdir={tmp_path}", "--prompt=hi")),
        ("smatch_jax.main.demo", ()),
        ("smatch_jax.main.assets", ("list",)),
    ]:
        line = assert_error(run(env, program, *args, override), 2, override, "takes no config")
        assert "only train (python -m smatch_jax.main) and compile" in line
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- in-process pieces


def test_the_sampler_refuses_to_decode_past_a_gpt2_position_table():
    cfg = tiny("gpt2")  # 64 positions
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    prompts = np.ones((2, 60), np.int32)
    scfg = sampling.SamplingConfig(max_new_tokens=8, greedy=True)
    with pytest.raises(sampling.PositionLimitError, match=r"68 positions.*has 64"):
        sampling.sample(model, prompts, np.array([60, 3]), jax.random.key(0), eos_id=0,
                        pad_id=0, cfg=scfg)  # fmt: skip
    # Wide rows with short prompts fit: only the longest prompt counts.
    out = sampling.sample(model, prompts, np.array([50, 3]), jax.random.key(0), eos_id=0,
                          pad_id=0, cfg=scfg)  # fmt: skip
    assert out.final.shape == (2, 68)


def test_a_chat_model_stops_at_its_end_of_turn():
    """`eos_id` may be a tuple (eos, <|im_end|>): a row ends at either."""
    model = Transformer(tiny("llama"), rngs=nnx.Rngs(0))
    scfg = sampling.SamplingConfig(max_new_tokens=8, greedy=True, allow_bkspc=False)
    prompts = np.array([[1, 2, 3]], np.int32)
    args = (model, prompts, np.array([3]), jax.random.key(0))
    free = sampling.sample(*args, eos_id=0, pad_id=0, cfg=scfg)
    first = int(free.actions[0, 3])
    if first == 0:
        pytest.skip("the tiny model emits eos first")
    stopped = sampling.sample(*args, eos_id=(0, first), pad_id=0, cfg=scfg)
    assert bool(stopped.ended[0]) and int(stopped.length[0]) == 4


def test_one_line_and_the_argument_parser():
    assert cli.one_line("a:\n  b\n  c") == "a: b; c"
    ap = cli.ArgumentParser(prog="p")
    ap.add_argument("--n", type=int)
    with pytest.raises(UserError, match=r"--n: invalid int value: 'x' \(see p --help\)"):
        ap.parse_args(["--n", "x"])
