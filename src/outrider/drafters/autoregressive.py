"""No drafter: plain autoregressive decoding through the same loop; the speedup baseline."""

from __future__ import annotations

from typing import ClassVar

import torch

from outrider.drafters.base import BuildContext, Draft, DraftStep, empty_draft, register


@register("autoregressive")
class Autoregressive:
    uses_draft_model: ClassVar[bool] = False
    stops_on_confidence: ClassVar[bool] = False
    default_k: ClassVar[int] = 0
    batches: ClassVar[bool] = True  # model-free: a batch gives each row its own, for nothing

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self._empty = empty_draft(torch.device(device))

    @classmethod
    def build(cls, ctx: BuildContext) -> Autoregressive:
        return cls(ctx.target.model.device)

    def begin(self, prompt: torch.Tensor) -> None:
        pass

    def propose(self, step: DraftStep) -> Draft:
        return self._empty

    def update(self, path: list[int]) -> None:
        pass
