"""`train(config, workdir)`: the SequenceMatch training loop (method.md §6).

    init params (scratch or pretrained + <bkspc> row, optional LoRA)      run.setup
    for step: [refill the replay buffer from data prompts] -> data batch (+ noise on device)
              + model rows from the buffer -> one layout forward pass -> loss -> update
    log / evaluate / checkpoint on schedule; SIGTERM or Ctrl-C saves and exits cleanly

The checkpoint holds the whole `TrainState` (params, optimiser state, replay buffer, RNG) and
the data-iterator state, so a restarted run continues exactly where it stopped.

Reliability (README "Reliability"): the config and the workdir are checked before anything is
built (`smatch_jax.validate`); a workdir of another config is refused unless `force_resume`,
and so is a workdir another process is training in; nothing in a workdir is written until its
checkpoint is restored (config.json, config.previous.json and provenance.jsonl come after);
unreadable newest checkpoints are set aside and the previous one is used; outputs written
after the restored step are purged so that they are written again identically; a
non-finite loss or gradient is never applied (guard.py).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import warnings
from pathlib import Path

import jax
import ml_collections

from smatch_jax import (
    checkpointing,
    guard,
    metrics,
    preemption,
    provenance,
    read_noise,
    sharding,
    steps,
    storage,
    throughput,
    validate,
)
from smatch_jax.eval import report
from smatch_jax.run import setup

log = logging.getLogger(__name__)


def _prepare(config, workdir_p: Path, force_resume: bool):
    """Checks that need no model or data: the config, the workdir, its saved config; (the
    typed config, the config changes to the workdir's outside RESUMABLE_CHANGES)."""
    typed = validate.check_config(config)
    diff = validate.prepare_workdir(workdir_p, config.to_dict(), force=force_resume)
    if diff:
        log.info("config changes from %s: %s", workdir_p / "config.json", diff)
    forced = {k: v for k, v in diff.items() if k not in validate.RESUMABLE_CHANGES}
    return typed, forced


def _write_config(config, workdir_p: Path, forced: dict) -> None:
    """config.json (after a forced resume the old one is kept as config.previous.json)."""
    if forced:
        previous = (workdir_p / "config.json").read_text()
        storage.write_atomic(workdir_p / "config.previous.json", previous)
        log.warning("force_resume: continuing %s with a changed config: %s", workdir_p, forced)
    storage.write_atomic(workdir_p / "config.json", json.dumps(config.to_dict(), indent=2))


def _restore(run: steps.Run, ckpt: checkpointing.Checkpointer):
    """(state, sampler stats of the last refill, restored step or None)."""
    newest = ckpt.latest_step()
    with warnings.catch_warnings(record=True) as caught:  # one line below, not one a step
        warnings.simplefilter("always")
        restored = ckpt.restore_latest_valid(abstract_state=run.abstract_state(), quarantine=True)
    if restored is None:
        return run.init_state(), {}, None
    step0, state, data_state, extra = restored
    run.data.set_state(data_state)
    if step0 != newest:
        log.warning(
            "%s; set aside as <step>.unreadable in %s, resuming from step %d",
            *(read_noise.skipped_steps(caught), ckpt.workdir, step0),
        )
    log.info("resumed from step %d", step0)
    return state, extra.get("sampled", {}), step0


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    stop_after: int | None = None,
    force_resume: bool = False,
    argv: list[str] | None = None,
    progress_every_s: float | None = None,
) -> tuple[steps.TrainState, dict[str, float]]:
    """The loop; returns the final state and metrics.

    `stop_after=k` stops after k steps of this invocation as a preemption would (checkpoint,
    clean return). `force_resume` continues a workdir whose
    config.json differs from `config` (see `validate.prepare_workdir`). `argv`: the command
    line, recorded in provenance.jsonl. `progress_every_s`: the progress line's cadence
    (default: 1 s on a terminal, 60 s in a log; the experiments' drivers, which run many short
    stages, ask for fewer lines).
    """
    t_start = time.time()
    workdir_p = storage.path(workdir)
    created = not workdir_p.exists() and not storage.is_remote(workdir)  # (no dirs in buckets)
    try:
        typed, forced = _prepare(config, workdir_p, force_resume)
        with validate.lock_workdir(workdir_p, jax.process_index()):
            run = setup(config, typed)
            progress = progress_every_s
            return _train(config, run, workdir_p, stop_after, t_start, forced, argv, progress)
    except BaseException:
        if created and jax.process_index() == 0:
            _remove_if_unwritten(workdir_p)
        raise


def _remove_if_unwritten(workdir_p: Path) -> None:
    """Remove a workdir this run created if it failed before writing anything to it (only
    its lock and empty directories are there)."""
    files = [p for p in workdir_p.rglob("*") if p.is_file()]
    if workdir_p.is_dir() and all(p.name.startswith(".train_lock.") for p in files):
        shutil.rmtree(workdir_p, ignore_errors=True)


def _train(config, run: steps.Run, workdir_p, stop_after, t_start, forced, argv, progress_every_s):
    c = run.typed
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(run.abstract_state()))
    validate.check_free_space(workdir_p, state_bytes, c.train.keep_ckpts)
    host0 = jax.process_index() == 0
    ckpt = checkpointing.Checkpointer(
        workdir_p / "checkpoints", keep=c.train.keep_ckpts, cleanup_tmp=host0
    )
    try:
        state, sampled, step0 = _restore(run, ckpt)
    except checkpointing.CheckpointError as e:
        ckpt.close()
        if not forced:
            raise
        changed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in forced.items())
        raise validate.WorkdirError(
            f"--force_resume: the checkpoints in {ckpt.workdir} do not fit the new config "
            f"({changed}); the workdir is unchanged and its checkpoints intact. Rerun without "
            "the changes that alter the model or its state, or use a new --workdir"
        ) from e
    except BaseException:
        ckpt.close()
        raise
    if host0:  # only now: a restore that fails leaves the workdir as it was
        _write_config(config, workdir_p, forced)
        provenance.record(workdir_p, argv=argv, resumed_from=step0)
    writer = metrics.MetricWriter(workdir_p, enabled=host0, purge_after=step0 or 0)
    n = c.train.num_steps
    progress = None
    if host0:
        progress = metrics.Progress(n, start_step=int(state.step), every_s=progress_every_s)
    stopper = preemption.PreemptionHandler(handle_sigint=True, announce=True).install()
    nonfinite = guard.NonFiniteGuard(c.train.nonfinite, c.train.max_skips, ckpt)
    samples_model_rows = run.samples_model_rows
    warmup, sample_every = c.loss.bc_warmup_steps, c.sampling.sample_every
    lr_at = c.optim.learning_rate(c.train.num_steps)
    timer = throughput.StepTimer(sync=c.train.time_split)
    rows = c.train.batch_size + (c.train.model_rows if samples_model_rows else 0)  # SM's rows
    flops_per_step = (
        rows
        * c.data.seq_len
        * throughput.train_flops_per_token(
            run.model_config, c.data.seq_len, base_trained=not c.model.lora_rank
        )
    )
    last: dict[str, float] = {}
    t_last, tokens_since, first_step_s, unlogged = time.time(), 0, None, None
    profiler = throughput.Profiler(
        workdir_p / "tensorboard",
        *(c.train.profile_start, c.train.profile_steps, int(state.step)),
        enabled=host0 or c.train.profile_all_hosts,
    )
    try:
        step = step_last = int(state.step)
        stop_step = n if stop_after is None else step + stop_after
        while step < n:
            with timer.phase("data"):
                batch = timer.ready(sharding.global_batch(run.data.next(), run.mesh))
            profiler.before(step)
            # SequenceMatch's model rows join the batch after the warm-up
            use_model_rows = samples_model_rows and step >= warmup
            if use_model_rows and step == warmup and host0:
                log.info(
                    "step %d: SequenceMatch's terms start (the BC warm-up, loss.bc_warmup_steps, "
                    "is over): the loss adds the value and chi2 terms, so its scale jumps; this "
                    "is expected",
                    step,
                )
            if use_model_rows and (step - warmup) % sample_every == 0:
                with timer.phase("refill"):
                    state, sample_stats = run.refill(state, batch)
                    sampled = {k: float(v) for k, v in jax.device_get(sample_stats).items()}
            with timer.phase("train_step"):
                state, met = run.train_step(state, batch, use_model_rows=use_model_rows)
                timer.ready(met["loss"])
            profiler.after(step, met["loss"])
            if first_step_s is None:  # building, compiling (or loading: the cache), one step
                jax.block_until_ready(met["loss"])
                first_step_s = unlogged = time.time() - t_start
                log.info("first step done %.1f s after the start", first_step_s)
            step += 1
            nonfinite.push(step, met)
            if step % c.train.log_every == 0 or step == n:
                nonfinite.check()
                met = jax.device_get(met)
                met.pop("finite")
                if c.train.nonfinite == "skip":
                    met["train/skipped_updates"] = nonfinite.skipped
                met["host/rss_mb"] = metrics.host_rss_mb() or 0.0
                met["optim/lr"] = float(lr_at(step - 1))  # the rate of this step's update
                if unlogged is not None:  # in the first log of this invocation
                    met["host/first_step_s"], unlogged = unlogged, None
                # this step's tokens, for each step since the last log
                tokens_since += int(met.pop("tokens")) * (step - step_last)
                now = time.time()
                met["tokens_per_s"] = tokens_since / max(now - t_last, 1e-9)
                # wall time per step since the last log (refills included, evaluations not)
                met["sec_per_step"] = (now - t_last) / max(step - step_last, 1)
                met["tokens_per_s_per_device"] = met["tokens_per_s"] / jax.device_count()
                met.update(timer.scalars(step - step_last))
                util = throughput.mfu(flops_per_step, met["sec_per_step"], jax.devices())
                if util is not None:  # a known TPU (no made-up peak elsewhere)
                    met["mfu"] = util
                t_last, tokens_since, step_last = now, 0, step
                met = {**sampled, **{k: float(v) for k, v in met.items()}}  # latest refill's
                last.update(met)
                writer.write_scalars(step, met)  # eval scalars: by report.evaluate_in_training
            if progress:  # throttled: at least once a minute without a terminal
                progress.update(step, **({"loss": last["loss"]} if "loss" in last else {}))
            if step % c.train.eval_every == 0 or step == n:
                t_eval = time.time()
                with timer.phase("eval"):
                    ev = report.evaluate_in_training(run, state, writer, step)
                last.update(ev)
                t_last += time.time() - t_eval  # throughput figures count training only
            stop = stopper.should_stop(step) or step >= stop_step
            if step % c.train.ckpt_every == 0 or step == n or stop:
                nonfinite.check()  # never checkpoint past an unchecked step
                extra = {"sampled": sampled}  # so the resumed run logs the same sampler stats
                with timer.phase("checkpoint"):  # until the arrays are off the devices
                    data_state = run.data.get_state()
                    ckpt.save(step, state=state, data_state=data_state, extra=extra, force=True)
            if stop and step < n:
                log.warning("stopping at step %d (checkpoint saved)", step)
                break
    finally:
        profiler.stop()
        ckpt.close()
        writer.close()
        stopper.uninstall()
        if progress:
            progress.close()
    return state, last
