"""The datastore (a suffix array over the target's earlier answers): its order, matches and trees
against brute force and against the suffix trie it stands in for; the suffix drafter and
eagle+suffix reading it, exact under greedy; its file."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from conftest import tiny_model
from test_e2e_hf import hf_greedy as greedy
from test_suffix import propose, substring_counts
from outrider import SpeculativeDecoder
from outrider.drafters.datastore import DATASTORE_NAME, SEP, Datastore, sorted_suffixes
from outrider.drafters.eagle import new_head
from outrider.drafters.heads import target_embedding
from outrider.drafters.base import DraftStep
from outrider.drafters.suffix import SuffixDrafter, SuffixTrie, best_first_tree
from outrider.sampling import SamplingParams
from outrider.models import load_model


def corpus(seed: int, n: int = 12, vocab: int = 5) -> list[list[int]]:
    """Short sequences over a small vocabulary: many repeats, so trees branch."""
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randrange(1, 30))] for _ in range(n)]


@pytest.mark.parametrize("depth", [1, 3, 8, 32])
@pytest.mark.parametrize("tokens", [[3, 1, 3, 1, 2, SEP, 3, 1, 3, SEP, 0, 0, 0, 0], [2, SEP], []])
def test_suffixes_are_sorted_by_their_first_depth_tokens(depth, tokens):
    tokens = np.array(tokens, dtype=np.int64)
    order = sorted_suffixes(tokens, depth)
    padded = list(tokens) + [SEP] * depth
    keys = [tuple(padded[i : i + depth]) for i in order]
    assert sorted(order.tolist()) == list(range(len(tokens)))
    assert keys == sorted(keys)


@pytest.mark.parametrize("seed", range(4))
def test_match_is_the_longest_suffix_found_and_its_range_counts_it(seed):
    seqs = corpus(seed)
    store = Datastore.from_sequences(seqs, depth=10)
    counts = substring_counts(seqs, 10)
    rng = random.Random(seed)
    for _ in range(30):
        context = [rng.randrange(6) for _ in range(rng.randrange(1, 12))]  # token 5 is never in it
        found = store.match(context, 1, 8)
        lengths = [m for m in range(1, min(8, len(context)) + 1) if tuple(context[-m:]) in counts]
        if not lengths:
            assert found is None
            continue
        length, lo, hi = found
        assert length == max(lengths)
        assert hi - lo == counts[tuple(context[-length:])]
    assert store.match([0, 1], 3, 8) is None  # shorter than min_len


@pytest.mark.parametrize("seed", range(4))
def test_trees_equal_the_suffix_tries(seed):
    """The datastore stands in for a suffix trie holding the same sequences: every tree it grows
    (all nodes over the score threshold) is the trie's, node for node, score for score."""
    depth = 12
    seqs = corpus(seed)
    store = Datastore.from_sequences(seqs, depth=depth)
    trie = SuffixTrie(depth)
    for s in seqs:
        trie.insert(s)
    rng = random.Random(100 + seed)
    for _ in range(20):
        context = [rng.randrange(5) for _ in range(rng.randrange(1, 6))]
        found = store.match(context, 1, 5)
        if found is None:
            continue
        length, lo, hi = found
        node = trie.find(context[-length:])
        assert node is not None
        size = 10_000  # every node over the threshold (a smaller size cuts ties either way)
        ours = store.tree(length, lo, hi, size, 0.05)
        theirs = best_first_tree(trie, node, size, 0.05)
        assert as_paths(ours) == as_paths(theirs)


def as_paths(tree: tuple[list[int], list[int], list[float]]) -> dict[tuple[int, ...], float]:
    tokens, parents, scores = tree
    paths: list[tuple[int, ...]] = []
    for t, p in zip(tokens, parents):
        assert p < len(paths), "topological"
        paths.append((paths[p] if p >= 0 else ()) + (t,))
    return {path: round(s, 9) for path, s in zip(paths, scores)}


def test_no_draft_crosses_from_one_sequence_into_the_next():
    store = Datastore.from_sequences([[1, 2, 3], [4, 5, 6]])
    length, lo, hi = store.match([9, 2, 3], 1, 8)
    assert (length, hi - lo) == (2, 1)
    assert store.tree(length, lo, hi, 8, 0.0) == ([], [], [])  # [1, 2, 3] ended: 4 does not follow


def test_the_suffix_drafter_drafts_from_its_datastore():
    answers = [[7, 8, 9, 10, 11, 12], [7, 8, 9, 10, 11, 12], [20, 21]]
    store = Datastore.from_sequences(answers)
    plain, with_store = SuffixDrafter(k=8), SuffixDrafter(k=8, datastore=store, datastore_weight=0.5)
    for d in (plain, with_store):
        d.begin(torch.tensor([1, 2, 3]))
    assert propose(plain, [1, 2, 3, 7, 8, 9])[:2] == ([], [])  # the request has no earlier 7 8 9
    assert propose(with_store, [1, 2, 3, 7, 8, 9])[:2] == ([10, 11, 12], [-1, 0, 1])
    # Its scores count at datastore_weight (each path was seen every time: 1.0 -> 0.5).
    assert with_store.propose_scored(DraftStep(torch.tensor([1, 2, 3, 7, 8, 9]), 8, SamplingParams(), None))[1] == 1.5
    # A one-token match is too weak a guess (datastore_min_match 2), unless allowed.
    assert propose(with_store, [1, 2, 3, 5, 20])[:2] == ([], [])
    one = SuffixDrafter(k=8, datastore=store, datastore_min_match=1)
    one.begin(torch.tensor([1, 2, 3]))
    assert propose(one, [1, 2, 3, 5, 20])[:2] == ([21], [-1])


@pytest.mark.parametrize("vocab_top", [100, 70000])  # uint16 on disk, and int32 past it
def test_file_round_trip(tmp_path, vocab_top):
    seqs = [[1, 2, vocab_top, 4], [vocab_top, 0]]
    store = Datastore.from_sequences(seqs)
    store.save(tmp_path / DATASTORE_NAME)
    again = Datastore.load(tmp_path)  # a folder holding one
    assert again.corpus.tolist() == store.corpus.tolist() == [1, 2, vocab_top, 4, SEP, vocab_top, 0, SEP]
    assert len(again) == 6


def test_bad_files_are_named(tmp_path):
    with pytest.raises(ValueError, match="is not a datastore.*outrider train drafter"):
        Datastore.load(tmp_path)
    np.save(tmp_path / "x.npy", np.zeros((2, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="x.npy.*is not a datastore"):
        Datastore.load(tmp_path / "x.npy")


PROMPT = [5, 17, 3, 42, 8]


def test_suffix_with_a_datastore_is_exact_and_drafts_from_it(tmp_path):
    """The datastore holds the target's own greedy continuation: drafting from it is exact and
    accepts more than the tries alone, which have nothing to match in a fresh request."""
    model = tiny_model("llama")
    answer = greedy(model, PROMPT, 30)
    Datastore.from_sequences([answer]).save(tmp_path / DATASTORE_NAME)
    plain = SpeculativeDecoder.from_pretrained(model, method="suffix", k=8)
    stored = SpeculativeDecoder.from_pretrained(model, method="suffix", k=8, datastore=tmp_path)
    a, b = plain.generate(PROMPT, max_new_tokens=30), stored.generate(PROMPT, max_new_tokens=30)
    assert a.token_ids == b.token_ids == answer
    assert b.stats.accepted > a.stats.accepted and b.stats.steps < a.stats.steps


def test_eagle_suffix_reads_a_datastore_when_given(tmp_path):
    """eagle+suffix drafts from a datastore given by name (a head folder holding one), and from
    none by default, even where the head's folder holds one."""
    model = tiny_model("llama")
    embed = target_embedding(load_model(model).model)
    new_head(model.config, embed, "tiny", torch.arange(50), max_positions=256).save(tmp_path / "head")
    answer = greedy(model, PROMPT, 30)
    Datastore.from_sequences([answer]).save(tmp_path / "head" / DATASTORE_NAME)
    bare = SpeculativeDecoder.from_pretrained(model, draft=tmp_path / "head", method="eagle+suffix", k=3)
    dec = SpeculativeDecoder.from_pretrained(model, draft=tmp_path / "head", method="eagle+suffix", k=3,
                                             datastore=tmp_path / "head")
    assert bare.drafter.suffix.datastore is None and dec.drafter.suffix.datastore is not None
    res = dec.generate(PROMPT, max_new_tokens=30)
    assert res.token_ids == answer
    assert dec.drafter.chose_suffix > 0 and res.stats.steps < bare.generate(PROMPT, max_new_tokens=30).stats.steps


def test_a_datastore_is_refused_where_it_cannot_be_read(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="is not a datastore"):
        SpeculativeDecoder.from_pretrained(model, method="suffix", k=8, datastore=tmp_path)
    Datastore.from_sequences([[1, 2]]).save(tmp_path / DATASTORE_NAME)
    with pytest.raises(ValueError, match="'prompt_lookup' reads no datastore.*'eagle\\+suffix', 'suffix'"):
        SpeculativeDecoder.from_pretrained(model, method="prompt_lookup", k=4, datastore=tmp_path)
    with pytest.raises(ValueError, match="datastore=True is invalid"):
        SpeculativeDecoder.from_pretrained(model, method="suffix", k=8, datastore=True)  # type: ignore[arg-type]


def test_train_answers_fall_back_to_the_cue_or_the_window(tokenizer):
    from test_train_eagle import tiny_tokenizer_with_template
    from outrider.train.datastore import train_answers

    tok = tiny_tokenizer_with_template(tokenizer)
    cued = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    prompt = tok(cued, add_special_tokens=False)["input_ids"]
    rows = torch.tensor([prompt + [11, 12, -1], prompt + [13, -1, -1]])
    assert train_answers({"train": rows}, tok, True, 4) == [[11, 12], [13]]
    assert train_answers({"train": rows}, tok, False, len(prompt) + 1) == [[12]]  # row 2's is empty: dropped
    starts = torch.tensor([len(prompt) + 1, len(prompt)])
    assert train_answers({"train": rows, "train_starts": starts}, tok, True, 4) == [[12], [13]]


def test_a_token_budget_keeps_whole_first_answers(tmp_path, capsys):
    from outrider.cli import main
    from outrider.train.datastore import within_budget

    answers = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    assert within_budget(answers, None) == answers
    assert within_budget(answers, 5) == within_budget(answers, 8) == [[1, 2, 3], [4, 5]]  # [6..9] would cross it
    assert within_budget(answers, 2) == []
    assert main(["train", "datastore", "--target", str(tmp_path), "--runs", str(tmp_path),
                 "--out", str(tmp_path / "d.npy"), "--max-tokens", "0"]) == 2
    assert "--max-tokens 0 is invalid: use a token count >= 1" in capsys.readouterr().err
    assert not (tmp_path / "d.npy").exists()
