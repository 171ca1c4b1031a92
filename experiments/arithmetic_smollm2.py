"""The paper's arithmetic on a real pretrained LM: SmolLM2-135M-Instruct + LoRA, its own tokenizer.

    python -m experiments.arithmetic_smollm2 --calibrate  # zero-shot and MLE on validation
    python -m experiments.arithmetic_smollm2              # MLE, BC, SequenceMatch x seeds
    python -m experiments.arithmetic_smollm2 --summarise_only

The paper fine-tunes Llama-2-7B on `add_or_sub_in_base`; every other arithmetic result here is
a 0.2M-parameter model pretrained from scratch on characters. This experiment fine-tunes a
real pretrained LM directly (no pretraining stage): SmolLM2-135M-Instruct from its 4-bit GGUF
(the `smollm2` asset), LoRA rank 16 on the attention and MLP projections plus the `<bkspc>`
rows, questions rendered as "Question: ...\\nAnswer: ..." in SmolLM2's tokenizer
(`configs/arithmetic.py:smollm2`). Methods: MLE, BC (noise + `<bkspc>`) and SequenceMatch
with ground-truth noise, at noise 0.1 (`--noise 0.05,0.1` adds a level), `--seeds` seeds; then
one ablation on seed 0 (`ABLATIONS`: SequenceMatch at temperature 0.001).

A run costs 0.5-2 h on 2 CPU cores, so the sweep spans sessions: each finished run's row is
appended to `experiments/results/arithmetic_smollm2.json` at once (commit it), and a run whose
row is already there is skipped, also on a new machine with an empty `--workdir` (this
experiment's --out is the committed file by default). Two processes may share the sweep (the
same command twice, or `--only NAME` in the second; their rows merge). The
difficulty and step count were chosen with `--calibrate` on validation questions
(`arithmetic_smollm2_calibration.md`), never on the test questions.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import numpy as np

from configs import arithmetic as arith_config
from experiments import arithmetic, common
from smatch_jax import train

NAME = "arithmetic_smollm2"
METHODS = {"mle": "mle", "bc": "bc", "sm_gt": "sm_chi2"}  # result key: config variant
CALIBRATION_STEPS_EVAL = 100  # --calibrate: validation accuracy every this many steps
# One change from SequenceMatch's defaults, trained after the sweep on seed 0 at noise 0.1 and
# compared with that seed's SequenceMatch and BC rows (the same questions): the defaults were
# chosen on models trained from scratch, whose V is 10-14 nats; SmolLM2's is 25-37, and the r^2
# term it scales was 0.18-0.79 in the sweep's last steps against 0.12-0.16 for the toy models.
ABLATIONS = {"sm_gt_t0.001": ("SequenceMatch, temperature 0.001", "loss.temperature", 0.001)}
ABLATION_NOISE, ABLATION_SEED = 0.1, 0


def base_config(variant: str, seed: int, data_dir: str = ""):
    c = arith_config.get_config(f"smollm2,{variant}")
    c.seed, c.data.data_dir = seed, data_dir
    c.train.eval_every = c.train.num_steps  # one evaluation, at the end (minutes at 135M)
    return c


def plan(seeds: int, levels: list[float], data_dir: str = "") -> list[common.Job]:
    """Per seed: SequenceMatch and BC at each noise level, then MLE; then each of ABLATIONS
    (seed 0, one config field changed from SequenceMatch's)."""
    runs = []
    for seed in range(seeds):
        for noise in levels:
            for key in ("sm_gt", "bc"):
                c = base_config(METHODS[key], seed, data_dir)
                c.noise.rate = noise
                runs.append(common.Job(f"{key}_n{noise:g}_s{seed}", key, c, noise, seed))
        c = base_config("mle", seed, data_dir)
        runs.append(common.Job(f"mle_n0_s{seed}", "mle", c, 0.0, seed))
    for name, (_, field, value) in ABLATIONS.items():  # after the sweep: seed 0 has its rows
        c = base_config(METHODS["sm_gt"], ABLATION_SEED, data_dir)
        c.noise.rate = ABLATION_NOISE
        section, key = field.split(".")
        c[section][key] = value
        runs.append(common.Job(name, name, c, ABLATION_NOISE, ABLATION_SEED))
    return runs


def step_times(workdir: Path, warmup: int, log_every: int) -> dict[str, float]:
    """Median wall seconds per step (refills included) in the BC warm-up and after it, from
    metrics.jsonl; the first logged interval of each phase (compilation) is left out. And
    `train_s`: the training time of all the run's invocations (a resumed run's `wall_s` is
    its last invocation's), evaluations excluded."""
    bc, sm = [], []
    total, prev = 0.0, 0
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        s, v = rec.get("step", 0), rec.get("sec_per_step")
        if v is None:
            continue
        total, prev = total + v * (s - prev), s
        if log_every < s <= warmup:
            bc.append(v)
        elif s > warmup + log_every:
            sm.append(v)
    out = {"train_s": total} if prev else {}
    if bc:
        out["sec_per_step_warmup"] = statistics.median(bc)
    if sm:
        out["sec_per_step_after_warmup"] = statistics.median(sm)
    return out


def run(job: common.Job, wd: Path, ctx: common.Context) -> dict:
    """`experiments.arithmetic`'s fine-tuning of a job (its config names the model), plus the
    measured step times; --calibrate: the MLE run evaluated on validation questions every
    CALIBRATION_STEPS_EVAL steps, its curve."""
    c = job.config
    c.data.data_dir = ctx.data_dir
    if ctx.args.calibrate:
        state, _ = train.train(c, str(wd), progress_every_s=common.PROGRESS_S)
        if int(state.step) < c.train.num_steps:  # preempted (SIGTERM): saved, not done
            raise SystemExit(f"{job.name} stopped at step {int(state.step)}; rerun to resume")
        records = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
        times = step_times(wd, c.loss.bc_warmup_steps, c.train.log_every)
        return {"curve": [r for r in records if "eval/accuracy" in r], **times}
    res = arithmetic.make_train_fn(c.model.init, ctx.data_dir)(job, wd)
    return {**res, **step_times(wd, c.loss.bc_warmup_steps, c.train.log_every)}


FIRST_NUMBER = re.compile(r"-?[0-9a-z]+")


def zero_shot(seed: int, data_dir: str, split: str = "test") -> dict:
    """The pretrained model before any fine-tuning, greedy, on `split` of `seed`'s questions
    (`zero_shot_eval` of the smollm2 config)."""
    c = base_config("mle", seed, data_dir)
    c.data.eval_split = split
    row = zero_shot_eval(c)
    row["name"] = f"zero_shot_s{seed}" + ("" if split == "test" else f"_{split}")
    return row


def zero_shot_eval(c) -> dict:
    """The model of config `c` as it is initialised (a pretrained model: before fine-tuning),
    greedy on its evaluation split: exact match (the answer and then eos), and the lenient
    figure: the first number it writes equals the answer (a chat model rarely stops where
    the data's eos is)."""
    import jax
    from flax import nnx

    from smatch_jax import run as run_lib
    from smatch_jax.eval import decoding

    run = run_lib.setup(c)
    model = nnx.merge(run.graphdef, run.init_state().params, run.frozen)
    ev, tok = run.data.eval_split, run.data.tokenizer
    m = ev["prompt_len"]
    prompts = [ev["tokens"][b, : m[b]].tolist() for b in range(len(m))]
    cfg = decoding.decoding_config("greedy", run.settings.sampling.max_new_tokens)
    dec = decoding.decode(
        model, prompts, tok, cfg, width=run.settings.prompt_max, key=jax.random.key(0),
        floor_len=m, batch_size=128,
    )  # fmt: skip
    texts = [tok.decode(f[int(k) :]) for f, k in zip(dec.final, m, strict=True)]
    first = [(FIRST_NUMBER.findall(t) or [""])[0] for t in texts]
    answers = [a.strip() for a in ev["answer"]]
    exact = [t.strip() == a for t, a in zip(texts, answers, strict=True)]
    lenient = [f == a for f, a in zip(first, answers, strict=True)]
    return {
        "name": "zero_shot",
        "method": "zero_shot",
        "noise": 0.0,
        "seed": c.seed,
        "split": run.data.eval_name,
        "eval/accuracy": float(np.mean(exact)),
        "eval/accuracy_first_number": float(np.mean(lenient)),
        "eval/n": float(len(m)),
        "samples": [
            f"{tok.decode(p)!r} -> {t!r}" for p, t in zip(prompts[:4], texts, strict=False)
        ],
    }


def calibration_plan() -> list[common.Job]:
    """--calibrate: MLE at the config's step count, evaluated (greedy) on validation questions
    every CALIBRATION_STEPS_EVAL steps, beside the zero-shot figure (`setup`): the numbers the
    difficulty and step count were chosen by (MLE should land between 0.3 and 0.7: room to
    gain and to lose)."""
    c = base_config("mle", 0)
    c.data.eval_split, c.eval.decodings, c.eval.recovery = "validation", "greedy", False
    c.train.eval_every = CALIBRATION_STEPS_EVAL
    return [common.Job("mle", "mle", c)]


def summarise_calibration(rows: list[dict], header: str) -> str:
    zero, mle = common.split(rows, "zero_shot_s0_validation")[0], common.split(rows, "mle")[0]
    c = calibration_plan()[0].config
    table = [
        [
            "pretrained, zero-shot",
            0,
            f"{zero['eval/accuracy']:.3f}",
            f"{zero['eval/accuracy_first_number']:.3f} (first number)",
        ]
    ]
    for r in mle.get("curve", []):
        lo, hi = r["eval/accuracy_ci_low"], r["eval/accuracy_ci_high"]
        table.append(["MLE", r["step"], f"{r['eval/accuracy']:.3f}", f"[{lo:.3f}, {hi:.3f}]"])
    return (
        "# Arithmetic on SmolLM2-135M: calibration on validation questions\n\n"
        + header
        + "\nSeed 0's 500 validation questions (difficulty "
        f"`{c.data.arithmetic.difficulty}`, never the "
        f"test questions), greedy exact match. MLE: `configs/arithmetic.py:smollm2,mle` "
        f"({c.train.num_steps} steps, lr {c.optim.lr:g} cosine, LoRA rank "
        f"{c.model.lora_rank}, {c.train.batch_size} rows of {c.data.seq_len} tokens), "
        f"evaluated every {CALIBRATION_STEPS_EVAL} steps of the one run (so the earlier points "
        "are mid-schedule, not shorter runs). Median "
        f"{mle.get('sec_per_step_after_warmup', float('nan')):.1f} s per MLE step.\n\n"
        + common.markdown_table(["model", "step", "exact match", "95% interval"], table)
        + "\nZero-shot samples:\n\n"
        + "".join(f"- `{s}`\n" for s in zero["samples"])
    )


def differences(by: dict, noise: float) -> str:
    """SM - MLE and SM - BC in headline exact match: paired by seed (each seed has its own
    training and test questions), mean and 95% t-interval over seeds, and the interval of
    the question sampling alone (from each run's bootstrap interval, unpaired)."""
    sm = {r["seed"]: r for r in by.get(("sm_gt", noise), [])}
    lines = []
    for other, label in (("mle", "MLE"), ("bc", "BC")):
        rs = by.get(("mle", 0.0) if other == "mle" else (other, noise), [])
        pairs = [(sm[r["seed"]], r) for r in rs if r["seed"] in sm]
        if not pairs:
            continue
        d = [a["eval/accuracy"] - b["eval/accuracy"] for a, b in pairs]
        mean, half = common.mean_ci(d)
        se = lambda r: (r["eval/accuracy_ci_high"] - r["eval/accuracy_ci_low"]) / 3.92
        q_half = 1.96 * float(np.sqrt(sum(se(a) ** 2 + se(b) ** 2 for a, b in pairs))) / len(d)
        seeds = ", ".join(f"{x:+.3f}" for x in d)
        over = f"± {half:.3f} over {len(d)} seeds" if len(d) > 1 else "one seed"
        lines.append(
            f"- SequenceMatch − {label} (noise {noise:g}): **{mean:+.3f}** ({over}; per seed "
            f"{seeds}); question sampling alone ± {q_half:.3f}\n"
        )
    return "".join(lines)


def ablation_section(rows: list[dict]) -> str:
    """Each ablation beside its seed's SequenceMatch and BC rows (same questions, same noise):
    one seed, so only the question-sampling interval is known."""
    same = lambda r: r["noise"] == ABLATION_NOISE and r["seed"] == ABLATION_SEED
    base = {r["method"]: r for r in rows if r["method"] in ("bc", "sm_gt") and same(r)}
    abl = [r for r in rows if r["method"] in ABLATIONS and same(r)]
    if not abl:
        return ""
    keys = [
        ("eval/accuracy_sample", "sample"),
        ("eval/recovery", "recovery"),
        ("eval/bkspc_per_sample", "`<bkspc>`/sample"),
        ("eval/mech_deletion_precision", "deletion precision"),
        ("eval/mech_deletion_recall", "deletion recall"),
        ("eval/mech_auc_pi_bkspc", "AUC pi(bkspc)"),
        ("eval/mech_auc_neg_v", "AUC -V"),
        ("sm/r2_term", "r^2 term"),
        ("sec_per_step_after_warmup", "s/step"),
    ]
    table = []
    for label, r in [
        (arithmetic.METHODS["bc"][0], base.get("bc")),
        ("SequenceMatch, temperature 0.01 (default)", base.get("sm_gt")),
        *[(ABLATIONS[r["method"]][0], r) for r in abl],
    ]:
        if r is None:
            continue
        acc = common.mean_cell([r], "eval/accuracy", bootstrap=True)
        table.append([label, acc, *[common.cell(r, k) for k, _ in keys]])
    return (
        f"\n## Ablation: the objective's temperature for a pretrained model's logits (seed "
        f"{ABLATION_SEED}, noise {ABLATION_NOISE:g})\n\nOne field changed from SequenceMatch's "
        "defaults, trained after the sweep and evaluated on the same test questions as the "
        "seed's rows above; the headline keeps the defaults, chosen before the sweep. The "
        "defaults were tuned on models trained from scratch (V of 10-14 nats; r^2 term "
        "0.12-0.16 at their last step); SmolLM2's V is 25-37 nats. A smaller temperature "
        "weighs the r^2 term less (a tenth at 0.001; the term's value also depends on how the "
        "logits move) and leaves the linear terms, BC plus the boundary term, as they are. "
        "One seed: the interval is the question sampling's.\n\n"
        + common.markdown_table(["setting", "accuracy", *[h for _, h in keys]], table)
    )


def summarise(rows: list[dict], header: str, out: Path) -> str:
    zero = [r for r in rows if r["method"] == "zero_shot"]
    runs = [r for r in rows if r["method"] in METHODS]
    by = common.group(runs, "method", "noise")
    levels = sorted({n for _, n in by})
    noisy = [n for n in levels if n > 0]
    labels = {m: arithmetic.METHODS[m][0] for m in METHODS}
    c = base_config("mle", 0, "")
    zs = ", ".join(
        f"seed {r['seed']}: {r['eval/accuracy']:.3f} exact, {r['eval/accuracy_first_number']:.3f}"
        " first number"
        for r in zero
    )
    times = []
    for m in METHODS:
        rs = [r for n in levels for r in by.get((m, n), [])]
        w = [r["sec_per_step_warmup"] for r in rs if "sec_per_step_warmup" in r]
        a = [r["sec_per_step_after_warmup"] for r in rs if "sec_per_step_after_warmup" in r]
        wall = [r["train_s"] / 60 for r in rs if "train_s" in r]
        if rs:
            fmt = lambda v: f"{statistics.median(v):.1f}" if v else "-"
            times.append([labels[m], len(rs), fmt(w), fmt(a), fmt(wall)])
    diag_keys = [
        ("eval/accuracy", "accuracy"),
        ("eval/accuracy_sample", "sample"),
        ("eval/recovery", "recovery"),
        ("eval/bkspc_per_sample", "`<bkspc>`/sample"),
        ("eval/mech_deletion_precision", "deletion precision"),
        ("eval/mech_auc_pi_bkspc", "AUC pi(bkspc)"),
        ("eval/mech_auc_neg_v", "AUC -V"),
        ("sec_per_step_after_warmup", "s/step"),
        ("sm/r_data", "r data"),
        ("sm/r_model", "r model"),
        ("sm/v_mean", "V mean"),
    ]
    per = lambda pairs: "".join(
        f"\n**{head}**\n\n" + arithmetic.method_table(by, levels, key) for key, head in pairs
    )
    examples = arithmetic.table2(by, noisy[-1]) if noisy else ""
    text = (
        "# Arithmetic on a pretrained LM: SmolLM2-135M-Instruct + LoRA, in its own tokenizer\n\n"
        + header
        + f"\nFine-tuned directly from the pretrained model (`configs/arithmetic.py:smollm2,"
        f"<method>`): LoRA rank {c.model.lora_rank} (alpha {c.model.lora_alpha:g}), "
        f"{c.train.num_steps} steps ({c.loss.bc_warmup_steps} of BC warm-up), lr {c.optim.lr:g}, "
        f"{c.train.batch_size} data rows (+ {c.train.model_rows} model rows for SequenceMatch, "
        f"refilled every {c.sampling.sample_every} steps) of {c.data.seq_len} tokens, "
        f"{c.data.train_size} `{c.data.arithmetic.difficulty}` training questions per seed. "
        "Held-out "
        "exact match of the final answer (after backspaces) on each seed's 200 test questions; "
        "mean ± half-width of the 95% t-interval over seeds. The pretrained model zero-shot "
        f"(greedy): {zs or 'not measured'}.\n\n"
        + common.verdict(by, levels, labels, "eval/accuracy", "Verdict (headline exact match)")
        + "\n\n"
        + arithmetic.method_table(by, levels, "eval/accuracy")
        + "\n"
        + "".join(differences(by, n) for n in noisy)
        + f"\n![accuracy]({out.name}.png)\n\n## Every decoding\n"
        + per(arithmetic.DECODINGS[1:])
        + "\n## Recovery from a corrupted answer prefix\n\nThe answer's first `j` reference "
        "tokens then one wrong token from the ground-truth noise distribution, deletable.\n"
        + per(arithmetic.RECOVERY)
        + (f"\n### The first four test questions (seed 0)\n\n{examples}" if examples else "")
        + "\n## Does the model know its own errors?\n\nOn the decoded text: a state is still "
        "correct when its answer text is a prefix of the reference's.\n"
        + per(arithmetic.MECHANISM)
        + "\n## Step times (2 CPU cores, this machine)\n\nMedian wall seconds per step "
        "(SequenceMatch: its model rows and the refills included) in the BC warm-up and after "
        "it, and the training time of a run (all its invocations, compilation included, evaluation "
        "not), in minutes (-: the runs predate that record). A run's figures are slower when "
        "another run shared the cores: `s/step` in the table below is each run's own.\n\n"
        + common.markdown_table(
            ["method", "runs", "s/step, warm-up", "s/step, after", "training (min)"], times
        )
        + ablation_section(rows)
        + "\n## Every run\n\n"
        + common.run_table(runs, diag_keys)
    )
    if runs:
        arithmetic.plot(by, levels, out.with_suffix(".png"), arithmetic.DECODINGS)
    return text


def setup(ctx: common.Context) -> list[dict]:
    """The pretrained model's zero-shot score: per seed on its test questions (--calibrate:
    seed 0's validation questions), the seeds without a row."""
    done = {r["name"] for r in ctx.rows()}
    rows = []
    for seed in [0] if ctx.args.calibrate else range(ctx.args.seeds):
        split = "validation" if ctx.args.calibrate else "test"
        if f"zero_shot_s{seed}" + ("" if split == "test" else f"_{split}") not in done:
            print(f"zero-shot, seed {seed}, {split}", flush=True)
            rows.append(zero_shot(seed, ctx.data_dir, split))
    return rows


def plan_of(ctx: common.Context) -> list[common.Job]:
    if ctx.args.calibrate:
        return calibration_plan()
    return plan(ctx.args.seeds, [float(x) for x in ctx.args.noise.split(",")])


def summarise_rows(rows: list[dict], ctx: common.Context) -> str:
    if ctx.args.calibrate:
        return summarise_calibration(rows, ctx.header)
    return summarise(rows, ctx.header, ctx.out)


EXPERIMENT = common.Experiment(
    module="experiments.arithmetic_smollm2",
    doc=__doc__,
    workdir="/tmp/smatch_jax_experiments/arithmetic_smollm2",
    out=str(common.RESULTS),
    seeds=2,
    name=lambda a: NAME + ("_calibration" if a.calibrate else ""),
    runs_dir=lambda a: "calibration" if a.calibrate else "runs",
    plan=plan_of,
    setup=setup,
    run=run,
    summarise=summarise_rows,
    flags={
        "calibrate": common.switch("zero-shot + MLE on validation"),
        "noise": dict(default="0.1", help="comma list of noise levels for BC and SM"),
    },
)

if __name__ == "__main__":
    common.main(EXPERIMENT)
