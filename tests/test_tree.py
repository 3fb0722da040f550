"""Draft trees: the tensor helpers, tree verification on hand-written logits, its statistical
losslessness for both ways of choosing children (with a biased variant rejected at the same sample
size), and greedy exactness of every tree drafter through the decoder."""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chi2

import outrider.verify as verify_module
from conftest import FakeModel, loaded
from outrider import SpeculativeDecoder
from outrider.drafters import DraftModel, PromptLookup
from outrider.sampling import SamplingParams, probs_from_logits
from outrider.tree import ancestor_mask, check_parents, depths, merge_trees, path_to, verify_mask, verify_positions
from outrider.verify import verify_tree_greedy, verify_tree_speculative
from test_loop_fake import greedy_reference
from test_verify import logits_preferring

# A tree:   root -> 0 -> 2 -> 4
#               |      \-> 3
#               \-> 1 -> 5
PARENTS = torch.tensor([-1, -1, 0, 0, 2, 1])


def test_tree_helpers():
    assert depths(PARENTS).tolist() == [1, 1, 2, 2, 3, 2]
    assert verify_positions(PARENTS, 10).tolist() == [10, 11, 11, 12, 12, 13, 12]
    mask = ancestor_mask(PARENTS)
    assert mask[4].tolist() == [True, False, True, False, True, False]  # 4 sees 0, 2 and itself
    assert mask[5].tolist() == [False, True, False, False, False, True]
    vm = verify_mask(PARENTS)
    assert vm.shape == (7, 7) and vm[:, 0].all() and not vm[0, 1:].any()
    assert path_to(PARENTS.tolist(), 4) == [0, 2, 4] and path_to(PARENTS.tolist(), -1) == []
    with pytest.raises(ValueError, match=r"parents\[2\]=2"):
        check_parents(torch.tensor([-1, 0, 2]))


@pytest.mark.parametrize(
    "tokens, best, expected",
    [
        # rows: root, node 0..5. The target follows 0 -> 2 -> 4 and then wants 7 (bonus).
        ([1, 2, 3, 4, 5, 6], [1, 3, 0, 5, 0, 7, 0], ([0, 2, 4], 7)),
        # The root wants node 1's token: branch 1 -> 5 accepted, then the bonus after 5.
        ([1, 2, 3, 4, 5, 6], [2, 0, 6, 0, 0, 0, 3], ([1, 5], 3)),
        # Second-level mismatch: 0 accepted, its children 3 and 4 both wrong, recovered 7.
        ([1, 2, 3, 4, 5, 6], [1, 7, 0, 0, 0, 0, 0], ([0], 7)),
        # Nothing accepted.
        ([1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 0, 0, 0], ([], 0)),
    ],
)
def test_greedy_tree_follows_the_argmax_path(tokens, best, expected):
    v = verify_tree_greedy(torch.tensor(tokens), PARENTS, logits_preferring(best, vocab=8))
    assert (v.path, v.next_token) == expected


# ---- statistical losslessness of one verification step -------------------------------------

V, N = 5, 20000
P_REJECT = 1e-6


def table(seed: int, scale: float) -> dict[tuple[int, ...], torch.Tensor]:
    """Random logits (V,) for every context of length 0..2 over the tiny vocabulary."""
    g = torch.Generator().manual_seed(seed)
    return {ctx: torch.randn(V, generator=g) * scale
            for depth in range(3) for ctx in itertools.product(range(V), repeat=depth)}


P_TABLE, Q_TABLE = table(0, 1.5), table(1, 1.5)
SETTINGS = [SamplingParams(1.0), SamplingParams(0.7, top_k=3), SamplingParams(1.0, top_p=0.8)]


def one_step(params: SamplingParams, sampled: bool, g: torch.Generator) -> tuple[int, int]:
    """Draft a width-2, depth-2 tree from Q, verify it against P, return the first two tokens
    (the second drawn from P directly when the step committed only one)."""
    tokens, parents, rows = [], [], []

    def children(parent: int, ctx: tuple[int, ...]) -> None:
        q = probs_from_logits(Q_TABLE[ctx], params)
        picks = torch.multinomial(q, 2, replacement=True, generator=g).tolist() if sampled \
            else torch.topk(q, 2).indices.tolist()
        for x in picks:
            tokens.append(x)
            parents.append(parent)
            rows.append(q)

    children(-1, ())
    for i in (0, 1):
        children(i, (tokens[i],))
    path_ctx = [()] + [tuple(tokens[j] for j in path_to(parents, i)) for i in range(len(tokens))]
    target = torch.stack([probs_from_logits(P_TABLE[c], params) for c in path_ctx])
    verdict = verify_tree_speculative(torch.tensor(tokens), torch.tensor(parents),
                                      torch.stack(rows) if sampled else None, target, g)
    out = [tokens[i] for i in verdict.path] + [verdict.next_token]
    if len(out) == 1:
        out.append(int(torch.multinomial(probs_from_logits(P_TABLE[(out[0],)], params), 1, generator=g)))
    return out[0], out[1]


def p_value(params: SamplingParams, sampled: bool) -> float:
    g = torch.Generator().manual_seed(123)
    counts = torch.zeros(V, V)
    for _ in range(N):
        a, b = one_step(params, sampled, g)
        counts[a, b] += 1
    p1 = probs_from_logits(P_TABLE[()], params)
    exact = torch.stack([p1[a] * probs_from_logits(P_TABLE[(a,)], params) for a in range(V)])  # (V, V)
    expected = exact.flatten() * N
    observed = counts.flatten()
    if (observed[expected == 0] > 0).any():
        return 0.0
    keep = expected >= 5
    obs = torch.cat([observed[keep], observed[~keep].sum().view(1)])
    exp = torch.cat([expected[keep], expected[~keep].sum().view(1)])
    obs, exp = (obs, exp) if exp[-1] > 0 else (obs[:-1], exp[:-1])
    stat = float(((obs - exp) ** 2 / exp).sum())
    return float(chi2.sf(stat, len(obs) - 1))


@pytest.mark.parametrize("params", SETTINGS, ids=["t1", "t0.7-topk3", "topp0.8"])
@pytest.mark.parametrize("sampled", [True, False], ids=["sampled-children", "topk-children"])
def test_tree_verification_is_lossless(params, sampled):
    assert p_value(params, sampled) > P_REJECT


@pytest.mark.parametrize("sampled", [True, False], ids=["sampled-children", "topk-children"])
def test_the_test_rejects_a_verifier_that_skips_the_residual(sampled, monkeypatch):
    """Power: trying the next sibling against the unchanged p (no residual, nothing removed) is
    biased, and the same test at the same sample size rejects it."""
    monkeypatch.setattr(verify_module, "residual_distribution", lambda p, q: p)
    monkeypatch.setattr(verify_module, "without_token", lambda p, x: p)
    assert p_value(SETTINGS[0], sampled) < P_REJECT


# ---- through the decoder ------------------------------------------------------------------

PROMPT = [1, 2, 3, 1, 2, 3, 1, 2]


@pytest.mark.parametrize("width, k", [(2, 6), (3, 12), (4, 5)])
@pytest.mark.parametrize("draft_seed", [0, 3])
def test_draft_model_tree_is_exact_under_greedy(width, k, draft_seed):
    target = FakeModel(vocab_size=6, seed=0, scale=1.0)
    draft = FakeModel(vocab_size=6, seed=draft_seed, scale=1.0)
    dec = SpeculativeDecoder(loaded(target), DraftModel(draft, 6, k=k, width=width), k=k)
    for max_new in (1, 7, 40):
        res = dec.generate(PROMPT, max_new_tokens=max_new)
        assert res.token_ids == greedy_reference(target, PROMPT, max_new)
        assert target.tokens == PROMPT + res.token_ids[:-1]  # the cache holds exactly the committed tokens
        assert draft.length <= len(target.tokens) and draft.tokens == target.tokens[: draft.length]
    assert res.stats.drafted > res.stats.steps  # trees: more than one node per step


class SecondGuess(FakeModel):
    """A draft that ranks the target's second choice first and its first choice second."""

    def logits_for(self, context: list[int]) -> torch.Tensor:
        logits = super().logits_for(context).clone()
        top2 = torch.topk(logits, 2).indices
        logits[top2[0]], logits[top2[1]] = logits[top2[1]].item(), logits[top2[0]].item()
        return logits


def test_tree_accepts_what_the_first_guess_misses():
    """A chain from a draft that is always second-best accepts nothing; a width-2 tree from the same
    draft accepts more than one token per step (its frontier keeps the 2 best nodes per depth, so
    it cannot follow second choices all the way down)."""
    target = FakeModel(vocab_size=6, seed=0, scale=1.0)
    chain = SpeculativeDecoder(loaded(target), DraftModel(SecondGuess(6, seed=0, scale=1.0), 6, k=4), k=4)
    tree = SpeculativeDecoder(loaded(target), DraftModel(SecondGuess(6, seed=0, scale=1.0), 6, k=8, width=2), k=8)
    a, b = chain.generate(PROMPT, max_new_tokens=30), tree.generate(PROMPT, max_new_tokens=30)
    assert a.token_ids == b.token_ids == greedy_reference(target, PROMPT, 30)
    assert a.stats.accepted == 0
    assert b.stats.tau >= 2.0


@pytest.mark.parametrize("width", [1, 2, 3])
def test_prompt_lookup_tree_is_exact_under_greedy(width):
    target = FakeModel(vocab_size=4, seed=1, scale=1.0)
    dec = SpeculativeDecoder(loaded(target), PromptLookup(max_ngram=2, k=6, width=width), k=6)
    res = dec.generate(PROMPT, max_new_tokens=40)
    assert res.token_ids == greedy_reference(target, PROMPT, 40)
    assert res.stats.accepted > 0


def test_prompt_lookup_offers_several_matches_as_branches():
    import numpy as np

    from outrider.drafters.prompt_lookup import lookup_continuations, merge_branches

    #          a  b  X  Y   a  b  Z  W   a  b  X  Q   a  b
    seq = np.array([1, 2, 7, 8, 1, 2, 5, 6, 1, 2, 7, 9, 1, 2])
    found = lookup_continuations(seq, max_ngram=2, min_ngram=1, k=3, width=3)
    assert found == [[7, 9, 1], [5, 6, 1], [7, 8, 1]]  # most recent first, distinct
    tokens, parents = merge_branches(found, budget=20)
    # 7 is shared by the first and third branch: one node, two children (9 and 8).
    assert tokens == [7, 5, 9, 6, 8, 1, 1, 1] and parents == [-1, -1, 0, 1, 0, 2, 3, 4]
    tokens, parents = merge_branches(found, budget=4)  # depth by depth: every branch starts
    assert tokens == [7, 5, 9, 6] and parents == [-1, -1, 0, 1]


# ---- sampling through the decoder: the committed tokens follow the target exactly -------------

@pytest.mark.parametrize("drafter", ["draft_model-tree", "prompt_lookup-tree", "suffix"])
def test_tree_drafters_sample_losslessly_through_the_decoder(drafter):
    """The first 3 sampled tokens (6-token vocabulary, all 216 outcomes enumerated) follow the
    target's exact distribution: sampled children (draft_model), deterministic ones (lookup, suffix)."""
    from outrider.drafters.suffix import SuffixDrafter
    from test_lossless import N, P_REJECT, PROMPT as LOSSLESS_PROMPT, SETTINGS, chi_square_p_value, \
        exact_distribution, sample_decoder, sample_exact

    params = SETTINGS[0]
    target = FakeModel(vocab_size=6, seed=0, scale=1.0)
    if drafter == "draft_model-tree":
        d, k = DraftModel(FakeModel(vocab_size=6, seed=1, scale=1.0), 6, k=6, width=2), 6
    elif drafter == "prompt_lookup-tree":
        d, k = PromptLookup(max_ngram=2, k=6, width=3), 6
    else:
        d, k = SuffixDrafter(k=6), 6
    dec = SpeculativeDecoder(loaded(target), d, k=k)
    counts = sample_decoder(dec, params)
    target_dist = exact_distribution(target, params)
    assert chi_square_p_value(counts, target_dist, N) > P_REJECT
    stats = dec.generate(LOSSLESS_PROMPT, max_new_tokens=3, temperature=1.0, seed=0).stats
    assert stats.drafted > 0
    # Power at the same sample size: the draft's own law is rejected.
    other = sample_exact(exact_distribution(FakeModel(vocab_size=6, seed=1, scale=1.0), params), seed=0)
    assert chi_square_p_value(other, target_dist, N) < P_REJECT


def test_merge_trees_is_the_union_of_their_paths():
    # A: the chain 7 8 9; B: 7 8 5 (shares 7 8), 4 (a new first token), 4 -> 6.
    tokens, parents = merge_trees([7, 8, 9], [-1, 0, 1], [7, 8, 5, 4, 6], [-1, 0, 1, -1, 3])
    assert tokens[:3] == [7, 8, 9] and parents[:3] == [-1, 0, 1]  # A unchanged, first
    assert tokens[3:] == [5, 4, 6] and parents[3:] == [1, -1, 4]
    check_parents(torch.tensor(parents))

    def paths(toks, pars):
        return {tuple(toks[j] for j in path_to(pars, i)) for i in range(len(toks))}

    assert paths(tokens, parents) == paths([7, 8, 9], [-1, 0, 1]) | paths([7, 8, 5, 4, 6], [-1, 0, 1, -1, 3])
    assert merge_trees([], [], [3, 4], [-1, 0]) == ([3, 4], [-1, 0])
    assert merge_trees([3, 4], [-1, 0], [3], [-1]) == ([3, 4], [-1, 0])  # nothing new
