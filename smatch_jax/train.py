"""`train_and_evaluate(config, workdir)`: the SequenceMatch training loop (method.md §6).

    init params (scratch or pretrained + <bkspc> row, optional LoRA)
    for step: [refill the replay buffer from data prompts] -> data batch (+ noise on device)
              + model rows from the buffer -> one layout forward pass -> loss -> update
    log / evaluate / checkpoint on schedule; SIGTERM saves and exits cleanly

The checkpoint holds the whole `TrainState` (params, optimiser state, replay buffer, RNG) and
the data-iterator state, so a restarted run continues exactly where it stopped.

Reliability (README "Reliability"): the config and the workdir are checked before anything is
built (`smatch_jax.validate`); a workdir of another config is refused unless `force_resume`;
unreadable newest checkpoints are set aside and the previous one is used; outputs written
after the restored step are purged so that they are written again identically; a
non-finite loss or gradient is never applied and stops the run (`train.nonfinite='stop'`,
naming the step and its diagnostics) or is skipped (`'skip'`, at most `train.max_skips`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from smatch_jax import (
    checkpointing,
    losses,
    metrics,
    noise,
    replay,
    sampling,
    sharding,
    steps,
    validate,
)
from smatch_jax.data import train_data as data_lib
from smatch_jax.eval import accuracy, decoding
from smatch_jax.models import ModelConfig, Transformer, importers, lora

log = logging.getLogger(__name__)


def build_model(
    cfg: ml_collections.ConfigDict, vocab_size: int, seq_len: int, seed: int, tokenizer=None
):
    """The model of `cfg.model` (presets in configs/common.py), from scratch or pretrained.

    `tokenizer` (optional) is checked against the tokenizer of a `ckpt:<workdir>` model.
    """
    from configs.common import MODEL_PRESETS  # configs/ lives at the repository root

    init = cfg.init
    if init == "scratch":
        if cfg.preset not in MODEL_PRESETS:
            raise ValueError(f"model.preset={cfg.preset!r}; choose one of {sorted(MODEL_PRESETS)}")
        mc = ModelConfig(
            vocab_size=vocab_size,
            max_positions=max(seq_len, 8),
            dtype=cfg.dtype,
            **MODEL_PRESETS[cfg.preset],
        )
        model = Transformer(mc, rngs=nnx.Rngs(seed))
    elif init == "smollm2":
        model = importers.smollm2(dtype=cfg.dtype)
    elif init.startswith("hf:"):
        model = importers.load_hf(init[3:], dtype=cfg.dtype)
    elif init.startswith("ckpt:"):  # fine-tune a model trained here (e.g. MLE pretraining)
        run, state = load_trained(init[5:])
        model = nnx.merge(run.graphdef, state.params, run.frozen)
        _check_same_tokenizer(run.data.tokenizer, tokenizer, init)
    else:
        raise ValueError(
            f"model.init={init!r}; use 'scratch', 'smollm2', 'hf:<dir>' or 'ckpt:<workdir>'"
        )
    if model.config.vocab_size != vocab_size:
        raise ValueError(
            f"the model has vocab_size={model.config.vocab_size} but the tokenizer "
            f"{vocab_size}; use the model's own tokenizer"
        )
    if cfg.lora_rank:
        lora.apply_lora(
            model, rank=cfg.lora_rank, alpha=cfg.lora_alpha or None, rngs=nnx.Rngs(seed + 1)
        )
    return model


def _check_same_tokenizer(theirs, ours, init: str) -> None:
    if ours is None or theirs.vocab_size != ours.vocab_size:
        return  # a different vocabulary size is reported by the caller
    ids = range(theirs.vocab_size)
    if [theirs.decode([i]) for i in ids] != [ours.decode([i]) for i in ids]:
        raise ValueError(
            f"model.init={init!r} was trained with a different tokenizer (same size, other "
            "tokens); fine-tune on data built with the same tokenizer"
        )


def make_optimizer(cfg: ml_collections.ConfigDict, num_steps: int, mask=None):
    if cfg.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(
            0.0,
            cfg.lr,
            cfg.warmup_steps,
            max(num_steps, cfg.warmup_steps + 1),
            end_value=0.1 * cfg.lr,
        )
    elif cfg.schedule == "constant":
        lr = optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps), optax.constant_schedule(cfg.lr)],
            [cfg.warmup_steps],
        )
    else:
        raise ValueError(f"optim.schedule={cfg.schedule!r}; use 'cosine' or 'constant'")
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []
    parts.append(optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay))
    if mask is not None:
        parts.append(lora.masked_updates(mask))
    return optax.chain(*parts)


@dataclasses.dataclass
class Run:
    """Everything the loop needs, built once."""

    config: ml_collections.ConfigDict
    data: data_lib.TrainData
    mesh: Any
    state: steps.TrainState
    state_shardings: Any
    train_step: Any  # jitted, static with_model
    refill: Any  # jitted
    graphdef: Any
    frozen: Any
    settings: steps.StepSettings


def setup(config: ml_collections.ConfigDict) -> Run:
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    data = data_lib.build_train_data(config, jax.process_index(), jax.process_count())
    tok = data.tokenizer
    validate.check_tokenizer(tok)
    T, P = config.data.seq_len, data.prompt_max
    model = build_model(config.model, tok.vocab_size, T, config.seed, tok)
    graphdef, params, frozen = nnx.split(
        model, lora.trainable_filter(config.model.lora_rank > 0), ...
    )
    mask = lora.update_mask(params, tok.bkspc_id) if config.model.lora_rank else None
    optimizer = make_optimizer(config.optim, config.train.num_steps, mask)

    specials = [tok.eos_id, tok.pad_id] + ([tok.bos_id] if tok.bos_id is not None else [])
    if config.noise.kind == "ground_truth":
        probs = noise.ground_truth_noise_probs(
            *data.train_rows, vocab_size=tok.vocab_size, special_ids=specials
        )
    elif config.noise.kind == "random":
        probs = noise.random_noise_probs(tok.vocab_size, specials)
    else:
        raise ValueError(f"noise.kind={config.noise.kind!r}; use 'ground_truth' or 'random'")
    sm_on = config.loss.sm_weight > 0 and config.loss.value_on == "mix"
    st = steps.StepSettings(
        bkspc_id=tok.bkspc_id,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
        noise_rate=config.noise.rate,
        noise_max_burst=config.noise.max_burst,
        mask_noise_actions=config.noise.mask_noise_actions,
        noise_exclude_target=config.noise.exclude_target,
        model_rows=config.train.model_rows if sm_on else 0,
        prompt_max=P,
        sampling=sampling.SamplingConfig(
            max_new_tokens=T - P,
            max_actions=T - P,
            temperature=config.sampling.temperature,
            top_k=config.sampling.top_k,
            top_p=config.sampling.top_p,
            bkspc_logit_bias=config.sampling.bkspc_logit_bias,
            allow_bkspc=config.sampling.allow_bkspc,
        ),
    )
    loss_fn = losses.make_loss_fn(config.loss.to_dict(), eos_id=tok.eos_id)
    key = jax.random.key_data(jax.random.key(config.seed))
    state = steps.TrainState(
        jnp.zeros((), jnp.int32),
        params,
        optimizer.init(params),
        replay.init(config.replay.capacity, T, tok.pad_id),
        key,
    )
    param_sh = sharding.param_shardings(state.params, mesh)
    rep = sharding.replicated(mesh)
    opt_sh = jax.tree.map(lambda _: rep, state.opt_state)
    # Optimiser moments follow their parameter's sharding.
    opt_sh = optax.tree_map_params(
        optimizer, lambda _, s: s, state.opt_state, param_sh, transform_non_params=lambda _: rep
    )
    state_sh = steps.TrainState(
        rep, param_sh, opt_sh, jax.tree.map(lambda _: rep, state.replay), rep
    )
    state = jax.device_put(state, state_sh)
    train_step = jax.jit(
        steps.make_train_step(graphdef, frozen, optimizer, loss_fn, jnp.asarray(probs), st),
        static_argnames="with_model",
        out_shardings=(state_sh, rep),
    )
    refill = jax.jit(steps.make_refill(graphdef, frozen, st), out_shardings=(state_sh, rep))
    return Run(config, data, mesh, state, state_sh, train_step, refill, graphdef, frozen, st)


def _abstract(run: Run):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        run.state,
        run.state_shardings,
    )


def load_trained(
    workdir: str, step: int | None = None, *, eval_split: str | None = None
) -> tuple[Run, steps.TrainState]:
    """The run of `workdir` (its saved config) restored at `step` (default: latest), with
    `run.data.eval_split` the run's own evaluation split or `eval_split`."""
    cfg_file = Path(workdir) / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file} not found: is {workdir} a training workdir?")
    config = ml_collections.ConfigDict(json.loads(cfg_file.read_text()))
    if eval_split is not None:
        config.data.eval_split = eval_split
    run = setup(config)
    with checkpointing.Checkpointer(Path(workdir) / "checkpoints") as ckpt:
        step, state, _, _ = ckpt.restore(step, abstract_state=_abstract(run))
    return run, state


def _is_sm_step(config, step: int) -> bool:
    return config.loss.sm_weight > 0 and step >= config.loss.bc_warmup_steps


class NonFiniteError(FloatingPointError):
    """A non-finite loss or gradient stopped the run (its update was not applied)."""


class _NonFiniteGuard:
    """Checks each step's `finite` flag one step late, so the device is never left idle.

    The train step itself never applies a non-finite update; this decides whether the run
    stops (policy 'stop') or goes on (policy 'skip', at most `max_skips` times).
    """

    def __init__(self, policy: str, max_skips: int, ckpt: checkpointing.Checkpointer):
        self.policy, self.max_skips, self.ckpt = policy, max_skips, ckpt
        self.skipped = 0
        self._held: tuple[int, dict] | None = None  # (step, device metrics) not yet checked

    def push(self, step: int, met: dict) -> None:
        """Check the previous step, hold this one."""
        self.check()
        self._held = (step, met)

    def check(self) -> None:
        """Check the held step (blocks until it is computed)."""
        if self._held is None:
            return
        step, met = self._held
        self._held = None
        if bool(jax.device_get(met["finite"])):
            return
        diag = jax.device_get({k: v for k, v in met.items() if k not in ("finite", "tokens")})
        text = ", ".join(f"{k}={float(v):.4g}" for k, v in sorted(diag.items()))
        if self.policy == "skip" and self.skipped < self.max_skips:
            self.skipped += 1
            log.warning(
                "step %d: non-finite loss or gradient, update skipped (%d of at most %d): %s",
                *(step, self.skipped, self.max_skips, text),
            )
            return
        last = self.ckpt.latest_step()
        why = f"after {self.skipped} skipped updates " if self.policy == "skip" else ""
        raise NonFiniteError(
            f"non-finite loss or gradient at step {step} {why}(the update was not applied): "
            f"{text}\nThe last checkpoint is step {last} in {self.ckpt.workdir}. Lower "
            "optim.lr or raise optim.warmup_steps, check the data, or set "
            "train.nonfinite='skip' to skip such updates."
        )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains (resuming from `workdir` if it holds a checkpoint); returns the last metrics."""
    return train(config, workdir)[1]


def _prepare(config, workdir_p: Path, force_resume: bool) -> None:
    """Checks that need no model or data: the config, the workdir, its saved config."""
    validate.check_config(config)
    diff = validate.prepare_workdir(workdir_p, config.to_dict(), force=force_resume)
    if diff:
        log.info("config changes from %s: %s", workdir_p / "config.json", diff)


def _write_config(config, workdir_p: Path) -> None:
    tmp = workdir_p / "config.json.tmp"
    tmp.write_text(json.dumps(config.to_dict(), indent=2))
    tmp.replace(workdir_p / "config.json")


def _restore(run: Run, ckpt: checkpointing.Checkpointer):
    """(state, sampler stats of the last refill, restored step or None)."""
    newest = ckpt.latest_step()
    restored = ckpt.restore_latest_valid(abstract_state=_abstract(run), quarantine=True)
    if restored is None:
        return run.state, {}, None
    step0, state, data_state, extra = restored
    run.data.set_state(data_state)
    if step0 != newest:
        log.warning(
            "checkpoints after step %d were unreadable (set aside as <step>.unreadable); "
            "resuming from step %d",
            step0,
            step0,
        )
    log.info("resumed from step %d", step0)
    return state, extra.get("sampled", {}), step0


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    stop_after: int | None = None,
    force_resume: bool = False,
) -> tuple[steps.TrainState, dict[str, float]]:
    """The loop; returns the final state and metrics.

    `stop_after=k` stops after k steps of this invocation as a preemption would (checkpoint,
    clean return), for tests of resumption. `force_resume` continues a workdir whose
    config.json differs from `config` (see `validate.prepare_workdir`).
    """
    workdir_p = Path(workdir)
    _prepare(config, workdir_p, force_resume)
    run = setup(config)
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(run.state))
    validate.check_free_space(workdir_p, state_bytes, config.train.keep_ckpts)
    host0 = jax.process_index() == 0
    if host0:
        _write_config(config, workdir_p)
    ckpt = checkpointing.Checkpointer(
        workdir_p / "checkpoints", keep=config.train.keep_ckpts, cleanup_tmp=host0
    )
    state, sampled, step0 = _restore(run, ckpt)
    writer = metrics.MetricWriter(workdir_p, enabled=host0, purge_after=step0 or 0)
    n = config.train.num_steps
    progress = metrics.Progress(n, start_step=int(state.step)) if host0 else None
    stopper = checkpointing.PreemptionHandler().install()
    guard = _NonFiniteGuard(config.train.nonfinite, config.train.max_skips, ckpt)
    sm_on = run.settings.model_rows > 0
    last: dict[str, float] = {}
    t_last, tokens_since = time.time(), 0
    try:
        step = int(state.step)
        stop_step = n if stop_after is None else step + stop_after
        while step < n:
            batch = sharding.global_batch(run.data.next(), run.mesh)
            with_model = sm_on and _is_sm_step(config, step)
            if (
                with_model
                and (step - config.loss.bc_warmup_steps) % config.sampling.sample_every == 0
            ):
                state, sample_stats = run.refill(state, batch)
                sampled = {k: float(v) for k, v in jax.device_get(sample_stats).items()}
            state, met = run.train_step(state, batch, with_model=with_model)
            step += 1
            guard.push(step, met)
            if step % config.train.log_every == 0 or step == n:
                guard.check()
                met = jax.device_get(met)
                met.pop("finite")
                if config.train.nonfinite == "skip":
                    met["train/skipped_updates"] = guard.skipped
                met["host/rss_mb"] = metrics.host_rss_mb() or 0.0
                tokens_since += int(met.pop("tokens")) * config.train.log_every
                now = time.time()
                met["tokens_per_s"] = tokens_since / max(now - t_last, 1e-9)
                t_last, tokens_since = now, 0
                met = {**sampled, **{k: float(v) for k, v in met.items()}}  # latest refill's
                last.update(met)
                writer.write_scalars(step, met)  # eval scalars are written by `evaluate`
                if progress:
                    progress.update(step, loss=last["loss"])
            if step % config.train.eval_every == 0 or step == n:
                ev = evaluate(run, state, writer, step)
                last.update(ev)
            stop = stopper.should_stop(step) or step >= stop_step
            if step % config.train.ckpt_every == 0 or step == n or stop:
                guard.check()  # never checkpoint past an unchecked step
                extra = {"sampled": sampled}  # so the resumed run logs the same sampler stats
                ckpt.save(
                    step, state=state, data_state=run.data.get_state(), extra=extra, force=True
                )
            if stop and step < n:
                log.warning("stopping at step %d (checkpoint saved)", step)
                break
    finally:
        ckpt.close()
        writer.close()
        stopper.uninstall()
        if progress:
            progress.close()
    return state, last


def arithmetic_eval_options(run: Run, **overrides) -> dict:
    """`accuracy.evaluate_arithmetic` keywords from `config.eval` (decodings, samples,
    temperature; recovery uses the ground-truth noise distribution of the training rows)."""
    e = run.config.get("eval") or ml_collections.ConfigDict()
    opts = dict(
        decodings=decoding.parse_decodings(e.get("decodings", "all")),
        num_samples=e.get("num_samples", 4),
        temperature=e.get("temperature", 1.0),
        recovery=e.get("recovery", True),
    )
    opts.update(overrides)
    tok = run.data.tokenizer
    specials = [tok.eos_id, tok.pad_id] + ([tok.bos_id] if tok.bos_id is not None else [])
    probs = noise.ground_truth_noise_probs(
        *run.data.train_rows, vocab_size=tok.vocab_size, special_ids=specials
    )
    opts["noise_probs"] = probs if opts.pop("recovery") else None
    return opts


def evaluate(run: Run, state: steps.TrainState, writer, step: int) -> dict[str, float]:
    """Arithmetic: accuracy under each decoding and recovery (`config.eval`); text: samples
    and backspace statistics."""
    ev = run.data.eval_split
    model = nnx.merge(run.graphdef, state.params, run.frozen)
    tok = run.data.tokenizer
    kw = dict(
        prompt_max=run.settings.prompt_max, max_new_tokens=run.settings.sampling.max_new_tokens
    )
    if run.config.data.task == "arithmetic":
        res = accuracy.evaluate_arithmetic(model, ev, tok, **kw, **arithmetic_eval_options(run))
    else:
        res = accuracy.sample_text(model, ev, tok, seed=run.config.seed + step, **kw)
    scalars = {f"eval/{k}": float(v) for k, v in res.scalars.items()}
    writer.write_scalars(step, scalars)
    texts = {"samples": res.samples}
    if res.recovery_examples:
        texts["recovery"] = "\n".join(res.recovery_examples)
    writer.write_texts(step, texts)
    return scalars
