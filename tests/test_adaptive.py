"""Adaptive draft length: the choice follows measured acceptance and costs; output stays exact."""

import pytest

from conftest import FakeModel, loaded
from outrider import SpeculativeDecoder
from outrider.adaptive import AdaptiveK
from outrider.costs import CostModel
from outrider.drafters import DraftModel


def trained(acceptance: float, t_draft: float, t_verify: float, steps: int = 200, k: int = 4) -> AdaptiveK:
    """Costs in units of a decode step: c = t_draft / t_verify, flat verification."""
    ak = AdaptiveK(k_max=8, costs=CostModel(c=t_draft / t_verify))
    # Deterministic stream of outcomes with the given per-position acceptance.
    import random

    rng = random.Random(0)
    for _ in range(steps):
        accepted = 0
        while accepted < k and rng.random() < acceptance:
            accepted += 1
        ak.observe(k, accepted)
    return ak


def test_high_acceptance_and_cheap_drafts_give_long_drafts():
    ak = trained(0.95, t_draft=0.01, t_verify=1.0)
    assert ak.choose(100) >= 6


def test_low_acceptance_gives_short_drafts():
    ak = trained(0.2, t_draft=0.3, t_verify=1.0)
    assert ak.choose(100) == 1


def test_expected_rate_follows_the_design_formula():
    # a_i = 0.5 everywhere before any observation; v(n) = 1 + 0.05 (n - 1)
    ak = AdaptiveK(k_max=4, prior=0.5, costs=CostModel(c=0.1, verify={1: 1.0, 5: 1.2}))
    a, c, k = 0.5, 0.1, 3
    v = 1.0 + 0.05 * k  # verifying k + 1 tokens
    assert ak.expected_rate(k) == pytest.approx((1 - a ** (k + 1)) / ((1 - a) * (k * c + v)))


def test_choice_respects_the_limit():
    ak = trained(0.95, t_draft=0.01, t_verify=1.0)
    assert ak.choose(2) == 2 and ak.choose(0) == 0


@pytest.mark.parametrize("kwargs, needle", [({"k_max": 0}, "k_max=0"), ({"decay": 1.0}, "decay=1.0")])
def test_bad_settings(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        AdaptiveK(**kwargs)


def test_auto_k_is_exact_under_greedy():
    from test_loop_fake import greedy_reference

    target, draft = FakeModel(vocab_size=4, seed=0, scale=1.0), FakeModel(vocab_size=4, seed=5, scale=1.0)
    dec = SpeculativeDecoder(loaded(target), DraftModel(draft, 4, k=8), k=8,
                             adaptive=AdaptiveK(k_max=8, costs=CostModel(c=0.1, verify={1: 1.0, 8: 1.3})))
    for _ in range(3):
        res = dec.generate([1, 2, 3], max_new_tokens=50)
        assert res.token_ids == greedy_reference(target, [1, 2, 3], 50)
    assert len(res.stats.drafted_at) >= 1


def test_from_pretrained_accepts_auto(model_dirs):
    target, draft = model_dirs
    dec = SpeculativeDecoder.from_pretrained(str(target), draft=str(draft), k="auto")
    ref = SpeculativeDecoder.from_pretrained(str(target), method="autoregressive")
    assert dec.adaptive is not None
    assert dec.generate("def f", max_new_tokens=20).token_ids == ref.generate("def f", max_new_tokens=20).token_ids


def calibrated(t_draft: float = 0.1, t_verify: float = 1.0) -> AdaptiveK:
    """Sure tokens (confidence 0.95) are always accepted, unsure ones (0.15) never."""
    ak = AdaptiveK(k_max=8, costs=CostModel(c=t_draft / t_verify))
    for _ in range(31):  # 31: the next step is not one that explores a token past the rule
        ak.observe(3, 2, [(0.95, True, 0), (0.95, True, 0), (0.15, False, 0)])
    return ak


def test_acceptance_is_calibrated_per_confidence():
    ak = calibrated()
    assert ak.acceptance_at(0.95) > 0.95 and ak.acceptance_at(0.15) < 0.05
    assert ak.acceptance_at(0.55) == pytest.approx(0.55)  # never seen: the prior, "as sure as it says"
    assert ak.acceptance_at(0.95, rank=1) == pytest.approx(0.95)  # later siblings are counted apart


def test_drafting_goes_on_while_the_drafter_is_sure():
    ak = calibrated()
    assert ak.keep_drafting([0.95]) and ak.keep_drafting([0.95, 0.95, 0.95])
    assert not ak.keep_drafting([0.95, 0.15])
    expensive = calibrated(t_draft=2.0)  # a draft token costs twice a verification: stop at once
    assert not expensive.keep_drafting([0.95])


class RecordingDraftModel(DraftModel):
    """A DraftModel that records, for every proposal, the draft length it was allowed (DraftStep.k:
    the decoder's k, cut to the remaining token budget) and the length it drafted."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.proposals: list[tuple[int, int]] = []

    def propose(self, step):
        draft = super().propose(step)
        self.proposals.append((step.k, draft.size))
        return draft


def test_confident_drafts_stop_early_and_stay_exact():
    from test_loop_fake import greedy_reference

    target, draft = FakeModel(vocab_size=4, seed=0, scale=1.0), FakeModel(vocab_size=4, seed=5, scale=1.0)
    ak = AdaptiveK(k_max=8, costs=CostModel(c=0.1))  # a draft token costs a tenth of a decode step
    drafter = RecordingDraftModel(draft, 4, k=8)
    dec = SpeculativeDecoder(loaded(target), drafter, k=8, adaptive=ak)
    res = dec.generate([1, 2, 3], max_new_tokens=60)
    assert res.token_ids == greedy_reference(target, [1, 2, 3], 60)
    assert sum(ak.conf_reached) > len(ak.conf_reached)  # the drafter reported its confidences
    assert drafter.proposals and all(size <= allowed for allowed, size in drafter.proposals)
    # Cut short by confidence: among steps the budget did not limit (allowed the full k = 8), some
    # drafted fewer. The budget-limited last steps (allowed < 8) do not count: they are short anyway.
    unlimited = [size for allowed, size in drafter.proposals if allowed == 8]
    assert len(unlimited) >= 3 and any(size < 8 for size in unlimited), drafter.proposals


def test_tree_size_weighs_reach_against_verification_cost():
    cheap = AdaptiveK(costs=CostModel(c=0.1))  # flat verification: every node with reach > 0 pays
    steep = AdaptiveK(costs=CostModel(c=0.1, verify={1: 1.0, 2: 1.5}))  # each node costs half a step
    reach = [0.9, 0.8, 0.5, 0.3, 0.1]
    assert cheap.tree_size(reach, draft_forwards=2, explore=False) == 5
    # With v(n) = 1 + 0.5 (n - 1): size s gives (1 + sum reach[:s]) / (0.2 + 1 + 0.5 s), best at s = 2.
    assert steep.tree_size(reach, draft_forwards=2, explore=False) == 2
    assert steep.tree_size([], draft_forwards=1) == 0
