"""Pretraining the target: next-token cross-entropy on random corpus windows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from outrider.train.config import Budget, TrainSettings
from outrider.train.data import WindowSampler
from outrider.train.loop import LoopResult, train


def build_model(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    """A freshly initialised fp32 model; the seed fixes the initial weights."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def next_token_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting batch[:, 1:] from batch[:, :-1]; batch is (B, T + 1)."""
    inputs, labels = batch[:, :-1], batch[:, 1:]  # (B, T) each
    logits = model(input_ids=inputs, use_cache=False).logits  # (B, T, V), bf16 under autocast
    # Cross-entropy in fp32: bf16 log-softmax over 8k classes loses visible precision.
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def pretrain(
    config: LlamaConfig,
    tokens: np.ndarray,
    settings: TrainSettings,
    budget: Budget,
    ckpt_path: Path,
    device: torch.device,
    seed: int,
) -> tuple[LlamaForCausalLM, LoopResult]:
    """Pretrain (or resume pretraining) the target; returns it in fp32 with the loop's result."""
    model = build_model(config, seed).to(device)
    sampler = WindowSampler(tokens, settings.seq_len, settings.batch_size, seed=seed)
    result = train(model, next_token_loss, sampler, settings, budget, ckpt_path, device, "target")
    return model.eval(), result
