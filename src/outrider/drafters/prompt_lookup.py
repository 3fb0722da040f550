"""Prompt lookup: propose the tokens that followed the latest earlier occurrence of the current
n-gram in prompt + generated text (Saxena 2023). Deterministic, so q is one-hot and speculative
sampling stays lossless (accept x with probability p(x); recover from p with x removed).

With width > 1 the continuations of up to `width` distinct earlier matches (longest n-gram first,
then most recent) become the branches of a draft tree, merged where they share a prefix."""

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


def lookup_continuations(tokens: np.ndarray, max_ngram: int, min_ngram: int, k: int, width: int) -> list[list[int]]:
    """Up to `width` distinct continuations (each up to k tokens) of earlier matches of the current
    suffix n-gram: longer n-grams first, the most recent match first within a size."""
    n = tokens.shape[0]
    found: list[list[int]] = []
    for size in range(min(max_ngram, n - 1), min_ngram - 1, -1):
        pattern = tokens[n - size :]
        windows = sliding_window_view(tokens[: n - 1], size)
        for hit in np.flatnonzero((windows == pattern).all(axis=1))[::-1].tolist():
            cont = tokens[hit + size : hit + size + k].tolist()
            if cont and not any(f[: len(cont)] == cont for f in found):
                found.append(cont)
                if len(found) == width:
                    return found
    return found


def merge_branches(branches: list[list[int]], budget: int) -> tuple[list[int], list[int]]:
    """Token sequences -> (tokens, parents) of the tree they spell, shared prefixes merged, at most
    `budget` nodes. Nodes are added depth by depth across the branches (so every branch gets its
    first tokens before any gets its last), which keeps parents before children."""
    tokens: list[int] = []
    parents: list[int] = []
    child: dict[tuple[int, int], int] = {}
    at = [-1] * len(branches)  # node each branch has reached
    for depth in range(max((len(b) for b in branches), default=0)):
        for j, branch in enumerate(branches):
            if depth >= len(branch) or (depth > 0 and at[j] < 0):
                continue
            key = (at[j], branch[depth])
            if key not in child:
                if len(tokens) == budget:
                    at[j] = -2  # this branch stops here
                    continue
                child[key] = len(tokens)
                tokens.append(branch[depth])
                parents.append(at[j])
            at[j] = child[key]
    return tokens, parents


@register("prompt_lookup")
class PromptLookup:
    uses_draft_model: ClassVar[bool] = False
    stops_on_confidence: ClassVar[bool] = False
    default_k: ClassVar[int] = 6
    batches: ClassVar[bool] = True  # model-free: a batch gives each row its own, for nothing

    def __init__(
        self, max_ngram: int = 3, min_ngram: int = 1, k: int = 6, device: torch.device | str = "cpu",
        width: int = 1,
    ) -> None:
        """k: most tokens proposed per step (a tree's node count); width: branches (1: a chain)."""
        if min_ngram < 1 or max_ngram < min_ngram:
            raise ValueError(
                f"n-gram sizes min_ngram={min_ngram}, max_ngram={max_ngram} are invalid: "
                "need 1 <= min_ngram <= max_ngram"
            )
        if k < 1:
            raise ValueError(f"k={k} is invalid: propose at least 1 token per step")
        if width < 1:
            raise ValueError(f"width={width} is invalid: use 1 for a chain or more for a tree of matches")
        self.max_ngram, self.min_ngram, self.k, self.width = max_ngram, min_ngram, k, width
        self.device = torch.device(device)
        self._empty = empty_draft(self.device)

    @classmethod
    def build(cls, ctx: BuildContext) -> PromptLookup:
        width = ctx.width or 1
        return cls(k=ctx.k or cls.default_k * width, device=ctx.target.model.device, width=width)

    def begin(self, prompt: torch.Tensor) -> None:
        pass

    def propose(self, step: DraftStep) -> Draft:
        k = min(step.k, self.k)
        if self.width > 1:
            branches = lookup_continuations(step.tokens.numpy(), self.max_ngram, self.min_ngram, k, self.width)
            if len(branches) > 1:
                tokens, parents = merge_branches(branches, k)
                return Draft(torch.tensor(tokens, device=self.device), parents=torch.tensor(parents, device=self.device))
            found = np.asarray(branches[0] if branches else [], dtype=np.int64)
        else:
            found = lookup_continuation(step.tokens.numpy(), self.max_ngram, self.min_ngram, k)
        if found.size == 0:
            return self._empty
        return Draft(torch.from_numpy(found.copy()).to(self.device))

    def update(self, path: list[int]) -> None:
        pass
