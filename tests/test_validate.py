"""Bad input fails fast with one message naming the fix (README "Reliability").

Config keys, types, ranges and incompatible settings; command-line overrides; the tokenizer's
<bkspc> id; an unwritable, full or foreign workdir; a missing asset. None of these builds a
model: the checks run before anything expensive.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from collections import namedtuple

import ml_collections
import pytest

from configs import arithmetic, text
from smatch_jax import assets, train, validate
from smatch_jax.data.tokenizers import CharTokenizer
from smatch_jax.main import cli
from tests.test_train import tiny_config


@pytest.fixture
def cfg(tmp_path):
    return tiny_config(tmp_path / "data")


def _edited(c, key, value):
    """`c` with `key` set to `value`, as a config loaded from JSON would have it (a
    ConfigDict refuses a wrong type on assignment, a freshly built one does not)."""
    d = c.to_dict()
    *path, field = key.split(".")
    node = d
    for part in path:
        node = node[part]
    node[field] = value
    return ml_collections.ConfigDict(d)


@pytest.mark.parametrize(
    "key, value, message",
    [
        (
            "loss.chi2coef",
            0.5,
            r"unknown config key 'loss.chi2coef'; did you mean 'loss.chi2_coef'",
        ),
        ("train.num_stepz", 5, r"did you mean 'train.num_steps'"),
        ("train.num_steps", "100", r"train.num_steps='100' has type str; it must be of type int"),
        ("noise.mask_noise_actions", 1, r"must be of type bool"),
        ("loss.value_on", "mx", r"loss.value_on='mx' is unknown; choose one of \['mix', 'data'\]"),
        ("model.preset", "huge", r"model.preset='huge' is unknown; choose one of"),
        (
            "loss.terminal",
            "bootstrapped",
            r"loss.terminal='bootstrapped' is unknown; choose one of \['zero', 'bootstrap'\]",
        ),
        ("loss.masked_actions", "env", r"choose one of \['unrewarded', 'environment'\]"),
        ("loss.normalize", "episode", r"choose one of \['token', 'row'\]"),
        ("data.eval_split", "dev", r"data.eval_split='dev' is not a split of arithmetic"),
        ("data.arithmetic.difficulty", "", r"data.arithmetic.difficulty='' is unknown; choose"),
        ("eval.decodings", "greedy,beam", r"eval.decodings='greedy,beam': unknown decoding 'beam'"),
        ("loss.temperature", 0.0, r"loss.temperature=0.0 is out of range; it must be in \(0.0"),
        ("loss.truncated_weight", 2.0, r"loss.truncated_weight=2.0 is out of range"),
        ("noise.rate", 1.5, r"noise.rate=1.5 is out of range; it must be in \[0.0, 1.0\]"),
        ("train.batch_size", 0, r"train.batch_size=0 is out of range"),
        ("data.train_size", 0, r"data.train_size=0 would make an empty split"),  # an empty dataset
        ("train.model_rows", 0, r"loss.value_on='mix' needs rows sampled from the model"),
        ("data.prompt_max", 96, r"data.prompt_max=96 leaves no room for actions"),
        ("train.nonfinite", "ignore", r"train.nonfinite='ignore' is unknown"),
        ("noise.kind", "errors", r"noise.kind='errors' needs a task with a prefix automaton"),
        ("mesh.tensor", 0, r"mesh.tensor=0 is out of range"),
        ("mesh.rules", "lm_head=model", r"mesh.rules 'lm_head=model' names \['model'\]"),
    ],
)
def test_bad_config_is_refused_before_anything_is_built(cfg, tmp_path, key, value, message):
    with pytest.raises(validate.ConfigError, match=message):
        train.train(_edited(cfg, key, value), str(tmp_path / "w"))
    assert not (tmp_path / "data").exists()  # no dataset was built


def test_offline_value_term_needs_no_model_rows(cfg):
    cfg.train.model_rows, cfg.loss.value_on = 0, "data"
    validate.check_config(cfg)  # compatible: no error


def test_text_row_longer_than_seq_len_is_refused():
    c = text.get_config("smoke")
    c.data.seq_len = c.data.text.prompt_tokens + 1
    with pytest.raises(validate.ConfigError, match=r"data.seq_len=\d+ is shorter than a text row"):
        validate.check_config(c)


def test_every_problem_is_reported_at_once(cfg):
    cfg.train.batch_size, cfg.noise.rate = 0, -1.0
    with pytest.raises(validate.ConfigError) as e:
        validate.check_config(cfg)
    assert "train.batch_size=0" in str(e.value) and "noise.rate=-1.0" in str(e.value)


def test_command_line_override_typo_names_the_closest_key():
    argv = ["--config=configs/arithmetic.py:smoke", "--workdir=/x", "--config.loss.chi2coef=0.5"]
    with pytest.raises(validate.ConfigError, match=r"did you mean 'loss.chi2_coef'"):
        cli.load_and_check_overrides(argv)
    cli.load_and_check_overrides([*argv[:2], "--config.loss.chi2_coef=0.5"])  # a known key


def test_bkspc_id_inside_the_base_vocabulary_is_refused():
    class Clash(CharTokenizer):
        @property
        def bkspc_id(self):
            return 3  # an ordinary token's id

    ok = CharTokenizer("0123456789+=")
    validate.check_tokenizer(ok)
    bad = Clash("0123456789+=")
    with pytest.raises(validate.ConfigError, match=r"<bkspc> id 3 must be vocab_size=\d+"):
        validate.check_tokenizer(bad)


def test_missing_asset_names_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("SMATCH_JAX_ASSETS", str(tmp_path / "empty_cache"))
    c = text.get_config("smoke")
    c.data.data_dir = str(tmp_path / "data")
    with pytest.raises(assets.AssetMissingError, match=r"python -m smatch_jax.main.assets fetch"):
        train.train(c, str(tmp_path / "w"))


def test_workdir_under_a_file_is_not_writable(cfg, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(validate.WorkdirError, match=r"is not writable.*choose another --workdir"):
        train.train(cfg, str(tmp_path / "file" / "w"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_workdir_is_not_writable(cfg, tmp_path):
    wd = tmp_path / "ro"
    wd.mkdir()
    wd.chmod(0o500)
    try:
        with pytest.raises(validate.WorkdirError, match="is not writable"):
            train.train(cfg, str(wd))
    finally:
        wd.chmod(0o700)


def test_too_little_free_space_is_refused(tmp_path, monkeypatch, caplog):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 20, 9 << 20, 1 << 20))
    with pytest.raises(validate.WorkdirError, match=r"1.0 MB free but one checkpoint needs"):
        validate.check_free_space(tmp_path, 2 << 20, keep=3)
    validate.check_free_space(tmp_path, 300 << 10, keep=3)  # fits once, not keep + 1 times
    assert "keeping 3 checkpoints" in caplog.text


def test_workdir_of_another_config_is_refused_with_a_diff(cfg, tmp_path):
    wd = tmp_path / "w"
    wd.mkdir()
    (wd / "config.json").write_text(json.dumps(cfg.to_dict()))
    other = tiny_config(tmp_path / "data")
    other.loss.chi2_coef, other.seed = 0.5, 3
    with pytest.raises(validate.WorkdirError) as e:
        train.train(other, str(wd))
    msg = str(e.value)
    assert "loss.chi2_coef: 0.25 (workdir) -> 0.5 (now)" in msg and "seed: 0 (workdir) -> 3" in msg
    assert "--force_resume" in msg and not (tmp_path / "data").exists()
    # Forced: accepted, the workdir unchanged until the restore succeeds; then the old config
    # is kept next to the new one.
    before = (wd / "config.json").read_text()
    diff = validate.prepare_workdir(wd, other.to_dict(), force=True)
    assert diff and (wd / "config.json").read_text() == before
    assert not (wd / "config.previous.json").exists()
    train._write_config(other, wd, forced=diff)
    assert json.loads((wd / "config.previous.json").read_text())["seed"] == 0
    assert json.loads((wd / "config.json").read_text())["seed"] == 3


def test_a_workdir_another_process_trains_in_is_refused(cfg, tmp_path):
    wd = tmp_path / "w"
    wd.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from smatch_jax import validate; "
         "f = validate.lock_workdir(sys.argv[1]); print('held', flush=True); time.sleep(300)",
         str(wd)],
        cwd=os.path.dirname(os.path.dirname(__file__)), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(validate.WorkdirError) as e:
            train.train(cfg, str(wd))
        assert f"pid {holder.pid} on " in str(e.value) and "is training in" in str(e.value)
        assert "choose another --workdir" in str(e.value)
        assert not (tmp_path / "data").exists()  # refused before anything was built
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with validate.lock_workdir(wd):  # a killed holder leaves no stale lock
        with pytest.raises(validate.WorkdirError, match=f"pid {os.getpid()} on "):
            validate.lock_workdir(wd)
        validate.lock_workdir(wd, process=1).close()  # another host's lock is its own


def test_run_length_and_cadence_may_change_on_resume(cfg, tmp_path):
    wd = tmp_path / "w"
    wd.mkdir()
    (wd / "config.json").write_text(json.dumps(cfg.to_dict()))
    longer = tiny_config(tmp_path / "data", num_steps=100, log_every=7, ckpt_every=9)
    diff = validate.prepare_workdir(wd, longer.to_dict())
    assert set(diff) == {"train.num_steps", "train.log_every", "train.ckpt_every"}


def test_a_workdir_saved_before_task_subsections_resumes(cfg, tmp_path):
    """A config.json from before `data.<task>` subsections (every task's fields flat in
    `data`, the other tasks' at their old defaults) is the same run, not another config."""
    old = cfg.to_dict()
    data = old["data"]
    for name in ("grammar", "text"):
        del data[name]
    data.update(data.pop("arithmetic"))
    data.update(corpus="", prompt_tokens=0, completion_tokens=0, max_files=0, split_seed=-1)
    data.update(max_depth=6, max_len=40, p_end=0.3, p_open=0.5)  # the old flat defaults
    wd = tmp_path / "w"
    wd.mkdir()
    (wd / "config.json").write_text(json.dumps(old))
    assert validate.prepare_workdir(wd, cfg.to_dict()) == {}
    changed = cfg.to_dict()
    changed["data"]["arithmetic"]["difficulty"] = "hard"
    with pytest.raises(validate.WorkdirError, match=r"data.arithmetic.difficulty: 'all'"):
        validate.prepare_workdir(wd, changed)


def test_every_shipped_config_passes():
    for v in arithmetic.VARIANTS:
        validate.check_config(arithmetic.get_config(v))
    for v in ("smoke", "mle", "mle_ul", "bc", "sm_chi2", "gpt2", "smollm2", "smoke,bc"):
        validate.check_config(text.get_config(v))
