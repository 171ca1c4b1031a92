"""The objective ablations (experiments/arithmetic_objective.py, text_objective.py): plans,
the choice on validation accuracy, and the reports, without training."""

import numpy as np

from experiments import arithmetic_objective as obj
from experiments import common, text_objective


def test_arithmetic_plan_sets_every_loss_field_and_evaluates_on_validation():
    runs = obj.plan(3)
    assert len({r.name for r in runs}) == len(runs)
    per_seed = len(runs) // 3
    # MLE, BC, and every setting at both noise levels except 'environment' without noise.
    assert per_seed == 2 + 2 * len(obj.settings()) - 1
    for r in runs:
        assert r.config.data.eval_split == "validation" and r.config.seed == r.seed
        if r.method in ("mle", "bc"):
            continue
        want = {**obj.REV1, **obj.settings()[r.method]}
        assert {k: r.config.loss[k] for k in want} == want
        assert r.config.noise.rate == r.noise and r.config.loss.sm_weight > 0
    names = {(r.method, r.noise) for r in runs}
    assert ("+environment", 0.0) not in names and ("+environment", 0.1) in names
    assert ("all4 T=1 c=0.25", 0.0) in names and ("all4 T=0.01 c=0.25", 0.0) not in names


def _fake(method, noise, seed, acc):
    return {"method": method, "noise": noise, "seed": seed, "eval/accuracy": acc, "wall_s": 1.0}


def test_choice_is_the_best_mean_over_both_noise_levels_and_the_report(tmp_path):
    results = [_fake("mle", 0.0, s, 0.3) for s in range(2)]
    results += [_fake("bc", 0.1, s, 0.27) for s in range(2)]
    for name in obj.settings():
        for noise in obj.NOISES:
            if obj.same_as(name, noise):
                continue
            for s in range(2):
                acc = {"all4": 0.29, "+temperature": 0.3 if noise == 0 else 0.2}.get(name, 0.1)
                results.append(_fake(name, noise, s, acc))
    by = obj.by_cell(results)
    assert by[("+environment", 0.0)] == by[("rev1", 0.0)]  # the twin fills the skipped cell
    assert obj.choose(by, seeds=2) == "all4"  # 0.29 on both beats 0.3 / 0.2
    assert obj.choose(by, seeds=3) is None  # not every run finished
    text = obj.summarise(results, "header\n", tmp_path / "o", seeds=2)
    row = next(line for line in text.splitlines() if line.startswith("| **all4** (chosen)"))
    assert "0.290 ± 0.000" in row
    assert (tmp_path / "o.png").stat().st_size > 1000


def test_text_plan_and_report(tmp_path):
    runs = text_objective.plan(2)
    assert len(runs) == 2 * (2 + len(text_objective.SETTINGS))
    all5 = next(r for r in runs if r.method == "all5")
    assert all5.config.loss.truncated_weight == 0.0 and all5.config.loss.temperature == 0.01
    results = []
    for r in runs:
        m = {
            f"text/{k}": float(np.random.default_rng(len(r.name)).random())
            for k, *_ in text_objective.COLUMNS
        }
        results.append({"method": r.method, "seed": r.seed, "wall_s": 1.0, **m})
    pre = {f"text/{k}": 0.5 for k, *_ in text_objective.COLUMNS}
    text = text_objective.summarise(results, pre, "header\n", tmp_path / "t", seeds=2)
    assert text.count("\n| all5 |") == 3 and "pretrained model" in text  # table, 2 runs
    m, h = common.mean_ci([r["text/mauve"] for r in results if r["method"] == "all5"])
    assert f"{m:.3f} ± {h:.3f}" in next(x for x in text.splitlines() if x.startswith("| all5"))
    assert (tmp_path / "t.png").stat().st_size > 1000


def test_configured_defaults_are_a_setting_of_both_ablations_and_the_verdict():
    assert obj.configured_defaults() == "all4 normalize=token+drop_truncated"
    assert obj.configured_defaults(text_objective.SETTINGS) == "all5 normalize=token"
    d = obj.configured_defaults()
    by = {
        ("mle", 0.0): [{"test/accuracy_greedy": a} for a in (0.25, 0.3, 0.35)],
        ("bc", 0.1): [{"test/accuracy_greedy": a} for a in (0.20, 0.21, 0.22)],
        (d, 0.0): [{"test/accuracy_greedy": a} for a in (0.28, 0.29, 0.30)],
        (d, 0.1): [{"test/accuracy_greedy": a} for a in (0.30, 0.31, 0.32)],
    }
    text = obj.verdict(by, d)
    assert "at noise 0 0.290 ± 0.025 against MLE 0.300 ± 0.124 (within its 95% interval)" in text
    assert "against BC 0.210 ± 0.025 (above its 95% interval)" in text
    assert obj.verdict({}, d) == ""  # no test numbers yet: no verdict
