"""Shared pieces of the benchmarks: model sizes, synthetic rows, interleaved timing, FLOPs.

Every figure is a ratio of two (or more) computations timed side by side: the repetitions
are interleaved (A B A B ..., with the order alternating) and each figure is the median of
the per-repetition ratios, so load from other jobs on the machine cancels out as far as it
can. Absolute times are reported too, but only the ratios are meant to be compared.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from smatch_jax.models import ModelConfig, Transformer


@dataclasses.dataclass(frozen=True)
class Size:
    """A model shape and the batch it is benchmarked on."""

    name: str
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    vocab: int  # base vocabulary V (the model has V + 1 outputs)
    batch: int  # rows per step
    seq_len: int  # T
    dtype: str = "float32"  # compute dtype of the model (and of the matmul peak)

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            family="llama",
            vocab_size=self.vocab,
            d_model=self.d_model,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            d_ff=self.d_ff,
            max_positions=4096,
            use_bias=False,
            dtype=self.dtype,
        )


SIZES = {
    "toy": Size("toy", 32, 2, 4, 2, 64, 17, 4, 16),
    "s": Size("s", 64, 2, 4, 2, 192, 256, 8, 128),
    "m": Size("m", 128, 4, 4, 2, 384, 512, 8, 256),
    "l": Size("l", 256, 6, 8, 4, 768, 1024, 8, 256),
}


def build_model(size: Size, seed: int = 0) -> Transformer:
    return Transformer(size.model_config(), rngs=nnx.Rngs(seed))


def make_optimizer() -> optax.GradientTransformation:
    """The training loop's optimiser (clip + AdamW), constant learning rate."""
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, b1=0.9, b2=0.98))


def synthetic_rows(size: Size, seed: int = 0, p_bkspc: float = 0.1):
    """Full rows [B, T]: a prompt of T/4 tokens, then actions with `<bkspc>` at rate p_bkspc.

    Returns numpy `(tokens_with_bkspc, tokens_plain, prompt_len, length)`; the plain rows
    have the backspaces replaced by ordinary tokens (the MLE twin of the same shape).
    """
    rng = np.random.default_rng(seed)
    B, T, V = size.batch, size.seq_len, size.vocab
    plain = rng.integers(1, V, (B, T)).astype(np.int32)
    m = np.full(B, max(1, T // 4), np.int32)
    n = np.full(B, T, np.int32)
    bk = (rng.random((B, T)) < p_bkspc) & (np.arange(T)[None] >= m[:, None])
    tokens = np.where(bk, V, plain).astype(np.int32)
    return tokens, plain, m, n


def block(x):
    return jax.block_until_ready(x)


def timed(fn: Callable[[], object], inner: int) -> float:
    """Seconds per call of `fn` over `inner` back-to-back calls (one sync at the end)."""
    t0 = time.perf_counter()
    out = None
    for _ in range(inner):
        out = fn()
    block(out)
    return (time.perf_counter() - t0) / inner


TARGET_S = 0.15  # seconds one timing should last (tests lower it)


def calibrate(fn: Callable[[], object], target_s: float, max_inner: int = 64) -> int:
    """Calls per timing so that one timing lasts about `target_s` (after a warm-up call)."""
    block(fn())
    t = timed(fn, 1)
    return int(min(max_inner, max(1, round(target_s / max(t, 1e-6)))))


def interleave(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, list[float]]:
    """Seconds per call of each fn, `reps` times, interleaved with alternating order."""
    inner = {k: calibrate(f, TARGET_S) for k, f in fns.items()}
    names = list(fns)
    out: dict[str, list[float]] = {k: [] for k in names}
    for r in range(reps):
        for k in names if r % 2 == 0 else names[::-1]:
            out[k].append(timed(fns[k], inner[k]))
    return out


def median_ratio(num: list[float], den: list[float]) -> float:
    """Median over repetitions of num[i] / den[i] (paired, so slow phases cancel)."""
    return float(statistics.median(a / b for a, b in zip(num, den, strict=True)))


def ratio_quartiles(num: list[float], den: list[float]) -> list[float]:
    """[q1, q3] of the paired ratios num[i] / den[i]: how much the machine's noise moved them."""
    r = sorted(a / b for a, b in zip(num, den, strict=True))
    if len(r) < 2:
        return [r[0], r[0]]
    q = statistics.quantiles(r, n=4, method="inclusive")
    return [float(q[0]), float(q[2])]


def med(xs: list[float]) -> float:
    return float(statistics.median(xs))


def param_count(model: Transformer) -> int:
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def forward_flops(cfg: ModelConfig, batch: int, seq_len: int) -> float:
    """Matmul FLOPs of one forward pass over [batch, seq_len] (2 per multiply-add).

    Projections and MLP per token, the output layer over V + 1 actions, and attention scores
    and weighted values over all T keys (the masked attention computes them all).
    """
    d, hd = cfg.d_model, cfg.head_dim
    proj = d * hd * (cfg.n_heads * 2 + cfg.n_kv_heads * 2)  # q, o, k, v
    mlp = d * cfg.d_ff * (3 if cfg.family == "llama" else 2)
    attn = 2 * seq_len * cfg.n_heads * hd  # q.k and p.v per query
    per_token = cfg.n_layers * (proj + mlp + attn) + d * cfg.n_actions
    return 2.0 * per_token * batch * seq_len


def train_flops(cfg: ModelConfig, batch: int, seq_len: int) -> float:
    """Forward + backward (twice the forward) model FLOPs of one train step."""
    return 3.0 * forward_flops(cfg, batch, seq_len)


def matmul_peak_fn(n: int = 1024, dtype: str = "float32"):
    """(fn, flops per call): an n x n x n matmul, the machine's practical peak for `dtype`."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.dtype(dtype))
    f = jax.jit(lambda x, y: x @ y)
    return (lambda: f(a, b)), 2.0 * n**3
