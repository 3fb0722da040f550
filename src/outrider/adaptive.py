"""Adaptive draft length: pick k per step to maximise expected committed tokens per second.

With a_i the probability that draft position i is accepted given that positions < i were, a step
drafting k tokens commits in expectation E(k) = 1 + sum_{i<=k} prod_{j<=i} a_j tokens, and costs
k * t_draft + t_verify(k + 1). DESIGN.md's formula is the special case a_i = alpha. Both the
acceptance a_i and the costs are measured as the generation runs (exponential moving averages),
so k follows the text: long when the drafter agrees with the target, short when it does not.
"""

from __future__ import annotations


class AdaptiveK:
    def __init__(self, k_max: int = 8, decay: float = 0.9, prior: float = 0.6, explore_every: int = 6) -> None:
        if k_max < 1:
            raise ValueError(f"k_max={k_max} is invalid: use k_max >= 1")
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay={decay} is invalid: use a number in (0, 1)")
        self.k_max = k_max
        self.decay = decay
        # Exponentially decayed counts: reached[i] steps got to draft position i, kept[i] kept it.
        self.reached = [1.0] * k_max
        self.kept = [prior] * k_max
        self.t_draft: float | None = None  # seconds per drafted token
        self.t_verify: dict[int, float] = {}  # seconds per target forward of n tokens
        self.explore_every = explore_every
        self._steps = 0

    def acceptance(self) -> list[float]:
        """a_i for i = 0..k_max-1 (positions never reached keep the prior)."""
        return [min(max(kept / reached, 0.0), 0.999) for kept, reached in zip(self.kept, self.reached)]

    def verify_cost(self, n: int) -> float:
        """Seconds for one target forward over n tokens; unmeasured sizes interpolate linearly."""
        if n in self.t_verify:
            return self.t_verify[n]
        known = sorted(self.t_verify)
        if not known:
            return 1.0
        lower = [m for m in known if m < n]
        upper = [m for m in known if m > n]
        if lower and upper:
            a, b = lower[-1], upper[0]
            return self.t_verify[a] + (self.t_verify[b] - self.t_verify[a]) * (n - a) / (b - a)
        if lower and len(lower) >= 2:
            a, b = lower[-2], lower[-1]
            slope = max((self.t_verify[b] - self.t_verify[a]) / (b - a), 0.0)
            return self.t_verify[b] + slope * (n - b)
        return self.t_verify[lower[-1] if lower else upper[0]]

    def expected_rate(self, k: int) -> float:
        """Expected committed tokens per second when drafting k tokens."""
        return self._rates(k)[k - 1]

    def _rates(self, top: int) -> list[float]:
        """expected_rate(k) for k = 1..top in one pass (this runs once per decode step)."""
        rates, tokens, reach = [], 1.0, 1.0
        t_draft = self.t_draft or 0.0
        for i, a in enumerate(self.acceptance()[:top]):
            reach *= a
            tokens += reach
            rates.append(tokens / ((i + 1) * t_draft + self.verify_cost(i + 2)))
        return rates

    def choose(self, limit: int) -> int:
        """The k in 1..min(k_max, limit) with the highest expected rate (0 if limit < 1).

        Every `explore_every`-th step drafts one token more than the best guess: without it, one
        unlucky early estimate (a slow verification, a few rejections) is never measured again
        and the choice stays stuck below the best k."""
        top = min(self.k_max, limit)
        if top < 1:
            return 0
        rates = self._rates(top)
        k = 1 + rates.index(max(rates))
        self._steps += 1
        if self._steps % self.explore_every == 0:
            k = min(k + 1, top)
        return k

    def observe(self, drafted: int, accepted: int, draft_s: float, target_s: float) -> None:
        """Record one step: `drafted` tokens proposed in draft_s seconds, `accepted` kept; the target
        forward over drafted + 1 tokens took target_s seconds."""
        d = self.decay
        for i in range(min(drafted, self.k_max)):
            if i > accepted:
                break
            self.reached[i] = d * self.reached[i] + 1.0
            self.kept[i] = d * self.kept[i] + (1.0 if i < accepted else 0.0)
        if drafted:
            per_token = draft_s / drafted
            self.t_draft = per_token if self.t_draft is None else d * self.t_draft + (1 - d) * per_token
        n = drafted + 1
        old = self.t_verify.get(n)
        self.t_verify[n] = target_s if old is None else d * old + (1 - d) * target_s
