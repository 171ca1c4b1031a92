"""The objective's ablation (docs/method.md §2.7) on text, beside MLE and BC.

    python -m experiments.text --objective   # 2 seeds (run it twice at once: two processes
                                             # share the runs)

From the pretrained model of `experiments/text.py`, SequenceMatch (chi2-mix) is fine-tuned
with revision 1, with each revision-2 change alone (the four of the specification and the
fifth, truncated model rows dropped: `truncated_weight = 0`), with the four together and with
all five. Every loss field is set explicitly. Each model is evaluated like the text table:
MAUVE against the reference continuations, the perplexity of its generations under the
pretrained model, their length and the fraction that end with eos; and the training
diagnostics, among them the fraction of model rows that ended with eos.

Writes `experiments/results/text_objective.{md,json,png}`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from configs import text as text_config
from experiments import arithmetic_objective as arith
from experiments import common
from experiments.common import plt

SETTINGS = {"rev1": {}, **{f"+{k}": v for k, v in arith.CHANGES.items()}}
SETTINGS["all4"] = dict(arith.ALL4)
SETTINGS["all5"] = {**arith.ALL4, **arith.CHANGES["drop_truncated"]}
SETTINGS["all5 normalize=token"] = {**SETTINGS["all5"], "normalize": "token"}
COLUMNS = [  # (key without the text/ prefix, header, format)
    ("mauve", "MAUVE", "{:.3f}"),
    ("ppl_generated", "perplexity of generations", "{:.0f}"),
    ("mean_new_tokens", "length (tokens)", "{:.1f}"),
    ("eos_frac", "ended with eos", "{:.2f}"),
    ("bkspc_per_sample", "`<bkspc>`/sample", "{:.2f}"),
    ("mauve_no_repeat", "MAUVE, no_repeat", "{:.3f}"),
]
DIAG = [
    ("sm/r_data", "r data"),
    ("sm/r_model", "r model"),
    ("sm/v_mean", "V mean"),
    ("sm/pi_bkspc_model", "pi(bkspc) model rows"),
    ("sample/ended_frac", "model rows ended (eos)"),
    ("bc/loss", "L_BC"),
]


def plan(seeds: int) -> list[common.Job]:
    runs = []
    for seed in range(seeds):
        for method in ("mle", "bc"):
            c = text_config.get_config(f"finetune,{method}")
            c.loss.masked_actions = "unrewarded"
            runs.append(_run(c, method, method, seed))
        for name, edits in SETTINGS.items():
            c = text_config.get_config("finetune,sm_chi2")
            for k, v in {**arith.REV1, **edits}.items():
                c.loss[k] = v
            runs.append(_run(c, name, arith._slug(name), seed))
    return runs


def _run(c, method: str, slug: str, seed: int) -> common.Job:
    c.seed = seed
    return common.Job(f"obj_{slug}_s{seed}", method, c, c.noise.rate, seed)


def summarise(results: list[dict], pre: dict, header: str, out: Path, seeds: int) -> str:
    by = common.group(results, "method")
    names = ["mle", "bc", *SETTINGS]
    defaults = arith.configured_defaults(SETTINGS)
    rows = [
        [
            name + (" (the config defaults)" if name == defaults else ""),
            *[common.mean_cell(by[name], f"text/{k}", f) for k, _, f in COLUMNS],
        ]
        for name in names
        if name in by
    ]
    rows.append(
        ["pretrained model", *[common.mean_cell([pre], f"text/{k}", f) for k, _, f in COLUMNS]]
    )
    table = common.markdown_table(["setting", *[h for _, h, _ in COLUMNS]], rows)
    diag_rows = []
    for r in sorted(results, key=lambda r: (names.index(r["method"]), r["seed"])):
        vals = [common.cell(r, k) for k, _ in DIAG]
        diag_rows.append([r["method"], r["seed"], f"{r.get('text/mauve', 0):.3f}", *vals])
    diag = common.markdown_table(["setting", "seed", "MAUVE", *[h for _, h in DIAG]], diag_rows)
    _plot(by, names, pre, out.with_suffix(".png"))
    return (
        "# Text: the objective's ablation (revision 2)\n\n"
        + header
        + "\nSequenceMatch (chi2-mix, unigram noise at rate 0.05) fine-tuned from the "
        "pretrained model of `text.md` with revision 1 (`rev1`) and each change alone; "
        "`all4` is the four changes of the specification, `all5` adds dropping model rows "
        "cut off before eos. Evaluation as in `text.md` (256 validation prompts, one sampled "
        "continuation each at temperature 1; MAUVE with MiniLM features; perplexity under the "
        "pretrained model); mean ± half-width of the 95% t-interval over "
        f"{seeds} training seeds. `MAUVE, no_repeat`: sampling that never chooses a token "
        "again at a state it was deleted from.\n\n"
        + table
        + f"\n![MAUVE and eos rate per setting]({out.name}.png)\n\n## Every run\n\n"
        "Training diagnostics of the last logged step.\n\n" + diag
    )


def _plot(by: dict, names: list[str], pre: dict, path: Path) -> None:
    keys = [n for n in names if n in by]
    x = np.arange(len(keys))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (key, label, log) in zip(
        axes,
        [
            ("text/mauve", "MAUVE", False),
            ("text/ppl_generated", "perplexity of generations", True),
            ("text/eos_frac", "generations ending with eos", False),
        ],
        strict=True,
    ):
        vals = [[r[key] for r in by[k] if key in r] for k in keys]
        colors = ["C0" if k in ("mle", "bc") else "C1" for k in keys]
        ax.bar(x, [np.mean(v) for v in vals], yerr=[np.std(v) for v in vals], color=colors)
        if key in pre:
            ax.axhline(pre[key], ls="--", c="gray", label="pretrained model")
            ax.legend(fontsize=7)
        ax.set_title(label)
        ax.set_xticks(x, keys, rotation=45, ha="right", fontsize=7)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3, axis="y")
    common.save(fig, path)
