"""Shapes, optimiser settings, budgets and the two scale presets of the demo-pair recipe."""

from __future__ import annotations

import math
from dataclasses import dataclass

from transformers import LlamaConfig


@dataclass(frozen=True)
class ModelShape:
    """A Llama's size. Wider and deeper lowers loss but raises the cost of every decode step."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    max_positions: int = 1024  # context the exported model claims; rope needs no retraining for it

    def llama_config(self, vocab_size: int, eos_id: int) -> LlamaConfig:
        """The transformers config; the one special token is bos, eos and pad."""
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not divisible by heads {self.heads}")
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=self.hidden,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.heads,
            intermediate_size=self.intermediate,
            max_position_embeddings=self.max_positions,
            rope_theta=10000.0,
            # Tied input/output embeddings: at this size the embedding matrix is a large share of
            # the parameters, and tying halves it at little cost in loss.
            tie_word_embeddings=True,
            bos_token_id=eos_id,
            eos_token_id=eos_id,
            pad_token_id=eos_id,
            attn_implementation="sdpa",
        )


@dataclass(frozen=True)
class TrainSettings:
    """Optimiser and batch settings of one training phase."""

    seq_len: int
    batch_size: int  # windows per step; tokens per step = seq_len * batch_size
    lr: float
    min_lr_ratio: float = 0.1  # cosine floor, as a fraction of lr
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    checkpoint_minutes: float = 5.0  # bounds the work lost when a run is killed


@dataclass(frozen=True)
class Budget:
    """When a phase stops: after ``tokens`` training tokens or ``minutes`` of training time,
    whichever comes first. Both count over all runs of a phase, so rerunning with a larger
    budget extends a finished phase instead of restarting it."""

    tokens: int | None
    minutes: float | None

    def __post_init__(self) -> None:
        if self.tokens is None and self.minutes is None:
            raise ValueError("a budget needs tokens or minutes (or both); got neither")
        if self.tokens is not None and self.tokens <= 0:
            raise ValueError(f"token budget must be positive, got {self.tokens}")
        if self.minutes is not None and not (self.minutes > 0 and math.isfinite(self.minutes)):
            raise ValueError(f"minutes budget must be positive, got {self.minutes}")

    def overridden(self, tokens: int | None, minutes: float | None) -> Budget:
        """This budget with the given limits in place of its own (None keeps its own)."""
        return Budget(
            tokens=self.tokens if tokens is None else tokens,
            minutes=self.minutes if minutes is None else minutes,
        )

    def progress(self, tokens_seen: int, elapsed_s: float) -> float:
        """Fraction of the budget used, the larger of the two measures (may exceed 1)."""
        fractions = []
        if self.tokens is not None:
            fractions.append(tokens_seen / self.tokens)
        if self.minutes is not None:
            fractions.append(elapsed_s / (60.0 * self.minutes))
        return max(fractions)


def lr_at(settings: TrainSettings, step: int, progress: float) -> float:
    """Linear warmup over steps, then cosine decay over budget progress.

    Decaying over *progress* rather than a fixed step count lets a wall-clock budget end on a
    decayed learning rate without knowing the throughput up front.
    """
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))
    floor = settings.min_lr_ratio
    return settings.lr * (floor + (1.0 - floor) * cosine)


@dataclass(frozen=True)
class ScalePreset:
    """Everything that differs between the real recipe and the seconds-long toy one."""

    vocab_size: int
    max_train_files: int | None
    max_heldout_files: int | None
    max_file_bytes: int | None
    target: ModelShape
    draft: ModelShape
    target_train: TrainSettings
    draft_train: TrainSettings
    target_budget: Budget
    draft_budget: Budget
    eval_windows: int  # fixed held-out windows for loss, perplexity and agreement
    prompts: int  # held-out prompts for the acceptance measurement
    prompt_tokens: int
    max_new_tokens: int
    k: int


PRESETS: dict[str, ScalePreset] = {
    "full": ScalePreset(
        vocab_size=8192,
        max_train_files=None,
        max_heldout_files=None,
        max_file_bytes=None,
        target=ModelShape(hidden=384, layers=6, heads=6, intermediate=1024),
        draft=ModelShape(hidden=256, layers=1, heads=4, intermediate=768),
        target_train=TrainSettings(seq_len=256, batch_size=16, lr=1e-3, warmup_steps=200),
        draft_train=TrainSettings(seq_len=256, batch_size=16, lr=2e-3, warmup_steps=100),
        target_budget=Budget(tokens=None, minutes=100.0),
        draft_budget=Budget(tokens=None, minutes=25.0),
        eval_windows=64,
        prompts=16,
        prompt_tokens=200,
        max_new_tokens=64,
        k=4,
    ),
    "toy": ScalePreset(
        vocab_size=512,
        max_train_files=8,
        max_heldout_files=2,
        max_file_bytes=30_000,
        target=ModelShape(hidden=32, layers=2, heads=2, intermediate=64, max_positions=256),
        draft=ModelShape(hidden=16, layers=1, heads=2, intermediate=32, max_positions=256),
        target_train=TrainSettings(seq_len=32, batch_size=4, lr=3e-3, warmup_steps=5),
        draft_train=TrainSettings(seq_len=32, batch_size=4, lr=3e-3, warmup_steps=5),
        target_budget=Budget(tokens=30 * 32 * 4, minutes=None),
        draft_budget=Budget(tokens=20 * 32 * 4, minutes=None),
        eval_windows=4,
        prompts=2,
        prompt_tokens=16,
        max_new_tokens=8,
        k=3,
    ),
}
