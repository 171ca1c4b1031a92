"""experiments/arithmetic_smollm2.py without training: the plan, skipping committed rows, the
differences with their intervals and the summary."""

import dataclasses
import json

import pytest

from experiments import arithmetic_smollm2 as sm2
from experiments import common


def _row(method, noise, seed, acc, **extra):
    return {
        "name": f"{method}_n{noise:g}_s{seed}",
        "method": method,
        "noise": noise,
        "seed": seed,
        "eval/accuracy": acc,
        "eval/accuracy_ci_low": acc - 0.06,
        "eval/accuracy_ci_high": acc + 0.06,
        "eval/n": 200.0,
        "wall_s": 60.0,
        "sec_per_step_warmup": 6.0,
        **extra,
    }


def test_plan_is_mle_bc_sm_per_seed_on_smollm2():
    jobs = sm2.plan(2, [0.1], "/d")
    assert [j.name for j in jobs] == [
        "sm_gt_n0.1_s0", "bc_n0.1_s0", "mle_n0_s0", "sm_gt_n0.1_s1", "bc_n0.1_s1", "mle_n0_s1",
        "sm_gt_t0.001",
    ]  # fmt: skip
    *jobs, abl = jobs
    sm0 = jobs[0].config
    assert (abl.seed, abl.noise, abl.method) == (0, 0.1, "sm_gt_t0.001")
    assert abl.config.loss.temperature == 0.001 != sm0.loss.temperature
    abl.config.loss.temperature = sm0.loss.temperature  # the one change: otherwise equal
    assert abl.config.to_dict() == sm0.to_dict()
    for j in jobs:
        c = j.config
        assert c.data.tokenizer == "smollm2" and c.model.init == "smollm2"
        assert c.model.lora_rank == 16 and c.seed == j.seed and c.data.data_dir == "/d"
        assert c.train.eval_every == c.train.num_steps  # one evaluation, at the end
        assert (c.loss.sm_weight > 0) == (j.method == "sm_gt")
        assert c.noise.rate == (0.0 if j.method == "mle" else 0.1)


def test_committed_rows_are_skipped(tmp_path, monkeypatch):
    plot = lambda fig, path: (path.write_bytes(b"plot"), common.plt.close(fig))  # (time)
    monkeypatch.setattr(common, "save", plot)
    rows = [{**_row("zero_shot", 0.0, s, 0.0), "name": f"zero_shot_s{s}"} for s in range(2)] + [
        _row("mle", 0.0, 0, 0.5)
    ]
    for r in rows[:2]:
        r["eval/accuracy_first_number"] = 0.01
    (tmp_path / "arithmetic_smollm2.json").write_text(json.dumps(rows))
    trained = []

    def fake_run(job, wd, ctx):
        trained.append(job.name)
        return _row(job.method, job.noise, job.seed, 0.4)

    exp = dataclasses.replace(sm2.EXPERIMENT, run=fake_run)  # the zero-shot rows: committed
    main = lambda *argv: common.main(exp, ["--workdir", str(tmp_path / "w"), *argv])
    main("--seeds", "1", "--out", str(tmp_path))
    assert trained == ["sm_gt_n0.1_s0", "bc_n0.1_s0", "sm_gt_t0.001"]  # MLE s0, zero-shot: rows
    again = json.loads((tmp_path / "arithmetic_smollm2.json").read_text())
    assert [r["name"] for r in again][-3:] == trained
    assert (tmp_path / "arithmetic_smollm2.png").exists()
    md = (tmp_path / "arithmetic_smollm2.md").read_text()
    assert "| SequenceMatch, temperature 0.001 | 0.400 [0.34, 0.46] |" in md  # beside its seed's
    assert "| SequenceMatch, temperature 0.01 (default) | 0.400 [0.34, 0.46] |" in md
    trained.clear()
    main("--seeds", "2", "--out", str(tmp_path), "--only", "mle_n0_s1")
    assert trained == ["mle_n0_s1"]
    trained.clear()

    def beside_another_process(job, wd, ctx):  # it finishes bc_n0.1_s1 while this one runs
        path = tmp_path / "arithmetic_smollm2.json"
        path.write_text(json.dumps([*json.loads(path.read_text()), _row("bc", 0.1, 1, 0.3)]))
        return fake_run(job, wd, ctx)

    exp = dataclasses.replace(exp, run=beside_another_process)
    main("--seeds", "2", "--out", str(tmp_path))
    assert trained == ["sm_gt_n0.1_s1"]  # bc_n0.1_s1's row appeared meanwhile: not trained again
    names = [r["name"] for r in json.loads((tmp_path / "arithmetic_smollm2.json").read_text())]
    assert names[-3:] == ["mle_n0_s1", "bc_n0.1_s1", "sm_gt_n0.1_s1"]  # the other's row kept
    assert len(names) == len(set(names)) == 9
    with pytest.raises(SystemExit, match="names no planned run"):
        main("--seeds", "1", "--only", "mle_n0_s7")


def test_differences_pair_seeds_and_give_both_intervals():
    by = {
        ("mle", 0.0): [_row("mle", 0.0, 0, 0.50), _row("mle", 0.0, 1, 0.40)],
        ("bc", 0.1): [_row("bc", 0.1, 0, 0.45), _row("bc", 0.1, 1, 0.35)],
        ("sm_gt", 0.1): [_row("sm_gt", 0.1, 0, 0.47), _row("sm_gt", 0.1, 1, 0.39)],
    }
    text = sm2.differences(by, 0.1)
    assert "SequenceMatch − MLE (noise 0.1): **-0.020**" in text
    assert "SequenceMatch − BC (noise 0.1): **+0.030**" in text
    assert "per seed -0.030, -0.010" in text
    # each run's bootstrap half-width 0.06 -> se 0.0306; 4 runs: 1.96 * 0.0612 / 2 = 0.060
    assert "question sampling alone ± 0.060" in text


def test_step_times_leave_out_compilation(tmp_path):
    lines = [{"step": s, "sec_per_step": 30.0 if s in (10, 60) else 5.0 + (s > 50) * 7}
             for s in range(10, 101, 10)]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    t = sm2.step_times(tmp_path, warmup=50, log_every=10)
    # every interval is 10 steps: 2 x 30 + 4 x 5 + 4 x 12 seconds a step
    assert t == pytest.approx(
        {"sec_per_step_warmup": 5.0, "sec_per_step_after_warmup": 12.0, "train_s": 1280.0}
    )


def test_header_sums_training_time_and_says_when_a_run_predates_it(tmp_path):
    ctx = common.context(sm2.EXPERIMENT, ["--seeds", "1", "--out", str(tmp_path)])
    ctx.jobs = sm2.plan_of(ctx)
    zero = {"name": "zero_shot_s0", "method": "zero_shot"}  # no time: not in the sum
    rows = [zero, _row("mle", 0.0, 0, 0.5, train_s=600.0), _row("bc", 0.1, 0, 0.4, train_s=1200.0)]
    text = common.header(sm2.EXPERIMENT, ctx, rows)
    assert "30.0 min of training summed over all runs" in text  # train_s, not wall_s (2 min)
    assert "Runs: 2 of the 4 planned finished." in text
    rows.append(_row("sm_gt", 0.1, 0, 0.3))  # no train_s: its wall_s (60 s) stands in, named
    text = common.header(sm2.EXPERIMENT, ctx, rows)
    assert "31.0 min of training (for a run that predates the record" in text
