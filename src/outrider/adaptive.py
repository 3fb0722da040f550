"""Adaptive draft length: pick k per step to maximise expected committed tokens per second.

With a_i the probability that draft position i is accepted given that positions < i were, a step
drafting k tokens commits in expectation E(k) = 1 + sum_{i<=k} prod_{j<=i} a_j tokens, and costs
k * t_draft + t_verify(k + 1). DESIGN.md's formula is the special case a_i = alpha. Both the
acceptance a_i and the costs are measured as the generation runs (exponential moving averages),
so k follows the text: long when the drafter agrees with the target, short when it does not.

A drafter that knows how sure it is (a draft model: q of the token it drafted) does better than
any k fixed before the step: `keep_drafting` decides after each drafted token, from that token's
confidence mapped to a measured acceptance rate (calibrated per confidence bin as it runs), whether
one more token raises the expected tokens per second of this step. The draft length then depends
only on the draft itself, which verification never assumes otherwise: the output is unchanged.
"""

from __future__ import annotations


CONFIDENCE_BINS = 10
COST_DECAY = 0.98  # costs drift slowly (machine load); acceptance follows the text faster (decay)


def _bin(confidence: float) -> int:
    return min(max(int(confidence * CONFIDENCE_BINS), 0), CONFIDENCE_BINS - 1)


def _rate(kept: float, reached: float) -> float:
    """An acceptance estimate from decayed counts, kept below 1 so that expected lengths stay finite."""
    return min(max(kept / reached, 0.0), 0.999)


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
        # Decayed sums of 1, n, n^2, t, n t over verifications of n tokens taking t seconds.
        self._fit = [0.0] * 5
        self._verifications = 0
        self.explore_every = explore_every
        self._explore = False  # whether this step still owes its exploring token (choose or keep_drafting)
        # Acceptance by draft confidence, same decayed counts; the prior says "as sure as it claims".
        self.conf_reached = [1.0] * CONFIDENCE_BINS
        self.conf_kept = [(b + 0.5) / CONFIDENCE_BINS for b in range(CONFIDENCE_BINS)]

    def acceptance(self) -> list[float]:
        """a_i for i = 0..k_max-1 (positions never reached keep the prior)."""
        return [_rate(kept, reached) for kept, reached in zip(self.kept, self.reached)]

    def verify_cost(self, n: int) -> float:
        """Seconds for one target forward over n tokens, from a line a + b n fitted to every
        verification so far (decayed least squares): each size informs the others, so one slow
        measurement at a rarely used size cannot keep that size unused. 1.0 before any."""
        w, wn, wnn, wy, wny = self._fit
        if w == 0.0:
            return 1.0
        det = w * wnn - wn * wn
        slope = max((w * wny - wn * wy) / det, 0.0) if det > 1e-9 * w * w else 0.0
        return max((wy - slope * wn) / w + slope * n, 1e-9)

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
        if self._explore:
            self._explore = False
            k = min(k + 1, top)
        return k

    def acceptance_at(self, confidence: float) -> float:
        """Measured probability that a draft token the drafter gave this probability is accepted."""
        b = _bin(confidence)
        return _rate(self.conf_kept[b], self.conf_reached[b])

    def keep_drafting(self, confidences: list[float]) -> bool:
        """After drafting tokens with these confidences: whether drafting one more is expected to
        raise this step's committed tokens per second. The next token's acceptance is guessed from
        the last one's (a drafter's certainty runs in stretches)."""
        i = len(confidences)
        t_draft = self.t_draft or 0.0
        tokens, reach = 1.0, 1.0
        for c in confidences:
            reach *= self.acceptance_at(c)
            tokens += reach
        now = tokens / (i * t_draft + self.verify_cost(i + 1))
        more = (tokens + reach * self.acceptance_at(confidences[-1])) / ((i + 1) * t_draft + self.verify_cost(i + 2))
        if more > now:
            return True
        if self._explore:  # once every explore_every steps, one token past the rule (see choose)
            self._explore = False
            return True
        return False

    def observe(
        self, drafted: int, accepted: int, draft_s: float, target_s: float, confidences: list[float] | None = None
    ) -> None:
        """Record one step: `drafted` tokens proposed in draft_s seconds (with the drafter's
        confidences, when it reports them), `accepted` kept; the target forward over drafted + 1
        tokens took target_s seconds."""
        d = self.decay
        if confidences:
            for i, c in enumerate(confidences[: accepted + 1]):  # the ones verification reached
                b = _bin(c)
                self.conf_reached[b] = d * self.conf_reached[b] + 1.0
                self.conf_kept[b] = d * self.conf_kept[b] + (1.0 if i < accepted else 0.0)
        for i in range(min(drafted, self.k_max)):
            if i > accepted:
                break
            self.reached[i] = d * self.reached[i] + 1.0
            self.kept[i] = d * self.kept[i] + (1.0 if i < accepted else 0.0)
        if drafted:
            per_token = draft_s / drafted
            self.t_draft = per_token if self.t_draft is None else d * self.t_draft + (1 - d) * per_token
        n = drafted + 1
        if self._fit[0]:  # a spike (another process, a first call at a new size) counts as 3x at most
            target_s = min(target_s, 3.0 * self.verify_cost(n))
        self._fit = [COST_DECAY * f + x for f, x in zip(self._fit, (1.0, n, n * n, target_s, n * target_s))]
        self._verifications += 1
        self._explore = self._verifications % self.explore_every == 0
