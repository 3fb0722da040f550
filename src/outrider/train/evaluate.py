"""Held-out figures of the pair: loss, perplexity, draft/target top-1 agreement, and acceptance."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from outrider.train.loop import autocast


@torch.no_grad()
def _logits(model: torch.nn.Module, inputs: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(B, T) ids -> (B, T, V) fp32 logits under the same bf16 autocast as training."""
    with autocast(device):
        return model(input_ids=inputs.to(device), use_cache=False).logits.float()


@torch.no_grad()
def heldout_metrics(
    target: torch.nn.Module,
    draft: torch.nn.Module,
    windows: torch.Tensor,
    device: torch.device,
    batch_size: int = 8,
) -> dict[str, float]:
    """Loss/perplexity of both models and their top-1 agreement on ``windows`` (n, T + 1).

    agreement = share of positions where argmax(draft) == argmax(target): under greedy
    decoding, the chance that one drafted token is accepted.
    """
    target.eval()
    draft.eval()
    sums = {"target_nll": 0.0, "draft_nll": 0.0, "agree": 0.0}
    count = 0
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        inputs, labels = chunk[:, :-1], chunk[:, 1:].to(device)  # (b, T) each
        t_logits = _logits(target, inputs, device)  # (b, T, V)
        d_logits = _logits(draft, inputs, device)
        flat = labels.flatten()
        sums["target_nll"] += F.cross_entropy(t_logits.flatten(0, 1), flat, reduction="sum").item()
        sums["draft_nll"] += F.cross_entropy(d_logits.flatten(0, 1), flat, reduction="sum").item()
        sums["agree"] += (t_logits.argmax(-1) == d_logits.argmax(-1)).sum().item()
        count += labels.numel()
    target_loss = sums["target_nll"] / count
    draft_loss = sums["draft_nll"] / count
    return {
        "tokens": count,
        "target_loss": target_loss,
        "target_ppl": math.exp(target_loss),
        "draft_loss": draft_loss,
        "draft_ppl": math.exp(draft_loss),
        "top1_agreement": sums["agree"] / count,
    }


def measure_pair_acceptance(
    target_dir: Path | str,
    draft_dir: Path | str,
    prompts: Sequence[Sequence[int]],
    k: int,
    max_new_tokens: int,
    temperature: float,
    seed: int = 0,
) -> dict[str, float | int]:
    """Acceptance of the exported pair under outrider's own speculative decoder.

    ``prompts`` are lists of token ids; prompt i is decoded with seed ``seed + i``.
    Returns alpha (accepted / drafted), tau (committed tokens per target forward, bonus
    included), the drafted and accepted counts, and the acceptance rate per draft position.
    """
    from outrider import SpeculativeDecoder, SpecStats  # outrider's package imports the recipe lazily

    if not prompts:
        raise ValueError("no prompts given: pass at least one list of token ids")
    decoder = SpeculativeDecoder.from_pretrained(
        str(target_dir), draft=str(draft_dir), method="draft_model", k=k, dtype=torch.float32
    )
    # One prompt per call (the decoder's API); stats of all prompts are merged into one count.
    stats = SpecStats()
    for i, prompt in enumerate(prompts):
        result = decoder.generate(
            list(prompt), max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + i
        )
        stats = stats.merge(result.stats)
    return {
        "k": k,
        "temperature": temperature,
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "alpha": float(stats.alpha),
        "tau": float(stats.tau),
        "drafted": int(stats.drafted),
        "accepted": int(stats.accepted),
        "acceptance_at": [round(float(a), 4) for a in stats.acceptance_at],
    }
