"""Does V know where the answer went wrong? Value-guided deletion on trained arithmetic runs.

    python -m experiments.value_guided --runs /tmp/smatch_jax_experiments/arithmetic/runs_long

SequenceMatch's V separates already-wrong from still-correct states of its own samples better
than BC's (`arithmetic_long.md`, AUC of -V 0.68 vs 0.62 at noise 0.1), but its policy does not
use that: its deletions are no more precise than BC's. This decoder uses V directly: greedy
without repeating a deleted token (`greedy_no_repeat`), plus `<bkspc>` forced whenever
V(s) = logsumexp(logits(s)) fell by more than a threshold `delta` since the state before the
last token (`SamplingConfig.value_drop_bkspc`); the ban then makes greedy try the next token at
that state. It needs no training: every finished run is re-decoded.

Protocol: `delta` is chosen per method on the validation questions (500 per seed, the training
difficulty, never the test questions), from `--deltas`; then the test questions are decoded
once with the chosen `delta` and with the plain headline decoding. One row per method (its
seeds' decodings). Writes `experiments/results/value_guided.{md,json,png}`.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax

from experiments import common
from experiments.common import plt
from smatch_jax.eval import accuracy, decoding, mechanism, report

METHODS = {  # run-name prefix: label
    "mle_n0": "MLE",
    "bc_n0.1": "BC, noise 0.1",
    "sm_gt_n0.1": "SequenceMatch, noise 0.1",
    "sm_gt_n0": "SequenceMatch, noise 0",
}
DELTAS = (0.0, 3.0, 6.0, 8.0, 10.0, 12.0, 16.0)


_load = functools.lru_cache(maxsize=2)(report.load_model)  # one run, both splits


def decode_accuracy(workdir: Path, split: str, delta: float) -> dict[str, float]:
    """Exact match, deletions per question and deletion precision of one run on `split`."""
    run, _, model = _load(str(workdir), split=split)
    ev, tok = run.data.eval_split, run.data.tokenizer
    cfg = decoding.decoding_config("greedy_no_repeat", run.settings.sampling.max_new_tokens)
    cfg = dataclasses.replace(cfg, value_drop_bkspc=delta)
    prompts = [ev["tokens"][b, : ev["prompt_len"][b]].tolist() for b in range(len(ev["answer"]))]
    dec = decoding.decode(
        model, prompts, tok, cfg, width=run.settings.prompt_max, key=jax.random.key(0)
    )
    correct = accuracy.exact_match(dec, ev["prompt_len"], ev["answer"], tok)
    ref = [ev["tokens"][b, : ev["length"][b]].tolist() for b in range(len(prompts))]
    dels = mechanism.deletion_stats(dec.actions, ev["prompt_len"], ref, tok.bkspc_id)
    return {
        "accuracy": float(correct.mean()),
        "deletions": float(dec.n_bkspc.mean()),
        "deletion_precision": dels["deletion_precision"],
    }


def run(job: common.Job, wd: Path, ctx: common.Context) -> dict:
    """One method's seeds: every delta on the validation questions, the best one (ties: off)
    and the headline decoding on the test questions."""
    deltas = [float(d) for d in ctx.args.deltas.split(",")]
    wds = [Path(ctx.args.runs) / f"{job.name}_s{s}" for s in range(ctx.args.seeds)]
    missing = [str(w) for w in wds if not (w / "result.json").exists()]
    if missing:
        raise SystemExit(f"unfinished runs: {missing}; run experiments.arithmetic first")
    val: dict[float, list[dict]] = {d: [] for d in deltas}
    for w in wds:  # run by run, so that each model is loaded once per split
        for d in deltas:
            val[d].append(decode_accuracy(w, "validation", d))
    means = {d: common.mean_ci([r["accuracy"] for r in v])[0] for d, v in val.items()}
    best = max(deltas, key=lambda d: (means[d], d == 0.0))  # ties: keep it off
    print(f"{job.name}: validation {means} -> delta {best:g}", flush=True)
    test = {"off": [], "chosen": [], "delta": best}
    for w in wds:
        test["off"].append(decode_accuracy(w, "test", 0.0))
        test["chosen"].append(decode_accuracy(w, "test", best))
    return {"validation": {str(d): v for d, v in val.items()}, "test": test}


def summarise(rows: list[dict], ctx: common.Context) -> str:
    val = {r["name"]: {float(d): v for d, v in r["validation"].items()} for r in rows}
    test = {r["name"]: r["test"] for r in rows}
    deltas = sorted(next(iter(val.values())))
    return report(val, test, deltas, ctx.header, Path(ctx.args.runs), ctx.out)


def report(val, test, deltas, header, runs: Path, out: Path) -> str:
    vrows = [
        [label, *[common.mean_cell(val[p][d], "accuracy") for d in deltas]]
        for p, label in METHODS.items()
        if p in val
    ]
    vdel = [
        [label, *[common.mean_cell(val[p][d], "deletions") for d in deltas]]
        for p, label in METHODS.items()
        if p in val
    ]
    vprec = [
        [label, *[common.mean_cell(val[p][d], "deletion_precision") for d in deltas]]
        for p, label in METHODS.items()
        if p in val
    ]
    trows = []
    for p, label in METHODS.items():
        if p not in test:
            continue
        t = test[p]
        trows.append(
            [
                label,
                f"{t['delta']:g}",
                common.mean_cell(t["off"], "accuracy"),
                common.mean_cell(t["chosen"], "accuracy"),
                common.mean_cell(t["chosen"], "deletions"),
                common.mean_cell(t["chosen"], "deletion_precision"),
            ]
        )
    heads = [f"delta {d:g}" if d else "off" for d in deltas]
    mean = lambda rs: common.mean_ci([r["accuracy"] for r in rs])[0]
    on = [d for d in deltas if d]
    worst = {p: min(mean(val[p][d]) - mean(val[p][0.0]) for d in on) for p in val}
    best = {p: max(mean(val[p][d]) - mean(val[p][0.0]) for d in on) for p in val}
    if all(test[p]["delta"] == 0 for p in val):
        verdict = (
            "**Verdict: value-guided deletion does not help.** On the validation questions every "
            f"delta tried changes accuracy by {min(worst.values()):+.3f} to "
            f"{max(best.values()):+.3f} against the headline decoding, for every method, "
            "so the rule is chosen off everywhere and the test accuracies are the headline's. "
            "A large drop in V does flag wrong states (the deletions it forces are mostly of "
            "wrong tokens), but too many right ones are deleted too, and with `no_repeat_deleted` "
            "a deleted right token cannot come back.\n\n"
        )
    else:
        verdict = (
            "Chosen on validation: "
            + ", ".join(f"{METHODS[p]} delta {test[p]['delta']:g}" for p in val)
            + "; the test table compares them with the headline decoding.\n\n"
        )
    _plot(val, deltas, out.with_suffix(".png"))
    return (
        "# Value-guided deletion: does V know where the answer went wrong?\n\n"
        + header
        + f"\nRuns: `{runs}` (the `--base long` sweep of experiments.arithmetic, 3 seeds). "
        "Decoding: greedy_no_repeat, plus `<bkspc>` forced when V = logsumexp(logits) fell by "
        "more than delta since the previous state. Cells: mean ± half-width of the 95% "
        "t-interval over the seeds' runs.\n\n"
        + verdict
        + "## Validation questions (500 per seed): choosing delta\n\n"
        + common.markdown_table(["method", *heads], vrows)
        + "\n**Deletions per question**\n\n"
        + common.markdown_table(["method", *heads], vdel)
        + "\n**Deletion precision (deleted tokens that were wrong)**\n\n"
        + common.markdown_table(["method", *heads], vprec)
        + f"\n![validation accuracy vs delta]({out.name}.png)\n\n"
        "## Test questions, once\n\n"
        + common.markdown_table(
            [
                "method",
                "delta chosen",
                "headline (off)",
                "value-guided",
                "deletions",
                "deletion precision",
            ],
            trows,
        )
    )


def _plot(val, deltas, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for p, label in METHODS.items():
        if p not in val:
            continue
        ms = [common.mean_ci([r["accuracy"] for r in val[p][d]]) for d in deltas]
        ax.errorbar(deltas, [m for m, _ in ms], yerr=[h for _, h in ms], fmt="-o", label=label)
    ax.set_xlabel("delta (0: off)")
    ax.set_ylabel("validation exact match")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    common.save(fig, path)


EXPERIMENT = common.Experiment(
    module="experiments.value_guided",
    doc=__doc__,
    workdir="/tmp/smatch_jax_experiments/value_guided",
    what="decoding (no training)",
    name=lambda a: "value_guided",
    plan=lambda ctx: [common.Job(prefix, prefix) for prefix in METHODS],
    run=run,
    summarise=summarise,
    flags={
        "runs": dict(
            default="/tmp/smatch_jax_experiments/arithmetic/runs_long",
            help="the trained runs (`python -m experiments.arithmetic --base long`)",
        ),
        "deltas": dict(default=",".join(f"{d:g}" for d in DELTAS)),
    },
)

if __name__ == "__main__":
    common.main(EXPERIMENT)
