"""The tokenizer interface every tokenizer in smatch_jax implements.

The base vocabulary has `vocab_size` ids (special tokens included); the `<bkspc>` action is the
extra id `bkspc_id == vocab_size`, which no tokenizer ever produces from text. Decoding an
action row applies its backspaces first (method.md §3); `render_actions` shows them instead. Both
take rows already cut to their length (padding is the caller's business).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

BKSPC_GLYPH = "⌫"


class Tokenizer(abc.ABC):
    """Text <-> ids, plus the special ids the method needs."""

    vocab_size: int  # base vocabulary size V (specials included); <bkspc> is V
    eos_id: int  # ends an episode
    pad_id: int  # fills rows past their length (may equal eos_id)
    bos_id: int | None  # prompt of unconditional text, if the tokenizer has one

    @property
    def bkspc_id(self) -> int:
        return self.vocab_size

    @property
    def special_ids(self) -> list[int]:
        """eos, pad and bos (when there is one): never noise, never a reward target."""
        return [self.eos_id, self.pad_id] + ([self.bos_id] if self.bos_id is not None else [])

    def same_as(self, other: Tokenizer) -> bool:
        """The same vocabulary: equal size and every id decodes to the same text."""
        ids = range(self.vocab_size)
        return self.vocab_size == other.vocab_size and all(
            self.decode([i]) == other.decode([i]) for i in ids
        )

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of `text` (no special tokens added)."""

    @abc.abstractmethod
    def _decode_base(self, ids: Sequence[int]) -> str:
        """Text of base-vocabulary ids (no <bkspc> among them)."""

    def decode(self, ids: Sequence[int], prompt_len: int = 0) -> str:
        """Text of `ids` after their backspaces are applied (slice rows to their length first).

        Backspaces never delete the first `prompt_len` ids (method.md §1: a no-op at the prompt).
        """
        ids = [int(i) for i in ids]
        state = ids[:prompt_len]
        for i in ids[prompt_len:]:
            if i != self.bkspc_id:
                state.append(i)
            elif len(state) > prompt_len:
                state.pop()
        return self._decode_base(state)

    def render_actions(self, ids: Sequence[int]) -> str:
        """The raw action stream with each `<bkspc>` shown as ⌫ (for inspecting samples)."""
        out, run = [], []
        for i in [int(i) for i in ids] + [self.bkspc_id]:
            if i == self.bkspc_id:
                if run:
                    out.append(self._decode_base(run))
                    run = []
                out.append(BKSPC_GLYPH)
            else:
                run.append(i)
        return "".join(out[:-1])
