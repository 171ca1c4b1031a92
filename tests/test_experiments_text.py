"""experiments/text.py without training: the plan and the summary of a toy result list."""

import json

import numpy as np
import pytest

from configs import text as text_config
from experiments import text


def test_plan_is_four_methods_per_seed_on_one_dataset():
    runs = text.plan(seeds=2)
    assert [(r.method, r.seed) for r in runs] == [(m, s) for s in (0, 1) for m in text.METHODS]
    assert len({r.name for r in runs}) == len(runs)
    by = {(r.method, r.seed): r.config for r in runs}
    assert by["mle", 1].seed == 1 and by["mle", 1].noise.rate == 0
    assert by["mle_ul", 0].loss.unlikelihood_weight > 0
    assert by["bc", 0].loss.sm_weight == 0 and by["bc", 0].noise.rate > 0
    assert by["sm_chi2", 0].loss.sm_weight > 0
    assert by["bc", 0].noise.to_dict() == by["sm_chi2", 0].noise.to_dict()  # the same noise
    pre = text_config.get_config("pretrain")
    for c in by.values():  # every run shares the pretraining's dataset and tokenizer
        assert c.data.text.split_seed == pre.data.text.split_seed == 0
        assert c.data.tokenizer == pre.data.tokenizer and c.model.preset == pre.model.preset
        assert (c.data.text.prompt_tokens, c.data.seq_len) == (
            pre.data.text.prompt_tokens,
            pre.data.seq_len,
        )


PROTOCOL = {
    "n": 256,
    "prompt_tokens": "24-24",
    "reference_continuation_tokens": "3-24",
    "max_new_tokens": 40,
    "decoding": "ancestral sampling",
    "final_text": "after backspaces",
    "perplexity": {"scored": "continuation tokens"},
    "mauve": {
        "featurizer": "MiniLM",
        "n_generated": 256,
        "n_reference": 256,
        "settings": "defaults",
        "kmeans_seeds": [0, 1, 2],
    },
}


def _fake(method, seed, mauve_values, ppl, **extra):
    r = {
        "method": method,
        "seed": seed,
        "noise": 0.0,
        "wall_s": 10.0,
        "protocol": {**PROTOCOL, "mauve": {**PROTOCOL["mauve"], "per_seed": mauve_values}},
        "text/mauve": float(np.mean(mauve_values)),
        "text/mauve_std": float(np.std(mauve_values)),
        "text/ppl_generated": ppl,
        "text/ppl_reference": 50.0,
        "text/diversity": 0.9,
    }
    r.update({f"text/{k}": v for k, v in extra.items()})
    return r


def test_summary_table_verdict_and_plot(tmp_path):
    results = [
        _fake("mle", 0, [0.5, 0.6, 0.7], 40.0),
        _fake("mle", 1, [0.7, 0.8, 0.9], 60.0),
        _fake("sm_chi2", 0, [0.2, 0.3, 0.4], 90.0, bkspc_action_frac=0.01),
    ]
    pre = _fake("mle", 0, [0.6], 45.0, ref_diversity=0.95)
    out = tmp_path / "text"
    md = text.summarise(results, pre, "header\n", out)
    mle = next(line for line in md.splitlines() if line.startswith("| MLE |"))
    allv = [0.5, 0.6, 0.7, 0.7, 0.8, 0.9]  # 2 training seeds x 3 k-means seeds
    assert f"{np.mean(allv):.3f} ± {np.std(allv):.3f}" in mle
    assert "0.85 ± 0.03" in mle  # the paper's number beside ours
    h = 12.71 * np.std([40.0, 60.0], ddof=1) / np.sqrt(2)
    assert f"50.0 ± {h:.1f}" in mle  # perplexity: mean and t-interval over training seeds
    sm = next(line for line in md.splitlines() if line.startswith("| SequenceMatch"))
    assert "0.300 ± 0.082" in sm and "| 90.0 |" in sm and "0.0100" in sm
    assert "BC" not in md.split("## Every run")[0].split("| method")[1].split("pretrained")[0]
    ref = next(line for line in md.splitlines() if line.startswith("| reference continuations"))
    assert "| 50.0 |" in ref and "0.950" in ref
    assert "does not beat the baselines" in md
    assert md.count("| SequenceMatch (chi2-mix) | 0 |") == 1  # the every-run table
    assert (tmp_path / "text.png").stat().st_size > 1000


@pytest.mark.parametrize("variant", ["pretrain", "finetune,sm_chi2", "finetune,mle_ul"])
def test_experiment_variants_load(variant):
    c = text_config.get_config(variant)
    assert c.model.preset == "mini_llama" and c.data.text.split_seed == 0


def test_reevaluate_replaces_only_the_evaluation(tmp_path, monkeypatch):
    runs = text.plan(seeds=1)[:2]
    pre = tmp_path / "pretrain"
    for wd in (pre, tmp_path / runs[0].name):  # the second run has not finished
        wd.mkdir()
        (wd / "result.json").write_text(json.dumps({"text/old": 0.0, "loss": 2.0, "wall_s": 3}))
    seen = []

    def fake_eval(wd, pre_wd, featurizer):
        seen.append(wd.name)
        return {"text/mauve": 0.5, "protocol": {"n": 1}}

    monkeypatch.setattr(text, "evaluate_run", fake_eval)
    rows = text.reevaluate(tmp_path, runs, pre, featurizer=None)
    assert seen == ["pretrain", runs[0].name]
    got = json.loads((tmp_path / runs[0].name / "result.json").read_text())
    assert got == {"loss": 2.0, "wall_s": 3, "text/mauve": 0.5, "protocol": {"n": 1}}
    assert rows == [{"name": "pretrain", **got}, {"name": runs[0].name, **got}]  # to merge
