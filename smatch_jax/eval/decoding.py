"""Decoding modes of the evaluation, and the corrupted prompts of the recovery evaluation.

Three modes, each a `SamplingConfig` (method.md §7):
* `greedy`: argmax at every step. After `x <bkspc>` a model is back in the same state with the
  same logits, so it picks `x` again: plain greedy cannot use a backspace well.
* `greedy_no_repeat`: argmax among the actions not deleted from the current state before
  (`SamplingConfig.no_repeat_deleted`). The headline: it equals greedy for a model that never
  deletes.
* `sample`: ancestral sampling at a temperature (default 1), `k` sampling seeds.

`decode` runs one mode over a list of prompts in fixed-size batches (one compiled sampler per
mode and width) and returns plain numpy rows. `corrupt` builds the recovery prompts of the
paper's Table 2: the question, the first `j` answer tokens of the reference and one wrong token.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, ClassVar

import jax
import numpy as np

from smatch_jax import sampling, sharding
from smatch_jax.sections import Section

log = logging.getLogger(__name__)

DECODINGS = ("greedy", "greedy_no_repeat", "sample")
HEADLINE = "greedy_no_repeat"


@dataclasses.dataclass(frozen=True)
class EvalConfig(Section):
    """`config.eval`: how arithmetic runs are evaluated (method.md §7)."""

    NAME: ClassVar[str] = "eval"
    decodings: str = "all"  # 'all' or a comma list of greedy,greedy_no_repeat,sample
    num_samples: int = 4  # sampling seeds of the 'sample' decoding (mean and interval)
    temperature: float = 1.0  # temperature of the 'sample' decoding
    recovery: bool = True  # also recovery from a corrupted answer prefix

    RANGES: ClassVar[tuple[tuple[str, Any, Any, bool], ...]] = (
        ("num_samples", 1, None, True),
        ("temperature", 0.0, None, False),
    )

    @classmethod
    def cross_problems(cls, values: dict[str, Any]) -> list[str]:
        try:
            parse_decodings(values["decodings"])
        except ValueError as e:
            return [f"eval.decodings={values['decodings']!r}: {e}"]
        return []


def decoding_config(mode: str, max_new_tokens: int, temperature: float = 1.0):
    """The `SamplingConfig` of a decoding mode."""
    if mode == "greedy":
        return sampling.SamplingConfig(max_new_tokens=max_new_tokens, greedy=True)
    if mode == "greedy_no_repeat":
        return sampling.SamplingConfig(
            max_new_tokens=max_new_tokens, greedy=True, no_repeat_deleted=True
        )
    if mode == "sample":
        return sampling.SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature)
    raise ValueError(f"unknown decoding {mode!r}; choose one of {list(DECODINGS)}")


def parse_decodings(spec: str) -> tuple[str, ...]:
    """'all' or a comma-separated list of modes."""
    modes = DECODINGS if spec == "all" else tuple(m.strip() for m in spec.split(",") if m.strip())
    for m in modes:
        if m not in DECODINGS:
            raise ValueError(f"unknown decoding {m!r}; choose from {list(DECODINGS)} or 'all'")
    if not modes:
        raise ValueError("no decoding given; choose from greedy, greedy_no_repeat, sample, all")
    return modes


@dataclasses.dataclass
class Decoded:
    """Per example: the action row (prompt, then actions), the final state, counts."""

    actions: list[list[int]]
    final: list[list[int]]  # the state after backspaces, eos removed
    n_bkspc: np.ndarray  # int [N]
    ended: np.ndarray  # bool [N]


def decode(
    model,
    prompts: list[list[int]],
    tokenizer,
    cfg: sampling.SamplingConfig,
    *,
    width: int,
    key: jax.Array,
    floor_len: list[int] | None = None,
    batch_size: int = 256,
) -> Decoded:
    """Decodes every prompt (left-aligned into `width` columns) with `cfg`.

    `floor_len[i]` (default: the prompt's length): the state length `<bkspc>` cannot go below.
    Batches are padded to `batch_size` so that one compiled sampler serves every call.
    """
    N = len(prompts)
    floor = [len(p) for p in prompts] if floor_len is None else list(floor_len)
    limit = model.config.position_limit
    longest = max(len(p) for p in prompts)
    if limit is not None and longest < limit < longest + cfg.max_new_tokens:
        # A GPT-2-family model has no positions past its table (sampling.check_positions):
        # the states that could run past it (recovery prompts hold part of the answer) get
        # fewer new tokens, never NaN logits.
        log.warning(
            "decoding: max_new_tokens %d -> %d so that prompts of up to %d tokens stay within "
            "the model's %d positions",
            *(cfg.max_new_tokens, limit - longest, longest, limit),
        )
        cfg = dataclasses.replace(cfg, max_new_tokens=limit - longest)
    out = Decoded([], [], np.zeros(N, np.int64), np.zeros(N, bool))
    for start in range(0, N, batch_size):
        chunk = list(range(start, min(start + batch_size, N)))
        rows = chunk + [chunk[0]] * (batch_size - len(chunk))  # pad with copies
        ids = np.full((batch_size, width), tokenizer.pad_id, np.int32)
        for i, b in enumerate(rows):
            ids[i, : len(prompts[b])] = prompts[b]
        m = np.array([len(prompts[b]) for b in rows], np.int32)
        res = sharding.to_host(
            sampling.sample(
                model,
                ids,
                m,
                jax.random.fold_in(key, start),
                eos_id=tokenizer.eos_id,
                pad_id=tokenizer.pad_id,
                cfg=cfg,
                floor_len=np.array([floor[b] for b in rows], np.int32),
            )
        )
        for i, b in enumerate(chunk):
            out.actions.append(res.actions[i, : res.length[i]].tolist())
            final = res.final[i, : res.final_length[i]].tolist()
            out.final.append(final[:-1] if res.ended[i] else final)
            out.n_bkspc[b], out.ended[b] = res.n_bkspc[i], res.ended[i]
    return out


def recovery_deletions(dec: Decoded, prompts: list[list[int]], bkspc_id: int) -> dict:
    """Deletions after corrupted prompts: `recovery_deletions` (mean backspaces per example)
    and `recovery_exact_delete_frac` (the model deleted the given error and nothing else:
    its one backspace was its first action)."""
    pairs = zip(dec.actions, prompts, strict=True)
    first_bk = np.array([len(a) > len(p) and a[len(p)] == bkspc_id for a, p in pairs])
    return {
        "recovery_deletions": float(dec.n_bkspc.mean()),
        "recovery_exact_delete_frac": float(np.mean(first_bk & (dec.n_bkspc == 1))),
    }


def corrupt(
    tokens: np.ndarray,
    prompt_len: np.ndarray,
    length: np.ndarray,
    noise_probs: np.ndarray,
    *,
    eos_id: int,
    seed: int = 0,
) -> tuple[list[list[int]], np.ndarray, np.ndarray]:
    """The recovery prompts: question, reference answer tokens `[0, j)` with `j` uniform over
    the answer's positions, then one wrong token drawn from `noise_probs` (the ground-truth
    noise distribution) without the reference token at `j`. Returns (prompts, j, wrong).
    Deterministic in `seed`, so every method sees the same corrupted prompts."""
    rng = np.random.default_rng(seed)
    prompts, js, wrongs = [], [], []
    for b in range(len(prompt_len)):
        m, n = int(prompt_len[b]), int(length[b])
        answer = [t for t in tokens[b, m:n].tolist() if t != eos_id]
        j = int(rng.integers(0, max(len(answer), 1)))
        p = np.asarray(noise_probs, np.float64).copy()
        if j < len(answer):
            p[answer[j]] = 0.0  # an error must be an error
        if p.sum() <= 0:
            raise ValueError("the noise distribution has no token other than the reference")
        wrong = int(rng.choice(len(p), p=p / p.sum()))
        prompts.append(tokens[b, :m].tolist() + answer[:j] + [wrong])
        js.append(j)
        wrongs.append(wrong)
    return prompts, np.array(js), np.array(wrongs)
