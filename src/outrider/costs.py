"""Step costs, measured once and then frozen: what adaptive drafting weighs acceptance against.

Words (DESIGN.md): c = cost of one drafter forward ÷ one target decode step; v(n) = cost of a
target forward over n tokens ÷ one decode step (≈1 while memory-bound; it grows with n on a CPU).

Nothing that decides a draft may read the clock during a seeded request (contract 3): the draft
length or tree size decides how many random draws a step makes, so a decision that followed the
machine's load would change a seeded output. Costs are therefore calibrated once, when a decoder
is built (or given, e.g. from a stored table), rounded to a coarse grid so that recalibrating on
the same machine lands on the same numbers, and never updated while generating.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from outrider.models import CausalModel

CALIBRATION_SIZES = (1, 2, 4, 8, 16, 32, 64)
V_GRID = 0.05  # v(n) rounded to this, c to C_GRID: coarse enough to repeat, fine enough to choose by
C_GRID = 0.01


@dataclass(frozen=True)
class CostModel:
    """c and v(n) as measured. `verify` maps n -> v(n) at the calibrated sizes (v(1) = 1); other
    sizes are interpolated linearly (extrapolated from the last two beyond the largest)."""

    c: float = 0.0
    verify: dict[int, float] = field(default_factory=lambda: {1: 1.0})

    def __post_init__(self) -> None:
        if not (self.c >= 0 and self.c == self.c):
            raise ValueError(f"c={self.c!r} is invalid: use a draft/target cost ratio >= 0")
        if not self.verify or any(n < 1 or v <= 0 for n, v in self.verify.items()):
            raise ValueError(f"verify={self.verify!r} is invalid: map token counts n >= 1 to costs v(n) > 0")

    def v(self, n: int) -> float:
        sizes = sorted(self.verify)
        if n <= sizes[0] or len(sizes) == 1:
            return self.verify[sizes[0]]
        for a, b in zip(sizes, sizes[1:]):
            if n <= b:
                return self.verify[a] + (self.verify[b] - self.verify[a]) * (n - a) / (b - a)
        a, b = sizes[-2], sizes[-1]
        slope = max(self.verify[b] - self.verify[a], 0.0) / (b - a)
        return self.verify[b] + slope * (n - b)

    def to_dict(self) -> dict:
        """JSON-ready: {"c": c, "verify": {"n": v(n)}} (a bench record carries it)."""
        return {"c": self.c, "verify": {str(n): v for n, v in sorted(self.verify.items())}}

    @classmethod
    def from_dict(cls, data: dict) -> CostModel:
        return cls(float(data["c"]), {int(n): float(v) for n, v in data["verify"].items()})

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> CostModel:
        return cls.from_dict(json.loads(text))

    @classmethod
    def load(cls, path: str | Path) -> CostModel:
        try:
            return cls.from_json(Path(path).read_text())
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"costs file {str(path)!r} is unreadable ({e}): write it with CostModel.to_json()") from e


def _round(x: float, grid: float) -> float:
    return round(round(x / grid) * grid, 4)


def _forward_s(model: CausalModel, ids: torch.Tensor, context: int, clock: Callable[[], float]) -> float:
    """Seconds of one forward over ids after `context` cached tokens (rolled back after)."""
    t0 = clock()
    model.forward(ids)
    elapsed = clock() - t0
    model.rollback(context)
    return elapsed


@torch.inference_mode()
def calibrate(
    target: CausalModel,
    draft: CausalModel | None = None,
    sizes: tuple[int, ...] = CALIBRATION_SIZES,
    repeats: int = 7,
    context: int = 64,
    clock: Callable[[], float] = time.perf_counter,
    probe: Callable[[], object] | None = None,
) -> CostModel:
    """Measure v(n) of the target at `sizes` (capped by its context) and c for a draft model, or for
    a drafter's own one-step `probe` (a self-drafting head), 0 for drafters with neither,
    after `context` tokens of cache; the caches are reset afterwards.

    Sizes are measured in interleaved rounds (drift hits all alike; the first rounds only warm up),
    and with a draft model each target forward follows a draft forward, as in decoding: the draft
    evicts part of the target's weights from the CPU's cache, which a target measured alone keeps."""
    limit = (target.max_length or 10**9) - context
    sizes = tuple(sorted({1, *(n for n in sizes if n <= limit)}))
    ids = torch.zeros(max(sizes), dtype=torch.long, device=target.device)
    models = [target] + ([draft] if draft is not None else [])
    for m in models:
        m.reset()
        m.forward(torch.zeros(context, dtype=torch.long, device=m.device), num_logits=0)
    times: dict[int, list[float]] = {n: [] for n in sizes}
    draft_times: list[float] = []
    draft_ids = torch.zeros(1, dtype=torch.long, device=draft.device) if draft is not None else None
    warmup = 2
    for r in range(warmup + repeats):
        for n in sizes:
            if draft is not None:
                t = _forward_s(draft, draft_ids, context, clock)
                if r >= warmup and n == 1:
                    draft_times.append(t)
            elif probe is not None:
                t0 = clock()
                probe()
                if r >= warmup and n == 1:
                    draft_times.append(clock() - t0)
            t = _forward_s(target, ids[:n], context, clock)
            if r >= warmup:
                times[n].append(t)
    for m in models:
        m.reset()
    base = statistics.median(times[1])
    verify = {1: 1.0}
    for n in sizes[1:]:
        verify[n] = max(_round(statistics.median(times[n]) / base, V_GRID), 1.0)
    c = _round(statistics.median(draft_times) / base, C_GRID) if draft_times else 0.0
    return CostModel(c, verify)
