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


def verify_greedy_rows(drafts: torch.Tensor, target_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """verify_greedy for a batch of chains at once. drafts (B, k) long, each row's draft padded
    with -1 past its length; target_tokens (B, k+1) the target's argmax at each row's root and
    draft positions (anything past a row's length + 1). Returns accepted (B,) long and the
    committed ids (B, k+1) long: each row's accepted draft tokens, then the target's token after
    them, then -1 (vLLM's rejection sampler pads its output the same way)."""
    B, k = drafts.shape
    assert target_tokens.shape == (B, k + 1), (drafts.shape, target_tokens.shape)
    match = (drafts == target_tokens[:, :k]) & (drafts >= 0)  # (B, k)
    accepted = match.long().cumprod(1).sum(1)  # (B,): the first mismatch (or pad) ends a row
    cols = torch.arange(k + 1, device=drafts.device)[None]  # (1, k+1)
    padded = torch.cat([drafts, drafts.new_full((B, 1), -1)], dim=1)  # (B, k+1)
    out = torch.where(cols < accepted[:, None], padded, torch.full_like(padded, -1))
    out.scatter_(1, accepted[:, None], target_tokens.gather(1, accepted[:, None]))
    return accepted, out


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) over the last dim: what the recovered token is sampled from.

    p, q (..., V). Rejection implies p(x) < q(x) for the drafted x, so the residual has positive
    mass in exact arithmetic; if rounding leaves none (p == q), p itself is the right answer.
    """
    residual = (p - q).clamp_min(0)
    mass = residual.sum(-1, keepdim=True)
    return torch.where(mass > 0, residual / mass.clamp_min(1e-30), p)


def without_token(p: torch.Tensor, x: int) -> torch.Tensor:
    """p (V,) with token x removed and renormalised: the residual of a one-hot draft on x (x was
    just rejected, which has probability 1 - p(x) > 0, so mass remains)."""
    p = p.clone()
    p[x] = 0.0
    return p / p.sum().clamp_min(1e-30)


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


# ---- trees -----------------------------------------------------------------------------------
# A draft tree (tree.py): node i holds tokens[i] after node parents[i] (-1: the root, the last
# committed token). The target scores [root] + nodes in one forward, so target row 0 is the
# distribution after the root and row i + 1 the one after node i.
#   tokens   (n,)     long
#   parents  (n,)     long, topological (parents[i] < i)
#   draft_probs (n, V) q of the distribution node i was sampled from (siblings share it), or None
#                      when the children were chosen deterministically
#   target_logits / target_probs (n+1, V)


class TreeVerdict(NamedTuple):
    path: list[int]  # accepted nodes, root's child first; accepted = len(path)
    next_token: int  # recovered token (a rejection ended the path) or bonus token (a leaf)


def verify_tree_greedy(tokens: torch.Tensor, parents: torch.Tensor, target_logits: torch.Tensor) -> TreeVerdict:
    """Follow, from the root, the child equal to the target's argmax while there is one; then the
    argmax after the last accepted node. Equals greedy decoding token for token."""
    n = tokens.shape[0]
    assert target_logits.shape[0] == n + 1, (tokens.shape, target_logits.shape)
    best = target_logits.argmax(-1).tolist()  # (n+1,): one host sync for the whole tree
    toks, pars = tokens.tolist(), parents.tolist()
    # child[(parent, token)] -> node: the first sibling holding a token (a repeat can never win).
    child: dict[tuple[int, int], int] = {}
    for i in range(n):
        child.setdefault((pars[i], toks[i]), i)
    path, node = [], -1
    while (nxt := child.get((node, best[node + 1]))) is not None:
        path.append(nxt)
        node = nxt
    return TreeVerdict(path, best[node + 1])


def verify_tree_speculative(
    tokens: torch.Tensor,
    parents: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> TreeVerdict:
    """Lossless speculative sampling over a tree: from the root, try the current node's children in
    order; the first accepted child becomes the current node; when all are rejected, sample the
    recovered token from what is left of p; at a leaf, sample the bonus token from p.

    Sampled children (draft_probs given; SpecInfer's multi-round rule, Miao et al. 2024): child x
    drawn from q is accepted with probability min(1, p(x) / q(x)); after a rejection p becomes the
    residual norm(max(0, p - q)) for the next sibling. Deterministic children (draft_probs None):
    child x is accepted with probability p(x); after a rejection x is removed from p and p is
    renormalised (sampling without replacement: q is one-hot on each child). Either way each
    committed token is distributed exactly as sampling from the target.
    """
    n = tokens.shape[0]
    assert target_probs.shape[0] == n + 1, (tokens.shape, target_probs.shape)
    toks, pars = tokens.tolist(), parents.tolist()
    children: list[list[int]] = [[] for _ in range(n + 1)]
    for i, par in enumerate(pars):
        children[par + 1].append(i)
    path, node = [], -1
    while True:
        p = target_probs[node + 1]
        tried = children[node + 1]
        if not tried:
            return TreeVerdict(path, int(sample(p, generator)))  # bonus token
        # One uniform per child, drawn up front: the number of draws depends only on the tree.
        u = torch.rand(len(tried), generator=generator, device=p.device, dtype=p.dtype).tolist()
        nxt = None
        for j, c in enumerate(tried):
            x = toks[c]
            if draft_probs is None:
                if u[j] < float(p[x]):
                    nxt = c
                    break
                p = without_token(p, x)
            else:
                q = draft_probs[c]
                if u[j] * float(q[x]) < float(p[x]):
                    nxt = c
                    break
                p = residual_distribution(p, q)
        if nxt is None:
            return TreeVerdict(path, int(sample(p, generator)))  # recovered token
        path.append(nxt)
        node = nxt
