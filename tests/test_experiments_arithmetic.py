"""experiments/arithmetic.py without training: the plans and the summaries (the driver that
runs and resumes them: test_experiments_driver.py)."""

import json

import numpy as np
import pytest

from experiments import arithmetic, common


def test_quick_plan_is_mle_bc_sm_at_one_noise_level():
    runs = arithmetic.plan(quick=True, seeds=3)
    assert [(r.method, r.noise, r.seed) for r in runs] == [
        ("mle", 0.0, 0),
        ("bc", 0.1, 0),
        ("sm_gt", 0.1, 0),
    ]
    mle, bc, sm = (r.config for r in runs)
    assert mle.loss.sm_weight == 0 and mle.noise.rate == 0
    assert bc.loss.sm_weight == 0 and bc.noise.rate == 0.1
    assert sm.loss.sm_weight > 0 and sm.noise.rate == 0.1 and sm.noise.kind == "ground_truth"


def test_full_plan_covers_every_method_level_and_seed():
    runs = arithmetic.plan(quick=False, seeds=3)
    assert len({r.name for r in runs}) == len(runs)
    cells = {(r.method, r.noise) for r in runs}
    for n in arithmetic.NOISE_LEVELS:
        assert ("sm_gt", n) in cells
        if n > 0:
            assert ("bc", n) in cells and ("sm_random", n) in cells
    for r in runs:
        assert {x.seed for x in runs if (x.method, x.noise) == (r.method, r.noise)} == {0, 1, 2}
        assert r.config.seed == r.seed
        if r.method == "sm_random":
            assert r.config.noise.kind == "random" and r.config.noise.rate == r.noise
        if r.method == "sm_gt_nomask":
            assert not r.config.noise.mask_noise_actions
        if r.method == "sm_nobkspc":
            assert r.config.noise.rate == 0 and not r.config.sampling.allow_bkspc


def _fake(method, noise, seed, acc):
    return {
        "method": method,
        "noise": noise,
        "seed": seed,
        "eval/accuracy": acc,
        "eval/accuracy_ci_low": acc - 0.05,
        "eval/accuracy_ci_high": acc + 0.05,
        "eval/n": 200,
        "wall_s": 1.0,
    }


def test_summary_table_means_and_plot(tmp_path):
    results = [_fake("mle", 0.0, s, a) for s, a in enumerate([0.2, 0.3])]
    results += [_fake("sm_gt", 0.1, s, a) for s, a in enumerate([0.4, 0.5])]
    results += [_fake("bc", 0.1, 0, 0.25)]
    out = tmp_path / "arith"
    text = arithmetic.summarise(results, {"eval/accuracy": 0.1}, "header\n", out)
    m, h = common.mean_ci([0.4, 0.5])
    assert m == pytest.approx(0.45) and h == pytest.approx(
        12.71 * np.std([0.4, 0.5], ddof=1) / np.sqrt(2)
    )
    row = next(line for line in text.splitlines() if line.startswith("| SequenceMatch, ground"))
    assert f"{m:.3f} ± {h:.3f}" in row
    bc = next(line for line in text.splitlines() if line.startswith("| BC"))
    assert "0.250 [0.20, 0.30]" in bc  # one seed: its bootstrap interval
    assert (tmp_path / "arith.png").stat().st_size > 1000
    json.dumps(results)  # what main writes


def test_summary_reports_every_decoding_recovery_and_table2(tmp_path):
    results = []
    for method, noise in (("mle", 0.0), ("bc", 0.1), ("sm_gt", 0.1)):
        for seed, acc in enumerate([0.3, 0.4]):
            r = _fake(method, noise, seed, acc)
            r.update({"eval/accuracy_greedy": acc - 0.1, "eval/accuracy_sample": acc / 2})
            r.update({"eval/recovery": 0.2, "eval/recovery_greedy": 0.1})
            r["eval/recovery_exact_delete_frac"] = 0.05 if method != "mle" else 0.0
            r["recovery_examples"] = [
                f"In base 7, what is {i} + 1? \t{i}x\t⌫{i + 1}\t{i + 1}\t{i + 1}\t"
                + ("right" if method != "mle" else "wrong")
                for i in range(4)
            ]
            results.append(r)
    out = tmp_path / "arith"
    text = arithmetic.summarise(results, {"eval/accuracy": 0.1}, "header\n", out)
    sections = text.split("\n## ")
    decodings = next(x for x in sections if x.startswith("Every decoding"))
    sm_greedy = [line for line in decodings.splitlines() if line.startswith("| SequenceMatch, gr")]
    m, h = common.mean_ci([0.3 - 0.1, 0.4 - 0.1])
    assert f"{m:.3f} ± {h:.3f}" in sm_greedy[0]  # the greedy table
    rec = next(x for x in sections if x.startswith("Recovery"))
    assert "0.200 ± 0.000" in rec
    row = next(
        line for line in rec.splitlines() if line.startswith("| `In base 7, what is 3 + 1?`")
    )
    assert row.count("`⌫4` → `4` ✓") == 2 and row.count("✗") == 1  # BC, SM right; MLE wrong
    for png in ("arith.png", "arith_recovery.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_last_texts_reads_the_final_dump(tmp_path):
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "step_9.txt").write_text("=== samples ===\nold\n\n")
    (tmp_path / "samples" / "step_10.txt").write_text(
        "=== samples ===\na\nb\n\n=== recovery ===\nr1\nr2\n\n"
    )
    assert common.last_texts(tmp_path) == {"samples": "a\nb", "recovery": "r1\nr2"}
    assert common.last_texts(tmp_path / "none") == {}


def test_last_eval_reads_the_latest_evaluation(tmp_path):
    lines = [{"step": 1, "loss": 2.0}, {"step": 2, "eval/accuracy": 0.1}, {"step": 3, "loss": 1}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    assert common.last_eval(tmp_path) == lines[1]


def test_results_header_gives_the_command_that_reproduces_the_file(monkeypatch):
    argv = ["--objective", "--workdir", "/w", "--only=a,b", "--seeds", "3", "--summarise_only"]
    assert (
        common.reproduce_command("experiments.arithmetic", argv)
        == "python -m experiments.arithmetic --objective --seeds 3"
    )
    monkeypatch.setattr("sys.argv", ["x", *argv])
    head = common.provenance(0.0, "experiments.arithmetic", 60.0)
    assert "Command: `python -m experiments.arithmetic --objective --seeds 3`" in head
    assert "written by `python -m experiments.arithmetic " + " ".join(argv) + "`" in head
    assert "from runs trained earlier" in head and "1.0 min of training" in head
    monkeypatch.setattr("sys.argv", ["x", "--quick"])
    assert "written by" not in common.provenance(0.0, "experiments.arithmetic", 60.0)


def test_committed_long_base_has_its_pinned_hash_and_reaches_0_6():
    from smatch_jax.models.convert import load_npz

    model, vocab = load_npz(arithmetic.LONG_BASE, sha256=arithmetic.LONG_BASE_SHA256)
    info = json.loads(arithmetic.LONG_BASE.with_suffix(".json").read_text())
    assert info["sha256"] == arithmetic.LONG_BASE_SHA256 and info["step"] == 15000
    assert info["eval/accuracy"] >= 0.6  # held-out greedy exact match of the base (issue 15)
    assert len(vocab) == model.config.vocab_size  # the text vocabulary (<bkspc> is one more row)
    assert arithmetic.LONG_BASE.stat().st_size < 20e6


def test_value_guided_summary_keeps_the_rule_off_when_it_never_helps(tmp_path):
    from experiments import value_guided

    def r(acc):
        return {"accuracy": acc, "deletions": 1.0, "deletion_precision": 0.8}

    deltas = [0.0, 4.0]
    val = {p: {0.0: [r(0.6), r(0.62)], 4.0: [r(0.5), r(0.52)]} for p in value_guided.METHODS}
    test = {p: {"off": [r(0.6)], "chosen": [r(0.6)], "delta": 0.0} for p in val}
    text = value_guided.report(val, test, deltas, "", tmp_path, tmp_path / "v")
    assert "value-guided deletion does not help" in text and "-0.100 to -0.100" in text
    test["mle_n0"]["delta"] = 4.0
    rows = [  # the rows of the results file: one per method, its deltas as json keys
        {"name": p, "validation": {str(d): v for d, v in val[p].items()}, "test": test[p]}
        for p in val
    ]
    ctx = common.context(value_guided.EXPERIMENT, ["--out", str(tmp_path)])
    text = value_guided.summarise(rows, ctx)
    assert (
        "Chosen on validation: MLE delta 4" in text and "| 0.610 ± 0.127 | 0.510 ± 0.127 |" in text
    )


def test_model_noise_plan_reuses_the_baseline_runs():
    runs = arithmetic.plan(quick=False, seeds=2, model_noise=True)
    names = {r.name for r in arithmetic.plan(quick=False, seeds=2)}
    new = [r for r in runs if r.name not in names]
    assert {r.method for r in new} == {"bc_model", "sm_model"} and len(new) == 4
    for r in new:
        assert r.config.noise.kind == "model" and r.config.noise.rate == 0.1
    assert {r.method for r in runs} - {r.method for r in new} == {"mle", "bc", "sm_gt"}


def test_middle_ground_changes_one_thing_at_a_time_on_validation_questions(tmp_path):
    from experiments import middle_ground

    runs = middle_ground.plan(seeds=1)
    assert len({r.name for r in runs}) == len(runs) == len(middle_ground.SETTINGS)
    default = next(r for r in runs if r.method.startswith("SM (defaults")).config
    for r in runs:
        assert r.config.data.eval_split == "validation"
        if r.method.startswith("SM"):
            diff = {
                f"{s}.{k}"
                for s in ("loss", "train", "sampling", "noise")
                for k in r.config[s]
                if r.config[s][k] != default[s][k]
            }
            assert diff == set(middle_ground.SETTINGS[r.method][1]), r.method
    res = [
        {"method": r.method, "seed": 0, "wall_s": 1.0, "eval/accuracy": 0.5 + 0.01 * i}
        for i, r in enumerate(runs)
    ]
    ctx = common.context(middle_ground.EXPERIMENT, ["--out", str(tmp_path)])
    text = middle_ground.summarise(res, ctx)
    assert "is `SM max_burst = 3` (0.630), against BC 0.510 and MLE 0.500; it is above BC" in text
    for r in res[2:]:
        r["eval/accuracy"] = 0.53  # +0.02 over BC: inside one seed's interval
    text = middle_ground.summarise(res, ctx)
    assert "no setting is above BC by more than the 95% half-width" in text
