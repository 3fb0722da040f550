"""Batch > 1: several sequences advance together, one target forward per step for all of them.

A BatchDecoder holds up to `max_batch` sequences ("rows"). Each row has its own slot of the native
target's KV cache (models/llama.py: set_slots, forward_rows), its own drafter, sampling generator,
k policy, stats and stop condition. A step drafts for every row, sends every row's root + draft
through one `forward_rows` (the weights are read once for all rows; attention runs per row over
its own cache, so no row sees another), then verifies and commits each row with the very
functions the single-sequence decoder uses (decoder._plan / _complete; greedy chains are verified
for all rows at once as tensors, verify.verify_greedy_rows). A row's output is therefore what it
would be alone: token for token in float32 greedy; in bf16 a batched matmul may
round differently, as a verify forward does (DESIGN.md contract 1).

Rows join (`add`) and leave between steps, so a server batches continuously.

Drafters with a model of their own draft together, so that a chain of depth d costs d draft
forwards for all rows, not per row: a head's rows share one copy of the head (the drafter class's
`join_rows`) and propose in one call (`propose_rows`: one head pass per depth, in this thread); a
draft model's rows each hold a slot of the draft and propose in lockstep (lockstep.py: worker
threads whose draft forwards meet).

Speculation is gated by measurement, so that it never costs throughput. On a CPU verifying n
tokens costs v(n) > 1 steps and B rows' drafts add up: at some batch size drafts no longer pay
(SmolLM2 with its head at batch 8). At each batch size the batch keeps two rates, committed tokens
per second of its recent speculating steps and of its recent plain ones (no drafts but the seeded
rows'), measured by its own clock on steps that prefill nobody; it runs the faster mode, and
every `check_every` steps the other for CHECK_BURST steps, so that both rates follow the text
and the machine; a batch size not measured yet starts from the choice of the nearest measured
one within a factor of 2. A row alone is not checked: its step is the single-sequence decoder's,
whose drafting its k policy already sizes from this machine's measured costs at batch 1 (k="auto"),
or the user fixed; checked, SmolLM2 with eagle+suffix at batch 1 ran 1.21-1.44x plain decoding
against 1.23-1.59x unchecked, the check's plain bursts and noisy rates costing what it guards.
The rates are of steady speculation: a speculating step right after a plain one is not measured
(its drafter first catches up on the tokens it skipped: a head reads their states, a draft model
feeds them; measured, that catch-up made the pair's heads look slower than plain decoding at
batch 8 while they ran 1.35x when left on), nor one where most rows speculate for the first time
(a head reads the whole prompt then, a draft model feeds it): at a batch's start every row reads
its prompt in the same step, a transient that, measured, decided the warm-up (eagle on the pair
at batch 4: 1.32x plain decoding gated where every draft verified gave 1.65x). A step with a few
rows' first reads is measured: in steady serving a request pays its read once, a real cost of
speculating (left out, the pair's head served 8 clients of Spec-Bench's long prompts at 0.46x
plain decoding; SmolLM2's head at batch 8 ran 0.88x).
The check only decides whether unseeded rows draft, so it changes no
output: greedy rows commit the target's tokens either way (contract 1), and seeded sampling rows
always draft: their random draws depend on the drafts, and a seeded request must give the same
tokens alone or in a batch (contract 3).

Opt-in (`cost_gate=True`), a cost model decides per row inside the speculating steps. Before
each forward it keeps a row's draft only if it raises the step's expected tokens per second, from
a frozen cost table (BatchCosts: seconds of a forward of B rows x n tokens, measured once) and
each row's measured accepted tokens per verified draft; a row whose drafts were dropped
`probe_every` steps in a row is verified once anyway. For a draft model or a head it decides
before drafting too, from the drafter's own table and what the batch measures a draft depth to
take. It is not the default: on the pair it kept eagle at tau 1.3-2.6 where every draft verified
reached 4.2 (0.78x plain decoding at batch 4 against 1.50x), since a model of costs misses some
(reads of skipped states, mixed row lengths, the rows' Python).
"""

from __future__ import annotations

import copy
import functools
import statistics
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch

from outrider.decoder import Chunk, Collector, GenerationRequest, GenerationResult, SpeculativeDecoder, _Sequence
from outrider.lockstep import Lockstep, LockstepRow
from outrider.models.base import RowForward, common_prefix
from outrider.stats import SpecStats
from outrider.verify import verify_greedy_rows

COST_SIZES = (1, 2, 4, 8, 16)  # tokens per row the cost table measures (root + draft)
COST_CONTEXT = 64  # tokens already cached in each row while the costs are measured
CHECK_WARMUP = 2  # measured steps of each mode at a batch size before the check compares them
CHECK_BURST = 3  # steps the mode not chosen runs, every check_every steps (the first may catch up)
CHECK_SURE = 8  # measured steps of each mode before the check spaces its bursts out (_speculate)

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
                repeats: int = 5) -> BatchCosts:
        """Time forward_rows on `model` (whose slots are then empty) for 1..max_batch rows. Each
        repeat times every (rows, size) once, round-robin, and each entry is the median: a slow
        moment of a shared machine then lands on every entry alike instead of on one (the gate
        compares entries, and a skewed table made it drop drafts that pay)."""
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.vocab_size, (max_batch, context + max(sizes)), generator=gen)
        model.reset()
        model.forward_rows([RowForward(r, ids[r, :context].to(model.device), 0) for r in range(max_batch)])
        feeds = {n: [RowForward(r, ids[r, context : context + n].to(model.device)) for r in range(max_batch)]
                 for n in sizes}
        runs: dict[tuple[int, int], list[float]] = {(b, n): [] for b in range(1, max_batch + 1) for n in sizes}
        for i in range(repeats + 1):  # the first round warms up
            for rows, n in runs:
                t0 = time.perf_counter()
                model.forward_rows(feeds[n][:rows])
                if i:
                    runs[rows, n].append(time.perf_counter() - t0)
                for r in range(rows):
                    model.rollback(context, r)
        model.reset()
        return cls(tuple(sizes), tuple(tuple(statistics.median(runs[b, n]) for n in sizes)
                                       for b in range(1, max_batch + 1)))

    @classmethod
    def measure_probe(cls, probe: Any, max_batch: int, repeats: int = 5) -> BatchCosts:
        """A head's table: seconds of probe(rows), one draft step of `rows` rows, for 1..max_batch
        (a step feeds one token per row, so every size reads the same); round-robin as measure."""
        runs: dict[int, list[float]] = {b: [] for b in range(1, max_batch + 1)}
        for i in range(repeats + 1):  # the first round warms up
            for rows in runs:
                t0 = time.perf_counter()
                probe(rows)
                if i:
                    runs[rows].append(time.perf_counter() - t0)
        return cls((1, 2), tuple((statistics.median(runs[b]),) * 2 for b in runs))


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
    drafted_sum: float = 1.0  # drafted tokens per verified draft, the same way (a prior set at add)
    dropped_streak: int = 0
    joining: bool = True  # admitted, not prefilled yet (the next step prefills it)
    drafted_last: bool = False  # it drafted in its last step, nothing to catch up on (kept by the cost gate)
    speculated: bool = False  # it has been in a speculating step (its drafter has read its prompt)

    @property
    def expected_accepted(self) -> float:
        return self.accepted_sum / self.verified_sum

    @property
    def expected_drafted(self) -> float:
        return self.drafted_sum / self.verified_sum


@dataclass
class StepRate:
    """Committed tokens and seconds of one mode's measured steps at one batch size, older steps
    weighted down by `decay` per step."""

    tokens: float = 0.0
    seconds: float = 0.0
    steps: int = 0

    def add(self, tokens: int, seconds: float, decay: float) -> None:
        self.tokens = decay * self.tokens + tokens
        self.seconds = decay * self.seconds + seconds
        self.steps += 1

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")


class BatchDecoder:
    """Up to max_batch sequences decoded together by one SpeculativeDecoder's target and method.

    The decoder's target gets `max_batch` cache slots (use the BatchDecoder, not the decoder, from
    then on): on the native backend all rows share one forward; on the hf backend (any
    transformers model) they run one after another, interleaved step by step but with no
    throughput gain. Its method must be one whose drafter batches (every built-in one: draft_model
    needs a draft with slots). gate: speculate only where it measures faster than plain decoding
    (module doc); check_every: the steps between two runs of the mode not chosen (0: no check);
    clock: what the check times steps by (tests pass a virtual one); decay: the weight of older
    steps in its rates. cost_gate: also drop the drafts a cost model says cannot pay (module doc),
    by costs / draft_costs, the target's and the drafter's model's tables (None: measured now);
    probe_every: a dropped row's draft is verified after this many skipped ones. `mode_steps`
    counts the steps run speculating and plain."""

    def __init__(self, decoder: SpeculativeDecoder, max_batch: int = 4, *, gate: bool = True,
                 check_every: int = 16, clock: Callable[[], float] = time.perf_counter, decay: float = 0.9,
                 cost_gate: bool = False, costs: BatchCosts | None = None, draft_costs: BatchCosts | None = None,
                 probe_every: int = 8) -> None:
        if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
            raise ValueError(f"max_batch={max_batch!r} is invalid: use an integer >= 1")
        # check_every=1 would alternate the modes whatever they measure.
        if not isinstance(check_every, int) or isinstance(check_every, bool) or check_every < 0 or check_every == 1:
            raise ValueError(f"check_every={check_every!r} is invalid: use an integer >= 2, or 0 for no check")
        model = decoder.target.model
        if not hasattr(model, "forward_rows"):
            raise ValueError(
                f"batching needs a backend with cache slots (native or hf), but the target runs on "
                f"{type(model).__name__}: load it with backend='native' or 'hf', or use max_batch=1")
        if decoder.new_drafter is None:
            raise ValueError(
                "this decoder was built by hand, so a batch cannot build its rows' drafters: build it with "
                "SpeculativeDecoder.from_pretrained, or set decoder.new_drafter to a function returning one")
        if not getattr(type(decoder.drafter), "batches", False):
            raise ValueError(
                f"method {decoder.method!r} does not batch: use one whose drafter sets `batches` (every "
                "built-in method does), or max_batch=1 through SpeculativeDecoder")
        draft = getattr(decoder.drafter, "model", None) if type(decoder.drafter).uses_draft_model else None
        if draft is not None and not hasattr(draft, "forward_rows"):
            raise ValueError(
                f"batching draft_model needs a draft with cache slots (native or hf), but it runs on "
                f"{type(draft).__name__}: load both with backend='native', or use max_batch=1")
        self.decoder = decoder
        self.model = model
        self.max_batch = max_batch
        self.probe_every, self.decay = probe_every, decay
        model.set_slots(max_batch)
        self.gate = gate and decoder.k > 0
        self.cost_gate = cost_gate and self.gate
        self.costs = costs if costs is not None or not self.cost_gate else BatchCosts.measure(model, max_batch)
        # Per slot, reused by the requests that slot serves: a suffix drafter remembers their outputs.
        # A draft model gets a slot per row too (its rows draft in lockstep), a head one copy for all
        # rows (they propose together); the gate reads their cost per draft step from a table of
        # their own.
        self._lockstep: Lockstep | None = None
        self._propose_rows = None  # a head class's all-rows proposal, when it has one
        self.draft_costs = draft_costs
        join = getattr(type(decoder.drafter), "join_rows", None)
        if draft is not None:
            draft.set_slots(max_batch)
            if self.cost_gate and draft_costs is None:
                self.draft_costs = BatchCosts.measure(draft, max_batch, sizes=(1, 2))
            self._lockstep = Lockstep(draft.forward_rows)
            self._drafters = [decoder.new_drafter(LockstepRow(self._lockstep, draft, i)) for i in range(max_batch)]
        else:
            self._drafters = [decoder.new_drafter() for _ in range(max_batch)]
            if join is not None:
                probe = join(self._drafters)
                self._propose_rows = type(decoder.drafter).propose_rows
                if self.cost_gate and draft_costs is None:
                    self.draft_costs = BatchCosts.measure_probe(probe, max_batch)
        self._measured_depth_s: dict[int, float] = {}  # rows -> seconds per lockstep depth (_observe_drafting)
        self._adaptives = [copy.deepcopy(decoder.adaptive) for _ in range(max_batch)]
        self._rows: list[Row | None] = [None] * max_batch
        self._drafts_together = self._lockstep is not None or self._propose_rows is not None
        self.check_every, self.clock = check_every, clock
        self._checking = self.gate and check_every > 0
        self._rates: dict[int, dict[bool, StepRate]] = {}  # batch size -> {speculating: rate, plain: rate}
        self._since_check: dict[int, int] = {}  # batch size -> steps since the other mode last ran
        self._speculated_last = False  # whether the last step speculated (for the check's measure)
        self.mode_steps = {"speculating": 0, "plain": 0}

    @property
    def active(self) -> int:
        return sum(r is not None for r in self._rows)

    @property
    def free(self) -> int:
        return self.max_batch - self.active

    def add(self, request: GenerationRequest, stats: SpecStats | None = None) -> Row:
        """Admit a request into a free slot. The next step prefills it, in the same forward as the
        other rows' step (the weights read once for both: chunked prefill); it drafts from the
        step after."""
        free = [i for i, r in enumerate(self._rows) if r is None]
        if not free:
            raise RuntimeError(f"the batch is full ({self.max_batch} rows): wait for a row to finish")
        stats = stats or SpecStats()
        dec = self.decoder
        state = dec._new_sequence(request, stats, True, self.model.row(free[0]), self._drafters[free[0]],
                                  self._adaptives[free[0]])
        # The free slot whose cache shares the longest prefix with the prompt (a conversation's
        # earlier turns, wherever they ran) serves it, and keeps that prefix (decoder._keep_prefix).
        ids = state.seq[: state.n_prompt]
        slot = max(free, key=lambda i: (common_prefix(self.model.row(i).cached_ids(), ids), -i))
        if slot != free[0]:
            state.model, state.drafter = self.model.row(slot), self._drafters[slot]
            state.adaptive = self._adaptives[slot]
        dec._keep_prefix(state)
        # Prior: 2 drafted tokens per draft. k is only a cap (k="auto" drafters stop far earlier),
        # and a prior of k made the gate skip a draft model's drafts at batch 4-8 (0.9x measured).
        row = Row(slot, request, state, stats, exempt=request.seed is not None and not request.sampling.greedy,
                  drafted_sum=float(min(2, max(1, dec.k))))
        self._rows[slot] = row
        return row

    def remove(self, row: Row) -> None:
        """Drop a row before it finishes (a cancelled request); its slot is free for the next."""
        if self._rows[row.slot] is row:
            self._rows[row.slot] = None

    def step(self) -> list[tuple[Row, Chunk]]:
        """One draft -> verify -> commit step for every row, in one target forward that also
        prefills the rows admitted since the last step. Returns each stepped row's committed
        chunk; rows that finished leave the batch."""
        rows = [r for r in self._rows if r is not None and not r.joining]
        joining = [r for r in self._rows if r is not None and r.joining]
        if not rows and not joining:
            return []
        dec = self.decoder
        t0, t_check = dec.clock(), self.clock()
        # A row alone drafts as the single-sequence decoder would (module doc: no check at batch 1).
        checked = self._checking and len(rows) > 1
        speculate = self._speculate(len(rows)) if checked else True
        # Measured by the check: steps that prefill nobody and, speculating, do not follow a plain
        # step (whose drafters catch up on skipped tokens first) and where at most half the rows
        # speculate for the first time (reading a whole prompt: module doc).
        measured = checked and not joining and (
            not speculate or (self._speculated_last and 2 * sum(not r.speculated for r in rows) <= len(rows)))
        if rows:
            self._speculated_last = speculate
            self.mode_steps["speculating" if speculate else "plain"] += 1
        for r in rows if speculate and self._checking else ():  # only the check reads it
            r.speculated = True
        if not speculate:
            caps: list[int | None] = [None if r.exempt else 0 for r in rows]
        elif rows and self.cost_gate and self._drafts_together:
            caps = self._draft_caps(rows)
        else:
            caps = [None] * len(rows)
        if not rows:
            plans = []
        elif self._drafts_together:
            # Rows that do not draft this step plan at once; only the drafting ones draft together
            # (a lockstep's thread hand-offs cost ~1-2 ms a depth on this 2-core machine).
            plans = [dec._plan(r.state, 0) if c == 0 else None for r, c in zip(rows, caps)]
            drafting = [i for i, c in enumerate(caps) if c != 0]
            # The cost model learns a depth's cost from steady steps only (_observe_drafting).
            steady = self.cost_gate and speculate and all(r.drafted_last for r in rows)
            if self.cost_gate:
                for r, c in zip(rows, caps):
                    r.drafted_last = c != 0
            if drafting:
                t_draft = self.clock()
                for i, plan in zip(drafting, self._draft_together([rows[i] for i in drafting],
                                                                   [caps[i] for i in drafting])):
                    plans[i] = plan
                if steady:
                    self._observe_drafting(caps, plans, self.clock() - t_draft)
        else:
            plans = [dec._plan(r.state, c) for r, c in zip(rows, caps)]
        if speculate and self.cost_gate and rows:
            self._gate(rows, plans)
        feeds = [RowForward(r.slot, p.ids, None, p.attn_mask, p.positions) for r, p in zip(rows, plans)]
        # A joining row feeds its prompt but the last token and the prefix its slot kept (add).
        prefills = [(r, dec._prefill_ids(r.state)) for r in joining]
        fed = [(r, ids) for r, ids in prefills if ids is not None and r.state.kept < ids.shape[0]]
        feeds += [RowForward(r.slot, ids[r.state.kept :].to(self.model.device), 0) for r, ids in fed]
        logits = self.model.forward_rows(feeds) if feeds else []
        hidden = self.model.row_hidden if dec.hidden_layers and feeds else [None] * len(feeds)
        for r, h in zip(rows, hidden):  # each row's hidden states of this forward, for its head (_complete)
            r.state.model.hidden = h
        fed_hidden = {id(r): h for (r, _), h in zip(fed, hidden[len(rows):])}
        for r, ids in prefills:
            prompt_hidden = dec._prompt_hidden(r.state, fed_hidden.get(id(r))) if ids is not None else None
            dec._begin(r.state, prompt_hidden, t0)
            r.joining = False
        verdicts = _greedy_chain_verdicts(rows, plans, logits)
        out = []
        for r, p, lg, v in zip(rows, plans, logits, verdicts):
            chunk = dec._complete(r.state, p, lg, v)
            if p.draft is not None and p.draft.size:
                self._observe(r, sum(chunk.drafted), p.draft.size)
            r.collected.add(chunk)
            out.append((r, chunk))
            if chunk.finish_reason is not None:
                r.finished = True
                self._rows[r.slot] = None
        if measured:
            self._rates[len(rows)][speculate].add(sum(len(c.token_ids) for _, c in out), self.clock() - t_check,
                                                  self.decay)
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

    def _speculate(self, B: int) -> bool:
        """The measured check (module doc): whether this step of B rows speculates. The faster mode
        at B runs, and the other for CHECK_BURST steps after every check_every (times the square of
        how many times faster the faster one measures, at most 8, once both modes have CHECK_SURE
        measured steps). Until both modes have CHECK_WARMUP measured steps at B, the faster one is
        the nearest batch size's that has them, within a factor of 2 of B (batch 1's verdict says little about batch 8's); where none has,
        it speculates until that mode has them, then runs plain until it has."""
        rates = self._rates.setdefault(B, {True: StepRate(), False: StepRate()})
        warm = [b for b, r in self._rates.items()
                if min(r[True].steps, r[False].steps) >= CHECK_WARMUP and B <= 2 * b and b <= 2 * B]
        if not warm:
            return rates[True].steps < CHECK_WARMUP
        on, off = self._rates[min(warm, key=lambda b: (abs(b - B), b))].values()
        best = on.tokens_per_s >= off.tokens_per_s
        # The further behind the other mode measures, the rarer its bursts (at most 8x rarer): a
        # draft model's step at batch 8 on the pair costs ~2 plain steps, and its bursts cost 15%.
        # Only once both rates rest on CHECK_SURE steps: a verdict from the warm-up's few noisy
        # steps, stretched, held for a whole short run (eagle on the pair at batch 4: 1.32x plain
        # decoding where every draft verified gave 1.65x).
        hi, lo = sorted((on.tokens_per_s, off.tokens_per_s), reverse=True)
        sure = min(on.steps, off.steps) >= CHECK_SURE
        every = self.check_every * ((min((hi / lo) ** 2, 8.0) if lo > 0 else 8.0) if sure else 1.0)
        since = self._since_check.get(B, 0) + 1
        self._since_check[B] = 0 if since >= every + CHECK_BURST else since
        return best if since <= every else not best

    def _observe(self, row: Row, accepted: int, drafted: int) -> None:
        row.accepted_sum = self.decay * row.accepted_sum + accepted
        row.drafted_sum = self.decay * row.drafted_sum + drafted
        row.verified_sum = self.decay * row.verified_sum + 1.0

    def _must_verify(self, row: Row) -> bool:
        """Whether the gate must leave this row's draft alone: seeded rows always, the others when
        they are due a probe (so their estimate is measured again); a verified row's streak ends."""
        if row.exempt or row.dropped_streak + 1 >= self.probe_every:
            row.dropped_streak = 0
            return True
        return False

    def _draft_together(self, rows: list[Row], caps: list[int | None]) -> list[Any]:
        """The plans of rows whose drafters share a model: through the head class's propose_rows
        (all rows' calls batched in this thread), else each row's `_plan` in the lockstep's threads."""
        dec = self.decoder
        if self._propose_rows is None:
            return self._lockstep.run([functools.partial(dec._plan, r.state, c) for r, c in zip(rows, caps)])
        made = [dec._draft_step(r.state, c) for r, c in zip(rows, caps)]
        asked = [i for i, (k, _, _) in enumerate(made) if k > 0]
        drafts: list[Any] = [None] * len(rows)
        if asked:
            for i, draft in zip(asked, self._propose_rows([rows[i].state.drafter for i in asked],
                                                          [made[i][1] for i in asked])):
                drafts[i] = draft
        return [dec._plan_from(r.state, k, step, draft, ta) for r, (k, step, ta), draft in zip(rows, made, drafts)]

    def _observe_drafting(self, caps: list[int | None], plans: list[Any], seconds: float) -> None:
        """Learn what one lockstep depth really costs when all B rows draft: the draft forward plus
        each row's drafting Python and the threads' hand-offs, which the draft's cost table (its
        forward alone) leaves out (on the 14M pair at batch 8 they cost more than the forward).
        Only steps after a step where every row drafted are observed: a drafter that skipped steps
        first catches up on them (a head reads their states, a draft model feeds them; a row's
        first draft reads its whole prompt), and counting that as the depth's cost made the gate
        stop drafting where drafts paid (eagle on the pair at batch 1: tau 2.5 against 4.15)."""
        depth = max((p.draft.forwards for p in plans if p.draft is not None), default=0)
        if depth and all(c is None for c in caps):
            B, per = len(caps), seconds / depth
            old = self._measured_depth_s.get(B)
            self._measured_depth_s[B] = per if old is None else self.decay * old + (1 - self.decay) * per

    def _depth_s(self, B: int) -> float:
        """Seconds of one lockstep draft depth for B rows: as measured while B rows drafted; else
        the nearest batch size measured, scaled by the table; else the table."""
        table = self.draft_costs.forward_s(B, B)
        if not self._measured_depth_s:
            return table
        near = min(self._measured_depth_s, key=lambda b: (abs(b - B), b))
        at_near = self.draft_costs.forward_s(near, near)
        return self._measured_depth_s[near] * (table / at_near if near != B and at_near > 0 else 1.0)

    def _draft_caps(self, rows: list[Row]) -> list[int | None]:
        """Before a draft model drafts (its forwards cost time the verify gate cannot give back):
        None (draft as usual) for every row when the batch's drafts are expected to pay, else 0
        (no draft) for all but seeded rows and rows due a probe. Drafting pays when the expected
        committed tokens per second, one lockstep draft forward per drafted depth plus the larger
        verify forward, beat a plain decode step's."""
        B = len(rows)
        depth = max(r.expected_drafted for r in rows)  # lockstep: the deepest row sets the draft forwards
        tokens = B + sum(r.expected_drafted for r in rows)
        gain = B + sum(min(r.expected_drafted, r.expected_accepted) for r in rows)
        spent = depth * self._depth_s(B) + self.costs.forward_s(B, round(tokens))
        if gain / spent > B / self.costs.forward_s(B, B):
            for r in rows:
                r.dropped_streak = 0
            return [None] * B
        caps: list[int | None] = []
        for r in rows:
            if self._must_verify(r):
                caps.append(None)
            else:
                r.dropped_streak += 1
                caps.append(0)
        return caps

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
            if self._must_verify(r):
                continue
            candidates.append((expected / d, i, d, expected))
        # Least accepted per drafted token first: drop while that raises tokens per second.
        for _, i, d, expected in sorted(candidates):
            keep = gain / self.costs.forward_s(B, tokens)
            drop = (gain - expected) / self.costs.forward_s(B, tokens - d)
            r = rows[i]
            if drop > keep:
                plans[i] = _without_draft(plans[i])
                r.state.drafter.update([])  # as if all rejected: a draft model rolls back what it fed
                gain -= expected
                tokens -= d
                r.dropped_streak += 1
            else:
                r.dropped_streak = 0


def _greedy_chain_verdicts(rows: list[Row], plans: list[Any], logits: list[Any]) -> list[tuple[int, int] | None]:
    """(accepted, next token) of every greedy chain row, verified together as tensors
    (verify.verify_greedy_rows: drafts (G, k) and the target's argmax (G, k+1), padded); None for
    the rows verified alone (sampling rows draw from their own generators, trees walk their own
    shapes)."""
    greedy = [i for i, (r, p) in enumerate(zip(rows, plans))
              if r.state.params.greedy and (p.draft is None or p.draft.is_chain)]
    verdicts: list[tuple[int, int] | None] = [None] * len(rows)
    if not greedy:
        return verdicts
    k = max(int(plans[i].ids.shape[0]) - 1 for i in greedy)
    drafts = torch.full((len(greedy), k), -1, dtype=torch.long)
    targets = torch.zeros(len(greedy), k + 1, dtype=torch.long)
    for j, i in enumerate(greedy):
        n = int(plans[i].ids.shape[0])
        drafts[j, : n - 1] = plans[i].ids[1:].cpu()
        targets[j, :n] = logits[i].argmax(-1).cpu()
    accepted, ids = verify_greedy_rows(drafts, targets)
    for j, (a, row) in enumerate(zip(accepted.tolist(), ids.tolist())):
        verdicts[greedy[j]] = (a, row[a])
    return verdicts


def _without_draft(plan: Any) -> Any:
    """The plan with its draft dropped: the step feeds the root alone (a plain decode step)."""
    return replace(plan, draft=None, ids=plan.ids[:1], attn_mask=None, positions=None)
