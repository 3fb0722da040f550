"""Tier 1: verification on hand-written logits and probabilities."""

import pytest
import torch

from outrider.verify import residual_distribution, verify_greedy, verify_speculative


def logits_preferring(tokens: list[int], vocab: int = 5) -> torch.Tensor:
    out = torch.zeros(len(tokens), vocab)
    out[torch.arange(len(tokens)), torch.tensor(tokens)] = 5.0
    return out


@pytest.mark.parametrize(
    "draft, expected",
    [
        ([1, 2, 3], (3, 4)),  # all accepted: the bonus token
        ([0, 2, 3], (0, 1)),  # none accepted: the target's own token
        ([1, 2, 0], (2, 3)),  # partly accepted
        ([1, 0, 3], (1, 2)),  # stops at the first mismatch even if later ones match
    ],
)
def test_greedy_accepts_the_longest_matching_prefix(draft, expected):
    v = verify_greedy(torch.tensor(draft), logits_preferring([1, 2, 3, 4]))
    assert (v.accepted, v.next_token) == expected


def test_greedy_without_draft_is_argmax():
    v = verify_greedy(torch.empty(0, dtype=torch.long), logits_preferring([3]))
    assert (v.accepted, v.next_token) == (0, 3)


def test_residual_distribution():
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    q = torch.tensor([0.2, 0.6, 0.2, 0.0])
    assert torch.allclose(residual_distribution(p, q), torch.tensor([1.0, 0.0, 0.0, 0.0]))
    p = torch.tensor([0.4, 0.4, 0.2])
    q = torch.tensor([0.1, 0.2, 0.7])
    assert torch.allclose(residual_distribution(p, q), torch.tensor([0.6, 0.4, 0.0]))


def test_residual_falls_back_to_p_when_p_equals_q():
    p = torch.tensor([0.25, 0.75])
    assert torch.allclose(residual_distribution(p, p), p)


def test_speculative_accepts_everything_when_q_equals_p():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.25, 0.25], [0.0, 0.0, 1.0]])
    for _ in range(50):
        v = verify_speculative(torch.tensor([1, 0]), p[:2], p, g)
        assert (v.accepted, v.next_token) == (2, 2)  # bonus from p[2], a point mass on 2


def test_speculative_rejects_token_the_target_cannot_produce():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.0, 0.5, 0.5], [1 / 3, 1 / 3, 1 / 3]])
    q = torch.tensor([[1.0, 0.0, 0.0]])
    for _ in range(50):
        v = verify_speculative(torch.tensor([0]), q, p, g)
        assert v.accepted == 0 and v.next_token in (1, 2)


def test_speculative_one_hot_draft_accepts_with_probability_p():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.3, 0.7], [0.5, 0.5]])
    n = 4000
    accepted = sum(verify_speculative(torch.tensor([0]), None, p, g).accepted for _ in range(n))
    # Binomial(4000, 0.3): sd ~ 29, so +-6 sd is 174.
    assert abs(accepted - 0.3 * n) < 174


def test_speculative_first_token_follows_p_single_step():
    """One step, many draws: the first committed token is distributed as p (chi-square, 2 dof)."""
    g = torch.Generator().manual_seed(1)
    p = torch.tensor([[0.2, 0.5, 0.3], [0.3, 0.3, 0.4]])
    q = torch.tensor([[0.6, 0.1, 0.3]])
    n = 6000
    counts = torch.zeros(3)
    for _ in range(n):
        x = torch.multinomial(q[0], 1, generator=g)
        v = verify_speculative(x, q, p, g)
        counts[int(x) if v.accepted else v.next_token] += 1
    expected = p[0] * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 30.0  # P(chi2_2 > 30) ~ 3e-7


def test_verify_greedy_rows_equals_verify_greedy_row_by_row():
    """The batched greedy chain verifier gives each row what verify_greedy gives it alone."""
    from outrider.verify import verify_greedy_rows

    gen = torch.Generator().manual_seed(0)
    V, k = 5, 4
    lengths = [0, 1, 4, 2, 3, 4]
    logits = [torch.randn(n + 1, V, generator=gen) for n in lengths]
    # Drafts that agree with the target for a while, then (sometimes) not.
    drafts = []
    for n, lg in zip(lengths, logits):
        d = lg.argmax(-1)[:n].clone()
        if n:
            cut = int(torch.randint(0, n + 1, (1,), generator=gen))
            d[cut:] = (d[cut:] + 1) % V
        drafts.append(d)
    padded = torch.full((len(lengths), k), -1, dtype=torch.long)
    targets = torch.zeros(len(lengths), k + 1, dtype=torch.long)
    for i, (d, lg) in enumerate(zip(drafts, logits)):
        padded[i, : len(d)] = d
        targets[i, : len(d) + 1] = lg.argmax(-1)
    accepted, out = verify_greedy_rows(padded, targets)
    for i, (d, lg) in enumerate(zip(drafts, logits)):
        a, nxt = verify_greedy(d, lg)
        assert int(accepted[i]) == a
        assert out[i].tolist() == d[:a].tolist() + [nxt] + [-1] * (k - a)
    assert sorted(set(accepted.tolist())) != [0]  # the cases include accepted drafts
