"""`outrider train drafter --method medusa`: Medusa-1 heads trained on self-distilled data.

Same data, budget and checkpoints as the EAGLE recipe (train/eagle.py, train/selfdistill.py). Head
i reads the target's last hidden state of token j and learns the target's distribution of token
j+1+i (KL on the reduced vocabulary). After training, the held-out rate at which each head's
rank-r token is the target's greedy token is measured and stored with the heads: it shapes their
draft tree (drafters/medusa.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from typing import Any

import torch
import torch.nn.functional as F

from outrider.drafters.medusa import MedusaHeads, new_heads
from outrider.train.config import Budget
from outrider.train.eagle import EagleRecipe, target_pass
from outrider.train.loop import autocast, train
from outrider.train.selfdistill import RowSampler, head_settings, scored, start_run

NUM_HEADS = 4


def head_losses(heads: MedusaHeads, hidden: torch.Tensor, logits: torch.Tensor,
                batch: torch.Tensor) -> list[torch.Tensor]:
    """KL(p || q) per head over real tokens. hidden (B, T, D) at the heads' layer, logits (B, T, V)
    of the target, batch (B, T) right-padded with PAD (-1)."""
    d2t = heads.d2t
    q_all = heads(hidden)  # (K, B, T, N)
    losses = []
    for h in range(heads.cfg.num_heads):
        T = hidden.shape[1] - (h + 1)
        log_p = F.log_softmax(logits[:, h + 1 :].float()[..., d2t], dim=-1)  # (B, T, N)
        log_q = F.log_softmax(q_all[h, :, :T].float(), dim=-1)
        real = scored(batch, h + 2, T).float()  # head h at j learns p of token j+h+2: where it exists
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        losses.append((kl * real).sum() / real.sum().clamp(min=1.0))
    return losses


@torch.no_grad()
def rank_acceptance(heads: MedusaHeads, target: Any, rows: torch.Tensor, batch: int = 16) -> list[list[float]]:
    """acceptance[i][r]: how often head i's rank-r token is the target's greedy token, held out."""
    cfg = heads.cfg
    hits = [[0.0] * w for w in cfg.widths]
    total = [0] * cfg.num_heads
    for i in range(0, rows.shape[0], batch):
        b = rows[i : i + batch]
        with autocast(b.device):
            hidden, logits = target_pass(target, b, (cfg.target_layer,))
            q_all = heads(hidden[0])
        best = logits.argmax(-1)  # (B, T)
        for h, w in enumerate(cfg.widths):
            T = b.shape[1] - (h + 1)
            top = heads.d2t[torch.topk(q_all[h, :, :T].float(), w).indices]  # (B, T, w)
            real = scored(b, h + 2, T)
            for r in range(w):
                hits[h][r] += float(((top[..., r] == best[:, h + 1 :]) & real).sum())
            total[h] += int(real.sum())
    return [[round(x / t, 4) for x in row] for row, t in zip(hits, total)]


def train_medusa(recipe: EagleRecipe, device: torch.device | None = None) -> dict[str, Any]:
    device = device or torch.device("cpu")
    run = start_run(recipe, device)
    target, embed, data, d2t, out = run.target, run.embed, run.data, run.d2t, run.out
    lm_head = target.get_output_embeddings().weight.detach()
    heads = new_heads(target.config, embed, lm_head, str(recipe.target), d2t, NUM_HEADS).to(device)
    layer = heads.cfg.target_layer

    def loss_fn(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        hidden, logits = target_pass(target, batch, (layer,))
        losses = head_losses(model, hidden[0], logits, batch)
        return sum(losses) / len(losses)

    settings = head_settings(recipe, data)
    result = train(heads, loss_fn, RowSampler(data["train"], recipe.batch_size, recipe.seed), settings,
                   Budget(tokens=None, minutes=recipe.minutes), run.work / "heads.ckpt", device, "medusa")
    acceptance = rank_acceptance(heads.eval(), target, data["heldout"].to(device))
    final = MedusaHeads(replace(heads.cfg, acceptance=tuple(tuple(r) for r in acceptance)))
    final.load_state_dict(heads.state_dict())
    final.to(torch.bfloat16).save(out)
    report = {
        "command": "outrider train drafter --method medusa",
        "recipe": asdict(recipe),
        "target": recipe.target,
        "heads": NUM_HEADS,
        "widths": list(heads.cfg.widths),
        "draft_vocab": int(d2t.shape[0]),
        "parameters": sum(p.numel() for p in heads.parameters()),
        "size_mb": round((out / "model.safetensors").stat().st_size / 1e6, 2),
        "data": {"train_sequences": int(data["train"].shape[0]), "heldout_sequences": int(data["heldout"].shape[0]),
                 "generate_s": round(float(data["generate_s"]), 1)},
        "steps": result.progress.step,
        "tokens_seen": result.progress.tokens_seen,
        "train_minutes": round(result.progress.elapsed_s / 60, 2),
        "wall_minutes": round((time.monotonic() - run.started) / 60, 2),
        "heldout_rank_acceptance": acceptance,
        "heldout_acceptance_by_depth": [row[0] for row in acceptance],
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# Medusa heads: training report", "",
             f"Target `{recipe.target}`; {NUM_HEADS} heads over its last hidden state; draft vocabulary "
             f"{report['draft_vocab']}; {report['parameters']} parameters, {report['size_mb']} MB (bf16).", "",
             f"Training: {report['steps']} steps, {report['tokens_seen']} tokens, {report['train_minutes']} min.", "",
             "| head (draft depth) | held-out rate of the target's token at rank 1, 2, ... |", "|---:|---|",
             *(f"| {i + 1} | {', '.join(f'{a:.3f}' for a in row)} |" for i, row in enumerate(acceptance)), ""]
    (out / "report.md").write_text("\n".join(lines))
    return report
