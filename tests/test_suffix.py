"""The suffix drafter (SuffixDecoding): its suffix trie against a brute-force substring count, and
the trees it proposes from the request and global tries. No model, no decoder."""

from __future__ import annotations

import random
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from outrider.drafters import REGISTRY, BuildContext, DraftStep, SuffixDrafter, drafter_class
from outrider.drafters.suffix import SuffixTrie, advance_matches, best_first_tree
from outrider.sampling import SamplingParams
from outrider.tree import check_parents, path_to


def dump(trie: SuffixTrie, node: int = 0, prefix: tuple[int, ...] = ()) -> dict[tuple[int, ...], int]:
    """Every node's substring -> count, checking that each total is the sum of children's counts."""
    out = {}
    assert trie.total[node] == sum(trie.count[c] for c in trie.children[node].values())
    for t, child in trie.children[node].items():
        assert trie.count[child] > 0, "a node with count 0 must be pruned"
        out[prefix + (t,)] = trie.count[child]
        out.update(dump(trie, child, prefix + (t,)))
    return out


def substring_counts(seqs: list[list[int]], max_depth: int) -> dict[tuple[int, ...], int]:
    counts: Counter = Counter()
    for s in seqs:
        for i in range(len(s)):
            for j in range(i + 1, min(i + max_depth, len(s)) + 1):
                counts[tuple(s[i:j])] += 1
    return dict(counts)


def propose(drafter: SuffixDrafter, tokens: list[int], k: int = 8):
    draft = drafter.propose(DraftStep(torch.tensor(tokens), k, SamplingParams(), None))
    parents = draft.parents.tolist() if draft.parents is not None else list(range(-1, draft.size - 1))
    return draft.tokens.tolist(), parents, draft


# --- the trie ------------------------------------------------------------------------------------


def test_trie_counts_after_insertion_and_removal():
    trie = SuffixTrie(max_depth=3)
    trie.insert([1, 2, 3, 1, 2, 4])
    assert trie.count_of([1]) == 2 and trie.count_of([1, 2]) == 2
    assert trie.count_of([1, 2, 3]) == 1 and trie.count_of([2, 4]) == 1
    assert trie.count_of([2, 3, 1, 2]) == 0  # longer than max_depth: not held
    assert trie.total[trie.find([1, 2])] == 2  # continued by 3 and by 4
    assert trie.total[trie.find([2, 4])] == 0  # end of the sequence
    trie.insert([1, 2, 5])
    assert trie.count_of([1, 2]) == 3

    trie.remove([1, 2, 3, 1, 2, 4])
    assert trie.count_of([1, 2]) == 1 and trie.total[trie.find([1, 2])] == 1
    assert set(trie.children[trie.find([1, 2])]) == {5}
    assert trie.find([3]) is None and trie.find([1, 2, 3]) is None and trie.find([4]) is None
    fresh = SuffixTrie(max_depth=3)
    fresh.insert([1, 2, 5])
    assert dump(trie) == dump(fresh) and trie.num_nodes() == fresh.num_nodes() == 6

    trie.remove([1, 2, 5])
    assert trie.children[0] == {} and trie.total[0] == 0 and trie.num_nodes() == 0


def test_trie_matches_brute_force_counts():
    rng = random.Random(0)
    seqs = [[rng.randrange(4) for _ in range(rng.randrange(1, 30))] for _ in range(6)]
    trie = SuffixTrie(max_depth=5)
    for s in seqs[:3]:
        trie.insert(s)
    # The open sequence extended in pieces counts the same as one whole insertion.
    trie.extend(seqs[3][:7])
    trie.extend(seqs[3][7:])
    trie.close()
    for s in seqs[4:]:
        trie.insert(s)
    assert dump(trie) == substring_counts(seqs, 5)
    trie.remove(seqs[1])
    trie.remove(seqs[4])
    assert dump(trie) == substring_counts([seqs[0], seqs[2], seqs[3], seqs[5]], 5)


def test_removed_nodes_are_reused_so_storage_stays_bounded():
    rng = random.Random(4)
    trie = SuffixTrie(max_depth=6)
    window: list[list[int]] = []
    for _ in range(40):  # a sliding window of 3 sequences, as the global trie's LRU keeps
        window.append([rng.randrange(50) for _ in range(20)])
        trie.insert(window[-1])
        if len(window) > 3:
            trie.remove(window.pop(0))
    assert dump(trie) == substring_counts(window, 6)
    assert trie.num_nodes() == len(substring_counts(window, 6))
    assert len(trie.count) <= 4 * 20 * 6 + 1  # never more than 4 sequences' worth of nodes


def test_active_nodes_are_the_open_sequence_suffixes():
    trie = SuffixTrie(max_depth=4)
    seq = [3, 1, 4, 1, 5, 9]
    trie.extend(seq)
    assert len(trie.active) == 3  # depths 1..max_depth-1
    for j, node in enumerate(trie.active):
        assert node == trie.find(seq[len(seq) - j - 1 :])


def test_advance_matches_follows_every_suffix_held_in_the_trie():
    rng = random.Random(3)
    trie = SuffixTrie(max_depth=6)
    trie.insert([rng.randrange(3) for _ in range(50)])
    seq = [rng.randrange(3) for _ in range(30)]
    matches: list[int] = []
    for n in range(1, len(seq) + 1):
        matches = advance_matches(trie, matches, seq[n - 1], max_len=5)
        held = [j for j in range(1, min(n, 5) + 1) if trie.find(seq[n - j : n]) is not None]
        assert held == list(range(1, len(matches) + 1))  # suffix-closed: lengths 1..len
        for j, node in enumerate(matches):
            assert node == trie.find(seq[n - j - 1 : n])
    assert max(len(advance_matches(trie, [], t, 5)) for t in range(3)) == 1


# --- trees ---------------------------------------------------------------------------------------


def test_repeated_pattern_in_prompt_gives_its_continuation_first():
    drafter = SuffixDrafter(max_requests=0)
    drafter.begin(torch.tensor([5, 6, 7, 8, 9, 11, 5, 6, 7]))
    tokens, parents, draft = propose(drafter, [5, 6, 7, 8, 9, 11, 5, 6, 7])
    # match [5, 6, 7] (length 3, max_spec_factor 1): the 3 tokens that followed it
    assert tokens == [8, 9, 11] and parents == [-1, 0, 1]
    assert draft.probs is None and draft.parents is not None


# Context where [1, 2] was followed by 10 three times and by 20 once; each run starts with a new
# token (50..54), so [1, 2] is the longest suffix that occurred before.
COUNTS_3_1 = [50, 1, 2, 10, 51, 1, 2, 10, 52, 1, 2, 20, 53, 1, 2, 10, 54, 1, 2]


def test_two_continuations_3_to_1_give_both_branches_frequent_first():
    drafter = SuffixDrafter(k=2, max_spec_factor=4, max_requests=0)
    drafter.begin(torch.tensor(COUNTS_3_1))
    tokens, parents, _ = propose(drafter, COUNTS_3_1)
    assert tokens == [10, 20] and parents == [-1, -1]
    # Scores are the conditional frequencies.
    trie = drafter.request_trie
    _, _, scores = best_first_tree(trie, trie.find([1, 2]), 2, 0.1)
    assert scores == pytest.approx([0.75, 0.25])


def test_tree_size_respects_k_threshold_and_spec_factor():
    def size(k=8, step_k=8, min_score=0.1, factor=8.0):
        drafter = SuffixDrafter(k=k, min_score=min_score, max_spec_factor=factor, max_requests=0)
        drafter.begin(torch.tensor(COUNTS_3_1))
        tokens, parents, _ = propose(drafter, COUNTS_3_1, k=step_k)
        check_parents(torch.tensor(parents))
        return len(tokens)

    # Every node past 10 scores 0.25 (10: 0.75 then 1/3 each of 51, 52, 54; 20 -> 53 -> ...).
    assert size() == 8
    assert size(k=3) == 3 and size(step_k=3) == 3
    assert size(min_score=0.3) == 1  # only 10 (0.75) reaches 0.3
    assert size(min_score=0.8) == 0
    assert size(factor=1.0) == 2  # match length 2
    assert size(factor=0.5) == 1

    drafter = SuffixDrafter(min_score=0.3, max_spec_factor=8, max_requests=0)
    drafter.begin(torch.tensor(COUNTS_3_1))
    assert propose(drafter, COUNTS_3_1)[0] == [10]


def test_long_repeats_leave_room_for_a_full_chain():
    # A 10-token block repeated: the longest earlier suffix is 11+ tokens, but matches are capped at
    # max_depth - k so the chain of k tokens after it still fits in the trie.
    block = list(range(100, 110))
    context = block * 3 + block[:5]
    drafter = SuffixDrafter(max_depth=12, k=4, max_requests=0)
    drafter.begin(torch.tensor(context))
    tokens, parents, _ = propose(drafter, context)
    assert tokens == block[5:9] and parents == [-1, 0, 1, 2]


def test_drafts_are_valid_topological_trees_of_earlier_continuations():
    rng = random.Random(1)
    seq = [rng.randrange(6) for _ in range(40)]
    drafter = SuffixDrafter(k=6, max_spec_factor=3, min_score=0.05, max_requests=0)
    drafter.begin(torch.tensor(seq[:20]))
    branched = 0
    for n in range(20, 41):
        tokens, parents, draft = propose(drafter, seq[:n])
        assert draft.size <= 6 and draft.tokens.dtype == torch.long
        check_parents(torch.tensor(parents, dtype=torch.long))  # raises unless parents[i] < i
        children = {}
        for i, p in enumerate(parents):
            assert tokens[i] not in children.setdefault(p, set()), "siblings must differ"
            children[p].add(tokens[i])
            # The last committed token and this node's path occurred earlier in the context.
            path = [seq[n - 1]] + [tokens[j] for j in path_to(parents, i)]
            assert any(seq[s : s + len(path)] == path for s in range(n - len(path) + 1))
        branched += any(len(c) > 1 for c in children.values())
    assert branched > 0  # the test exercised trees, not only chains


def test_step_by_step_equals_built_from_scratch():
    rng = random.Random(2)
    seq = [rng.randrange(5) for _ in range(60)]
    stepwise = SuffixDrafter(max_spec_factor=2, max_requests=0)
    stepwise.begin(torch.tensor(seq[:10]))
    for n in range(10, 61, 3):
        tokens, parents, _ = propose(stepwise, seq[:n])
        fresh = SuffixDrafter(max_spec_factor=2, max_requests=0)
        fresh.begin(torch.tensor(seq[:n]))
        assert (tokens, parents) == propose(fresh, seq[:n])[:2]
    assert dump(stepwise.request_trie) == substring_counts([seq[:58]], 24)


# --- the global trie -----------------------------------------------------------------------------

OUTPUT_A = list(range(200, 212))
OUTPUT_B = list(range(300, 312))


def run_request(drafter: SuffixDrafter, prompt: list[int], output: list[int]) -> None:
    drafter.begin(torch.tensor(prompt))
    for n in range(1, len(output) + 1):
        propose(drafter, prompt + output[:n])


def test_global_trie_helps_a_request_that_repeats_an_earlier_output():
    drafter = SuffixDrafter(max_requests=4)
    run_request(drafter, [1, 2, 3], OUTPUT_A)
    drafter.begin(torch.tensor([7, 8, 9]))  # remembers request 1's output
    assert drafter.num_remembered == 1 and drafter.global_trie.count_of(OUTPUT_A[:3]) == 1
    assert drafter.global_trie.count_of([1, 2]) == 0  # outputs only, not prompts
    tokens, parents, _ = propose(drafter, [7, 8, 9] + OUTPUT_A[:3])
    assert tokens == OUTPUT_A[3:6] and parents == [-1, 0, 1]

    # Control: the request trie alone has never seen this continuation.
    alone = SuffixDrafter(max_requests=0)
    run_request(alone, [1, 2, 3], OUTPUT_A)
    alone.begin(torch.tensor([7, 8, 9]))
    assert propose(alone, [7, 8, 9] + OUTPUT_A[:3])[0] == []


@pytest.mark.parametrize("max_requests", [1, 2])
def test_global_trie_forgets_the_oldest_request_past_max_requests(max_requests):
    drafter = SuffixDrafter(max_requests=max_requests)
    run_request(drafter, [1, 2, 3], OUTPUT_A)
    run_request(drafter, [1, 2, 3], OUTPUT_B)  # begin() remembers A
    drafter.begin(torch.tensor([7, 8, 9]))  # remembers B; with max_requests=1 evicts A
    kept_a = max_requests == 2
    assert drafter.num_remembered == max_requests
    assert drafter.global_trie.count_of(OUTPUT_A[:1]) == kept_a and drafter.global_trie.count_of(OUTPUT_B[:3]) == 1
    assert propose(drafter, [7, 8, 9] + OUTPUT_B[:3])[0] == OUTPUT_B[3:6]
    # Later in the same request (a new begin would remember this request and evict B).
    expected = OUTPUT_A[3:6] if kept_a else []
    assert propose(drafter, [7, 8, 9] + OUTPUT_B[:3] + OUTPUT_A[:3])[0] == expected


def test_better_trie_wins_by_expected_accepted_tokens():
    # The request trie saw [1, 2] -> 10 and [1, 2] -> 20 (score 0.5 each); the global trie saw
    # [1, 2] -> 30 -> 31 twice (score 1 each): its tree expects more accepted tokens.
    drafter = SuffixDrafter(max_spec_factor=1, max_requests=4)
    drafter.remember([1, 2, 30, 31, 5, 1, 2, 30, 31])
    prompt = [1, 2, 10, 1, 2, 20, 1, 2]
    drafter.begin(torch.tensor(prompt))
    assert propose(drafter, prompt)[0] == [30, 31]
    # Without the global memory the request tree's two branches come back.
    drafter = SuffixDrafter(max_spec_factor=1, max_requests=0)
    drafter.begin(torch.tensor(prompt))
    assert propose(drafter, prompt)[:2] == ([10, 20], [-1, -1])


def test_remember_during_a_request_is_matched_at_once():
    drafter = SuffixDrafter(max_requests=4)
    context = [7, 8, 9] + OUTPUT_A[:3]
    drafter.begin(torch.tensor(context))
    assert propose(drafter, context)[0] == []
    drafter.remember(OUTPUT_A)
    assert propose(drafter, context)[0] == OUTPUT_A[3:6]


def test_finish_adds_the_final_tokens_and_only_once():
    drafter = SuffixDrafter(max_requests=4)
    run_request(drafter, [1, 2, 3], OUTPUT_A[:6])
    drafter.finish(torch.tensor([1, 2, 3] + OUTPUT_A))  # the last step's tokens were never proposed on
    drafter.begin(torch.tensor([7]))  # already finished: not remembered twice
    assert drafter.num_remembered == 1 and drafter.global_trie.count_of(OUTPUT_A[-2:]) == 1


# --- construction --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"k": 0}, "k=0"),
        ({"min_match": 0}, "min_match=0"),
        ({"max_depth": 8, "k": 8}, "max_depth=8"),
        ({"min_score": 1.5}, "min_score=1.5"),
        ({"min_score": -0.1}, "min_score=-0.1"),
        ({"max_requests": -1}, "max_requests=-1"),
        ({"max_spec_factor": 0.0}, "max_spec_factor=0.0"),
        ({"datastore_weight": 0.0}, "datastore_weight=0.0"),
        ({"datastore_weight": 1.5}, "datastore_weight=1.5"),
        ({"datastore_min_match": 0}, "datastore_min_match=0"),
    ],
)
def test_bad_constructor_values_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SuffixDrafter(**kwargs)


def test_registered_and_built_from_context():
    assert drafter_class("suffix") is SuffixDrafter and REGISTRY["suffix"].name == "suffix"
    assert SuffixDrafter.uses_draft_model is False and SuffixDrafter.stops_on_confidence is False
    target = SimpleNamespace(model=SimpleNamespace(device=torch.device("cpu")))
    drafter = SuffixDrafter.build(BuildContext(target=target, draft=None, k=12))
    assert drafter.k == 12 and drafter.max_depth >= 12 + 16
    assert SuffixDrafter.build(BuildContext(target=target, draft=None, k=None)).k == SuffixDrafter.default_k


def test_k_auto_keeps_the_nodes_that_pay_for_their_verification():
    """With k="auto" the step's policy cuts the best-first tree (AdaptiveK.tree_size: a prefix of
    it, so still a tree); without one the whole tree is drafted."""
    d = SuffixDrafter(k=8)
    tokens = [1, 2, 3, 4, 5, 9, 1, 2, 3, 4, 5, 9, 1, 2, 3]
    d.begin(torch.tensor(tokens))
    full = d.propose(DraftStep(torch.tensor(tokens), 8, SamplingParams(), None))
    seen = []

    def tree_size(reach, draft_forwards, explore=True):
        seen.append(list(reach))
        return 2

    policy = SimpleNamespace(tree_size=tree_size)
    cut = d.propose(DraftStep(torch.tensor(tokens), 8, SamplingParams(), None, adaptive=policy))
    assert full.size > 2 and cut.tokens.tolist() == full.tokens[:2].tolist()
    assert len(seen[0]) == full.size  # the policy saw every node's score, best first
