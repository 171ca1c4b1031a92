"""The model of a run: `config.model` as a typed config, `build_model`, and `abstract_model`
(its shapes alone, for the pod plan).

A run's model is a preset architecture trained from scratch (`models/config.py: PRESETS`), a
converted pretrained checkpoint (`convert/`: SmolLM2 GGUF, Hugging Face GPT-2 / Llama), or a
model trained here (`ckpt:<workdir>`, e.g. MLE pretraining before fine-tuning, or its weights
committed as a small file, `npz:<file>` with `init_sha256`), always with the
`<bkspc>` output row, optionally with LoRA adapters.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from flax import nnx

from smatch_jax.models import convert, lora
from smatch_jax.models.config import PRESETS, VOCAB_SIZES, from_preset
from smatch_jax.models.transformer import REMAT, Transformer, relayout
from smatch_jax.sections import Section

INITS = "'scratch', 'smollm2', 'hf:<dir>', 'ckpt:<workdir>' or 'npz:<file>'"


@dataclasses.dataclass(frozen=True)
class ModelSpec(Section):
    """`config.model`: which model a run trains."""

    NAME: ClassVar[str] = "model"
    preset: str = "tiny_llama"  # architecture of model.init='scratch' (models/config.py PRESETS)
    init: str = "scratch"  # 'scratch', 'smollm2', 'hf:<dir>', 'ckpt:<workdir>', 'npz:<file>'
    init_sha256: str = ""  # npz: the content hash the file must have ('' : not checked)
    lora_rank: int = 0  # > 0: LoRA adapters of this rank, base weights frozen
    lora_alpha: float = 0.0  # LoRA scale numerator (0: = rank)
    dtype: str = "float32"  # compute dtype
    # What a gradient keeps of each block's forward pass: 'none', 'full' (recompute the block),
    # 'save_dots' (keep the projections' outputs), 'save_qkv' (keep the query, key and value
    # projections); transformer.REMAT. Memory and flops, not results.
    remat: str = "none"
    # The blocks' weights stacked on a layer axis and run under jax.lax.scan: one block is
    # compiled instead of n_layers (minutes less on a 32-layer model, README "Running on a
    # pod"); the same function and initial weights. Loads any checkpoint or import.
    scan_layers: bool = False

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "dtype": ("float32", "bfloat16", "float16"),
        "remat": tuple(REMAT),
    }
    RANGES: ClassVar[tuple[tuple[str, Any, Any, bool], ...]] = (("lora_rank", 0, None, True),)

    @classmethod
    def cross_problems(cls, values: dict[str, Any]) -> list[str]:
        init, preset = values["init"], values["preset"]
        if init == "scratch" and preset not in PRESETS:
            return [f"model.preset={preset!r} is unknown; choose one of {sorted(PRESETS)}"]
        if init not in ("scratch", "smollm2") and not init.startswith(("hf:", "ckpt:", "npz:")):
            return [f"model.init={init!r}; use {INITS}"]
        return []


def build_model(
    spec: ModelSpec,
    *,
    vocab_size: int,
    seq_len: int,
    seed: int,
    tokenizer=None,
    trained: tuple[Transformer, Any] | None = None,
    shardings: Any = None,
) -> Transformer:
    """The model of `spec` for a vocabulary of `vocab_size` and rows of `seq_len` tokens.

    `trained`: `(model, tokenizer)` of the run a `ckpt:<workdir>` init names, restored by the
    caller (`run.setup`); `tokenizer` (optional) must equal that run's tokenizer.
    `shardings` (the abstract params -> their shardings): an `hf:` checkpoint is read shard by
    shard onto them, each process reading only what its devices hold (`convert.load_hf_sharded`).
    """
    init, scan = spec.init, spec.scan_layers
    if init == "scratch":
        mc = from_preset(
            spec.preset,
            vocab_size=vocab_size,
            max_positions=max(seq_len, 8),
            dtype=spec.dtype,
            scan_layers=scan,
        )
        model = Transformer(mc, rngs=nnx.Rngs(seed))
    elif init == "smollm2":
        model = convert.smollm2(dtype=spec.dtype, scan_layers=scan)
    elif init.startswith("hf:") and shardings is not None:
        model = convert.load_hf_sharded(init[3:], shardings, dtype=spec.dtype, scan_layers=scan)
    elif init.startswith("hf:"):
        model = convert.load_hf(init[3:], dtype=spec.dtype, scan_layers=scan)
    elif init.startswith("ckpt:"):  # fine-tune a model trained here (e.g. MLE pretraining)
        if trained is None:
            raise ValueError(
                f"model.init={init!r}: a trained run is restored by run.setup (run.py); "
                "pass trained=(model, tokenizer)"
            )
        model, theirs = trained
        if (
            tokenizer is not None
            and theirs.vocab_size == vocab_size
            and not theirs.same_as(tokenizer)
        ):
            raise ValueError(
                f"model.init={init!r} was trained with a different tokenizer (same size, other "
                "tokens); fine-tune on data built with the same tokenizer"
            )
    elif init.startswith("npz:"):  # a small committed base model (convert/npz.py)
        model, vocab = convert.load_npz(
            init[4:], sha256=spec.init_sha256, dtype=spec.dtype, scan_layers=scan
        )
        ours = [tokenizer.decode([i]) for i in range(vocab_size)] if tokenizer else vocab
        if len(vocab) == vocab_size and vocab != ours:
            raise ValueError(
                f"model.init={init!r} was trained with a different tokenizer (same size, other "
                "tokens); fine-tune on data built with the same tokenizer"
            )
    else:
        raise ValueError(f"model.init={init!r}; use {INITS}")
    model = relayout(model, scan)  # a trained run's model may be in the other layout
    if model.config.vocab_size != vocab_size:
        raise ValueError(
            f"the model has vocab_size={model.config.vocab_size} but the tokenizer "
            f"{vocab_size}; use the model's own tokenizer"
        )
    if spec.lora_rank:
        lora.apply_lora(
            model, rank=spec.lora_rank, alpha=spec.lora_alpha or None, rngs=nnx.Rngs(seed + 1)
        )
    return model


def _preset_of(spec: ModelSpec) -> str:
    return "smollm2_135m" if spec.init == "smollm2" else spec.preset


def vocab_size_of(spec: ModelSpec, vocab_size: int | None = None) -> int:
    """`vocab_size`, else the vocabulary the pretrained weights of `model.preset` come with
    (for building the model without its tokenizer: the pod plan)."""
    if vocab_size:
        return vocab_size
    preset = _preset_of(spec)
    if spec.init != "scratch" and preset in VOCAB_SIZES:
        return VOCAB_SIZES[preset]
    raise ValueError(
        f"the vocabulary size of model.init={spec.init!r}, model.preset={preset!r} is not "
        f"known without its tokenizer; pass --vocab_size (pretrained presets: "
        f"{sorted(VOCAB_SIZES)})"
    )


def abstract_model(
    spec: ModelSpec, vocab_size: int, seq_len: int, seed: int, n_layers: int | None = None
) -> Transformer:
    """The model of `spec` as shapes (`nnx.eval_shape`: no weights read or drawn): preset
    shape, layout, LoRA, dtypes; `n_layers`: that many unrolled layers instead (the pod plan's
    cost probes). A pretrained model (`hf:`, `smollm2`, ...) is stored in `model.dtype` (the
    converters cast it), a scratch model in float32, as `build_model` does."""
    param_dtype = "float32" if spec.init == "scratch" else spec.dtype
    probe = {} if n_layers is None else dict(n_layers=n_layers)
    mc = from_preset(
        _preset_of(spec),
        vocab_size=vocab_size,
        max_positions=max(seq_len, 8),
        dtype=spec.dtype,
        param_dtype=param_dtype,
        scan_layers=spec.scan_layers and n_layers is None,
        **probe,
    )

    def build() -> Transformer:
        model = Transformer(mc, rngs=nnx.Rngs(seed))
        if spec.lora_rank:
            alpha = spec.lora_alpha or None
            lora.apply_lora(model, rank=spec.lora_rank, alpha=alpha, rngs=nnx.Rngs(seed + 1))
        return model

    return nnx.eval_shape(build)
