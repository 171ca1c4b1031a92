"""Arithmetic (`add_or_sub_in_base`, the paper's Figure 3): MLE, BC and SequenceMatch.

    python -m smatch_jax.main --config=configs/arithmetic.py:sm_chi2 --workdir=/tmp/w
    python -m smatch_jax.main --config=configs/arithmetic.py:smoke --workdir=/tmp/w \\
        --config.loss.chi2_coef=0.5

Variants (`:name`): `mle` (BC on clean data), `bc` (BC with noise + <bkspc>), `sm_chi2`
(default: SequenceMatch chi2_mix with ground-truth noise), `sm_random` (random noise),
`sm_kl`, `sm_nobkspc` (SequenceMatch without <bkspc>: no noise, sampler never backspaces),
`smoke` (a tiny, fast end-to-end run for tests and CI), `pretrain` (or `pretrain_long`, a
stronger base) / `finetune` (the two stages
of experiments/arithmetic.py at CPU scale), `smollm2` (SmolLM2-135M-Instruct with LoRA in its
own tokenizer, "Question: ...\nAnswer: ..." rows: experiments/arithmetic_smollm2.py). Append
`,<variant>` to combine, e.g. `smoke,bc` or `smollm2,sm_chi2`.
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = common.base_config()
    c.data.task = "arithmetic"  # dataset: arithmetic (add_or_sub_in_base)
    c.data.train_size = 5000  # training examples (the paper: 5,000)
    c.data.test_size = 200  # held-out questions (the paper: 200)
    c.data.arithmetic.difficulty = (
        "all"  # train entropy: easy | medium | hard | all (test: interpolate)
    )
    c.data.seq_len = 96  # T: prompt + actions (noise and backspaces included)

    c.model.preset = "small_llama"  # an architecture of smatch_jax/models/config.py PRESETS
    c.noise.kind = "ground_truth"

    for variant in (arg or "sm_chi2").split(","):
        common.apply_loss_variant(c, variant)
        if variant in ("pretrain", "pretrain_long"):  # experiments/arithmetic.py stage 1: MLE
            common.apply_loss_variant(c, "mle")
            _cpu_scale(c)
            c.seed = 1000  # its own questions: the fine-tuning sets (seeds 0, 1, ...) differ
            c.data.train_size = 20000
            if variant == "pretrain":  # 7.4 min on 2 cores: 29.5% held-out (11% at 3000)
                c.train.num_steps, c.train.eval_every = 6000, 1000
            else:  # a stronger base: the same run 2.5 times as long
                c.train.num_steps, c.train.eval_every = 15000, 5000
            c.train.ckpt_every = c.train.eval_every
            c.optim.lr = 2e-3
            c.optim.warmup_steps = 100
        elif variant == "finetune":  # stage 2: set model.init='ckpt:<pretrain workdir>'
            _cpu_scale(c)
            c.train.num_steps = 300
            c.loss.bc_warmup_steps = 50
            c.optim.lr = 5e-4
            c.optim.warmup_steps = 20
            c.sampling.sample_every = 5
            c.replay.capacity = 256
            c.train.eval_every = 300
            c.train.ckpt_every = 300
        elif variant == "smollm2":  # a pretrained LM in its own tokenizer, fine-tuned directly
            c.data.tokenizer = (
                "smollm2"  # rows in the qa prompt format (data.arithmetic.prompt_format auto)
            )
            c.model.init, c.model.lora_rank, c.model.lora_alpha = "smollm2", 16, 32.0
            # 30 layers: the train step compiles in 5 s instead of 19 and steps 0.90x as long
            # on a 2-core CPU (benchmarks/RESULTS.md, "Pod plans: one program, scanned layers")
            c.model.scan_layers = True
            c.data.arithmetic.difficulty = c.data.arithmetic.test_difficulty = "easy"
            c.data.seq_len = 48  # easy rows: prompts <= 32 tokens, answers ~5 + eos
            c.train.batch_size = c.train.model_rows = 16
            c.train.num_steps = 300
            c.loss.bc_warmup_steps = 50
            c.optim.lr = 5e-4
            c.optim.warmup_steps = 20
            c.sampling.sample_every = 5
            c.replay.capacity = 128
            c.train.log_every = 10
            c.train.eval_every = 100
            # 6-20 s a step on 2 cores: a checkpoint (0.3 GB, seconds) every 25 steps keeps
            # what a killed run loses to minutes, not half an hour
            c.train.ckpt_every = 25
        elif variant == "smoke":
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
            raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    return c


VARIANTS = (*common.LOSS_VARIANTS, "smoke", "pretrain", "pretrain_long", "finetune", "smollm2")


def _cpu_scale(c: ml_collections.ConfigDict) -> None:
    """The 2-core CPU scale of experiments/arithmetic.py (the paper's data, a smaller model)."""
    c.model.preset = "mini_llama"
    c.data.arithmetic.difficulty = c.data.arithmetic.test_difficulty = (
        "easy"  # a 3-layer model learns it on 2 cores
    )
    c.data.seq_len = 64
    c.train.batch_size = 32
    c.train.model_rows = 32
    c.train.log_every = 25
