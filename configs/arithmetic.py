"""Arithmetic (`add_or_sub_in_base`, the paper's Figure 3): MLE, BC and SequenceMatch.

    python -m smatch_jax.main --config=configs/arithmetic.py:sm_chi2 --workdir=/tmp/w
    python -m smatch_jax.main --config=configs/arithmetic.py:smoke --workdir=/tmp/w \\
        --config.loss.chi2_coef=0.5

Variants (`:name`): `mle` (BC on clean data), `bc` (BC with noise + <bkspc>), `sm_chi2`
(default: SequenceMatch chi2_mix with ground-truth noise), `sm_random` (random noise),
`sm_kl`, `sm_nobkspc` (SequenceMatch without <bkspc>: no noise, sampler never backspaces),
`smoke` (a tiny, fast end-to-end run for tests and CI). Append `,<variant>` to combine, e.g.
`smoke,bc`.
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = common.base_config()
    c.data.task = "arithmetic"  # dataset: arithmetic (add_or_sub_in_base)
    c.data.train_size = 5000  # training examples (the paper: 5,000)
    c.data.test_size = 200  # held-out questions (the paper: 200)
    c.data.difficulty = "all"  # train entropy: easy | medium | hard | all (test: interpolate)
    c.data.seq_len = 96  # T: prompt + actions (noise and backspaces included)

    c.model.preset = "small_llama"  # see configs/common.py: MODEL_PRESETS
    c.noise.kind = "ground_truth"

    for variant in (arg or "sm_chi2").split(","):
        common.apply_loss_variant(c, variant)
        if variant == "smoke":
            c.data.train_size = 256
            c.data.test_size = 32
            c.model.preset = "tiny_llama"
            c.train.num_steps = 40
            c.loss.bc_warmup_steps = 20
            c.train.batch_size = 16
            c.train.model_rows = 16
            c.sampling.sample_every = 5
            c.train.log_every = 5
            c.train.eval_every = 20
            c.train.ckpt_every = 20
            c.replay.capacity = 64
        elif variant not in common.LOSS_VARIANTS:
            raise ValueError(
                f"unknown variant {variant!r}; choose from {[*common.LOSS_VARIANTS, 'smoke']}"
            )
    return c
