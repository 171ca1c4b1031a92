"""The paper's experiments at the paper's scale: Llama-2-7B with LoRA, bf16, on a TPU slice.

    python -m smatch_jax.main.compile --config=configs/paper.py:arithmetic_sm --topology=v5e-32
    python -m smatch_jax.main --config=configs/paper.py:arithmetic_sm --workdir=/mnt/shared/w

Variants (`:name`): `arithmetic_sm`, `arithmetic_mle`, `arithmetic_bc` (the paper's Figure 3:
add_or_sub_in_base in Llama 2's own tokenizer) and `text_sm`, `text_mle`, `text_bc` (Table 1:
128-token prompts and continuations). Append `,v4` for the mesh of a v4-64 slice (32 chips
of 32 GiB: data 2 x fsdp 2 x tensor 8); the default is a v5e-32 slice (32 chips of 16 GiB:
fsdp 4 x tensor 8).

Weights: `model.init='hf:<dir>'`, a Hugging Face Llama-2-7B directory (safetensors,
config.json, tokenizer.json), taken from `$SMATCH_LLAMA_DIR` (default `llama-2-7b-hf`) or
overridden with `--config.model.init=hf:DIR --config.data.tokenizer=bpe:DIR/tokenizer.json`.
`python -m smatch_jax.main.compile` needs neither: it takes the shape from `model.preset` and
the vocabulary (32,000) from `models/config.py: VOCAB_SIZES`.
"""

from __future__ import annotations

import os

import ml_collections

from configs import common

LLAMA_DIR = os.environ.get("SMATCH_LLAMA_DIR", "llama-2-7b-hf")
METHODS = {"sm": "sm_chi2", "mle": "mle", "bc": "bc"}  # variant suffix -> common variant


def _arithmetic(c: ml_collections.ConfigDict) -> None:
    """Figure 3: add_or_sub_in_base in Llama 2's own tokenizer."""
    c.data.train_size, c.data.test_size = 5000, 200  # the paper's sizes
    c.data.arithmetic.difficulty = "all"
    c.data.arithmetic.prompt_format = "qa"  # "Question: ...\nAnswer: ..." for a pretrained LM
    c.data.seq_len = 96  # prompt + answer + noise and backspaces, in Llama tokens
    c.data.prompt_max = 48  # longest question in Llama tokens (digits split one by one)
    c.noise.kind = "ground_truth"
    c.train.batch_size = c.train.model_rows = 64  # 64 data + 64 model rows per step


def _text(c: ml_collections.ConfigDict) -> None:
    """Table 1: 128-token prompts and continuations."""
    c.data.text.corpus = "shakespeare"  # openwebtext in the paper: a directory of .txt files
    c.data.text.prompt_tokens, c.data.text.completion_tokens = 128, 128
    c.data.seq_len = 320  # prompt + continuation + eos + room for noise and backspaces
    c.data.test_size = 256
    c.noise.kind, c.noise.rate = "random", 0.05
    c.train.batch_size = c.train.model_rows = 32  # 32 data + 32 model rows per step


TASK_SETTINGS = {"arithmetic": _arithmetic, "text": _text}  # the paper's two tasks
VARIANTS = tuple(f"{t}_{m}" for t in TASK_SETTINGS for m in METHODS)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    names = (arg or "arithmetic_sm").split(",")
    if names[0] not in VARIANTS or any(n not in ("v4", "v5e") for n in names[1:]):
        raise ValueError(f"unknown variant {arg!r}; choose from {VARIANTS}, then ',v4' or ',v5e'")
    task, method = names[0].split("_")
    c = common.base_config()
    c.model.preset = "llama_7b"  # the shape of the weights model.init loads
    c.model.init = f"hf:{LLAMA_DIR}"  # Llama-2-7B (Hugging Face directory)
    c.model.lora_rank, c.model.lora_alpha = 16, 32.0  # LoRA on the frozen base
    c.model.dtype = "bfloat16"  # compute and storage of the converted weights
    c.model.scan_layers = True  # one block compiled, not 32 (benchmarks/RESULTS.md, pod plans)
    # Each block keeps its input and its q, k, v projections for the backward pass. Without
    # remat the activations of 32 blocks sit whole on every tensor shard: arithmetic_sm's
    # train_sm held 15.34 GiB a chip of 16 (3.76 with this), its MLE step 8.04 (2.15)
    # (benchmarks/RESULTS.md, "The 7B MLE step against MaxText's").
    c.model.remat = "save_qkv"
    c.data.tokenizer = f"bpe:{LLAMA_DIR}/tokenizer.json"  # the model's own tokenizer
    c.train.num_steps = 2000
    c.optim.lr = 2e-4
    c.optim.warmup_steps = 100
    c.loss.bc_warmup_steps = 200  # BC first, then SequenceMatch
    c.sampling.sample_every = 10  # a refill every 10 SequenceMatch steps
    c.train.eval_every = c.train.ckpt_every = 500
    c.data.task = task
    TASK_SETTINGS[task](c)
    common.apply_loss_variant(c, METHODS[method])
    # Weights split 8 ways by tensor parallelism (32 heads, 4 a chip; never gathered) and 4
    # (v5e) or 2 (v4) ways by FSDP (gathered layer by layer within 4 or 2 chips). FSDP over all
    # 32 chips gathered 4x the weight bytes per step and, in the sampler's decode layout
    # (sharding.py), left the KV cache whole on every chip: benchmarks/RESULTS.md "Pod plans".
    if "v4" in names[1:]:  # v4-64: 32 chips (megacore) of 32 GiB
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 8
        # 32 GiB a chip hold every activation: projected MLE / SM step 0.114 / 0.242 s without
        # remat (train_sm 15.94 GiB), 0.130 / 0.269 with save_qkv (4.21 GiB).
        c.model.remat = "none"
    else:  # v5e-32: 32 chips of 16 GiB
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 4, 8
    return c
