"""Batch > 1: several sequences advance together, one target forward per step for all of them.

A BatchDecoder holds up to `max_batch` sequences ("rows"). Each row has its own slot of the native
target's KV cache (models/llama.py: set_slots, forward_rows), its own drafter, sampling generator,
k policy, stats and stop condition. A step drafts for every row, sends every row's root + draft
through one `forward_rows` (the weights are read once for all rows; attention runs per row over
its own cache, so no row sees another), then verifies and commits each row with the very
functions the single-sequence decoder uses (decoder._plan / _complete). A row's output is
therefore what it would be alone: token for token in float32 greedy; in bf16 a batched matmul may
round differently, as a verify forward does (DESIGN.md contract 1).

Rows join (`add`) and leave between steps, so a server batches continuously.

Speculation is gated by measured cost. On a CPU verifying n tokens costs v(n) > 1 steps, and B
rows' drafts add up: at some batch size a draft no longer pays for the tokens it costs. Before
each forward the gate keeps a row's draft only if it raises the step's expected tokens per
second, from the frozen cost table (BatchCosts: seconds of a forward of B rows x n tokens,
measured once) and each row's measured accepted tokens per verified draft. A row whose drafts
were dropped `probe_every` steps in a row is verified once anyway, so its estimate follows the
text. Seeded sampling rows are never gated: their random draws depend on the drafts, and a seeded
request must give the same tokens alone or in a batch (contract 3).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch

from outrider.decoder import Chunk, Collector, GenerationRequest, GenerationResult, SpeculativeDecoder, _Sequence
from outrider.stats import SpecStats

COST_SIZES = (1, 2, 4, 8, 16)  # tokens per row the cost table measures (root + draft)
COST_CONTEXT = 64  # tokens already cached in each row while the costs are measured

__all__ = ["BatchCosts", "BatchDecoder", "Row"]


@dataclass(frozen=True)
class BatchCosts:
    """Seconds of one target forward of `rows` rows with n tokens each: seconds[rows - 1][j] at
    n = sizes[j]. Between sizes it interpolates linearly, past the last it extrapolates."""

    sizes: tuple[int, ...]
    seconds: tuple[tuple[float, ...], ...]

    def forward_s(self, rows: int, tokens: int) -> float:
        """Seconds of a forward of `rows` rows holding `tokens` tokens in all."""
        row = self.seconds[min(rows, len(self.seconds)) - 1]
        n = tokens / rows
        sizes = self.sizes
        j = next((i for i in range(1, len(sizes)) if n <= sizes[i]), len(sizes) - 1)
        a, b = sizes[j - 1], sizes[j]
        return row[j - 1] + (row[j] - row[j - 1]) * (n - a) / (b - a)

    @classmethod
    def measure(cls, model: Any, max_batch: int, sizes: Sequence[int] = COST_SIZES, context: int = COST_CONTEXT,
                repeats: int = 3) -> BatchCosts:
        """Time forward_rows on `model` (whose slots are then empty) for 1..max_batch rows."""
        from outrider.models.llama import RowForward

        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.vocab_size, (max_batch, context + max(sizes)), generator=gen)
        table = []
        for rows in range(1, max_batch + 1):
            model.reset()
            model.forward_rows([RowForward(r, ids[r, :context].to(model.device), 0) for r in range(rows)])
            times = []
            for n in sizes:
                batch = [RowForward(r, ids[r, context : context + n].to(model.device)) for r in range(rows)]
                runs = []
                for i in range(repeats + 1):  # the first run warms up
                    t0 = time.perf_counter()
                    model.forward_rows(batch)
                    if i:
                        runs.append(time.perf_counter() - t0)
                    for r in range(rows):
                        model.rollback(context, r)
                times.append(statistics.median(runs))
            table.append(tuple(times))
        model.reset()
        return cls(tuple(sizes), tuple(table))


@dataclass
class Row:
    """One sequence of a batch, from `add` until it finishes (or `remove`)."""

    slot: int
    request: GenerationRequest
    state: _Sequence
    stats: SpecStats
    collected: Collector = field(default_factory=Collector)
    finished: bool = False
    exempt: bool = False  # a seeded sampling row: its drafts are never gated (see the module doc)
    # The gate's estimate of accepted tokens per verified draft: decayed sums, a prior of 1 in 1.
    accepted_sum: float = 1.0
    verified_sum: float = 1.0
    dropped_streak: int = 0

    @property
    def expected_accepted(self) -> float:
        return self.accepted_sum / self.verified_sum


class BatchDecoder:
    """Up to max_batch sequences decoded together by one SpeculativeDecoder's target and method.

    The decoder's target must be on the native backend (it gets `max_batch` cache slots; use the
    BatchDecoder, not the decoder, from then on) and its method one whose drafter batches
    (autoregressive, prompt_lookup, suffix). gate: drop drafts that cost more than they bring
    (see the module doc); costs: the table it decides by (None: measured now)."""

    def __init__(self, decoder: SpeculativeDecoder, max_batch: int = 4, *, gate: bool = True,
                 costs: BatchCosts | None = None, probe_every: int = 8, decay: float = 0.9) -> None:
        if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
            raise ValueError(f"max_batch={max_batch!r} is invalid: use an integer >= 1")
        model = decoder.target.model
        if not hasattr(model, "forward_rows"):
            raise ValueError(
                f"batching needs the native backend (Llama, Mistral, Qwen2), but the target runs on "
                f"{type(model).__name__}: load it with backend='native', or use max_batch=1")
        if not getattr(type(decoder.drafter), "batches", False) or decoder.new_drafter is None:
            raise ValueError(
                f"method {decoder.method!r} does not batch yet: use autoregressive, prompt_lookup or suffix "
                "(their drafters are model-free), or max_batch=1 through SpeculativeDecoder")
        self.decoder = decoder
        self.model = model
        self.max_batch = max_batch
        self.probe_every, self.decay = probe_every, decay
        model.set_slots(max_batch)
        self.gate = gate and decoder.k > 0
        self.costs = costs if costs is not None or not self.gate else BatchCosts.measure(model, max_batch)
        # Per slot, reused by the requests that slot serves: a suffix drafter remembers their outputs.
        self._drafters = [decoder.new_drafter() for _ in range(max_batch)]
        self._adaptives = [copy.deepcopy(decoder.adaptive) for _ in range(max_batch)]
        self._rows: list[Row | None] = [None] * max_batch

    @property
    def active(self) -> int:
        return sum(r is not None for r in self._rows)

    @property
    def free(self) -> int:
        return self.max_batch - self.active

    def add(self, request: GenerationRequest, stats: SpecStats | None = None) -> Row:
        """Admit a request into a free slot and prefill it; it advances with the next step."""
        slot = next((i for i, r in enumerate(self._rows) if r is None), None)
        if slot is None:
            raise RuntimeError(f"the batch is full ({self.max_batch} rows): wait for a row to finish")
        stats = stats or SpecStats()
        dec = self.decoder
        state = dec._new_sequence(request, stats, True, self.model.row(slot), self._drafters[slot],
                                  self._adaptives[slot])
        dec._prefill(state)
        row = Row(slot, request, state, stats, exempt=request.seed is not None and not request.sampling.greedy)
        self._rows[slot] = row
        return row

    def remove(self, row: Row) -> None:
        """Drop a row before it finishes (a cancelled request); its slot is free for the next."""
        if self._rows[row.slot] is row:
            self._rows[row.slot] = None

    def step(self) -> list[tuple[Row, Chunk]]:
        """One draft -> verify -> commit step for every row, in one target forward. Returns each
        row's committed chunk; rows that finished leave the batch."""
        from outrider.models.llama import RowForward

        rows = [r for r in self._rows if r is not None]
        if not rows:
            return []
        dec = self.decoder
        plans = [dec._plan(r.state) for r in rows]
        if self.gate:
            self._gate(rows, plans)
        logits = self.model.forward_rows(
            [RowForward(r.slot, p.ids, None, p.attn_mask, p.positions) for r, p in zip(rows, plans)])
        out = []
        for r, p, lg in zip(rows, plans, logits):
            chunk = dec._complete(r.state, p, lg)
            if p.draft is not None and p.draft.size:
                self._observe(r, sum(chunk.drafted))
            r.collected.add(chunk)
            out.append((r, chunk))
            if chunk.finish_reason is not None:
                r.finished = True
                self._rows[r.slot] = None
        return out

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Every request's result, in order: rows join as slots free up (continuous batching)."""
        for request in requests:
            if not isinstance(request, GenerationRequest):
                raise ValueError(f"requests must be GenerationRequest objects, got {type(request).__name__}")
        waiting = deque(enumerate(requests))
        index: dict[int, int] = {}
        results: list[GenerationResult | None] = [None] * len(requests)
        while waiting or self.active:
            while waiting and self.free:
                i, request = waiting.popleft()
                index[id(self.add(request))] = i
            for row, chunk in self.step():
                if row.finished:
                    results[index.pop(id(row))] = row.collected.result(row.request, row.stats, self.decoder.tokenizer)
        return results  # type: ignore[return-value]

    # ---- the gate -------------------------------------------------------------------------

    def _observe(self, row: Row, accepted: int) -> None:
        row.accepted_sum = self.decay * row.accepted_sum + accepted
        row.verified_sum = self.decay * row.verified_sum + 1.0

    def _gate(self, rows: list[Row], plans: list[Any]) -> None:
        """Drop the drafts that lower this step's expected tokens per second (module doc)."""
        B = len(rows)
        tokens = sum(int(p.ids.shape[0]) for p in plans)
        gain = float(B)  # expected committed tokens: one per row, plus each kept draft's accepted
        candidates = []
        for i, (r, p) in enumerate(zip(rows, plans)):
            d = int(p.ids.shape[0]) - 1
            if d == 0:
                continue
            expected = min(float(d), r.expected_accepted)
            gain += expected
            if r.exempt or r.dropped_streak + 1 >= self.probe_every:
                r.dropped_streak = 0  # verified: seeded rows always, the others to re-measure
                continue
            candidates.append((expected / d, i, d, expected))
        # Least accepted per drafted token first: drop while that raises tokens per second.
        for _, i, d, expected in sorted(candidates):
            keep = gain / self.costs.forward_s(B, tokens)
            drop = (gain - expected) / self.costs.forward_s(B, tokens - d)
            r = rows[i]
            if drop > keep:
                plans[i] = _without_draft(plans[i])
                gain -= expected
                tokens -= d
                r.dropped_streak += 1
            else:
                r.dropped_streak = 0


def _without_draft(plan: Any) -> Any:
    """The plan with its draft dropped: the step feeds the root alone (a plain decode step)."""
    return replace(plan, draft=None, ids=plan.ids[:1], attn_mask=None, positions=None)
