"""Adaptive drafting: pick the draft length (or tree size) per step to maximise expected
committed tokens per unit of time.

With a_i the probability that draft position i is accepted given that positions < i were, a step
drafting k tokens commits in expectation E(k) = 1 + sum_{i<=k} prod_{j<=i} a_j tokens, and costs
k * c + v(k + 1) target decode steps (costs.py). DESIGN.md's formula is the special case a_i = alpha.
The acceptance a_i is counted as the request runs (exponential moving averages), so k follows the
text: long when the drafter agrees with the target, short when it does not.

A drafter that knows how sure it is (a draft model: q of the token it drafted) does better than
any k fixed before the step: `keep_drafting` decides after each drafted token, from that token's
confidence mapped to a measured acceptance rate (calibrated per confidence bin as it runs), whether
one more token raises the expected tokens per second of this step; `tree_size` sizes a draft tree
the same way from each node's estimated acceptance.

Reproducible (contract 3): the decisions read only the frozen costs and this request's own history
(`reset` starts each request from the same prior), never the clock. The number of random draws a
seeded request makes therefore does not depend on the machine's load or on earlier requests. The
prior itself may be learned once, when a decoder is built, from a greedy calibration run (see
`keep_as_prior`): drafts are often far from calibrated (the embedded draft's tokens of confidence
0.15 are accepted 87% of the time), and a request is too short to learn that from scratch.
"""

from __future__ import annotations

from outrider.costs import CostModel

CONFIDENCE_BINS = 10
RANKS = 2  # a node's rank among its siblings, calibrated apart: first child, or a later one


def _bin(confidence: float, rank: int = 0) -> int:
    """Calibration bin of a draft token: its confidence decile, apart for first and later children
    (a draft's first choice at confidence 0.2 is accepted far more often than its second)."""
    return min(rank, RANKS - 1) * CONFIDENCE_BINS + min(max(int(confidence * CONFIDENCE_BINS), 0), CONFIDENCE_BINS - 1)


def _rate(kept: float, reached: float) -> float:
    """An acceptance estimate from decayed counts, kept below 1 so that expected lengths stay finite."""
    return min(max(kept / reached, 0.0), 0.999)


class AdaptiveK:
    def __init__(
        self, k_max: int = 8, decay: float = 0.9, prior: float = 0.6, explore_every: int = 6,
        costs: CostModel | None = None,
    ) -> None:
        """costs: c and v(n) (None: free drafts and flat verification, c = 0 and v = 1)."""
        if k_max < 1:
            raise ValueError(f"k_max={k_max} is invalid: use k_max >= 1")
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay={decay} is invalid: use a number in (0, 1)")
        self.k_max = k_max
        self.decay = decay
        self.prior = prior
        self.explore_every = explore_every
        self.costs = costs if costs is not None else CostModel()
        # The counts each request starts from: (reached, kept, conf_reached, conf_kept). Before any
        # calibration run, acceptance `prior` per position and "as sure as it claims" per confidence.
        self._prior = (
            [1.0] * k_max, [prior] * k_max,
            [1.0] * (RANKS * CONFIDENCE_BINS), [(b + 0.5) / CONFIDENCE_BINS for b in range(CONFIDENCE_BINS)] * RANKS,
        )
        self.reset()

    def reset(self) -> None:
        """Forget this request's counts: a new request starts from the prior (see the module doc)."""
        # Exponentially decayed counts: reached[i] steps got to draft position i, kept[i] kept it;
        # conf_reached[b] / conf_kept[b] the same for draft tokens whose confidence fell in bin b.
        self.reached, self.kept, self.conf_reached, self.conf_kept = (list(x) for x in self._prior)
        self._steps = 0
        self._explore = False  # whether this step still owes its exploring token (choose or keep_drafting)

    def keep_as_prior(self, weight: float = 4.0) -> None:
        """Make the counts gathered so far (a calibration run) the prior of every later request,
        each bin's weight capped at `weight` observations so that a request still adapts quickly."""

        def capped(reached: list[float], kept: list[float]) -> tuple[list[float], list[float]]:
            scale = [min(1.0, weight / r) if r > 0 else 1.0 for r in reached]
            return [r * f for r, f in zip(reached, scale)], [k * f for k, f in zip(kept, scale)]

        self._prior = (*capped(self.reached, self.kept), *capped(self.conf_reached, self.conf_kept))
        self.reset()

    def acceptance(self) -> list[float]:
        """a_i for i = 0..k_max-1 (positions never reached keep the prior)."""
        return [_rate(kept, reached) for kept, reached in zip(self.kept, self.reached)]

    def verify_cost(self, n: int) -> float:
        """v(n): a target forward over n tokens, in decode steps."""
        return self.costs.v(n)

    def expected_rate(self, k: int) -> float:
        """Expected committed tokens per decode-step time when drafting k tokens."""
        return self._rates(k)[k - 1]

    def _rates(self, top: int) -> list[float]:
        """expected_rate(k) for k = 1..top in one pass (this runs once per decode step)."""
        rates, tokens, reach = [], 1.0, 1.0
        c = self.costs.c
        for i, a in enumerate(self.acceptance()[:top]):
            reach *= a
            tokens += reach
            rates.append(tokens / ((i + 1) * c + self.verify_cost(i + 2)))
        return rates

    def choose(self, limit: int) -> int:
        """The k in 1..min(k_max, limit) with the highest expected rate (0 if limit < 1).

        Every `explore_every`-th step drafts one token more than the best guess: without it, one
        unlucky early estimate (a few rejections) is never measured again and the choice stays
        stuck below the best k. (A count of steps: reproducible.)"""
        top = min(self.k_max, limit)
        if top < 1:
            return 0
        rates = self._rates(top)
        k = 1 + rates.index(max(rates))
        if self._explore:
            self._explore = False
            k = min(k + 1, top)
        return k

    def acceptance_at(self, confidence: float, rank: int = 0) -> float:
        """Measured probability that a draft token the drafter gave this probability is accepted
        (when verification reaches it), for a first child (rank 0) or a later sibling."""
        b = _bin(confidence, rank)
        return _rate(self.conf_kept[b], self.conf_reached[b])

    def keep_drafting(self, confidences: list[float]) -> bool:
        """After drafting tokens with these confidences: whether drafting one more is expected to
        raise this step's committed tokens per second. The next token's acceptance is guessed from
        the last one's (a drafter's certainty runs in stretches)."""
        i = len(confidences)
        c = self.costs.c
        tokens, reach = 1.0, 1.0
        for conf in confidences:
            reach *= self.acceptance_at(conf)
            tokens += reach
        now = tokens / (i * c + self.verify_cost(i + 1))
        more = (tokens + reach * self.acceptance_at(confidences[-1])) / ((i + 1) * c + self.verify_cost(i + 2))
        if more > now:
            return True
        if self._explore:  # once every explore_every steps, one token past the rule (see choose)
            self._explore = False
            return True
        return False

    def tree_size(self, reach: list[float], draft_forwards: int, explore: bool = True) -> int:
        """How many nodes of a draft tree to verify. reach[i]: the estimated probability that the
        i-th best node is accepted (nodes sorted best first, each after its parent, so every prefix
        is a tree). Maximises (1 + sum of the kept nodes' reach) / (draft_forwards * c + v(size + 1));
        the draft forwards are already spent, but they are part of what the step costs."""
        base = draft_forwards * self.costs.c
        best, best_rate, tokens = 0, 1.0 / (base + self.verify_cost(1)), 1.0
        for i, r in enumerate(reach):
            tokens += r
            rate = tokens / (base + self.verify_cost(i + 2))
            if rate > best_rate:
                best, best_rate = i + 1, rate
        if explore and self._explore and best < len(reach):  # explore one node more, as in choose
            self._explore = False
            best += 1
        return best

    def observe(self, drafted: int, accepted: int, tried: list[tuple[float, bool, int]] | None = None) -> None:
        """Record one step: the draft reached depth `drafted` (a chain's length) and `accepted`
        tokens were kept. tried: (confidence, kept, rank among siblings) of every drafted node that
        verification tried (the root's children and those of accepted nodes), from drafters that
        report confidences: it calibrates `acceptance_at`."""
        d = self.decay
        for confidence, kept, rank in tried or ():
            b = _bin(confidence, rank)
            self.conf_reached[b] = d * self.conf_reached[b] + 1.0
            self.conf_kept[b] = d * self.conf_kept[b] + (1.0 if kept else 0.0)
        for i in range(min(drafted, self.k_max)):
            if i > accepted:
                break
            self.reached[i] = d * self.reached[i] + 1.0
            self.kept[i] = d * self.kept[i] + (1.0 if i < accepted else 0.0)
        self._steps += 1
        self._explore = self._steps % self.explore_every == 0
