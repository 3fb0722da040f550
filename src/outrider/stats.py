"""SpecStats: the counting dataclass that every report (CLI, bench, server) reads.

Words (DESIGN.md): per step the drafter proposes `drafted` tokens and the verifier keeps
`accepted` of them; the step commits accepted + 1 tokens (recovered or bonus token included).
  tau   = committed tokens per target forward (plain autoregressive decoding has tau = 1)
  alpha = accepted / drafted
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class SpecStats:
    steps: int = 0  # target forwards after prefill (one per draft -> verify -> commit step)
    new_tokens: int = 0  # tokens committed (== len(result.token_ids))
    drafted: int = 0  # drafted tokens (tree nodes)
    accepted: int = 0
    draft_forwards: int = 0  # draft-model forwards spent drafting (0 for model-free drafters)
    # drafted_at[i] / accepted_at[i]: steps whose draft reached depth i + 1 (a chain: drafted a
    # token at position i) / whose accepted path did.
    drafted_at: list[int] = field(default_factory=list)
    accepted_at: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens whose cache the last sequence left (not fed again)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    draft_s: float = 0.0  # time inside the drafter (part of decode_s)
    target_s: float = 0.0  # time inside target forwards during decode (part of decode_s)

    def record_step(
        self, drafted: int, accepted: int, committed: int, depth: int | None = None, draft_forwards: int = 0
    ) -> None:
        """One step: `drafted` nodes (tree size) reaching `depth` (None: a chain, depth = drafted)."""
        depth = drafted if depth is None else depth
        self.steps += 1
        self.draft_forwards += draft_forwards
        self.drafted += drafted
        self.accepted += accepted
        self.new_tokens += committed
        if depth > len(self.drafted_at):
            grow = depth - len(self.drafted_at)
            self.drafted_at.extend([0] * grow)
            self.accepted_at.extend([0] * grow)
        for i in range(depth):
            self.drafted_at[i] += 1
        for i in range(accepted):
            self.accepted_at[i] += 1

    @property
    def tau(self) -> float:
        """Mean committed tokens per target forward, bonus included."""
        return self.new_tokens / self.steps if self.steps else 0.0

    @property
    def alpha(self) -> float:
        """Acceptance rate accepted / drafted (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def acceptance_at(self) -> list[float]:
        """Per depth i + 1 (a chain: draft position i): the fraction of steps drafting there that
        kept a token there (alpha per depth)."""
        return [a / d if d else 0.0 for a, d in zip(self.accepted_at, self.drafted_at)]

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second of wall time, prefill included (the Spec-Bench convention)."""
        return self.new_tokens / self.total_s if self.total_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s > 0 else 0.0

    def merge(self, other: SpecStats) -> SpecStats:
        """Sum of two runs' counts and times (for aggregating over prompts)."""
        out = SpecStats()
        for name in ("steps", "new_tokens", "drafted", "accepted", "draft_forwards", "prompt_tokens",
                     "reused_tokens"):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        for name in ("prefill_s", "decode_s", "draft_s", "target_s"):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        n = max(len(self.drafted_at), len(other.drafted_at))

        def padded(xs: list[int]) -> list[int]:
            return xs + [0] * (n - len(xs))

        out.drafted_at = [a + b for a, b in zip(padded(self.drafted_at), padded(other.drafted_at))]
        out.accepted_at = [a + b for a, b in zip(padded(self.accepted_at), padded(other.accepted_at))]
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            tau=self.tau,
            alpha=self.alpha,
            acceptance_at=self.acceptance_at,
            tokens_per_s=self.tokens_per_s,
            decode_tokens_per_s=self.decode_tokens_per_s,
        )
        return d
