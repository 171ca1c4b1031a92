"""Hugging Face checkpoints loaded shard by shard: each process reads only the slices of the
tensors that its devices hold.

`load_hf` reads every tensor on every host and builds the whole model there; `run.setup` then
places it on the mesh, so each of a pod's hosts reads a whole Llama-2-7B (13.5 GB) to keep
its share. `load_hf_sharded` builds the model of the same `ModelConfig` abstractly
(`nnx.eval_shape`), asks the caller where every parameter goes, and creates each one with
`jax.make_array_from_callback`: a device's slice of our parameter is mapped back to a slice of
the HF tensor (a `Take`), read with safetensors' `get_slice`, converted to float32, transformed
as `load_hf` transforms the whole tensor, stacked over the layers of a scanned model and cast
to the storage dtype. The values are `load_hf`'s then `jax.device_put`'s, bit for bit
(tests/test_shard_load.py).

The `<bkspc>` row is the mean of the existing rows of each column, so a slice of the table
that holds row V reads all V rows of its columns. "zeros" is per column too; "normal" draws
from the covariance of all columns: use `load_hf`.

Memory and disk. A process holds its devices' blocks of one parameter at a time on the host
(then the devices' copies) and, during one read, the file pages it touches (safetensors maps
the file; it is closed after every read). A row-major [out, in] tensor split over its input
features (our kernels' `fsdp` split, `sharding.RULES`) or a [V, d] table split over d is read
as a column block of every row, which touches most of the tensor's pages when a row spans a
few pages (Llama-2-7B: 8 KB rows): the memory is the process's share, the disk reads are not.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from smatch_jax.models.config import ModelConfig
from smatch_jax.models.convert.common import (
    LLAMA_BLOCK,
    bkspc_row,
    check_tensors,
    layer_shapes,
    with_dtypes,
)
from smatch_jax.models.convert.hf import (
    GPT2_BLOCK,
    GPT2_UNTIED,
    gpt2_config,
    gpt2_ignored,
    llama_config,
    llama_ignored,
    read_hf_config,
    safetensors_files,
)
from smatch_jax.models.transformer import Transformer

Bounds = tuple[tuple[int, int], ...]  # [start, stop) per dimension


@dataclasses.dataclass(frozen=True)
class Take:
    """How one of our unrolled parameters comes from one checkpoint tensor `src`: "copy",
    "T" (a torch Linear [out, in] transposed to our [in, out]), "cut" (third `part` of the
    columns of GPT-2's c_attn [..., 3d]), "row" (a [V, d] table with the `<bkspc>` row
    appended: the token embedding) or "row_T" (that, transposed: the untied output layer)."""

    src: str
    op: str
    part: int = 0

    def shape(self, src: tuple[int, ...]) -> tuple[int, ...]:
        """Our parameter's shape from the source tensor's."""
        if self.op == "cut":
            if src[-1] % 3:
                raise ValueError(f"{self.src} of shape {src} is not q | k | v columns")
            return (*src[:-1], src[-1] // 3)
        if self.op in ("row", "row_T"):
            if len(src) != 2:
                raise ValueError(f"{self.src} of shape {src} is not a [V, D] table")
            return (src[0] + 1, src[1]) if self.op == "row" else (src[1], src[0] + 1)
        return src[::-1] if self.op == "T" else src

    def read(
        self,
        read_src: Callable[[str, Bounds], np.ndarray],
        src: tuple[int, ...],
        at: Bounds,
        init: str,
        out: np.ndarray,
    ) -> None:
        """Writes block `at` of our parameter into `out` (cast to its dtype on the way) from
        the slice of the source (of shape `src`) it needs; `read_src(name, bounds)`: a
        float32 slice."""
        if self.op == "copy":
            out[...] = read_src(self.src, at)
        elif self.op == "T":
            out[...] = read_src(self.src, at[::-1]).T
        elif self.op == "cut":
            (a, b), n = at[-1], self.part * (src[-1] // 3)
            out[...] = read_src(self.src, (*at[:-1], (n + a, n + b)))
        else:  # a [V, d] table and the <bkspc> row V: out [rows, cols], or [cols, rows]
            rows, cols = at if self.op == "row" else at[::-1]
            table = out if self.op == "row" else out.T
            V = src[0]
            if rows[1] <= V:
                table[...] = read_src(self.src, (rows, cols))
            else:  # row V, from all V rows of these columns
                whole = read_src(self.src, ((0, V), cols))
                table[: V - rows[0]] = whole[rows[0] :]
                table[V - rows[0]] = _bkspc_row(whole, init)


def _bkspc_row(table_VxW: np.ndarray, init: str) -> np.ndarray:
    """`bkspc_row` of some columns of a table: the values it gives them in the whole table.
    numpy sums a [V, 1] array along its contiguous axis (pairwise) and a wider one row after
    row, as the whole table: one column is summed beside a zero column."""
    if init == "mean" and table_VxW.shape[1] == 1:
        return bkspc_row(np.pad(table_VxW, ((0, 0), (0, 1))), init=init)[:1]
    return bkspc_row(table_VxW, init=init)


def _llama_takes(config: ModelConfig) -> dict[str, Take]:
    """Our unrolled names -> their tensors, as `hf._hf_llama`'s specs."""
    out = {}
    for i in range(config.n_layers):
        for ours, (_, theirs) in LLAMA_BLOCK.items():
            op = "copy" if ours.endswith("scale") else "T"
            out[f"blocks.{i}.{ours}"] = Take(f"model.layers.{i}.{theirs}.weight", op)
    out["tok_embed.embedding"] = Take("model.embed_tokens.weight", "row")
    if not config.tie_embeddings:
        out["lm_head.kernel"] = Take("lm_head.weight", "row_T")
    out["final_norm.scale"] = Take("model.norm.weight", "copy")
    return out


def _gpt2_takes(config: ModelConfig) -> dict[str, Take]:
    """Our unrolled names -> their tensors (names without "transformer."), as `hf._hf_gpt2`'s
    specs."""
    out = {
        "tok_embed.embedding": Take("wte.weight", "row"),
        "pos_embed.embedding": Take("wpe.weight", "copy"),
        "final_norm.scale": Take("ln_f.weight", "copy"),
        "final_norm.bias": Take("ln_f.bias", "copy"),
    }
    for i in range(config.n_layers):
        b, h = f"blocks.{i}", f"h.{i}"
        for j, qkv in enumerate("qkv"):
            for w, theirs in (("kernel", "weight"), ("bias", "bias")):
                out[f"{b}.attn.{qkv}_proj.{w}"] = Take(f"{h}.attn.c_attn.{theirs}", "cut", j)
        for ours, theirs in GPT2_BLOCK.items():
            w_name = "scale" if ours.endswith("norm") else "kernel"
            out[f"{b}.{ours}.{w_name}"] = Take(f"{h}.{theirs}.weight", "copy")
            out[f"{b}.{ours}.bias"] = Take(f"{h}.{theirs}.bias", "copy")
    return out


def _tensors(directory: str | os.PathLike, strip: str) -> dict[str, tuple[str, str, tuple]]:
    """name (without the prefix `strip`) -> (file, name in the file, shape), from the files'
    headers alone."""
    from safetensors import safe_open

    out = {}
    for path in safetensors_files(directory):
        with safe_open(str(path), framework="np") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                shape = tuple(f.get_slice(key).get_shape())
                out[key.removeprefix(strip)] = (str(path), key, shape)
    return out


def _read(file: str, name: str, at: Bounds) -> np.ndarray:
    """The block `at` of tensor `name` of a safetensors file, as float32 (the file is mapped
    for this read only)."""
    from safetensors import safe_open

    with safe_open(file, framework="np") as f:
        block = f.get_slice(name)[tuple(slice(a, b) for a, b in at)]
    return np.asarray(block, np.float32)


def _check_gpt2_tied(tensors: Mapping[str, tuple[str, str, tuple]], rows: int = 4096) -> None:
    """`hf._hf_gpt2`'s check that lm_head.weight, when present, is wte.weight: `rows` rows of
    each at a time."""
    if "lm_head.weight" not in tensors:
        return
    (f1, n1, s1), (f2, n2, s2) = tensors["wte.weight"], tensors["lm_head.weight"]
    if s1 != s2:
        raise ValueError(GPT2_UNTIED)
    for a in range(0, s1[0], rows):
        at = ((a, min(a + rows, s1[0])), (0, s1[1]))
        if not np.array_equal(_read(f1, n1, at), _read(f2, n2, at)):
            raise ValueError(GPT2_UNTIED)


def _path_name(path) -> str:
    parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    return ".".join(parts[:-1] if parts and parts[-1] == "value" else parts)


def load_hf_sharded(
    directory: str | os.PathLike,
    shardings: Callable[[nnx.State], Any],
    *,
    dtype: str = "float32",
    param_dtype: str | None = None,
    bkspc_init: str = "mean",
    scan_layers: bool = False,
) -> Transformer:
    """`load_hf(directory, ...)` with every parameter a `jax.Array` placed by `shardings` (the
    abstract `nnx.state(model, nnx.Param)` -> a pytree of `NamedSharding` of its structure,
    e.g. `lambda a: sharding.param_shardings(a, mesh, rules)`), each process reading only the
    slices its devices hold (module doc). Every process of a multi-process run calls it.
    `bkspc_init`: "mean" or "zeros"."""
    if bkspc_init not in ("mean", "zeros"):
        raise ValueError(
            f"bkspc_init={bkspc_init!r}: the sharded loader supports 'mean' and 'zeros' (a "
            "column's <bkspc> value from that column alone); use load_hf for 'normal'"
        )
    hf = read_hf_config(directory)
    if hf["model_type"] == "llama":
        tensors = _tensors(directory, "")
        shapes = {k: s for k, (_, _, s) in tensors.items()}
        config = llama_config(hf, shapes)
        takes, ignored = _llama_takes(config), llama_ignored(config.tie_embeddings)
    else:
        tensors = _tensors(directory, "transformer.")
        shapes = {k: s for k, (_, _, s) in tensors.items()}
        config = gpt2_config(hf, shapes)
        takes, ignored = _gpt2_takes(config), gpt2_ignored
    what = f"{config.family} checkpoint"
    check_tensors(tensors, {t.src for t in takes.values()}, ignored, what)
    config = with_dtypes(config, dtype, param_dtype, scan_layers)
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    expected = {}
    for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
        expected.update(layer_shapes(config, _path_name(path), x.shape))
    got = {ours: t.shape(shapes[t.src]) for ours, t in takes.items()}
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    bad = sorted(
        f"{n}: got {got[n]}, expected {tuple(s)}"
        for n, s in expected.items()
        if n in got and got[n] != tuple(s)
    )
    if missing or unexpected or bad:
        raise ValueError(
            f"{what} does not match the {config.family} model: missing {missing}, "
            f"unexpected {unexpected}, shape mismatches {bad}"
        )
    if config.family == "gpt2":
        _check_gpt2_tied(tensors)

    def read_src(name: str, at: Bounds) -> np.ndarray:
        file, key, _ = tensors[name]
        return _read(file, key, at)

    def ours(name: str, at: Bounds, out: np.ndarray) -> None:
        t = takes[name]
        t.read(read_src, shapes[t.src], at, bkspc_init, out)

    def place(path, x, where):
        names = list(layer_shapes(config, _path_name(path), x.shape))
        stacked = names != [_path_name(path)]  # a scanned model's [L, ...] block weight
        done: dict[Bounds, np.ndarray] = {}  # devices holding the same block read it once

        def block(index) -> np.ndarray:
            at = tuple(s.indices(n)[:2] for s, n in zip(index, x.shape, strict=True))
            if at not in done:
                out = np.empty([b - a for a, b in at], x.dtype)
                if stacked:
                    for i, layer in zip(range(*at[0]), out, strict=True):
                        ours(names[i], at[1:], layer)
                else:
                    ours(names[0], at, out)
                done[at] = out
            return done[at]

        return jax.make_array_from_callback(x.shape, where, block)

    nnx.update(model, jax.tree_util.tree_map_with_path(place, state, shardings(state)))
    abstract = [
        _path_name(p)
        for p, v in jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]
        if isinstance(v, jax.ShapeDtypeStruct)
    ]
    if abstract:
        raise ValueError(f"model state left uninitialised (not params): {abstract}")
    return model
