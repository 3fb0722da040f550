"""The small protocol every backend (target or draft model) implements.

A model holds one sequence (batch size 1) and its KV cache. `forward` appends tokens at the end
of the cache and returns their logits; `rollback` shortens the cache to the committed length, so
that after a rejection the cache holds exactly the committed tokens (contract 4).

Batches (batch.py): the native backend also holds several sequences, one per cache *slot*
(`set_slots`, `forward_rows`); `row(slot)` is one slot seen through this same protocol, which is
what each sequence of a batch holds.

Trees (tree.py): a forward may carry a token tree instead of a chain. `attn_mask` (n, n) says
which of the new tokens each new token sees (its ancestors and itself; every new token sees the
whole cache) and `positions` (n,) gives each token its position (committed length + depth). After
verification `keep_path` keeps the accepted root-to-node path and drops the other branches, so
the cache equals that of the path fed as a chain.

Prefix reuse: a backend that records what its cache holds (`cached_ids`, and with capture_hidden
`cached_hidden`; the native backend does) lets a new sequence keep the part of the cache it shares
with the last one (`reuse_prefix`): a chat's next turn, or requests with one system prompt, feed
only their new tokens. Changing the captured layers starts the native cache over (its record holds
the old layers' states).

Hidden states (for self-drafting heads): `capture_hidden(layers)` makes every later forward record
the hidden states of those layers for the tokens it appends, in `hidden` (len(layers), n, D), in
the model's dtype. Layer indices follow transformers' `output_hidden_states`: 0 is the embedding
output, i the output of decoder layer i, and num_hidden_layers the last layer after the final norm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

import torch


@runtime_checkable
class CausalModel(Protocol):
    vocab_size: int  # width of the logits (may exceed the tokenizer's size when padded)
    max_length: int | None  # context window in tokens, None when the model has none
    device: torch.device
    hidden: torch.Tensor | None  # (len(layers), n, D) of the last forward; None when not captured

    @property
    def length(self) -> int:
        """Number of tokens in the cache."""
        ...

    def forward(
        self,
        ids: torch.Tensor,
        num_logits: int | None = None,
        attn_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Append ids (n,) long to the cache; return float32 logits (m, V) of the last m positions
        (m = n when num_logits is None). num_logits=0 skips the output layer (prefill).
        attn_mask (n, n) bool: [i, j] = new token i sees new token j (None: causal); or
        (n, length + n) bool over cache and new tokens (a drafter growing a tree over several
        forwards: a new node must not see the other branches already in the cache).
        positions (n,) long: each new token's position (None: length .. length + n - 1)."""
        ...

    def rollback(self, length: int) -> None:
        """Keep only the first `length` tokens of the cache (length <= self.length)."""
        ...

    def keep_path(self, start: int, path: list[int]) -> None:
        """After a forward that appended tokens at [start, length): keep only those at offsets
        `path` (increasing), moved to [start, start + len(path)); the cache length becomes
        start + len(path)."""
        ...

    def capture_hidden(self, layers: Sequence[int]) -> None:
        """Record these layers' hidden states in `hidden` on every later forward (empty: stop)."""
        ...

    def reset(self) -> None:
        """Empty the cache for a new sequence."""
        ...


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """The length of the longest common prefix of two 1-D id tensors."""
    n = min(a.shape[0], b.shape[0])
    differ = (a[:n].cpu() != b[:n].cpu()).nonzero()
    return int(differ[0, 0]) if differ.numel() else n


def reuse_prefix(model: Any, ids: torch.Tensor) -> int:
    """Start a new sequence whose first tokens are `ids` (n,) on `model`: keep the longest prefix
    of them its cache already holds (rolled back to it) and return its length; a backend that does
    not record its cache's ids (no `cached_ids`) is reset and 0 returned. The caller feeds ids[kept:]."""
    cached = getattr(model, "cached_ids", None)
    kept = common_prefix(cached(), ids) if cached is not None else 0
    if kept:
        model.rollback(kept)
    else:
        model.reset()
    return kept


@dataclass(frozen=True, slots=True)
class RowForward:
    """One row of a batched forward (`forward_rows` of a backend with slots): append `ids` (n,)
    long to the cache of `slot`; num_logits, attn_mask and positions as in CausalModel.forward."""

    slot: int
    ids: torch.Tensor
    num_logits: int | None = None
    attn_mask: torch.Tensor | None = None
    positions: torch.Tensor | None = None


class SlotRow:
    """One slot of a backend that holds several sequences (set_slots / forward_rows) as a batch-1
    CausalModel: the model a sequence of a batch holds. Its forward runs that row alone; a batch
    decoder runs all rows' steps in one forward_rows and hands each row its hidden states."""

    def __init__(self, model: Any, slot: int) -> None:
        if not 0 <= slot < model.slots:
            raise ValueError(f"slot={slot} is outside the cache's {model.slots} slots: call set_slots first")
        self.model, self.slot = model, slot
        self.vocab_size, self.max_length, self.device = model.vocab_size, model.max_length, model.device
        self.hidden: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.model.slot_length(self.slot)

    def forward(self, ids: torch.Tensor, num_logits: int | None = None, attn_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.model.forward_rows([RowForward(self.slot, ids, num_logits, attn_mask, positions)])[0]
        self.hidden = self.model.row_hidden[0] if self.model.row_hidden is not None else None
        return logits

    def rollback(self, length: int) -> None:
        self.model.rollback(length, self.slot)

    def cached_ids(self) -> torch.Tensor:
        """The slot's cached ids; none where the backend does not record them (nothing reusable)."""
        cached = getattr(self.model, "cached_ids", None)
        return cached(self.slot) if cached is not None else torch.zeros(0, dtype=torch.long)

    def cached_hidden(self) -> torch.Tensor | None:
        cached = getattr(self.model, "cached_hidden", None)
        return cached(self.slot) if cached is not None else None

    def keep_path(self, start: int, path: list[int]) -> None:
        self.model.keep_path(start, path, self.slot)

    def capture_hidden(self, layers: Sequence[int]) -> None:
        self.model.capture_hidden(layers)

    def reset(self) -> None:
        self.model.reset(self.slot)
        self.hidden = None
