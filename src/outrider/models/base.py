"""The small protocol every backend (target or draft model) implements.

A model holds one sequence (batch size 1) and its KV cache. `forward` appends tokens at the end
of the cache and returns their logits; `rollback` shortens the cache to the committed length, so
that after a rejection the cache holds exactly the committed tokens (contract 3).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class CausalModel(Protocol):
    vocab_size: int  # width of the logits (may exceed the tokenizer's size when padded)
    max_length: int | None  # context window in tokens, None when the model has none
    device: torch.device

    @property
    def length(self) -> int:
        """Number of tokens in the cache."""
        ...

    def forward(self, ids: torch.Tensor, num_logits: int | None = None) -> torch.Tensor:
        """Append ids (n,) long to the cache; return float32 logits (m, V) of the last m positions
        (m = n when num_logits is None). num_logits=0 skips the output layer (prefill)."""
        ...

    def rollback(self, length: int) -> None:
        """Keep only the first `length` tokens of the cache (length <= self.length)."""
        ...

    def reset(self) -> None:
        """Empty the cache for a new sequence."""
        ...
