"""The row format every task produces and every consumer (losses, noise, eval) expects.

An example is a dict with

    tokens      int32 [T]  prompt ids, then completion ids (ending in eos), then pad_id
    prompt_len  int32 []   number of prompt ids (>= 1)
    length      int32 []   prompt_len + completion length (eos included); tokens[length:] == pad

and a batch stacks examples: tokens [B, T], prompt_len [B], length [B]. Rows never silently lose
tokens: `make_row` raises `RowTooLongError`, and each task decides explicitly what to do with
such rows (arithmetic resamples and counts them, text chunking is sized so that rows fit).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

ROW_KEYS = ("tokens", "prompt_len", "length")


class RowTooLongError(ValueError):
    """A prompt + completion + eos does not fit in T tokens."""


def make_row(
    prompt: Sequence[int], completion: Sequence[int], *, T: int, eos_id: int, pad_id: int
) -> dict[str, np.ndarray]:
    """One example: `prompt`, `completion`, eos, padding to T (raises if it does not fit)."""
    if len(prompt) < 1:
        raise ValueError("a row needs a prompt of at least one token")
    if len(prompt) >= T:
        raise RowTooLongError(f"prompt of {len(prompt)} tokens does not fit T={T} (+ eos)")
    length = len(prompt) + len(completion) + 1
    if length > T:
        raise RowTooLongError(
            f"prompt ({len(prompt)}) + completion ({len(completion)}) + eos = {length} > T={T}"
        )
    tokens = np.full((T,), pad_id, np.int32)
    tokens[: len(prompt)] = prompt
    tokens[len(prompt) : length - 1] = completion
    tokens[length - 1] = eos_id
    return {
        "tokens": tokens,
        "prompt_len": np.int32(len(prompt)),
        "length": np.int32(length),
    }


def stack_rows(rows: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stacks examples into a batch (numeric row fields only)."""
    if not rows:
        raise ValueError("cannot stack an empty list of rows")
    return {k: np.stack([np.asarray(r[k]) for r in rows]).astype(np.int32) for k in ROW_KEYS}


def completion_token_counts(
    tokens: np.ndarray, prompt_len: np.ndarray, length: np.ndarray, *, vocab_size: int
) -> np.ndarray:
    """Counts [vocab_size] of the completion tokens (eos included) of a batch of rows.

    `noise.ground_truth_noise_probs(tokens, prompt_len, length, vocab_size=V,
    special_ids=[eos, pad])` normalises the same counts (minus specials) into the ground-truth
    noise distribution; use `load_split(..., "train")` to get the arrays.
    """
    tokens, prompt_len, length = np.asarray(tokens), np.asarray(prompt_len), np.asarray(length)
    t = np.arange(tokens.shape[1])[None, :]
    acts = tokens[(t >= prompt_len[:, None]) & (t < length[:, None])]
    return np.bincount(acts, minlength=vocab_size)[:vocab_size]
