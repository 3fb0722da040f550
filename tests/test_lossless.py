"""Tier 3: speculative sampling is lossless, checked statistically against the target's exact
distribution over the first H sampled tokens (computed by enumeration on a 6-token vocabulary).

Test: Pearson chi-square over the V^H outcomes (bins with expected count < 5 merged), rejecting at
p < 1e-6, so a correct implementation fails with probability about 1e-6 per test. Power: the same
test, with the same sample size, must reject samples drawn from the draft's own distribution.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chi2

from conftest import FakeModel, loaded
from outrider import SpeculativeDecoder
from outrider.drafters import DraftModel, PromptLookup
from outrider.sampling import SamplingParams, probs_from_logits

V, H, N = 6, 3, 12000
P_REJECT = 1e-6
PROMPT = [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
SETTINGS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=3),
    SamplingParams(temperature=1.0, top_p=0.8),
]


def exact_distribution(model: FakeModel, params: SamplingParams) -> dict[tuple[int, ...], float]:
    out = {}
    for seq in itertools.product(range(V), repeat=H):
        prob, ctx = 1.0, list(PROMPT)
        for t in seq:
            prob *= float(probs_from_logits(model.logits_for(ctx), params)[t])
            ctx.append(t)
        out[seq] = prob
    return out


def chi_square_p_value(counts: dict[tuple[int, ...], int], expected: dict[tuple[int, ...], float], n: int) -> float:
    assert sum(counts.values()) == n
    if any(expected.get(seq, 0.0) == 0 for seq in counts):
        return 0.0  # an outcome the target can never produce: certainly not the target's law
    obs, exp, rest_obs, rest_exp = [], [], 0, 0.0
    for seq, prob in expected.items():
        if prob * n >= 5:
            obs.append(counts.get(seq, 0))
            exp.append(prob * n)
        else:
            rest_obs += counts.get(seq, 0)
            rest_exp += prob * n
    if rest_exp > 0:
        obs.append(rest_obs)
        exp.append(rest_exp)
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    return float(chi2.sf(stat, len(obs) - 1))


def sample_decoder(dec: SpeculativeDecoder, params: SamplingParams, prompt: list[int] = PROMPT) -> dict[tuple[int, ...], int]:
    counts: dict[tuple[int, ...], int] = {}
    for seed in range(N):
        ids = tuple(dec.generate(prompt, max_new_tokens=H, temperature=params.temperature, top_k=params.top_k,
                                 top_p=params.top_p, seed=seed).token_ids)
        counts[ids] = counts.get(ids, 0) + 1
    return counts


# ---- the same test on a tiny real Llama (drafters that read a real target's hidden states) -----------

LLAMA_PROMPT = [1, 2, 3, 1, 2]


def soft_tiny_llama(seed: int = 0):
    """A transformers Llama over the 6-token vocabulary, logits softer than tiny_model's so that
    most of the V^H outcomes are likely enough to be counted."""
    from conftest import tiny_model

    model = tiny_model("llama", vocab_size=V, seed=seed)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(0.5)
    return model


def llama_distribution(model, params: SamplingParams, prompt: list[int] = LLAMA_PROMPT) -> dict[tuple[int, ...], float]:
    """The exact law of the first H sampled tokens after `prompt`, enumerated."""
    out = {}
    with torch.no_grad():
        for seq in itertools.product(range(V), repeat=H):
            logits = model(torch.tensor([prompt + list(seq)])).logits[0].float()
            prob = 1.0
            for i, t in enumerate(seq):
                prob *= float(probs_from_logits(logits[len(prompt) - 1 + i], params)[t])
            out[seq] = prob
    return out


def assert_samples_like_the_llama(dec: SpeculativeDecoder, model, params: SamplingParams) -> None:
    """dec's samples pass the chi-square test against `model`'s exact law, and the same test at the
    same sample size rejects a 20% mixture of another model's law (its power)."""
    dist = llama_distribution(model, params)
    assert chi_square_p_value(sample_decoder(dec, params, LLAMA_PROMPT), dist, N) > P_REJECT
    odist = llama_distribution(soft_tiny_llama(seed=3), params)
    mixed = {s: 0.8 * dist[s] + 0.2 * odist[s] for s in dist}
    assert chi_square_p_value(sample_exact(mixed, seed=0), dist, N) < P_REJECT


def sample_exact(dist: dict[tuple[int, ...], float], seed: int) -> dict[tuple[int, ...], int]:
    seqs = list(dist)
    probs = torch.tensor([dist[s] for s in seqs], dtype=torch.float64)
    draws = torch.multinomial(probs, N, replacement=True, generator=torch.Generator().manual_seed(seed))
    counts: dict[tuple[int, ...], int] = {}
    for i in draws.tolist():
        counts[seqs[i]] = counts.get(seqs[i], 0) + 1
    return counts


@pytest.mark.parametrize("params", SETTINGS, ids=["t1", "t0.7-topk3", "topp0.8"])
def test_draft_model_sampling_is_lossless(params):
    target = FakeModel(vocab_size=V, seed=0, scale=1.0)
    draft = FakeModel(vocab_size=V, seed=1, scale=1.0)
    dec = SpeculativeDecoder(loaded(target), DraftModel(draft, V, k=2), k=2)
    target_dist = exact_distribution(target, params)
    counts = sample_decoder(dec, params)
    assert chi_square_p_value(counts, target_dist, N) > P_REJECT
    # Power: the draft's own distribution (a different one) is rejected by the same test.
    draft_counts = sample_exact(exact_distribution(draft, params), seed=0)
    assert chi_square_p_value(draft_counts, target_dist, N) < P_REJECT


@pytest.mark.parametrize("params", SETTINGS, ids=["t1", "t0.7-topk3", "topp0.8"])
def test_prompt_lookup_sampling_is_lossless(params):
    target = FakeModel(vocab_size=V, seed=2, scale=1.0)
    drafter = PromptLookup(max_ngram=2, k=2)
    dec = SpeculativeDecoder(loaded(target), drafter, k=2)
    target_dist = exact_distribution(target, params)
    counts = sample_decoder(dec, params)
    assert chi_square_p_value(counts, target_dist, N) > P_REJECT
    # The test has power against a verifier that keeps every lookup proposal.
    stats = dec.generate(PROMPT, max_new_tokens=H, temperature=params.temperature, top_k=params.top_k,
                         top_p=params.top_p, seed=0).stats
    assert stats.drafted > 0
    wrong = {tuple(PROMPT[2:2 + H]): N}
    assert chi_square_p_value(wrong, target_dist, N) < P_REJECT


@pytest.mark.parametrize("bias", [0.2, 0.05])
def test_chi_square_detects_a_biased_verifier(bias):
    """The statistic is sensitive to the kind of bug that matters: a verifier that lets some draft
    tokens through unchecked. Model: each of the N samples comes from the draft's distribution with
    probability `bias`, else from the target's, i.e. N draws from the mixture (1 - bias) p + bias q.
    Measured power at N = 12000 over 300 seeds: bias 0.2 rejected 300/300 (p underflows to 0);
    0.05 rejected 300/300 (largest p 7e-11); 0.03 only 36%."""
    target = FakeModel(vocab_size=V, seed=0, scale=1.0)
    draft = FakeModel(vocab_size=V, seed=1, scale=1.0)
    params = SETTINGS[0]
    target_dist = exact_distribution(target, params)
    draft_dist = exact_distribution(draft, params)
    mixture = {seq: (1 - bias) * prob + bias * draft_dist[seq] for seq, prob in target_dist.items()}
    assert sum(mixture.values()) == pytest.approx(1.0)
    assert chi_square_p_value(sample_exact(mixture, seed=1), target_dist, N) < P_REJECT


def test_adaptive_draft_length_sampling_is_lossless():
    """k chosen per step from past acceptance, and the draft cut short token by token from the
    drafter's own confidence (DraftModel reports it), depend only on the history and the draft:
    still lossless."""
    from outrider.adaptive import AdaptiveK

    params = SETTINGS[0]
    target = FakeModel(vocab_size=V, seed=0, scale=1.0)
    draft = FakeModel(vocab_size=V, seed=1, scale=1.0)
    dec = SpeculativeDecoder(loaded(target), DraftModel(draft, V, k=3), k=3, adaptive=AdaptiveK(k_max=3))
    counts = sample_decoder(dec, params)
    assert chi_square_p_value(counts, exact_distribution(target, params), N) > P_REJECT
