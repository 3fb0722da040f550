"""Datastore: what a target said before, as a suffix array, for retrieval drafting (REST, He et al.
2024; the global cache of SuffixDecoding, Oliaro et al. 2024, filled ahead of time).

A small model repeats its own phrasing from one answer to the next ("Here's a", "In summary,",
the shape of a list). A corpus of its own answers, written by self-distillation on requests that
are not the test set (`outrider train drafter` keeps them), predicts those phrases for no forward.

Words used below (those of drafters/suffix.py):
- **corpus**: token sequences joined by SEP (-1), which no pattern contains, so no match or draft
  runs from one sequence into the next.
- **suffix array**: the corpus positions, sorted by the `depth` tokens that start there. Every
  node of the corpus' suffix trie down to `depth` (the substring it spells) is then one
  contiguous range [lo, hi) of the array: its **count** is hi - lo, and its children (the next
  tokens) are contiguous sub-ranges, found by a scan of the range.
- **match** and **score** as in suffix.py: the longest suffix of the committed sequence found in
  the corpus; a draft node's score is the product of count(child) / total(parent) along its path.

Memory is 8 bytes per corpus token plus the tokens (the trie of suffix.py costs ~300 bytes per node,
~depth nodes per token); a lookup is ~5 binary searches, a tree ~size scans of shrinking ranges.
"""

from __future__ import annotations

import bisect
import functools
import heapq
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

SEP = -1  # between sequences; sorts before every token
DATASTORE_NAME = "datastore.npy"  # in a head's folder: the target's answers of its training run
DEPTH = 32  # longest match + deepest draft node: suffixes are sorted on this many tokens


def sorted_suffixes(tokens: np.ndarray, depth: int) -> np.ndarray:
    """(n,) int64 positions of `tokens` (n,) sorted by the `depth` tokens starting there (reads
    past the end see SEP), by prefix doubling: after the pass with stride k every rank orders the
    first 2k tokens, so log2(depth) sorts suffice."""
    rank = tokens.astype(np.int64) - SEP  # SEP -> 0, the lowest; past the end counts as SEP
    k = 1
    while k < depth:
        second = np.zeros_like(rank)
        if k < len(rank):
            second[: len(rank) - k] = rank[k:]
        order = np.lexsort((second, rank))  # by rank, then by the rank k tokens later
        r1, r2 = rank[order], second[order]
        new = np.empty_like(rank)
        new[order] = np.concatenate([[0], np.cumsum((r1[1:] != r1[:-1]) | (r2[1:] != r2[:-1]))])
        rank = new
        k *= 2
    return np.argsort(rank, kind="stable")


class Datastore:
    """A suffix array over a corpus (see the module docstring). Immutable once built."""

    def __init__(self, corpus: np.ndarray, depth: int = DEPTH) -> None:
        if depth < 2:
            raise ValueError(f"depth={depth} is invalid: a match and a draft token need depth >= 2")
        corpus = np.asarray(corpus, dtype=np.int64)
        self.depth = depth
        self.corpus = corpus  # (n,) the sequences joined by SEP
        order = sorted_suffixes(corpus, depth)
        self.suffixes = order[corpus[order] != SEP]  # (m,) positions of real tokens, sorted
        # Reads up to `depth` past a position never leave the array.
        self.padded = np.concatenate([corpus, np.full(depth, SEP, dtype=np.int64)])
        # Python lists for the binary searches: slices of a list compare in C, numpy's do not.
        self._tokens = self.padded.tolist()
        self._order = self.suffixes.tolist()

    @classmethod
    def from_sequences(cls, sequences: Iterable[Sequence[int]], depth: int = DEPTH) -> Datastore:
        parts: list[int] = []
        for seq in sequences:
            if len(seq):
                parts.extend(int(t) for t in seq)
                parts.append(SEP)
        return cls(np.array(parts, dtype=np.int64), depth)

    def __len__(self) -> int:
        """Corpus tokens (separators not counted)."""
        return len(self._order)

    # --- files ---------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """The corpus alone (uint16 when every token fits; the suffix array is rebuilt on load, ~1 s
        per million tokens), written atomically."""
        path = Path(path)
        small = self.corpus.max(initial=0) < np.iinfo(np.uint16).max
        stored = np.where(self.corpus == SEP, np.iinfo(np.uint16).max, self.corpus).astype(np.uint16) if small \
            else self.corpus.astype(np.int32)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.save(f, stored)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, depth: int = DEPTH) -> Datastore:
        path = Path(path)
        if path.is_dir():
            path = path / DATASTORE_NAME
        if not path.is_file():
            raise ValueError(f"{str(path)!r} is not a datastore: pass a {DATASTORE_NAME} file or a head folder "
                             "holding one (`outrider train drafter` writes it)")
        stored = np.load(path)
        if stored.ndim != 1 or stored.dtype not in (np.uint16, np.int32):
            raise ValueError(f"{str(path)!r} is not a datastore (a 1-D uint16 or int32 array of token ids)")
        corpus = stored.astype(np.int64)
        if stored.dtype == np.uint16:
            corpus[stored == np.iinfo(np.uint16).max] = SEP
        return cls(corpus, depth)

    # --- lookups -------------------------------------------------------------------------------

    def _first(self, pattern: list[int], upper: bool) -> int:
        """The first suffix-array index whose suffix's len(pattern) tokens are >= pattern (upper:
        > pattern)."""
        m, t = len(pattern), self._tokens
        find = bisect.bisect_right if upper else bisect.bisect_left
        return find(self._order, pattern, key=lambda s: t[s : s + m])

    def match(self, context: Sequence[int], min_len: int, max_len: int) -> tuple[int, int, int] | None:
        """The longest suffix of `context` (length in [min_len, max_len]) found in the corpus, as
        (length, lo, hi): its suffix-array range. None when not even min_len tokens match. A
        suffix that occurs has every shorter suffix occur, so the length is binary-searched."""
        max_len = min(max_len, len(context), self.depth - 1)
        tail = [int(t) for t in context[-max_len:]] if max_len > 0 else []

        def found(m: int) -> bool:
            pattern = tail[len(tail) - m :]
            i = self._first(pattern, upper=False)
            return i < len(self._order) and self._tokens[self._order[i] : self._order[i] + m] == pattern

        if max_len < min_len or not found(min_len):
            return None
        lo_len, hi_len = min_len, max_len  # found(lo_len) holds; find the largest that does
        while lo_len < hi_len:
            mid = (lo_len + hi_len + 1) // 2
            if found(mid):
                lo_len = mid
            else:
                hi_len = mid - 1
        pattern = tail[len(tail) - lo_len :]
        return lo_len, self._first(pattern, upper=False), self._first(pattern, upper=True)

    def children(self, lo: int, hi: int, at: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The next tokens after a node of range [lo, hi) whose substring is `at` tokens long:
        (tokens, child lo, child hi), each (c,), SEP excluded (a sequence ended there)."""
        column = self.padded[self.suffixes[lo:hi] + at]  # (hi - lo,) sorted: runs of equal tokens
        cuts = np.flatnonzero(column[1:] != column[:-1]) + 1
        starts = np.concatenate([[0], cuts])
        ends = np.concatenate([cuts, [len(column)]])
        tokens = column[starts]
        real = tokens != SEP
        return tokens[real], lo + starts[real], lo + ends[real]

    def tree(self, length: int, lo: int, hi: int, size: int, min_score: float
             ) -> tuple[list[int], list[int], list[float]]:
        """A draft tree of at most `size` nodes below the match (length, lo, hi), best score first
        (suffix.best_first_tree's rule on the corpus' trie): (tokens, parents, scores), parents -1
        for the match's children, topological."""
        tokens: list[int] = []
        parents: list[int] = []
        scores: list[float] = []
        heap: list[tuple[float, int, int, int, int, int, int]] = []
        order = 0  # tie-breaker: earlier pushes first
        at, score, index = length, 1.0, -1
        while len(tokens) < size:
            if at < self.depth:
                toks, los, his = self.children(lo, hi, at)
                counts = his - los
                total = int(counts.sum())
                for token, c_lo, c_hi, count in zip(toks.tolist(), los.tolist(), his.tolist(), counts.tolist()):
                    child = score * count / total
                    if child >= min_score:
                        heapq.heappush(heap, (-child, order, token, c_lo, c_hi, at + 1, index))
                        order += 1
            if not heap:
                break
            neg, _, token, lo, hi, at, parent = heapq.heappop(heap)
            score, index = -neg, len(tokens)
            tokens.append(token)
            parents.append(parent)
            scores.append(score)
        return tokens, parents, scores


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, mtime_ns: int, depth: int) -> Datastore:
    return Datastore.load(path, depth)


def load_datastore(path: str | Path, depth: int = DEPTH) -> Datastore:
    """Datastore.load, shared: every drafter built from one file (a batch builds one per row) reads
    the same immutable suffix array instead of sorting it again."""
    path = Path(path).expanduser().resolve()
    if path.is_dir():
        path = path / DATASTORE_NAME
    mtime = path.stat().st_mtime_ns if path.is_file() else 0
    return _load_cached(str(path), mtime, depth)

