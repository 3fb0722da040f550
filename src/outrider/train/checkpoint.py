"""Atomic, resumable training checkpoints.

A checkpoint holds everything needed to continue as if the run had never stopped: fp32 weights,
optimiser moments, counters, and the RNG states (the window sampler's and torch's).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class Progress:
    """Counters of one training phase, summed over all its runs."""

    step: int = 0
    tokens_seen: int = 0
    elapsed_s: float = 0.0  # training time only: loading and evaluation are not counted
    loss_history: list[tuple[int, int, float]] = field(default_factory=list)  # (step, tokens, loss)


def save_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    progress: Progress,
    sampler_rng: torch.Tensor,
) -> None:
    """Write the checkpoint to a temporary file, then rename it over ``path``.

    os.replace is atomic on one filesystem, so a run killed mid-write leaves the previous
    checkpoint intact rather than a truncated one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": {k: v.detach().float().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "progress": asdict(progress),
        "sampler_rng": sampler_rng,
        "torch_rng": torch.get_rng_state(),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The saved state, or None when no checkpoint exists yet."""
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = state["progress"]
    state["progress"] = Progress(**{**saved, "loss_history": [tuple(x) for x in saved["loss_history"]]})
    return state
