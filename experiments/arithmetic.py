"""The paper's Figure 3 at CPU scale: arithmetic accuracy vs noise level, per method.

    python -m experiments.arithmetic --quick   # `make run`: MLE vs BC vs SM, noise 0.1, seed 0
    python -m experiments.arithmetic           # the sweep: 4 noise levels, 3 seeds, ablations
    python -m experiments.arithmetic --objective   # the objective's ablation (revision 2)

1. Pretrain (once): a 3-layer Llama-style model (`mini_llama`, 0.2M parameters) with MLE on
   20,000 generated `add_or_sub_in_base` questions (`configs/arithmetic.py:pretrain`).
2. Fine-tune it on 5,000 other questions (per seed) with each method for 300 steps
   (`configs/arithmetic.py:finetune,<method>`): MLE; BC (MLE on noise-augmented rows with
   `<bkspc>`); SequenceMatch chi2-mix with ground-truth noise; with random noise; and the
   ablations SequenceMatch without `<bkspc>` and with `mask_noise_actions=False`.
3. Greedy exact match of the final answer (after backspaces) on 200 held-out questions, with
   the mean and 95% interval over seeds; backspace statistics and the method.md §2.6 diagnostics.

Writes `experiments/results/arithmetic[_quick].{md,json,png}`. Every run is a workdir under
`--workdir`; finished runs are reused and interrupted ones resume, so re-running the same
command continues the sweep. MLE never sees noise: its accuracy is the same at every level.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from configs import arithmetic as arith_config
from experiments import arithmetic_objective as objective
from experiments import common
from experiments.common import plt
from smatch_jax import train

METHODS = {  # key: (label, config variant, config edits)
    "mle": ("MLE", "mle", {}),
    "bc": ("BC (MLE + `<bkspc>`)", "bc", {}),
    "sm_gt": ("SequenceMatch, ground-truth noise", "sm_chi2", {}),
    "sm_random": ("SequenceMatch, random noise", "sm_random", {}),
    "sm_nobkspc": ("SequenceMatch without `<bkspc>`", "sm_nobkspc", {}),
    "sm_gt_nomask": ("SequenceMatch, gt noise, noise actions trained", "sm_chi2", {"mask": False}),
    "bc_model": ("BC, the model's own mistakes as noise", "bc", {"kind": "model"}),
    "sm_model": ("SequenceMatch, the model's own mistakes as noise", "sm_chi2", {"kind": "model"}),
}
LABELS = {m: label for m, (label, _, _) in METHODS.items()}
NOISE_LEVELS = (0.0, 0.05, 0.1, 0.2)
PAPER = (  # the paper's Figure 3 is a plot without a table: its findings, not numbers
    "The paper (Figure 3: Llama2-7B, 5,000 questions, 2 seeds; a plot, no table): SequenceMatch "
    "with ground-truth noise above MLE and BC at every noise level > 0, a small gain at noise "
    "0, and random noise helping SequenceMatch but not BC.\n"
)
ABLATION_NOISE = 0.1
TUNING = {  # --tune: SequenceMatch (gt noise 0.1, seed 0) with one setting changed at a time
    "default": {},
    "chi2_coef=1": {"loss.chi2_coef": 1.0},
    "chi2_coef=0.05": {"loss.chi2_coef": 0.05},
    "gamma=0.99": {"loss.gamma": 0.99},
    "sm_weight=0.1": {"loss.sm_weight": 0.1},
    "lr=1.5e-4": {"optim.lr": 1.5e-4},
    "bc_warmup=150": {"loss.bc_warmup_steps": 150},
    "sample_every=1": {"sampling.sample_every": 1},
    "noise=0.05": {"noise.rate": 0.05},
    "value_on=data": {"loss.value_on": "data"},
}


def tuning_plan() -> list[common.Job]:
    runs = plan(quick=True, seeds=1)[:2]  # the MLE and BC baselines of seed 0
    for label, edits in TUNING.items():
        c = arith_config.get_config("finetune,sm_chi2")
        c.noise.rate = ABLATION_NOISE
        for key, value in edits.items():
            section, field = key.split(".")
            c[section][field] = value
        name = "sm_gt_n0.1_s0" if not edits else f"tune_{label}"
        runs.append(common.Job(name, f"sm_gt {label}", c, ABLATION_NOISE, 0))
    return runs


def plan(quick: bool, seeds: int, model_noise: bool = False) -> list[common.Job]:
    if model_noise:  # noise kind 'model' against the same baselines (their runs are reused)
        grid = [("mle", 0.0), ("bc", 0.1), ("sm_gt", 0.1), ("bc_model", 0.1), ("sm_model", 0.1)]
        seed_list = list(range(seeds))
    elif quick:
        grid = [("mle", 0.0), ("bc", 0.1), ("sm_gt", 0.1)]
        seed_list = [0]
    else:
        grid = [("mle", 0.0)]
        grid += [(m, n) for n in NOISE_LEVELS if n > 0 for m in ("bc", "sm_random")]
        grid += [("sm_gt", n) for n in NOISE_LEVELS]
        grid += [("sm_nobkspc", 0.0), ("sm_gt_nomask", ABLATION_NOISE)]
        seed_list = list(range(seeds))
    runs = []
    for seed in seed_list:
        for key, noise in grid:
            _, variant, edits = METHODS[key]
            c = arith_config.get_config(f"finetune,{variant}")
            c.seed = seed
            if key not in ("mle", "sm_nobkspc"):
                c.noise.rate = noise
            if "mask" in edits:
                c.noise.mask_noise_actions = edits["mask"]
            if "kind" in edits:
                c.noise.kind = edits["kind"]
            runs.append(common.Job(f"{key}_n{noise:g}_s{seed}", key, c, noise, seed))
    return runs


def pretrain(root: Path, data_dir: str, variant: str = "pretrain") -> Path:
    """MLE pretraining (`configs/arithmetic.py:<variant>`) in `root/<variant>`, once."""
    c = arith_config.get_config(variant)
    c.data.data_dir = data_dir
    return common.pretrain(root / variant, c)


# The stronger base, committed (experiments/assets/): `configs/arithmetic.py:pretrain_long`,
# exported by `python -m experiments.arithmetic --export_base` (the same weights bit for bit
# on this machine type: the hash below is checked when a run loads the file).
LONG_BASE = common.ROOT / "experiments" / "assets" / "arithmetic_base_long.npz"
LONG_BASE_SHA256 = "9cd5fcc901623671d3e503fbadb33f9608646c2a34e46c45fd720262fcb730ba"


def export_base(root: Path, data_dir: str) -> str:
    """Pretrains the stronger base and writes it (weights, config, vocabulary) to LONG_BASE,
    with its evaluation and provenance beside it; returns the content hash to pin."""
    from smatch_jax.eval import report
    from smatch_jax.models import convert

    wd = pretrain(root, data_dir, "pretrain_long")
    run, step, model = report.load_model(str(wd))
    tok = run.data.tokenizer
    LONG_BASE.parent.mkdir(parents=True, exist_ok=True)
    sha = convert.save_npz(model, LONG_BASE, [tok.decode([i]) for i in range(tok.vocab_size)])
    info = {
        "sha256": sha,
        "command": "python -m experiments.arithmetic --export_base",
        "config": "configs/arithmetic.py:pretrain_long",
        "step": step,
        "git": common.git_revision(),
        **json.loads((wd / "result.json").read_text()),
    }
    LONG_BASE.with_suffix(".json").write_text(json.dumps(info, indent=2))
    return sha


def make_train_fn(init: str, data_dir: str, init_sha256: str = "", evaluation: dict | None = None):
    """Fine-tunes a job from `init` (a `model.init` value: the pretraining workdir as
    `ckpt:<dir>`, or the committed base as `npz:<file>` with its hash); `evaluation`: fields of
    `config.eval` (the command line's decodings)."""

    def train_fn(r: common.Job, wd: Path) -> dict:
        r.config.model.init, r.config.model.init_sha256 = init, init_sha256
        r.config.eval.update(evaluation or {})
        r.config.data.data_dir = data_dir
        state, last = train.train(r.config, str(wd), progress_every_s=common.PROGRESS_S)
        if int(state.step) < r.config.train.num_steps:  # preempted (SIGTERM): saved, not done
            raise SystemExit(f"{r.name} stopped at step {int(state.step)}; rerun to resume")
        res = {**common.last_eval(wd), **{k: float(v) for k, v in last.items()}}
        rec = common.last_texts(wd).get("recovery")
        return {**res, "recovery_examples": rec.splitlines()} if rec else res

    return train_fn


DECODINGS = [  # (result key, heading): every method under each decoding mode
    ("eval/accuracy", "greedy_no_repeat (headline)"),
    ("eval/accuracy_greedy", "greedy"),
    ("eval/accuracy_sample", "sampling at T = 1 (mean of 4 sampling seeds)"),
]
RECOVERY = [
    ("eval/recovery", "greedy_no_repeat (headline)"),
    ("eval/recovery_greedy", "greedy"),
    ("eval/recovery_sample", "sampling at T = 1"),
]


MECHANISM = [  # (result key, heading): does the model know its own errors? (eval/mechanism.py)
    ("eval/mech_deletion_precision", "Deletion precision: deleted tokens that were wrong"),
    ("eval/mech_deletion_recall", "Deletion recall: wrong tokens emitted that were later deleted"),
    (
        "eval/mech_auc_pi_bkspc",
        "AUC of pi(`<bkspc>`): already-wrong vs still-correct states of its own samples",
    ),
    ("eval/mech_auc_neg_v", "AUC of -V: already-wrong vs still-correct states"),
]


def method_table(by: dict, levels: list[float], key: str) -> str:
    """Mean ± 95% t-interval over seeds; one seed: the headline's bootstrap interval."""
    return common.noise_table(by, levels, LABELS, key, bootstrap=key == "eval/accuracy")


def table2(by: dict, noise: float) -> str:
    """The first four test questions (seed 0) with a corrupted answer prefix, every method side
    by side: its actions after the given prefix (⌫ = `<bkspc>`) and its final answer."""
    cols = []
    for method, (label, _, _) in METHODS.items():
        rs = by.get(("mle", 0.0) if method == "mle" else (method, noise), [])
        ex = next((r.get("recovery_examples") for r in rs if r["seed"] == 0), None)
        if ex:
            cols.append((label, [line.split("\t") for line in ex]))
    if not cols:
        return ""
    rows = []
    for i, (q, given, _, _, ref, _) in enumerate(cols[0][1]):
        cells = [f"`{q.strip()}` `{given}` (ref `{ref}`)"]
        for _, ex in cols:
            _, _, acts, final, _, mark = ex[i]
            cells.append(f"`{acts}` → `{final}` {'✓' if mark == 'right' else '✗'}")
        rows.append(cells)
    return common.markdown_table(["question + given prefix", *[c[0] for c in cols]], rows)


def summarise(results: list[dict], pre: dict, header: str, out: Path) -> str:
    by = common.group(results, "method", "noise")
    levels = sorted({n for _, n in by})
    acc_table = method_table(by, levels, "eval/accuracy")
    per_decoding = "".join(
        f"\n**{head}**\n\n" + method_table(by, levels, key) for key, head in DECODINGS[1:]
    )
    recovery = "".join(
        f"\n**{head}**\n\n" + method_table(by, levels, key) for key, head in RECOVERY
    )
    recovery += "\n**Deletions per question (headline decoding)**\n\n" + method_table(
        by, levels, "eval/recovery_deletions"
    )
    recovery += "\n**Deleted the wrong token and nothing else**\n\n" + method_table(
        by, levels, "eval/recovery_exact_delete_frac"
    )

    diag_keys = [
        ("eval/accuracy", "accuracy"),
        ("eval/accuracy_greedy", "greedy"),
        ("eval/accuracy_sample", "sample"),
        ("eval/recovery", "recovery"),
        ("eval/bkspc_per_sample", "`<bkspc>`/sample"),
        ("eval/bkspc_sample_frac", "samples using `<bkspc>`"),
        ("eval/bkspc_deleted_wrong_frac", "deleted token was wrong"),
        ("bc/token_accuracy", "train token acc"),
        ("sm/r_data", "r data"),
        ("sm/r_model", "r model"),
        ("sm/pi_bkspc_model", "pi(bkspc) on model rows"),
    ]
    mechanism = "".join(
        f"\n**{head}**\n\n" + method_table(by, levels, key) for key, head in MECHANISM
    )
    diag = common.run_table(results, diag_keys)
    n_seeds = len({r["seed"] for r in results})
    examples = table2(by, ABLATION_NOISE)
    text = (
        "# Arithmetic: accuracy vs noise level (the paper's Figure 3, CPU scale)"
        + (": the model's own mistakes as noise" if "model_noise" in out.name else "")
        + "\n\n"
        + header
        + "\nHeld-out exact match of the final answer (after backspaces), "
        f"{int(results[0].get('eval/n', 0))} `easy` questions per seed; mean ± half-width of "
        f"the 95% t-interval over {n_seeds} seed(s) (each seed: its own fine-tuning set and "
        "test questions; with one seed, the bootstrap 95% interval over test questions). "
        "Headline decoding: greedy without choosing a token again at a state it was deleted "
        "from (`greedy_no_repeat`; equal to greedy for a model that never deletes). MLE never "
        "sees noise: one value for every level. The pretrained "
        f"model alone scores {pre.get('eval/accuracy', float('nan')):.3f} (seed 1000 test).\n\n"
        + common.verdict(by, levels, LABELS, "eval/accuracy", "Verdict (headline exact match)")
        + "\n\n"
        + acc_table
        + "\n"
        + PAPER
        + f"\n![accuracy vs noise]({out.name}.png)\n\n## Every decoding\n"
        + per_decoding
        + "\n## Recovery from a corrupted answer prefix (the paper's Table 2)\n\n"
        "Each test question with its first `j` reference answer tokens (`j` uniform over the "
        "answer) then one wrong token from the ground-truth noise distribution, given as "
        "actions the model may delete; recovery is the fraction whose final answer after "
        "backspaces is right. MLE cannot delete: its recovery is what continuing after an "
        "error gives.\n"
        + recovery
        + f"\n![recovery vs noise]({out.name}_recovery.png)\n"
        + (
            f"\n### The first four test questions (noise {ABLATION_NOISE:g}, seed 0)\n\n" + examples
            if examples
            else ""
        )
        + "\n## Does the model know its own errors?\n\n"
        "Under the headline decoding, a token is wrong when the answer ending in it is not a "
        "prefix of the reference. Precision and recall of the deletions, then, on the model's own "
        "samples (T = 1), every visited state split into still-correct and already-wrong: the "
        "AUC with which pi(`<bkspc>`) (higher when wrong) and -V (V lower when wrong) separate "
        "them; 0.5 is no separation. The paper's mechanism predicts SequenceMatch separates "
        "them better than BC. `-`: nothing to measure (a model that never deletes has no "
        "deletion precision).\n" + mechanism + "\n## Every run\n\n" + diag
    )
    plot(by, levels, out.with_suffix(".png"), DECODINGS)
    plot(by, levels, out.with_name(out.name + "_recovery.png"), RECOVERY)
    return text


TUNING_COLUMNS = [
    ("eval/accuracy", "accuracy"),
    ("eval/accuracy_ci_low", "CI low"),
    ("eval/accuracy_ci_high", "CI high"),
    ("eval/bkspc_per_sample", "`<bkspc>`/sample"),
    ("eval/bkspc_deleted_wrong_frac", "deleted was wrong"),
    ("bc/loss", "L_BC"),
    ("sm/loss", "L_SM"),
    ("sm/r_data", "r data"),
    ("sm/r_model", "r model"),
    ("sm/v_mean", "V mean"),
    ("sm/pi_bkspc_model", "pi(bkspc) model rows"),
]


def summarise_tuning(results: list[dict], header: str) -> str:
    rows = [[r["method"], *[common.cell(r, k) for k, _ in TUNING_COLUMNS]] for r in results]
    return (
        "# Arithmetic: SequenceMatch settings tried (noise 0.1, seed 0)\n\n"
        + header
        + "\nOne setting changed at a time from `configs/arithmetic.py:finetune,sm_chi2`; "
        "the MLE and BC rows are the baselines on the same data and test questions. Training "
        "diagnostics (method.md §2.6) are those of the last logged step. Selecting settings on "
        "these test questions would bias the sweep: the sweep keeps the defaults.\n\n"
        + common.markdown_table(["run", *[h for _, h in TUNING_COLUMNS]], rows)
    )


def interval(rs: list[dict]) -> tuple[float, tuple[float, float]]:
    """Mean accuracy and its error bar: the t-interval over seeds, or one seed's bootstrap."""
    if len(rs) == 1:
        r = rs[0]
        m = r["eval/accuracy"]
        return m, (m - r["eval/accuracy_ci_low"], r["eval/accuracy_ci_high"] - m)
    m, h = common.mean_ci([r["eval/accuracy"] for r in rs])
    return m, (h, h)


def plot(by, levels, path: Path, panels: list[tuple[str, str]]) -> None:
    """One panel per decoding mode: the metric vs noise level, per method."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), sharey=True)
    for ax, (key, head) in zip(np.atleast_1d(axes), panels, strict=True):
        for method, (label, _, _) in METHODS.items():
            pts = [(n, rs) for (m, n), rs in sorted(by.items()) if m == method]
            pts = [(n, [r for r in rs if key in r]) for n, rs in pts]
            pts = [(n, rs) for n, rs in pts if rs]
            if not pts:
                continue
            if method == "mle":
                pts = [(n, pts[0][1]) for n in levels]
            xs = [n for n, _ in pts]
            if key == "eval/accuracy":
                ys, es = zip(*[interval(rs) for _, rs in pts], strict=True)
            else:
                ys, es = zip(
                    *[
                        (m, (h, h))
                        for m, h in (common.mean_ci([r[key] for r in rs]) for _, rs in pts)
                    ],
                    strict=True,
                )
            es = np.asarray(es).T  # [2, len(xs)]: below, above
            style = "--" if method == "mle" else "-o" if len(xs) > 1 else "s"
            ax.errorbar(xs, ys, yerr=es, fmt=style, capsize=3, label=label.replace("`", ""))
        ax.set_title(head, fontsize=9)
        ax.set_xlabel("noise level")
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    np.atleast_1d(axes)[0].set_ylabel(
        "held-out exact match" if panels is DECODINGS else "recovery (final answer right)"
    )
    if np.atleast_1d(axes)[0].get_legend_handles_labels()[0]:
        np.atleast_1d(axes)[0].legend(fontsize=7)
    common.save(fig, path)


def name(args) -> str:
    if args.objective:
        return "arithmetic_objective"
    name = "arithmetic_tuning" if args.tune else "arithmetic_quick" if args.quick else "arithmetic"
    name = "arithmetic_model_noise" if args.model_noise else name
    return name + ("_long" if args.base == "long" else "")


def plan_of(ctx: common.Context) -> list[common.Job]:
    a = ctx.args
    if a.base == "long" and (a.objective or a.tune):
        raise SystemExit("--base long runs the comparison (--quick or the full sweep) only")
    if a.objective:
        return objective.plan(a.seeds)
    return tuning_plan() if a.tune else plan(a.quick, a.seeds, a.model_noise)


def setup(ctx: common.Context) -> list[dict]:
    """The pretraining (short base); the long base is committed, with its evaluation."""
    if ctx.args.base == "long":
        if not LONG_BASE.exists():
            raise SystemExit(
                f"{LONG_BASE} is missing: restore it from git, or regenerate it with "
                "python -m experiments.arithmetic --export_base"
            )
        return []
    return [common.base_row(pretrain(ctx.root, ctx.data_dir))]


def run(job: common.Job, wd: Path, ctx: common.Context) -> dict:
    a = ctx.args
    if a.base == "long":
        init, sha = f"npz:{LONG_BASE}", LONG_BASE_SHA256
    else:
        init, sha = f"ckpt:{ctx.root / 'pretrain'}", ""
    evaluation = dict(decodings=a.decoding, temperature=a.temperature, num_samples=a.num_samples)
    return make_train_fn(init, ctx.data_dir, init_sha256=sha, evaluation=evaluation)(job, wd)


def summarise_rows(rows: list[dict], ctx: common.Context) -> str:
    pre, runs = common.split(rows)
    if ctx.args.objective:
        return objective.summarise(runs, ctx.header, ctx.out, ctx.args.seeds)
    if ctx.args.tune:
        return summarise_tuning(runs, ctx.header)
    if ctx.args.base == "long":
        pre = json.loads(LONG_BASE.with_suffix(".json").read_text())
    return summarise(runs, pre, ctx.header, ctx.out)


def finish(rows: list[dict], ctx: common.Context) -> list[dict]:
    """The objective's ablation: its choice and the baselines, evaluated on the test split."""
    return objective.evaluate_on_test(rows, ctx.runs, ctx.args.seeds) if ctx.args.objective else []


def export(ctx: common.Context) -> None:
    print(f"wrote {LONG_BASE}: sha256 {export_base(ctx.root, ctx.data_dir)}")


EXPERIMENT = common.Experiment(
    module="experiments.arithmetic",
    doc=__doc__,
    workdir="/tmp/smatch_jax_experiments/arithmetic",
    name=name,
    plan=plan_of,
    setup=setup,
    run=run,
    finish=finish,
    summarise=summarise_rows,
    commands={"export_base": export},
    runs_dir=lambda a: "objective" if a.objective else "runs_long" if a.base == "long" else "runs",
    flags={
        "quick": common.switch("MLE, BC, SM at noise 0.1, one seed"),
        "tune": common.switch("SequenceMatch settings, one at a time"),
        "objective": common.switch(
            "the objective's ablation (experiments/arithmetic_objective.py)"
        ),
        "export_base": common.switch(
            "pretrain the stronger base (pretrain_long) and write it to experiments/assets/"
        ),
        "base": dict(
            choices=("short", "long"),
            default="short",
            help="fine-tune from the 6,000-step pretraining run here (short, 0.295 held-out) "
            "or from the committed 15,000-step base experiments/assets/arithmetic_base_long.npz "
            "(long, 0.700; no pretraining); long writes <name>_long.md",
        ),
        "model_noise": common.switch(
            "BC and SequenceMatch with noise kind 'model' (the policy's own mistakes) at "
            "noise 0.1, beside MLE, BC and SequenceMatch with ground-truth noise; writes "
            "<name>_model_noise.md"
        ),
        "decoding": dict(
            default="all",
            help="evaluation decodings: all, or a comma list of greedy,greedy_no_repeat,sample",
        ),
        "temperature": dict(type=float, default=1.0, help="of the sample decoding"),
        "num_samples": dict(type=int, default=4, help="sampling seeds (sample)"),
    },
)

if __name__ == "__main__":
    common.main(EXPERIMENT)
