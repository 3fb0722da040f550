"""Backend for any transformers causal LM (a model object), on a DynamicCache rolled back by crop."""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache, PreTrainedModel


def context_length(config: object) -> int | None:
    """The model's context window from its config, None when it declares none."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class HFModel:
    """Wraps a transformers AutoModelForCausalLM-style module for one sequence at a time."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model.eval()
        self.config = model.config
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.max_length = context_length(model.config)
        self.device = next(model.parameters()).device
        params = inspect.signature(model.forward).parameters
        # transformers 5.x renamed past_key_values to cache; accept both generations.
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._has_logits_to_keep = "logits_to_keep" in params
        self._cache = DynamicCache(config=model.config)
        self._length = 0

    @property
    def length(self) -> int:
        return self._length

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, num_logits: int | None = None) -> torch.Tensor:
        n = ids.shape[0]
        positions = torch.arange(self._length, self._length + n, device=self.device)
        kwargs = {self._cache_kw: self._cache, "use_cache": True}
        if self._has_logits_to_keep and num_logits is not None:
            # logits_to_keep=0 means "all" in transformers; 1 is the least it computes.
            kwargs["logits_to_keep"] = max(num_logits, 1)
        out = self.model(input_ids=ids[None].to(self.device), position_ids=positions[None], **kwargs)
        self._length += n
        logits = out.logits[0]  # (m, V)
        m = n if num_logits is None else num_logits
        return logits[logits.shape[0] - m :].float()

    def rollback(self, length: int) -> None:
        assert 0 <= length <= self._length, (length, self._length)
        if length < self._length:
            self._cache.crop(length - self._length)
            self._length = length

    def reset(self) -> None:
        self._cache = DynamicCache(config=self.model.config)
        self._length = 0
