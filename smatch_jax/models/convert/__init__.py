"""Converters of pretrained weights into `Transformer`, one module per format, all sharing the
`<bkspc>` row (`common.add_bkspc_row`): `gguf` (llama.cpp llama files, SmolLM2) and `hf`
(Hugging Face GPT-2 and Llama directories)."""

from smatch_jax.models.convert.common import (
    BKSPC_INITS,
    add_bkspc_row,
    model_from_params,
    model_params,
)
from smatch_jax.models.convert.gguf import (
    load_gguf_llama,
    permute_rope_rows,
    smollm2,
    unpermute_rope_rows,
)
from smatch_jax.models.convert.hf import load_hf, load_hf_params, read_safetensors_dir

__all__ = [
    "BKSPC_INITS",
    "add_bkspc_row",
    "load_gguf_llama",
    "load_hf",
    "load_hf_params",
    "model_from_params",
    "model_params",
    "permute_rope_rows",
    "read_safetensors_dir",
    "smollm2",
    "unpermute_rope_rows",
]
