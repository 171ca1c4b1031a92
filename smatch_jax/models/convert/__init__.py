"""Converters of pretrained weights into `Transformer`, one module per format, all sharing the
`<bkspc>` row (`common.add_bkspc_row`): `gguf` (llama.cpp llama files, SmolLM2), `hf`
(Hugging Face GPT-2 and Llama directories; `sharded`: the same, each process reading only its
devices' slices) and `npz` (our own small checkpoints, hashed)."""

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
from smatch_jax.models.convert.npz import load_npz, save_npz
from smatch_jax.models.convert.sharded import load_hf_sharded

__all__ = [
    "BKSPC_INITS",
    "add_bkspc_row",
    "load_gguf_llama",
    "load_hf",
    "load_hf_params",
    "load_hf_sharded",
    "load_npz",
    "model_from_params",
    "model_params",
    "permute_rope_rows",
    "read_safetensors_dir",
    "save_npz",
    "smollm2",
    "unpermute_rope_rows",
]
