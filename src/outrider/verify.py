"""Verification rules: pure functions on tensors (no models, caches or configs go in).

Words (DESIGN.md): of the k drafted tokens the verifier keeps the first `accepted`; then the
target yields one more token: the *recovered* token at the first rejection, or the *bonus* token
when all k were accepted. A step therefore commits `accepted + 1` tokens.

Shapes: k = number of drafted tokens, V = vocabulary size.
  draft_tokens   (k,)      long
  draft_probs    (k, V)    q: the drafter's distribution at each drafted position, or None for a
                           deterministic drafter (q is then one-hot on the drafted token)
  target_logits / target_probs  (k+1, V)  row i scores the token after draft_tokens[:i]
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from outrider.sampling import sample


class Verdict(NamedTuple):
    accepted: int  # number of drafted tokens kept, 0..k
    next_token: int  # recovered token (accepted < k) or bonus token (accepted == k)


def verify_greedy(draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> Verdict:
    """Keep the longest prefix of the draft equal to the target's argmax, then the argmax after it."""
    k = draft_tokens.shape[0]
    assert target_logits.shape[0] == k + 1, (draft_tokens.shape, target_logits.shape)
    target_tokens = target_logits.argmax(-1)  # (k+1,)
    if k == 0:
        return Verdict(0, int(target_tokens[0]))
    # One host sync: the position of the first mismatch (k when all match).
    mismatch = (draft_tokens != target_tokens[:k]).long()
    accepted = int(torch.cat([mismatch, mismatch.new_ones(1)]).argmax())
    return Verdict(accepted, int(target_tokens[accepted]))


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) over the last dim: what the recovered token is sampled from.

    p, q (..., V). Rejection implies p(x) < q(x) for the drafted x, so the residual has positive
    mass in exact arithmetic; if rounding leaves none (p == q), p itself is the right answer.
    """
    residual = (p - q).clamp_min(0)
    mass = residual.sum(-1, keepdim=True)
    return torch.where(mass > 0, residual / mass.clamp_min(1e-30), p)


def verify_speculative(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> Verdict:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): lossless.

    Accept drafted token x_i with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection
    sample the recovered token from norm(max(0, p_i - q_i)); if all are accepted, sample the bonus
    token from p_k. The committed tokens are then distributed exactly as sampling from p.
    """
    k = draft_tokens.shape[0]
    assert target_probs.shape[0] == k + 1, (draft_tokens.shape, target_probs.shape)
    if k == 0:
        return Verdict(0, int(sample(target_probs[0], generator)))
    positions = torch.arange(k, device=draft_tokens.device)
    p_x = target_probs[positions, draft_tokens]  # (k,)
    q_x = draft_probs[positions, draft_tokens] if draft_probs is not None else torch.ones_like(p_x)
    u = torch.rand(k, generator=generator, device=p_x.device, dtype=p_x.dtype)
    # u < p/q written without the division (q_x > 0 for any token a drafter actually proposed).
    rejected = (u * q_x >= p_x).long()
    accepted = int(torch.cat([rejected, rejected.new_ones(1)]).argmax())
    if accepted == k:
        return Verdict(k, int(sample(target_probs[k], generator)))
    p = target_probs[accepted]
    if draft_probs is not None:
        q = draft_probs[accepted]
    else:
        q = torch.zeros_like(p)
        q[draft_tokens[accepted]] = 1.0
    return Verdict(accepted, int(sample(residual_distribution(p, q), generator)))
