"""The benchmark figures (issue #7), each a function returning a JSON-able dict.

1. `layout_and_mfu`: SequenceMatch step on rows with `<bkspc>` vs an MLE step of the same
   shape, and both against this machine's matmul peak (model FLOP utilisation).
2. `sampler`: backspace sampler vs the same sampler with backspace off, and vs recomputing
   the full prefix at every step.
3. `sm_cost`: the real training step with model rows + amortised refills vs an MLE step.
5. `compile_and_memory`: compile times and XLA's memory estimate of the compiled programs.
Figure 6 (scaling over devices) lives in `benchmarks/scaling.py` (it needs subprocesses).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks import harness as h
from benchmarks.recompute import recompute_sample
from smatch_jax import masks, noise, objective, replay, sampling, steps

EOS = 0  # synthetic rows never contain id 0 as an action, so no row ends early
PAD = 0


# ---- 1 + 4: layout overhead and MFU -------------------------------------------------------


def make_step_fns(model, size: h.Size):
    """Jitted `sm`, `layout_mle` and `mle` steps: (params, opt_state, rows...) -> new state.

    * sm: backspace layout + forward + BC and SequenceMatch losses + backward + AdamW;
    * sm_parallel: the same with `backspace_layout(method="parallel")`;
    * layout_mle: the same layout but the BC loss only (isolates the layout's cost);
    * mle: positions 0..T-1 and a causal mask (no layout) + BC loss = MLE.
    """
    graphdef, params = nnx.split(model)
    opt = h.make_optimizer()
    sm_loss = objective.make_loss_fn({"bc_warmup_steps": 0}, eos_id=EOS)
    bc_loss = objective.make_loss_fn({"sm_weight": 0.0}, eos_id=EOS)
    V = size.vocab

    def update(params, opt_state, loss_fn, ids, pos, mask, rows):
        def objective(p):
            logits = nnx.merge(graphdef, p)(ids, pos, mask)
            return loss_fn(logits, rows, jnp.int32(0))

        (loss, _), grads = jax.value_and_grad(objective, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def with_layout(loss_fn, method="scan"):
        def step(params, opt_state, tokens, m, n, is_model):
            lay = masks.backspace_layout(tokens, m, n, bkspc_id=V, method=method)
            rows = objective.Batch(tokens, m, n, is_model, jnp.ones(tokens.shape, jnp.float32))
            return update(params, opt_state, loss_fn, *lay, rows)

        return jax.jit(step)

    @jax.jit
    def mle(params, opt_state, tokens, m, n, is_model):
        B, T = tokens.shape
        pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        causal = jnp.tril(jnp.ones((1, T, T), bool))
        rows = objective.Batch(tokens, m, n, is_model, jnp.ones(tokens.shape, jnp.float32))
        return update(params, opt_state, bc_loss, tokens, pos, causal, rows)

    fns = {
        "sm": with_layout(sm_loss),
        "sm_parallel": with_layout(sm_loss, "parallel"),
        "layout_mle": with_layout(bc_loss),
        "mle": mle,
    }
    return fns, params, opt.init(params)


def layout_and_mfu(size: h.Size, reps: int, mm_n: int = 1024) -> dict:
    """Figures 1 and 4 for one size, all timed in one interleaved group."""
    model = h.build_model(size)
    fns, params, opt_state = make_step_fns(model, size)
    tokens, plain, m, n = (jnp.asarray(x) for x in h.synthetic_rows(size))
    half = jnp.arange(size.batch) >= size.batch // 2  # half data rows, half model rows
    data = jnp.zeros(size.batch, bool)
    mm, mm_flops = h.matmul_peak_fn(mm_n, size.dtype)
    calls = {
        "sm": lambda: fns["sm"](params, opt_state, tokens, m, n, half),
        "sm_parallel": lambda: fns["sm_parallel"](params, opt_state, tokens, m, n, half),
        "layout_mle": lambda: fns["layout_mle"](params, opt_state, tokens, m, n, data),
        "mle": lambda: fns["mle"](params, opt_state, plain, m, n, data),
        "matmul": mm,
    }
    t = h.interleave(calls, reps)
    flops = h.train_flops(model.config, size.batch, size.seq_len)
    peak = [mm_flops / x for x in t["matmul"]]
    return {
        "size": size.name,
        "params": h.param_count(model),
        "tokens_per_step": size.batch * size.seq_len,
        "bkspc_frac": float(np.mean(np.asarray(tokens) == size.vocab)),
        "sm_step_ms": 1e3 * h.med(t["sm"]),
        "mle_step_ms": 1e3 * h.med(t["mle"]),
        "layout_overhead_ratio": h.median_ratio(t["sm"], t["mle"]),
        "layout_overhead_iqr": h.ratio_quartiles(t["sm"], t["mle"]),
        "layout_only_ratio": h.median_ratio(t["layout_mle"], t["mle"]),
        "parallel_layout_ratio": h.median_ratio(t["sm_parallel"], t["mle"]),
        "train_flops": flops,
        "matmul_peak_gflops": h.med(peak) / 1e9,
        "mfu": h.med([flops / a / p for a, p in zip(t["sm"], peak, strict=True)]),
        "mfu_mle": h.med([flops / a / p for a, p in zip(t["mle"], peak, strict=True)]),
    }


# ---- 2: sampling --------------------------------------------------------------------------


def _prompts(size: h.Size, P: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, size.vocab, (size.batch, P)).astype(np.int32)
    return jnp.asarray(ids), jnp.full((size.batch,), P, jnp.int32)


def sampler_configs(size: h.Size, n_new: int) -> dict[str, sampling.SamplingConfig]:
    """Backspace on (bias so ~10% of actions are `<bkspc>` at init) and off; n_new steps."""
    bias = math.log(max(size.vocab / 9.0, 1.0))
    base = sampling.SamplingConfig(max_new_tokens=n_new, max_actions=n_new, bkspc_logit_bias=bias)
    return {
        "bkspc": base,
        "plain": dataclasses.replace(base, allow_bkspc=False),
        "no_repeat": dataclasses.replace(base, no_repeat_deleted=True),
    }


def check_recompute_equals_cached(model, size: h.Size, n_new: int, P: int = 8) -> bool:
    """Greedy decoding: the no-cache reference gives the cached sampler's rows exactly."""
    graphdef, params = nnx.split(model)
    prompts, m = _prompts(size, P)
    cfg = dataclasses.replace(sampler_configs(size, n_new)["bkspc"], greedy=True)
    kw = dict(cfg=cfg, eos_id=EOS, pad_id=PAD)
    key = jax.random.key(0)
    a = sampling.sample(graphdef, prompts, m, key, params=params, **kw)
    b = recompute_sample(graphdef, params, prompts, m, key, **kw)
    return bool(
        np.array_equal(a.actions, b.actions)
        and np.array_equal(a.final, b.final)
        and np.array_equal(a.length, b.length)
    )


def recompute_steps(n_new: int) -> int:
    """Steps the recompute reference is timed over: 16, fewer for long buffers (>= 2)."""
    return max(2, min(16, n_new, 2048 // n_new))


def sampler(size: h.Size, reps: int, lengths=(64, 256, 1024)) -> dict:
    """Figure 2: tokens/s of the samplers at each number of generated tokens.

    Every row takes exactly `n` actions (no eos, `max_actions = max_new_tokens = n`), so each
    sampler runs `n` decoding steps for `batch * n` tokens. The recompute reference costs the
    same at every step (a full pass over its fixed buffer of P + n slots), so it is timed over
    its first `recompute_steps(n)` steps of that buffer and its tokens/s taken from those.
    """
    model = h.build_model(size)
    graphdef, params = nnx.split(model)
    P = 16
    prompts, m = _prompts(size, P)
    key = jax.random.key(0)
    out = {"size": size.name, "prompt_len": P, "batch": size.batch, "lengths": {}}
    kw = dict(eos_id=EOS, pad_id=PAD)
    for n_new in lengths:
        cfgs = sampler_configs(size, n_new)
        re_cfg = dataclasses.replace(cfgs["bkspc"], max_actions=recompute_steps(n_new))
        calls = {
            "bkspc": lambda c=cfgs["bkspc"]: sampling.sample(
                graphdef, prompts, m, key, cfg=c, params=params, **kw
            ),
            "plain": lambda c=cfgs["plain"]: sampling.sample(
                graphdef, prompts, m, key, cfg=c, params=params, **kw
            ),
            "no_repeat": lambda c=cfgs["no_repeat"]: sampling.sample(
                graphdef, prompts, m, key, cfg=c, params=params, **kw
            ),
            "recompute": lambda c=re_cfg: recompute_sample(
                graphdef, params, prompts, m, key, cfg=c, **kw
            ),
        }
        t = h.interleave(calls, reps)
        steps_of = {"bkspc": n_new, "plain": n_new, "no_repeat": n_new}
        steps_of["recompute"] = re_cfg.n_actions
        tps = {k: [size.batch * steps_of[k] / x for x in v] for k, v in t.items()}
        res = calls["bkspc"]()
        out["lengths"][str(n_new)] = {
            "tokens_per_s": {k: h.med(v) for k, v in tps.items()},
            "bkspc_frac": float(jnp.sum(res.n_bkspc)) / (size.batch * n_new),
            "bkspc_vs_plain": h.median_ratio(tps["bkspc"], tps["plain"]),
            "no_repeat_vs_plain": h.median_ratio(tps["no_repeat"], tps["plain"]),
            "cache_speedup": h.median_ratio(tps["bkspc"], tps["recompute"]),
        }
    out["greedy_recompute_equals_cached"] = check_recompute_equals_cached(model, size, 16)
    return out


# ---- 3 + 5: the real SequenceMatch training step ------------------------------------------


def real_step_setup(size: h.Size, model_rows: int | None = None):
    """The training loop's compiled pieces (`steps.make_train_step`, `make_refill`) and data.

    Data rows fill 3/4 of T (room for noise); the sampler continues their T/4-token prompts
    for T - T/4 tokens; the replay buffer holds 4 refills.
    """
    model = h.build_model(size)
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    opt = h.make_optimizer()
    B, T, V = size.batch, size.seq_len, size.vocab
    P = max(1, T // 4)
    model_rows = B if model_rows is None else model_rows
    samp = sampling.SamplingConfig(max_new_tokens=T - P, max_actions=T - P)
    st = steps.StepSettings(
        bkspc_id=V,
        eos_id=EOS,
        pad_id=PAD,
        noise=noise.NoiseConfig(rate=0.1, kind="random"),
        model_rows=model_rows,
        prompt_max=P,
        sampling=samp,
    )
    probs = jnp.asarray(noise.random_noise_probs(V, [EOS]))
    loss_fn = objective.make_loss_fn({"bc_warmup_steps": 0}, eos_id=EOS)
    state = steps.TrainState(
        jnp.zeros((), jnp.int32),
        params,
        opt.init(params),
        replay.init(4 * B, T, PAD),
        jax.random.key_data(jax.random.key(0)),
    )
    _, plain, m, _ = h.synthetic_rows(size)
    n = np.full(B, (3 * T) // 4, np.int32)
    plain = np.where(np.arange(T)[None] < n[:, None], plain, PAD)
    batch = {"tokens": jnp.asarray(plain), "prompt_len": jnp.asarray(m), "length": jnp.asarray(n)}
    tables = steps.NoiseTables(probs)
    train_step = functools.partial(
        steps.make_train_step(graphdef, opt, loss_fn, st), frozen=frozen, tables=tables
    )
    refill = functools.partial(steps.make_refill(graphdef, st), frozen=frozen)
    return model, state, batch, train_step, refill


def sm_cost(size: h.Size, reps: int, sample_every=(1, 4, 10, 16)) -> dict:
    """Figure 3: (SM step + refill / sample_every) / MLE step, at several sample_every."""
    model, state, batch, train_step, refill = real_step_setup(size)
    sm = jax.jit(train_step, static_argnames="use_model_rows")
    fill = jax.jit(refill)
    state, _ = fill(state, batch)  # a non-empty buffer
    fns, params, opt_state = make_step_fns(model, size)
    toks, m, n = batch["tokens"], batch["prompt_len"], batch["length"]
    data = jnp.zeros(size.batch, bool)
    calls = {
        "sm_step": lambda: sm(state, batch, use_model_rows=True),
        "refill": lambda: fill(state, batch),
        "mle": lambda: fns["mle"](params, opt_state, toks, m, n, data),
    }
    t = h.interleave(calls, reps)
    B, R = size.batch, size.batch
    table = []
    for k in sample_every:
        cost = [
            (a + b / k) / c for a, b, c in zip(t["sm_step"], t["refill"], t["mle"], strict=True)
        ]
        table.append(
            {"sample_every": k, "reuse_per_sampled_row": R * k / B, "sm_step_ratio": h.med(cost)}
        )
    return {
        "size": size.name,
        "data_rows": B,
        "model_rows": R,
        "sampled_tokens_per_refill": B * (size.seq_len - size.seq_len // 4),
        "sm_step_ms": 1e3 * h.med(t["sm_step"]),
        "refill_ms": 1e3 * h.med(t["refill"]),
        "mle_step_ms": 1e3 * h.med(t["mle"]),
        "train_step_only_ratio": h.median_ratio(t["sm_step"], t["mle"]),
        "refill_over_mle": h.median_ratio(t["refill"], t["mle"]),
        "by_sample_every": table,
    }


def _compile(fn, *args, **static) -> tuple[float, object]:
    t0 = time.perf_counter()
    compiled = jax.jit(fn, static_argnames=tuple(static)).lower(*args, **static).compile()
    return time.perf_counter() - t0, compiled


def _peak_bytes(compiled) -> int | None:
    ma = compiled.memory_analysis()
    if ma is None:
        return None
    total = ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
    return int(total - ma.alias_size_in_bytes)


def compile_and_memory(size: h.Size) -> dict:
    """Figure 5: compile seconds and XLA's peak-memory estimate (arguments + outputs + temps)."""
    _, state, batch, train_step, refill = real_step_setup(size)
    t_train, c_train = _compile(train_step, state, batch, use_model_rows=True)
    t_refill, c_refill = _compile(refill, state, batch)
    return {
        "size": size.name,
        "train_compile_s": t_train,
        "sampler_compile_s": t_refill,
        "train_peak_mb": (_peak_bytes(c_train) or 0) / 2**20,
        "sampler_peak_mb": (_peak_bytes(c_refill) or 0) / 2**20,
        "host_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
