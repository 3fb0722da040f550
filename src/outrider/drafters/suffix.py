"""Suffix drafter: SuffixDecoding (Oliaro et al. 2024). Proposes a draft *tree* read off suffix
tries of earlier text, with no model forward.

Words used below:
- **suffix trie** of depth D: a trie holding every substring of length <= D of the sequences put
  into it; a node stands for the substring spelled from the root, and its **count** is how many
  times that substring occurs. Its **total** is the sum of its children's counts: how many of
  those occurrences have a next token inside the trie.
- **match**: the longest suffix of the committed sequence that is a node with children (the
  match length is that node's depth). Its subtree holds what followed the suffix before.
- **score** of a draft node: the product of conditional frequencies count(child) / total(parent)
  along its path from the match, an estimate of the chance the whole path is accepted; the sum of
  a tree's scores is its expected number of accepted tokens.

Two tries, as in the paper: one over the current request (prompt + committed output, extended by
the newly committed tokens at each step) and a global one over the *outputs* of earlier requests
(as SuffixDecoding does: the prompt of the current request is already in the request trie, and
outputs are what repeats across agentic / templated requests), bounded to the `max_requests` most
recently remembered ones; the oldest is removed (counts decremented, empty nodes pruned).

Each child in a trie has a distinct token and is chosen deterministically, so probs is None and
verification treats siblings as drawn without replacement with one-hot q: lossless.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable, Sequence
from typing import ClassVar

import torch

from outrider.drafters.base import BuildContext, Draft, DraftStep, empty_draft, register
from outrider.drafters.datastore import Datastore


class SuffixTrie:
    """A bounded-depth suffix trie with occurrence counts (see the module docstring).

    Nodes are ids into flat lists, node 0 the root: count[i], total[i], and children[i], a dict
    token -> child id. Only ints in them, so the garbage collector does not track them: a trie of
    object nodes adds ~D tracked objects per token and soon triggers full collections, which cost
    ~0.25 s with torch and transformers loaded. Memory is ~300 bytes per node, ~D nodes per token
    of unrepetitive text. Ids of pruned nodes are reused.

    Holds one *open* sequence that `extend` appends to, O(max_depth) per token; `insert` adds a
    closed sequence, `remove` takes one out again (it must have been inserted as one sequence).
    """

    def __init__(self, max_depth: int) -> None:
        assert max_depth >= 1
        self.max_depth = max_depth
        self.count = [0]  # occurrences of the substring node i spells
        self.total = [0]  # sum of node i's children's counts
        self.children: list[dict[int, int] | None] = [{}]  # None: a free id
        self.free: list[int] = []
        self.active: list[int] = []  # active[j]: the open sequence's last j + 1 tokens

    def extend(self, tokens: Iterable[int]) -> None:
        active = self.active
        for t in tokens:
            active = extend_suffixes(self, active, t)
        self.active = active

    def close(self) -> None:
        """End the open sequence: the next `extend` starts a new one."""
        self.active = []

    def insert(self, tokens: Iterable[int]) -> None:
        self.close()
        self.extend(tokens)
        self.close()

    def remove(self, tokens: Sequence[int]) -> None:
        remove_sequence(self, tokens)

    def find(self, pattern: Sequence[int]) -> int | None:
        """The node spelling `pattern`, or None."""
        node: int | None = 0
        for t in pattern:
            node = self.children[node].get(t)
            if node is None:
                return None
        return node

    def count_of(self, pattern: Sequence[int]) -> int:
        """Occurrences of `pattern` (length <= max_depth) in the sequences put in; 0 if none."""
        node = self.find(pattern)
        return 0 if node is None else self.count[node]

    def num_nodes(self) -> int:
        """Nodes in use, the root excluded."""
        return len(self.count) - 1 - len(self.free)

    def _new_node(self) -> int:
        if self.free:
            node = self.free.pop()
            self.count[node] = self.total[node] = 0
            self.children[node] = {}
            return node
        self.count.append(0)
        self.total.append(0)
        self.children.append({})
        return len(self.count) - 1


def extend_suffixes(trie: SuffixTrie, active: list[int], token: int) -> list[int]:
    """Append `token` to the trie's open sequence: count it as the next token of every suffix of
    length < max_depth, creating nodes as needed. O(max_depth).

    active[j] is the node of the sequence's last j + 1 tokens (depths 1..max_depth-1: a node at
    max_depth can get no children). Returns the new active list, same layout.
    """
    count, total, children = trie.count, trie.total, trie.children
    keep = trie.max_depth - 1
    out = []
    for node in (0, *active):  # depth j -> child at depth j + 1
        child = children[node].get(token)
        if child is None:
            child = children[node][token] = trie._new_node()
        count[child] += 1
        total[node] += 1
        if len(out) < keep:
            out.append(child)
    return out


def remove_sequence(trie: SuffixTrie, tokens: Sequence[int]) -> None:
    """Undo inserting `tokens` as one sequence: decrement the counts of each of its windows
    tokens[i : i + max_depth] and prune nodes whose count reaches 0 (with their subtrees)."""
    count, total, children = trie.count, trie.total, trie.children
    n, depth = len(tokens), trie.max_depth
    for i in range(n):
        node = 0
        for t in tokens[i : min(i + depth, n)]:
            child = children[node][t]
            count[child] -= 1
            total[node] -= 1
            if count[child] == 0:
                # Every occurrence below this one came from this window too (a descendant's count
                # never exceeds its ancestor's), so the whole subtree goes.
                del children[node][t]
                stack = [child]
                while stack:
                    dead = stack.pop()
                    stack.extend(children[dead].values())
                    children[dead] = None
                    trie.free.append(dead)
                break
            node = child


def advance_matches(trie: SuffixTrie, matches: list[int], token: int, max_len: int) -> list[int]:
    """Follow `token` from each matched suffix, without changing the trie. O(len(matches)).

    matches[j] is the node of the sequence's last j + 1 tokens, for as many lengths as the trie
    holds (the set is suffix-closed: a substring's suffixes are in the trie too, so the lengths
    are 1..len(matches)); lengths past max_len are dropped. Returns the new matches.
    """
    children = trie.children
    child = children[0].get(token)
    if child is None:
        return []
    out = [child]
    for node in matches[: max_len - 1]:
        child = children[node].get(token)
        if child is None:  # suffix-closed: no longer suffix can match either
            break
        out.append(child)
    return out


def longest_match(trie: SuffixTrie, matches: list[int], min_len: int, max_len: int) -> tuple[int, int] | None:
    """(length, node) of the longest matched suffix with min_len <= length <= max_len that has a
    continuation (children), or None."""
    total = trie.total
    for j in range(min(len(matches), max_len) - 1, min_len - 2, -1):
        if total[matches[j]]:
            return j + 1, matches[j]
    return None


def best_first_tree(
    trie: SuffixTrie, match: int, size: int, min_score: float
) -> tuple[list[int], list[int], list[float]]:
    """A draft tree of at most `size` nodes grown from node `match`'s subtree, best score first.

    Expands the frontier node of highest score (ties: the one reached first), dropping nodes whose
    score is below min_score. A child is pushed only after its parent is placed, so the result is
    topological. Returns (tokens, parents, scores), parents -1 for the match's children.
    """
    count, total, children = trie.count, trie.total, trie.children
    tokens: list[int] = []
    parents: list[int] = []
    scores: list[float] = []
    heap: list[tuple[float, int, int, int, int]] = []
    order = 0  # tie-breaker: earlier pushes first
    node, score, index = match, 1.0, -1
    while len(tokens) < size:
        if total[node]:
            # child score = score * count / total >= min_score  <=>  count >= threshold
            threshold = min_score * total[node] / score
            scale = score / total[node]
            for token, child in children[node].items():
                if count[child] >= threshold:
                    heapq.heappush(heap, (-count[child] * scale, order, token, child, index))
                    order += 1
        if not heap:
            break
        neg, _, token, node, parent = heapq.heappop(heap)
        score, index = -neg, len(tokens)
        tokens.append(token)
        parents.append(parent)
        scores.append(score)
    return tokens, parents, scores


@register("suffix")
class SuffixDrafter:
    """SuffixDecoding's drafter: a tree from the request trie or the global trie, whichever
    expects more accepted tokens.

    max_depth: trie depth D = longest match + draft depth. Deeper matches are more specific but
      cost O(D) per committed token and memory ~D nodes per token. Matches are capped at
      D - tree size so a chain of the whole budget still fits below the match.
    k: tree size cap (node count). Verifying n nodes costs v(n) > 1 on a CPU: keep it small.
    min_score: drop draft nodes whose path score (estimated acceptance chance) is below this.
    max_requests: how many earlier requests' outputs the global trie remembers (0: none), the
      oldest forgotten first; memory up to ~300 bytes * D per remembered token.
    max_spec_factor: tree size <= max_spec_factor * match length; short matches predict poorly.
    min_match: shortest suffix worth matching.
    datastore: the target's answers to other requests (drafters/datastore.py), a third source
      beside the two tries, read the same way; None: the tries alone.
    datastore_weight: the datastore's path scores are scaled by this before they compete. Its
      counts come from other conversations, so they overstate the acceptance here: on held-out
      answers of SmolLM2 (never Spec-Bench) a datastore tree scored 1-3 kept 0.5-0.6 tokens and
      one scored >= 3 kept 1.1 (about 0.4 of the score), where the tries' trees keep ~0.4-0.9 and
      ~4. Scaled, its trees win a step only where they are likely, and k="auto" cuts them to the
      nodes whose scaled chance pays for verifying them.
    datastore_min_match: the shortest match the datastore drafts from (a one-token match is a
      common token: a long scan for a weak guess).
    """

    uses_draft_model: ClassVar[bool] = False
    reads_datastore: ClassVar[bool] = True  # from_pretrained(datastore=...)
    stops_on_confidence: ClassVar[bool] = False
    default_k: ClassVar[int] = 16  # most nodes; its own score threshold cuts (bench: 16 > 12 > 8 on code)
    batches: ClassVar[bool] = True  # model-free: a batch gives each row its own, for nothing

    def __init__(
        self,
        max_depth: int = 24,
        k: int = 8,
        min_score: float = 0.1,
        max_requests: int = 64,
        max_spec_factor: float = 1.0,
        min_match: int = 1,
        device: torch.device | str = "cpu",
        datastore: Datastore | None = None,
        datastore_weight: float = 0.4,
        datastore_min_match: int = 2,
    ) -> None:
        if k < 1:
            raise ValueError(f"k={k} is invalid: propose at least 1 token per step")
        if min_match < 1:
            raise ValueError(f"min_match={min_match} is invalid: match at least 1 token")
        if max_depth < k + min_match:
            raise ValueError(
                f"max_depth={max_depth} is too small for k={k}, min_match={min_match}: the trie must "
                f"hold a match and a full chain below it, use max_depth >= {k + min_match}"
            )
        if not 0.0 <= min_score <= 1.0:
            raise ValueError(
                f"min_score={min_score} is invalid: it is a probability, use 0 <= min_score <= 1"
            )
        if not 0.0 < datastore_weight <= 1.0:
            raise ValueError(f"datastore_weight={datastore_weight} is invalid: it scales estimated acceptances, "
                             "use 0 < datastore_weight <= 1")
        if datastore_min_match < 1:
            raise ValueError(f"datastore_min_match={datastore_min_match} is invalid: match at least 1 token")
        if max_requests < 0:
            raise ValueError(f"max_requests={max_requests} is invalid: use 0 (no global trie) or more")
        if not max_spec_factor > 0:
            raise ValueError(
                f"max_spec_factor={max_spec_factor} is invalid: the tree size is capped at "
                "max_spec_factor * match length, use a value > 0 (e.g. 1.0)"
            )
        self.max_depth, self.k, self.min_score = max_depth, k, min_score
        self.max_requests, self.max_spec_factor, self.min_match = max_requests, max_spec_factor, min_match
        self.device = torch.device(device)
        self.datastore = datastore  # shared and read-only: rows of a batch hold the same one
        self.datastore_weight, self.datastore_min_match = datastore_weight, datastore_min_match
        self._empty = empty_draft(self.device)
        self.global_trie = SuffixTrie(max_depth)
        self._remembered: deque[tuple[int, ...]] = deque()  # oldest first
        self._start_request([], 0)

    @classmethod
    def build(cls, ctx: BuildContext) -> SuffixDrafter:
        k = ctx.k or cls.default_k
        # Room for matches of 16 tokens above a full chain of k.
        return cls(k=k, max_depth=max(24, k + 16), device=ctx.target.model.device, datastore=ctx.datastore)

    # --- sequence protocol -------------------------------------------------------------------

    def begin(self, prompt: torch.Tensor) -> None:
        self.finish()
        self._start_request(prompt.tolist(), int(prompt.shape[0]))

    def propose(self, step: DraftStep) -> Draft:
        return self.propose_scored(step)[0]

    def propose_scored(self, step: DraftStep) -> tuple[Draft, float]:
        """The draft and its expected number of accepted tokens (the sum of its path scores)."""
        n = int(step.tokens.shape[0])
        if n != len(self._tokens):
            self._catch_up(step.tokens, n)
        budget = min(step.k, self.k)
        max_match = self.max_depth - budget
        best: tuple[list[int], list[int], list[float]] | None = None
        best_value = 0.0
        request, remembered = self.request_trie, self.global_trie
        for trie, matches in ((request, request.active), (remembered, self._global_matches)):
            found = longest_match(trie, matches, self.min_match, max_match)
            if found is None:
                continue
            length, node = found
            size = min(budget, int(self.max_spec_factor * length))
            tree = best_first_tree(trie, node, size, self.min_score)
            value = sum(tree[2])  # expected accepted tokens; ties keep the request trie's
            if value > best_value:
                best, best_value = tree, value
        store = self.datastore
        if store is not None:  # last: on a tie the tries' own text wins
            found_in = store.match(self._tokens, self.datastore_min_match, min(max_match, store.depth - budget))
            if found_in is not None:
                length, lo, hi = found_in
                tokens, parents, scores = store.tree(length, lo, hi, min(budget, int(self.max_spec_factor * length)),
                                                     self.min_score / self.datastore_weight)
                scores = [s * self.datastore_weight for s in scores]
                if sum(scores) > best_value:
                    best, best_value = (tokens, parents, scores), sum(scores)
        if best is not None and step.adaptive is not None:  # k="auto": the nodes that pay for their verification
            n = step.adaptive.tree_size(best[2], 0, explore=False)
            best = (best[0][:n], best[1][:n], best[2][:n])
            best_value = sum(best[2])
        if best is None or not best[0]:
            return self._empty, 0.0
        # (2, d): one host-to-device copy for tokens and parents
        both = torch.tensor([best[0], best[1]], dtype=torch.long).to(self.device)
        return Draft(both[0], parents=both[1]), best_value

    def update(self, path: list[int]) -> None:
        pass  # the accepted tokens arrive with the next step's committed sequence

    # --- the global trie ---------------------------------------------------------------------

    def finish(self, committed: torch.Tensor | None = None) -> None:
        """Remember the current request's output in the global trie (once; `begin` calls it).
        committed (n,) long, CPU: the final sequence, if it has tokens the last step did not see."""
        if committed is not None and int(committed.shape[0]) != len(self._tokens):
            self._catch_up(committed, int(committed.shape[0]))
        if not self._finished:
            self._finished = True
            self.remember(self._tokens[self._prompt_len :])

    def remember(self, tokens: Sequence[int]) -> None:
        """Add one sequence (e.g. an earlier output) to the global trie, forgetting the oldest
        remembered one past max_requests."""
        tokens = tuple(int(t) for t in tokens)
        if not tokens or self.max_requests == 0:
            return
        self.global_trie.insert(tokens)
        self._remembered.append(tokens)
        while len(self._remembered) > self.max_requests:
            self.global_trie.remove(self._remembered.popleft())
        # Nodes were added and perhaps pruned: redo the current sequence's matches.
        self._global_matches = self._match_tail(self._tokens)

    @property
    def num_remembered(self) -> int:
        return len(self._remembered)

    # --- internals ---------------------------------------------------------------------------

    def _start_request(self, tokens: list[int], prompt_len: int) -> None:
        self.request_trie = SuffixTrie(self.max_depth)
        self.request_trie.extend(tokens)
        self._tokens = tokens
        self._prompt_len = prompt_len
        self._finished = False
        self._global_matches = self._match_tail(tokens)

    def _catch_up(self, committed: torch.Tensor, n: int) -> None:
        """Add the committed tokens not yet seen. A shorter sequence than seen means the caller
        started a new one without `begin`: rebuild from it (not remembered as an output)."""
        if n < len(self._tokens):
            self._start_request(committed.tolist(), min(self._prompt_len, n))
            return
        new = committed[len(self._tokens) :].tolist()
        self.request_trie.extend(new)
        self._tokens.extend(new)
        trie, matches, max_len = self.global_trie, self._global_matches, self.max_depth - 1
        if trie.total[0]:
            for t in new:
                matches = advance_matches(trie, matches, t, max_len)
        self._global_matches = matches

    def _match_tail(self, tokens: list[int]) -> list[int]:
        trie, matches, max_len = self.global_trie, [], self.max_depth - 1
        if trie.total[0]:
            for t in tokens[-max_len:]:
                matches = advance_matches(trie, matches, t, max_len)
        return matches
