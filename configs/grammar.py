"""Grammar (Dyck-2 words of a known generator, `smatch_jax/data/grammar.py`): MLE, BC and
SequenceMatch where errors are checkable exactly.

    python -m smatch_jax.main --config=configs/grammar.py:sm_chi2 --workdir=/tmp/w
    python -m smatch_jax.main --config=configs/grammar.py:smoke,bc --workdir=/tmp/w

Variants (`:name`), as in configs/arithmetic.py: `mle`, `bc`, `sm_chi2` (default), `sm_random`,
`sm_kl`, `sm_nobkspc`, `smoke`, `pretrain` / `finetune` (the two stages of
experiments/grammar.py). Ground-truth noise here is noise kind `errors`: each noise token is an
error a model can make at that state (a wrong closing bracket, a closing bracket at depth 0,
an opening past the depth bound), drawn from the training brackets' frequencies.
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = common.base_config()
    c.data.task = "grammar"
    c.data.grammar.max_depth = 6  # nesting bound
    c.data.grammar.max_len = 40  # brackets per word at most (mean 12.5 at these settings)
    c.data.grammar.p_end = 0.3  # stop at depth 0
    c.data.grammar.p_open = 0.5  # open below the bound
    c.data.train_size = 5000
    c.data.validation_size = 500
    c.data.test_size = 500  # words sampled per evaluation seed; recovery prompts
    c.data.seq_len = 64  # prompt + 40 brackets + eos, and room for noise

    c.model.preset = "mini_llama"
    c.train.batch_size = 32
    c.train.model_rows = 32
    c.train.log_every = 25
    c.eval.num_samples = 4

    for variant in (arg or "sm_chi2").split(","):
        common.apply_loss_variant(c, variant)
        if variant == "pretrain":  # experiments/grammar.py stage 1: MLE on other words
            common.apply_loss_variant(c, "mle")
            c.seed = 1000
            c.data.train_size = 20000
            # 1000 steps: 0.856 valid at T = 1 (2000 steps: 0.963, too few errors left to study)
            c.train.num_steps, c.train.eval_every = 1000, 1000
            c.train.ckpt_every = c.train.eval_every
            c.optim.lr = 2e-3
            c.optim.warmup_steps = 100
        elif variant == "finetune":  # stage 2: set model.init='ckpt:<pretrain workdir>'
            c.train.num_steps = 300
            c.loss.bc_warmup_steps = 50
            c.optim.lr = 5e-4
            c.optim.warmup_steps = 20
            c.sampling.sample_every = 5
            c.replay.capacity = 256
            c.train.eval_every = 300
            c.train.ckpt_every = 300
        elif variant == "smoke":
            c.model.preset = "tiny_llama"
            c.data.train_size = 256
            c.data.test_size = 32
            c.data.validation_size = 32
            c.train.num_steps = 40
            c.loss.bc_warmup_steps = 20
            c.train.batch_size = 16
            c.train.model_rows = 16
            c.sampling.sample_every = 5
            c.train.log_every = 5
            c.train.eval_every = 20
            c.train.ckpt_every = 20
            c.replay.capacity = 64
            c.eval.num_samples = 2
        elif variant not in common.LOSS_VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    if c.noise.kind == "ground_truth":  # the grammar's ground truth: errors of the language
        c.noise.kind = "errors"
    return c


VARIANTS = (*common.LOSS_VARIANTS, "smoke", "pretrain", "finetune")
