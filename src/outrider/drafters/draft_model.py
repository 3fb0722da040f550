"""An independent small causal LM sharing the target's tokenizer, with its own rolled-back cache.

Its cache holds a prefix of the committed sequence plus the draft tokens it has fed; after
verification it keeps the committed prefix and, next step, feeds only the committed tokens it has
not seen (the recovered/bonus token, plus the last draft token when all were accepted). The whole
context is never recomputed.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from outrider.drafters.base import BuildContext, Draft, DraftStep, empty_draft, register
from outrider.models import CausalModel
from outrider.sampling import probs_from_logits, sample


def fit_vocab(logits: torch.Tensor, width: int) -> torch.Tensor:
    """Draft logits (..., Vd) -> (..., width): drop padded columns past the target's width, and give
    columns the draft lacks -inf, so q covers exactly the target's vocabulary."""
    vd = logits.shape[-1]
    if vd == width:
        return logits
    if vd > width:
        return logits[..., :width]
    pad = logits.new_full((*logits.shape[:-1], width - vd), float("-inf"))
    return torch.cat([logits, pad], dim=-1)


@register("draft_model")
class DraftModel:
    uses_draft_model: ClassVar[bool] = True
    stops_on_confidence: ClassVar[bool] = True
    # k=None means "auto" for this drafter (SpeculativeDecoder.from_pretrained); 3 is the best
    # fixed k measured on the embedded pair (benchmarks/pair_speed.py), for DraftModel(...) itself.
    default_k: ClassVar[int] = 3

    def __init__(self, model: CausalModel, target_vocab_size: int, k: int = 4) -> None:
        if k < 1:
            raise ValueError(f"k={k} is invalid: propose at least 1 token per step")
        self.model = model
        self.vocab_size = target_vocab_size
        self.k = k
        self._base = 0  # committed length when the last draft was proposed
        self._fed = 0  # draft tokens fed to the model during the last proposal

    @classmethod
    def build(cls, ctx: BuildContext) -> DraftModel:
        assert ctx.draft is not None
        return cls(ctx.draft.model, ctx.target.model.vocab_size, k=ctx.k or cls.default_k)

    def begin(self, prompt: torch.Tensor) -> None:
        self.model.reset()
        self._base = self._fed = 0
        if prompt.shape[0] > 1:
            self.model.forward(prompt[:-1].to(self.model.device), num_logits=0)

    def propose(self, step: DraftStep) -> Draft:
        n = step.tokens.shape[0]
        k = min(step.k, self.k)
        if self.model.max_length is not None:
            k = min(k, self.model.max_length - n + 1)
        if k < 1:
            self.model.rollback(min(self.model.length, n - 1))
            self._base, self._fed = n, 0
            return empty_draft(self.model.device)
        new = step.tokens[self.model.length :].to(self.model.device)  # (>=1,) committed, unseen
        logits = fit_vocab(self.model.forward(new, num_logits=1)[-1], self.vocab_size)
        tokens: list[torch.Tensor] = []
        probs: list[torch.Tensor] = []
        confidences: list[float] | None = None if step.keep_drafting is None else []
        for i in range(k):
            if step.sampling.greedy:
                x = logits.argmax(-1)
                if confidences is not None:
                    confidences.append(float(logits.softmax(-1)[x]))
            else:
                q = probs_from_logits(logits, step.sampling)
                x = sample(q, step.generator)
                probs.append(q)
                if confidences is not None:
                    confidences.append(float(q[x]))
            tokens.append(x)
            if i + 1 == k or (confidences is not None and not step.keep_drafting(confidences)):
                break
            logits = fit_vocab(self.model.forward(x.view(1), num_logits=1)[-1], self.vocab_size)
        self._base, self._fed = n, len(tokens) - 1
        return Draft(torch.stack(tokens), torch.stack(probs) if probs else None, confidences)

    def update(self, committed: int) -> None:
        # The cache holds committed[:n] + draft[:k-1]; keep the draft tokens that were committed.
        self.model.rollback(self._base + min(committed, self._fed))
