"""Distilling the draft from the frozen target: KL(target || draft) on the target's logits.

Speculative decoding accepts a drafted token when the target agrees with it, so the draft's job
is to match the target's distribution, not the corpus: forward KL against the target's softmax
(temperature 1) gives a denser signal than the one-hot next token and pulls the draft's argmax
toward the target's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from outrider.train.config import Budget, TrainSettings
from outrider.train.data import WindowSampler
from outrider.train.loop import LoopResult, train
from outrider.train.pretrain import build_model


def kl_to_target(target_logits: torch.Tensor, draft_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(p || q), p = softmax(target), q = softmax(draft).

    Both logits are (..., V); computed in fp32 so small probabilities do not vanish.
    """
    log_p = F.log_softmax(target_logits.float(), dim=-1)
    log_q = F.log_softmax(draft_logits.float(), dim=-1)
    return F.kl_div(log_q.flatten(0, -2), log_p.flatten(0, -2), log_target=True, reduction="batchmean")


def make_kl_loss(target: torch.nn.Module):
    """The distillation loss for the loop; ``target`` is frozen and in eval mode."""

    def loss_fn(draft: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        inputs = batch[:, :-1]  # (B, T); the next tokens are not needed, the target supplies p
        with torch.no_grad():
            target_logits = target(input_ids=inputs, use_cache=False).logits  # (B, T, V)
        draft_logits = draft(input_ids=inputs, use_cache=False).logits  # (B, T, V)
        return kl_to_target(target_logits, draft_logits)

    return loss_fn


def distill(
    target: LlamaForCausalLM,
    config: LlamaConfig,
    tokens: np.ndarray,
    settings: TrainSettings,
    budget: Budget,
    ckpt_path: Path,
    device: torch.device,
    seed: int,
) -> tuple[LlamaForCausalLM, LoopResult]:
    """Distil (or resume distilling) the draft from ``target``; returns it in fp32."""
    if config.vocab_size != target.config.vocab_size:
        raise ValueError(
            f"draft vocab {config.vocab_size} != target vocab {target.config.vocab_size}; "
            "the pair must share one tokenizer"
        )
    target.eval().requires_grad_(False)
    draft = build_model(config, seed + 1).to(device)
    # A different window seed from pretraining, so the draft sees windows in a fresh order.
    sampler = WindowSampler(tokens, settings.seq_len, settings.batch_size, seed=seed + 1)
    result = train(draft, make_kl_loss(target), sampler, settings, budget, ckpt_path, device, "draft")
    return draft.eval(), result
