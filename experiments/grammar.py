"""Grammar (Dyck-2 of a known generator): the valid-sample rate, distribution match and recovery
of MLE, BC and SequenceMatch, where every error is checkable exactly.

    python -m experiments.grammar --quick   # MLE vs BC vs SM at noise 0.1, seed 0
    python -m experiments.grammar           # 4 noise levels, 3 seeds, SM without <bkspc>

1. Pretrain (once): `mini_llama` (0.2M parameters) with MLE on 20,000 words of the generator
   (`configs/grammar.py:pretrain`, seed 1000): a base that writes mostly valid words but not
   always, so that there are errors to learn from.
2. Fine-tune it on 5,000 other words (per seed) with each method for 300 steps
   (`configs/grammar.py:finetune,<method>`): MLE; BC (MLE on rows with noise + `<bkspc>`);
   SequenceMatch chi2-mix with `errors` noise (the language's own errors: a wrong closing
   bracket, a closing bracket at depth 0, an opening past the bound) and with random noise;
   SequenceMatch without `<bkspc>`.
3. Evaluate (`smatch_jax/eval/grammar.py`): 500 words per seed sampled at T = 1 from the prompt,
   4 sampling seeds: the valid-sample rate; the generator's NLL of the valid words against the
   data entropy (exact); total variation of the length and depth histograms to the exact ones;
   recovery from a corrupted prefix; whether pi(`<bkspc>`) and V separate viable from
   non-viable states of the model's own samples.

Writes `experiments/results/grammar[_quick].{md,json,png}`. Runs are workdirs under `--workdir`:
finished runs are reused, interrupted ones resume.
"""

from __future__ import annotations

from pathlib import Path

from configs import grammar as grammar_config
from experiments import common
from experiments.arithmetic import make_train_fn
from experiments.common import plt

METHODS = {  # key: (label, config variant)
    "mle": ("MLE", "mle"),
    "bc": ("BC (MLE + `<bkspc>`)", "bc"),
    "sm_gt": ("SequenceMatch, error noise", "sm_chi2"),
    "sm_random": ("SequenceMatch, random noise", "sm_random"),
    "sm_nobkspc": ("SequenceMatch without `<bkspc>`", "sm_nobkspc"),
    "bc_model": ("BC, the model's own errors as noise", "bc"),
    "sm_model": ("SequenceMatch, the model's own errors as noise", "sm_chi2"),
}
LABELS = {m: label for m, (label, _) in METHODS.items()}
NOISE_LEVELS = (0.0, 0.05, 0.1, 0.2)
HEADLINE = "eval/valid"
TABLES = [  # (result key, heading)
    ("eval/recovery", "Recovery from a corrupted prefix, greedy_no_repeat (valid final words)"),
    ("eval/recovery_sample", "Recovery from a corrupted prefix, sampling at T = 1"),
    (
        "eval/nll_gap",
        "NLL of the valid words under the generator minus the data entropy (nats per word; "
        "0: as likely as data, < 0: favours likely words)",
    ),
    ("eval/tv_length", "Total variation to the exact length histogram (invalid words: own bin)"),
    ("eval/tv_depth", "Total variation to the exact max-depth histogram (invalid words: own bin)"),
    ("eval/bkspc_per_sample", "`<bkspc>` per sampled word"),
    ("eval/mech_deletion_precision", "Deletion precision: deleted tokens that were errors"),
    ("eval/mech_auc_pi_bkspc", "AUC of pi(`<bkspc>`): non-viable vs viable states"),
    ("eval/mech_auc_neg_v", "AUC of -V: non-viable vs viable states"),
]


def plan(quick: bool, seeds: int, model_noise: bool = False) -> list[common.Job]:
    if model_noise:  # noise kind 'model' beside the same baselines (their runs are reused)
        grid = [("mle", 0.0), ("bc", 0.1), ("sm_gt", 0.1), ("bc_model", 0.1), ("sm_model", 0.1)]
        seed_list = list(range(seeds))
    elif quick:
        grid, seed_list = [("mle", 0.0), ("bc", 0.1), ("sm_gt", 0.1)], [0]
    else:
        grid = [("mle", 0.0)]
        grid += [(m, n) for n in NOISE_LEVELS if n > 0 for m in ("bc", "sm_random")]
        grid += [("sm_gt", n) for n in NOISE_LEVELS] + [("sm_nobkspc", 0.0)]
        seed_list = list(range(seeds))
    runs = []
    for seed in seed_list:
        for key, noise in grid:
            c = grammar_config.get_config(f"finetune,{METHODS[key][1]}")
            c.seed = seed
            if key not in ("mle", "sm_nobkspc"):
                c.noise.rate = noise
            if key.endswith("_model"):
                c.noise.kind = "model"
            runs.append(common.Job(f"{key}_n{noise:g}_s{seed}", key, c, noise, seed))
    return runs


def pretrain(root: Path, data_dir: str) -> Path:
    """MLE pretraining (`configs/grammar.py:pretrain`) in `root/pretrain`, once."""
    c = grammar_config.get_config("pretrain")
    c.data.data_dir = data_dir
    return common.pretrain(root / "pretrain", c)


def _cells(by: dict, method: str, levels: list[float]) -> list[list[dict] | None]:
    return [by.get(("mle", 0.0) if method == "mle" else (method, n)) for n in levels]


def verdict(by: dict, levels: list[float], key: str = HEADLINE) -> str:
    return common.verdict(by, levels, LABELS, key, "Valid-sample rate")


def summarise(results: list[dict], pre: dict, header: str, out: Path) -> str:
    by = common.group(results, "method", "noise")
    levels = sorted({n for _, n in by})
    n_seeds = len({r["seed"] for r in results})
    r0 = results[0]
    tables = "".join(
        f"\n**{head}**\n\n" + common.noise_table(by, levels, LABELS, key) for key, head in TABLES
    )
    diag_keys = [
        ("eval/valid", "valid"),
        ("eval/recovery", "recovery"),
        ("eval/nll_gap", "NLL gap"),
        ("eval/tv_length", "TV length"),
        ("eval/tv_depth", "TV depth"),
        ("eval/mean_length_valid", "mean length"),
        ("eval/invalid_wrong_close", "wrong close"),
        ("eval/invalid_early_eos", "early eos"),
        ("eval/bkspc_per_sample", "`<bkspc>`/word"),
        ("sm/r_data", "r data"),
        ("sm/r_model", "r model"),
    ]
    examples = _examples(by)
    text = (
        "# Grammar: valid words, distribution match and recovery (Dyck-2, CPU scale)"
        + (": the model's own errors as noise" if "model_noise" in out.name else "")
        + "\n\n"
        + header
        + f"\nThe data: Dyck-2 words of depth <= {r0.get('eval/max_depth', 6):g} and length "
        f"<= 40 from a known generator (`configs/grammar.py`); exact entropy "
        f"{r0.get('eval/entropy', float('nan')):.3f} nats per word, mean length "
        f"{r0.get('eval/data_mean_length', float('nan')):.2f}. Each run samples "
        f"{int(r0.get('eval/n', 0))} words at T = 1 with "
        f"{int(r0.get('eval/valid_k', 0))} sampling seeds; cells are the mean ± half-width "
        f"of the 95% t-interval over {n_seeds} training seed(s). MLE never sees noise: one "
        "value for every level. The paper has no grammar task: there are no published numbers "
        f"to set beside these. The pretrained base alone: valid "
        f"{pre.get('eval/valid', float('nan')):.3f}, NLL gap "
        f"{pre.get('eval/nll_gap', float('nan')):.3f}.\n\n"
        + verdict(by, levels)
        + "\n\n**Valid-sample rate at T = 1 (headline)**\n\n"
        + common.noise_table(by, levels, LABELS, HEADLINE)
        + f"\n![valid rate and recovery vs noise]({out.name}.png)\n"
        + tables
        + "\nSampling floor of the TV figures (the same number of words drawn from the generator "
        f"itself): length {r0.get('eval/tv_length_floor', float('nan')):.3f}, depth "
        f"{r0.get('eval/tv_depth_floor', float('nan')):.3f}.\n"
        + (
            "\n## Recovery examples (noise 0.1, seed 0)\n\nGiven prefix (ending in an error), "
            "the model's actions (⌫ = `<bkspc>`), its final word.\n\n" + examples
            if examples
            else ""
        )
        + "\n## Every run\n\n"
        + common.run_table(results, diag_keys)
    )
    _plot(by, levels, out.with_suffix(".png"))
    return text


def _examples(by: dict) -> str:
    cols = []
    for method, (label, _) in METHODS.items():
        rs = by.get(("mle", 0.0) if method == "mle" else (method, 0.1), [])
        ex = next((r.get("recovery_examples") for r in rs if r["seed"] == 0), None)
        if ex:
            cols.append((label, [line.split("\t") for line in ex]))
    if not cols:
        return ""
    rows = []
    for i, (given, *_) in enumerate(cols[0][1]):
        cells = [f"`{given}`"]
        for _, ex in cols:
            _, acts, final, mark = ex[i]
            cells.append(f"`{acts}` → `{final}` {'✓' if mark == 'valid' else '✗'}")
        rows.append(cells)
    return common.markdown_table(["given prefix", *[c[0] for c in cols]], rows)


def _plot(by: dict, levels: list[float], path: Path) -> None:
    panels = [(HEADLINE, "valid-sample rate at T = 1"), ("eval/recovery", "recovery")]
    fig, axes = plt.subplots(1, 2, figsize=(10.4, 4.2))
    for ax, (key, head) in zip(axes, panels, strict=True):
        for method, (label, _) in METHODS.items():
            cells = zip(levels, _cells(by, method, levels), strict=True)
            pts = [(n, common.measured(rs, key)) for n, rs in cells]
            pts = [(n, v) for n, v in pts if v]
            if not pts:
                continue
            xs = [n for n, _ in pts]
            ys, hs = zip(*[common.mean_ci(v) for _, v in pts], strict=True)
            style = "--" if method == "mle" else "-o" if len(xs) > 1 else "s"
            ax.errorbar(xs, ys, yerr=hs, fmt=style, capsize=3, label=label.replace("`", ""))
        ax.set_title(head, fontsize=9)
        ax.set_xlabel("noise level")
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7)
    common.save(fig, path)


def summarise_rows(rows: list[dict], ctx: common.Context) -> str:
    pre, runs = common.split(rows)
    return summarise(runs, pre, ctx.header, ctx.out)


EXPERIMENT = common.Experiment(
    module="experiments.grammar",
    doc=__doc__,
    workdir="/tmp/smatch_jax_experiments/grammar",
    name=lambda a: (
        "grammar_model_noise" if a.model_noise else "grammar_quick" if a.quick else "grammar"
    ),
    plan=lambda ctx: plan(ctx.args.quick, ctx.args.seeds, ctx.args.model_noise),
    setup=lambda ctx: [common.base_row(pretrain(ctx.root, ctx.data_dir))],
    run=lambda job, wd, ctx: make_train_fn(f"ckpt:{ctx.root / 'pretrain'}", ctx.data_dir)(job, wd),
    summarise=summarise_rows,
    flags={
        "quick": common.switch("MLE, BC, SM at noise 0.1, one seed"),
        "model_noise": common.switch(
            "BC and SequenceMatch with noise kind 'model' (the policy's own errors) at noise "
            "0.1 beside MLE, BC and SequenceMatch with error noise; writes grammar_model_noise.md"
        ),
    },
)

if __name__ == "__main__":
    common.main(EXPERIMENT)
