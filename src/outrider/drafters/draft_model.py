"""An independent small causal LM sharing the target's tokenizer, with its own rolled-back cache.

Its cache holds a prefix of the committed sequence plus the draft tokens it has fed; after
verification it keeps the committed ones and, next step, feeds only the committed tokens it has
not seen (the recovered/bonus token, plus the last draft token when all were accepted). The whole
context is never recomputed.

width 1 drafts a chain. width > 1 grows a draft tree the EAGLE-2 way (Li et al. 2024): at each
depth the `width` most promising frontier nodes are fed to the draft model in one tree forward and
each gets `width` children; under greedy decoding the children are the draft's top-`width` tokens
(deterministic) and the finished tree is reranked to keep its best nodes, under sampling they are
drawn from q (SpecInfer's rule verifies them) and no node is dropped once drawn (dropping a drawn
node for its own value would bias the output).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from outrider.drafters.base import BuildContext, Draft, DraftStep, empty_draft, register
from outrider.models import CausalModel
from outrider.models.base import reuse_prefix
from outrider.sampling import probs_from_logits, sample

TREE_DEPTH = 6  # default deepest level of a draft tree (EAGLE-2 uses 6)


def fit_vocab(logits: torch.Tensor, width: int) -> torch.Tensor:
    """Draft logits (..., Vd) -> (..., width): drop padded columns past the target's width, and give
    columns the draft lacks -inf, so q covers exactly the target's vocabulary."""
    vd = logits.shape[-1]
    if vd == width:
        return logits
    if vd > width:
        return logits[..., :width]
    pad = logits.new_full((*logits.shape[:-1], width - vd), float("-inf"))
    return torch.cat([logits, pad], dim=-1)


class _Tree:
    """A draft tree while it grows: per node its token, parent, log path probability (score), q of
    its own token (confidence), and the q row it was drawn from (sampling only)."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.scores: list[float] = []
        self.conf: list[float] = []
        self.q_rows: list[torch.Tensor] = []
        self.leaf_only: list[bool] = []  # a repeated sibling draw: never accepted, never expanded

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, token: int, parent: int, conf: float, q_row: torch.Tensor | None, leaf_only: bool = False) -> None:
        self.tokens.append(token)
        self.parents.append(parent)
        parent_score = self.scores[parent] if parent >= 0 else 0.0
        self.scores.append(parent_score + math.log(max(conf, 1e-30)))
        self.conf.append(conf)
        if q_row is not None:
            self.q_rows.append(q_row)
        self.leaf_only.append(leaf_only)


@register("draft_model")
class DraftModel:
    uses_draft_model: ClassVar[bool] = True
    stops_on_confidence: ClassVar[bool] = True
    # k=None means "auto" for this drafter (SpeculativeDecoder.from_pretrained); 3 is the best
    # fixed k measured on the embedded pair (benchmarks/pair_speed.py), for DraftModel(...) itself.
    default_k: ClassVar[int] = 3
    # In a batch each row drafts on its own slot of the draft model, and the rows' draft forwards
    # run together, one per depth (batch.py: lockstep).
    batches: ClassVar[bool] = True

    def __init__(
        self, model: CausalModel, target_vocab_size: int, k: int = 4, width: int = 1, depth: int | None = None,
        expand: int | None = None,
    ) -> None:
        """k: draft length of a chain, or most nodes of a tree. width: children per expanded node
        (1: a chain). depth: deepest tree level (default min(k, TREE_DEPTH)). expand: nodes expanded
        per depth, each costing a row of one draft forward (default width; 1 grows the draft's
        best chain with its runners-up as leaves: no more draft work than a chain)."""
        if k < 1:
            raise ValueError(f"k={k} is invalid: propose at least 1 token per step")
        if width < 1:
            raise ValueError(f"width={width} is invalid: use 1 for a chain or more for a tree")
        if depth is not None and depth < 1:
            raise ValueError(f"depth={depth} is invalid: use a tree depth >= 1")
        if expand is not None and expand < 1:
            raise ValueError(f"expand={expand} is invalid: expand at least 1 node per depth")
        self.model = model
        self.vocab_size = target_vocab_size
        self.k = k
        self.width = width
        self.depth = depth if depth is not None else min(k, TREE_DEPTH)
        self.expand = expand if expand is not None else width
        self._base = 0  # draft cache length (committed tokens) when the last draft was proposed
        self._fed = 0  # chain: draft tokens fed to the model during the last proposal
        self._fed_nodes: list[int] = []  # tree: nodes fed, in cache order after _base

    @classmethod
    def build(cls, ctx: BuildContext) -> DraftModel:
        assert ctx.draft is not None
        return cls(ctx.draft.model, ctx.target.model.vocab_size, k=ctx.k or cls.default_k, width=ctx.width or 1)

    def begin(self, prompt: torch.Tensor) -> None:
        self._base = self._fed = 0
        self._fed_nodes = []
        if prompt.shape[0] < 2:
            self.model.reset()
            return
        # The draft cache keeps what it shares with the last sequence, as the target's does.
        kept = reuse_prefix(self.model, prompt[:-1])
        if kept < prompt.shape[0] - 1:
            self.model.forward(prompt[kept:-1].to(self.model.device), num_logits=0)

    def _logits(self, out: torch.Tensor) -> torch.Tensor:
        return fit_vocab(out, self.vocab_size)

    def propose(self, step: DraftStep) -> Draft:
        n = step.tokens.shape[0]
        k = min(step.k, self.k)
        if self.model.max_length is not None:
            k = min(k, self.model.max_length - n + 1)
        self._fed_nodes = []
        if k < 1:
            self.model.rollback(min(self.model.length, n - 1))
            self._base, self._fed = n, 0
            return empty_draft(self.model.device)
        new = step.tokens[self.model.length :].to(self.model.device)  # (>=1,) committed, unseen
        logits = self._logits(self.model.forward(new, num_logits=1)[-1])  # (V,)
        self._base, self._fed = n, 0
        if self.width > 1 and k > 1:
            return self._propose_tree(step, logits, k)
        return self._propose_chain(step, logits, k)

    def grow_tree(self, step: DraftStep, root_logits: torch.Tensor, k: int) -> Draft:
        """A tree of at most k nodes after the committed tokens already in the model (its length),
        from the distribution of the root's children (root_logits (V,)). Other drafters that look
        like a causal model over their own positions (an EAGLE head) grow their trees with this."""
        self._base, self._fed, self._fed_nodes = self.model.length, 0, []
        return self._propose_tree(step, root_logits, k)

    def _propose_chain(self, step: DraftStep, logits: torch.Tensor, k: int) -> Draft:
        tokens: list[torch.Tensor] = []
        probs: list[torch.Tensor] = []
        keep_drafting = step.adaptive.keep_drafting if step.adaptive is not None else None
        # Confidences feed k="auto" only: without it, no softmax and no host sync per token.
        confidences: list[float] | None = [] if keep_drafting is not None else None
        for i in range(k):
            if step.sampling.greedy:
                x = logits.argmax(-1)
                if confidences is not None:
                    confidences.append(float(logits.softmax(-1)[x]))
            else:
                q = probs_from_logits(logits, step.sampling)
                x = sample(q, step.generator)
                probs.append(q)
                if confidences is not None:
                    confidences.append(float(q[x]))
            tokens.append(x)
            if i + 1 == k or (confidences is not None and not keep_drafting(confidences)):
                break
            logits = self._logits(self.model.forward(x.view(1), num_logits=1)[-1])
        self._fed = len(tokens) - 1
        return Draft(torch.stack(tokens), torch.stack(probs) if probs else None, confidences, forwards=len(tokens))

    def _children(self, tree: _Tree, parent: int, logits: torch.Tensor, step: DraftStep, room: int) -> None:
        """Add up to min(width, room) children of `parent` drawn from the draft's logits (V,)."""
        m = min(self.width, room)
        if step.sampling.greedy:
            q = logits.softmax(-1)
            top = torch.topk(q, m)
            for conf, x in zip(top.values.tolist(), top.indices.tolist()):
                tree.add(x, parent, conf, None)
            return
        q = probs_from_logits(logits, step.sampling)
        # m draws decided before drawing; a repeated draw ends them (it could only be rejected:
        # SpecInfer's residual leaves no mass on a rejected token), kept as a leaf so the draws
        # verification replays are exactly those made here.
        seen: set[int] = set()
        for x in sample(q.expand(m, -1), step.generator).tolist():
            repeat = x in seen
            tree.add(x, parent, float(q[x]), q, leaf_only=repeat)
            if repeat:
                break
            seen.add(x)

    def _propose_tree(self, step: DraftStep, root_logits: torch.Tensor, k: int) -> Draft:
        adaptive = step.adaptive
        greedy = step.sampling.greedy
        # Under greedy decoding the tree may grow past k and is cut back to its best k nodes.
        room = 4 * k if greedy else k
        tree = _Tree()
        self._children(tree, -1, root_logits, step, room)
        layer = list(range(len(tree)))
        reach = self._reach(tree, adaptive)
        forwards = 1
        for depth in range(2, self.depth + 1):
            expandable = [i for i in layer if not tree.leaf_only[i]]
            frontier = sorted(expandable, key=lambda i: (-tree.scores[i], i))[: self.expand]
            if not frontier or len(tree) >= room:
                break
            if adaptive is not None and not self._worth_growing(tree, reach, frontier, forwards, adaptive):
                break
            if greedy and len(tree) >= k and max(reach[f] for f in frontier) <= sorted(reach, reverse=True)[k - 1]:
                break  # a child's reach is at most its parent's: no new node could enter the best k
            logits = self._feed(tree, frontier, depth - 1)  # (len(frontier), V)
            forwards += 1
            start = len(tree)
            for f, row in zip(frontier, logits):
                if len(tree) >= room:
                    break
                self._children(tree, f, row, step, room - len(tree))
            layer = list(range(start, len(tree)))
            reach = self._reach(tree, adaptive)
        keep = list(range(len(tree)))
        if greedy:
            order = sorted(keep, key=lambda i: (-reach[i], i))  # parents first: reach never grows down a path
            size = min(k, len(order))
            if adaptive is not None:
                size = min(size, max(1, adaptive.tree_size([reach[i] for i in order[:size]], forwards)))
            keep = sorted(order[:size])
        return self._draft(tree, keep, forwards)

    @staticmethod
    def _reach(tree: _Tree, adaptive) -> list[float]:
        """Estimated probability that each node is accepted: the product along its path of the
        calibrated acceptance of its confidence (without a policy: of the confidence itself)."""
        out: list[float] = []
        siblings: dict[int, int] = {}
        for p, c in zip(tree.parents, tree.conf):
            rank = siblings.get(p, 0)
            siblings[p] = rank + 1
            a = adaptive.acceptance_at(c, rank) if adaptive is not None else c
            out.append((out[p] if p >= 0 else 1.0) * a)
        return out

    @staticmethod
    def _worth_growing(tree: _Tree, reach: list[float], frontier: list[int], forwards: int, adaptive) -> bool:
        """Whether one more draft forward (expanding `frontier`) is expected to raise the step's
        tokens per unit time: the frontier's children may add up to sum(reach * acceptance) tokens
        for one more draft forward and the larger verification."""
        order = sorted(reach, reverse=True)
        size = adaptive.tree_size(order, forwards, explore=False)
        costs = adaptive.costs
        tokens = 1.0 + sum(order[:size])
        now = tokens / (forwards * costs.c + costs.v(size + 1))
        gain = sum(reach[f] * adaptive.acceptance_at(tree.conf[f]) for f in frontier)
        grown = size + len(frontier)
        return (tokens + gain) / ((forwards + 1) * costs.c + costs.v(grown + 1)) > now

    def _feed(self, tree: _Tree, frontier: list[int], parent_depth: int) -> torch.Tensor:
        """Feed frontier nodes to the draft model in one tree forward; each sees the committed
        tokens and its own fed ancestors only. Returns their logits (len(frontier), V)."""
        model = self.model
        cached = model.length  # committed tokens + nodes fed so far
        m = len(frontier)
        slot = {node: j for j, node in enumerate(self._fed_nodes)}
        mask = torch.zeros(m, cached + m, dtype=torch.bool)
        mask[:, : self._base] = True
        for r, node in enumerate(frontier):
            mask[r, cached + r] = True
            a = tree.parents[node]
            while a >= 0:
                mask[r, self._base + slot[a]] = True  # every expanded node's ancestors were fed
                a = tree.parents[a]
        ids = torch.tensor([tree.tokens[f] for f in frontier], dtype=torch.long, device=model.device)
        positions = torch.full((m,), self._base - 1 + parent_depth, dtype=torch.long, device=model.device)
        logits = model.forward(ids, attn_mask=mask.to(model.device), positions=positions)
        self._fed_nodes.extend(frontier)
        return self._logits(logits)

    def _draft(self, tree: _Tree, keep: list[int], forwards: int) -> Draft:
        """The kept nodes (ascending, closed under parents) renumbered 0..len-1 as a Draft."""
        new_index = {old: new for new, old in enumerate(keep)}
        self._fed_nodes = [new_index.get(old, -1) for old in self._fed_nodes]  # -1: fed, then cut
        dev = self.model.device
        tokens = torch.tensor([tree.tokens[i] for i in keep], dtype=torch.long, device=dev)
        parents = torch.tensor([new_index[tree.parents[i]] if tree.parents[i] >= 0 else -1 for i in keep],
                               dtype=torch.long, device=dev)
        probs = torch.stack([tree.q_rows[i] for i in keep]) if tree.q_rows else None
        return Draft(tokens, probs, [tree.conf[i] for i in keep], parents, forwards)

    def update(self, path: list[int]) -> None:
        if self._fed_nodes:
            # Tree: keep the fed nodes on the accepted path (a prefix of it: a node was fed only
            # if it was expanded, and then so were its ancestors).
            slot = {node: j for j, node in enumerate(self._fed_nodes) if node >= 0}
            kept = []
            for node in path:
                if node not in slot:
                    break
                kept.append(slot[node])
            self.model.keep_path(self._base, kept)
            self._fed_nodes = []
            return
        # Chain: the cache holds committed[:n] + draft[:d-1]; keep the draft tokens committed.
        self.model.rollback(min(self.model.length, self._base + min(len(path), self._fed)))
