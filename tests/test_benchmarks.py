"""The benchmark suite at toy size: JSON structure and its built-in correctness checks.

No timing is asserted anywhere (the machine is shared): only that every figure is produced
and that the checks inside the benchmarks hold (the no-cache reference sampler equals the
cached sampler under greedy decoding; the scaling run's losses agree across device counts).
"""

import json
import subprocess

import pytest

from benchmarks import figures, run, scaling
from benchmarks import harness as h

HEADLINE = (
    "layout_overhead_ratio",
    "bkspc_sampler_ratio",
    "no_repeat_sampler_ratio",
    "cache_speedup_256",
    "sm_step_ratio",
    "mfu",
    "train_compile_s",
)


def test_recompute_sampler_equals_cached_sampler():
    size = h.SIZES["toy"]
    assert figures.check_recompute_equals_cached(h.build_model(size), size, n_new=10)


def test_flops_count_matches_a_hand_count():
    cfg = h.SIZES["toy"].model_config()  # d 32, 2 layers, 4 heads (2 kv) of 8, ff 64, V+1 18
    per_token = 2 * (32 * 8 * (4 * 2 + 2 * 2) + 32 * 64 * 3 + 2 * 16 * 4 * 8) + 32 * 18
    assert h.forward_flops(cfg, 1, 16) == 2 * per_token * 16


@pytest.mark.slow
def test_quick_suite_at_toy_size(monkeypatch, tmp_path):
    monkeypatch.setattr(h, "TARGET_S", 0.005)
    res = run.run(
        sizes=("toy",),
        reps=1,
        sampler_reps=1,
        sampler_size="toy",
        step_size="toy",
        scaling_reps=1,
        lengths=(8,),
        device_counts=(1, 2),
        log=lambda _: None,
    )
    for k in HEADLINE:
        assert isinstance(res[k], float) and res[k] > 0, k
    assert res["greedy_recompute_equals_cached"] and res["scaling_losses_equal"]
    q1, q3 = res["layout"][0]["layout_overhead_iqr"]
    assert q1 <= res["layout"][0]["layout_overhead_ratio"] <= q3
    assert [r["devices"] for r in res["scaling"]["runs"]] == [1, 2]
    assert {r["sample_every"] for r in res["sm_cost"]["by_sample_every"]} >= {1, 10}
    samplers = {"bkspc", "plain", "no_repeat", "recompute"}
    assert set(res["sampler"]["lengths"]["8"]["tokens_per_s"]) == samplers
    assert res["compile"]["train_peak_mb"] > 0 and res["machine"]["platform"] == "cpu"
    out = tmp_path / "r.json"
    out.write_text(json.dumps(res))
    assert set(HEADLINE) <= set(json.loads(out.read_text()))
    table = run.tables(res)
    assert all(f"\n## {i}" in table for i in ("1+4.", "2.", "3.", "5.", "6."))


def test_scaling_worker_that_dies_after_reporting_keeps_its_result(monkeypatch):
    """A worker that printed its result and then died on the way out (jaxlib can abort at
    interpreter teardown on small machines) is a result with `worker_exit_code`; one that died
    before reporting is an error with its stderr."""
    outputs = iter(
        [
            subprocess.CompletedProcess([], -6, stdout='{"devices": 2}\n', stderr="abort"),
            subprocess.CompletedProcess([], 1, stdout="", stderr="ImportError: boom"),
        ]
    )
    monkeypatch.setattr(scaling.subprocess, "run", lambda *a, **k: next(outputs))
    assert scaling.run_one(2, "toy", 1, True, "float32") == {"devices": 2, "worker_exit_code": -6}
    with pytest.raises(RuntimeError, match="exit code 1 before printing its result:\nImportError"):
        scaling.run_one(2, "toy", 1, True, "float32")


def test_every_committed_pod_plan_prints_as_a_table():
    """`python -m benchmarks.plans` (the pod tables of benchmarks/RESULTS.md): every committed
    plan JSON has the fields the table reads, one row per piece."""
    from benchmarks import plans

    files = sorted(plans.PLANS.glob("*.json"))
    assert files, "no committed plans in benchmarks/plans"
    for f in files:
        plan = json.loads(f.read_text())
        out = plans.table(plan)
        assert out.count("\n| ") == len(plan["pieces"]) + 1, f.name  # header + one per piece
        assert plan["scan_layers"] in (True, False) and "donated" in plan["pieces"]["train_mle"]
