"""Prompt lookup: propose the tokens that followed the latest earlier occurrence of the current
n-gram in prompt + generated text (Saxena 2023). Deterministic, so q is one-hot and speculative
sampling stays lossless (accept x with probability p(x); recover from p with x removed)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from outrider.drafters.base import BuildContext, Draft, DraftStep, empty_draft, register


def lookup_continuation(tokens: np.ndarray, max_ngram: int, min_ngram: int, k: int) -> np.ndarray:
    """Tokens after the latest earlier match of the longest matching suffix n-gram.

    tokens (n,) int64. Tries n-gram sizes max_ngram..min_ngram; returns up to k tokens (possibly
    none) that followed the most recent earlier occurrence of the last `size` tokens.
    """
    n = tokens.shape[0]
    for size in range(min(max_ngram, n - 1), min_ngram - 1, -1):
        pattern = tokens[n - size :]
        # Windows starting at 0..n-size-1: each has at least one token after it.
        windows = sliding_window_view(tokens[: n - 1], size)
        hits = np.flatnonzero((windows == pattern).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + size
            return tokens[start : start + k]
    return tokens[:0]


@register("prompt_lookup")
class PromptLookup:
    uses_draft_model: ClassVar[bool] = False
    stops_on_confidence: ClassVar[bool] = False
    default_k: ClassVar[int] = 6

    def __init__(
        self, max_ngram: int = 3, min_ngram: int = 1, k: int = 6, device: torch.device | str = "cpu"
    ) -> None:
        if min_ngram < 1 or max_ngram < min_ngram:
            raise ValueError(
                f"n-gram sizes min_ngram={min_ngram}, max_ngram={max_ngram} are invalid: "
                "need 1 <= min_ngram <= max_ngram"
            )
        if k < 1:
            raise ValueError(f"k={k} is invalid: propose at least 1 token per step")
        self.max_ngram, self.min_ngram, self.k = max_ngram, min_ngram, k
        self.device = torch.device(device)
        self._empty = empty_draft(self.device)

    @classmethod
    def build(cls, ctx: BuildContext) -> PromptLookup:
        return cls(k=ctx.k or cls.default_k, device=ctx.target.model.device)

    def begin(self, prompt: torch.Tensor) -> None:
        pass

    def propose(self, step: DraftStep) -> Draft:
        found = lookup_continuation(step.tokens.numpy(), self.max_ngram, self.min_ngram, min(step.k, self.k))
        if found.size == 0:
            return self._empty
        return Draft(torch.from_numpy(found.copy()).to(self.device))

    def update(self, committed: int) -> None:
        pass
