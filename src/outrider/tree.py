"""Draft trees as plain tensors: `tokens (n,)` and `parents (n,)`, everything else derived.

Words (DESIGN.md): node i holds tokens[i]; parents[i] is the node it follows, -1 for the *root*
(the last committed token). Nodes are in topological order (parents[i] < i), so a chain is the
tree whose parents are [-1, 0, 1, ...]. The **depth** of a node is 1 for the root's children;
the tree's depth is its longest path. A verify forward scores n + 1 tokens: the root at row 0 and
node i at row i + 1, so row 0 gives the distribution of the root's children and row i + 1 that of
node i's children.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_parents(parents: Tensor) -> None:
    """Raise ValueError unless parents (n,) is a topologically ordered forest under the root."""
    n = parents.shape[0]
    if parents.dim() != 1:
        raise ValueError(f"parents must be one-dimensional (n,), got shape {tuple(parents.shape)}")
    idx = torch.arange(n, device=parents.device)
    bad = ((parents < -1) | (parents >= idx)).nonzero().flatten().tolist()
    if bad:
        i = bad[0]
        raise ValueError(
            f"parents[{i}]={int(parents[i])} is invalid: each node's parent must be -1 (the root) or an "
            "earlier node (parents[i] < i)"
        )


def depths(parents: Tensor) -> Tensor:
    """(n,) long depth of each node (1 for the root's children). parents (n,) topological."""
    out = [0] * parents.shape[0]
    for i, p in enumerate(parents.tolist()):
        out[i] = 1 if p < 0 else out[p] + 1
    return torch.tensor(out, dtype=torch.long, device=parents.device)


def ancestor_mask(parents: Tensor) -> Tensor:
    """(n, n) bool: [i, j] is True when node j is node i or one of its ancestors (root excluded)."""
    n = parents.shape[0]
    mask = torch.eye(n, dtype=torch.bool, device=parents.device)
    for i, p in enumerate(parents.tolist()):
        if p >= 0:
            mask[i] |= mask[p]  # topological order: the parent's row is already complete
    return mask


def verify_mask(parents: Tensor) -> Tensor:
    """(n+1, n+1) bool attention mask of a verify forward over [root] + nodes: every token sees the
    root and its own ancestors and itself. The root is row/column 0."""
    n = parents.shape[0]
    mask = torch.zeros(n + 1, n + 1, dtype=torch.bool, device=parents.device)
    mask[:, 0] = True
    mask[1:, 1:] = ancestor_mask(parents)
    return mask


def verify_positions(parents: Tensor, root_position: int) -> Tensor:
    """(n+1,) long positions of [root] + nodes: the root's, then the root's + each node's depth."""
    return torch.cat([parents.new_zeros(1), depths(parents)]) + root_position


def path_to(parents: list[int], node: int) -> list[int]:
    """Nodes from the root's child down to `node` (empty for node -1)."""
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


def merge_trees(tokens_a: list[int], parents_a: list[int], tokens_b: list[int],
                parents_b: list[int]) -> tuple[list[int], list[int]]:
    """The union of two draft trees under one root, as a trie: A's nodes first and unchanged (node
    i of A is node i of the result), then each node of B whose path A does not already hold, in B's
    order (topological, so the result is too). A node of B that repeats a sibling's token is the
    same node: verification could never take both."""
    tokens, parents = list(tokens_a), list(parents_a)
    child = {}
    for i, (t, p) in enumerate(zip(tokens, parents)):
        child.setdefault((p, t), i)
    where = []  # where[j]: B's node j in the result
    for t, p in zip(tokens_b, parents_b):
        key = (where[p] if p >= 0 else -1, t)
        if key not in child:
            child[key] = len(tokens)
            tokens.append(t)
            parents.append(key[0])
        where.append(child[key])
    return tokens, parents
