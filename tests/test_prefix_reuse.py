"""Prefix reuse (models/base.py, reuse_prefix): a request keeps the target's cache of the prefix it
shares with the previous one (a chat's next turn, a shared system prompt) and feeds only the rest.
What a user relies on: the output is the one a full prefill gives (bit for bit where outrider's
kernels run), with self-drafting heads and draft models too, and the cache's record of ids and
hidden states follows rollbacks and tree paths."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from test_e2e_hf import hf_greedy as greedy
from test_eagle import eagle_decoder
from test_kernels import bf16_model
from test_tree_backends import CONTEXT, PARENTS, ROOT, TOKENS, oracle
from outrider import SpeculativeDecoder
from outrider.drafters import Autoregressive, DraftModel
from outrider.models import LoadedModel, kernels, load_model
from outrider.models.base import common_prefix, reuse_prefix
from outrider.models.llama import NativeLlama
from outrider.tree import verify_mask, verify_positions

TURN1 = [5, 17, 3, 42, 8, 5, 17, 3, 9, 60]
TURN2 = [7, 7, 21, 4]


def test_common_prefix():
    t = torch.tensor
    assert common_prefix(t([1, 2, 3]), t([1, 2, 4, 5])) == 2
    assert common_prefix(t([1, 2]), t([1, 2, 3])) == 2
    assert common_prefix(t([9]), t([1])) == 0
    assert common_prefix(t([], dtype=torch.long), t([1])) == 0


def test_the_cache_records_its_ids_and_states_through_rollback_and_tree_paths():
    model = tiny_model("llama")
    m = NativeLlama.from_hf(model)
    m.capture_hidden([1, 2])
    m.forward(torch.tensor(CONTEXT + [ROOT, 70, 71]), num_logits=0)
    m.rollback(len(CONTEXT) + 1)  # the two drafted tokens were rejected
    start = m.length
    m.forward(torch.tensor(TOKENS), attn_mask=verify_mask(PARENTS)[1:, 1:],
              positions=verify_positions(PARENTS, start - 1)[1:])
    m.keep_path(start, [1, 4])  # node 1, then its child 4
    chain = CONTEXT + [ROOT, TOKENS[1], TOKENS[4]]
    assert m.cached_ids().tolist() == chain
    _, hs = oracle(model, chain)
    for row, i in enumerate([1, 2]):
        assert torch.allclose(m.cached_hidden()[row], hs[i], atol=1e-4), i
    assert reuse_prefix(m, torch.tensor(CONTEXT + [ROOT, 99])) == len(CONTEXT) + 1
    assert m.length == len(CONTEXT) + 1
    assert reuse_prefix(m, torch.tensor([1, 2])) == 0 and m.length == 0


def test_changing_the_captured_layers_starts_the_cache_over():
    m = NativeLlama.from_hf(tiny_model("llama"))
    m.forward(torch.tensor(CONTEXT), num_logits=0)
    m.capture_hidden([1])  # the cached positions have no record of layer 1: nothing is reusable
    assert m.length == 0 and m.cached_hidden().shape[1] == 0


def second_turn(dec: SpeculativeDecoder, turn1: list[int], n: int = 24) -> tuple[list[int], object]:
    first = dec.generate(turn1, max_new_tokens=n).token_ids
    res = dec.generate(turn1 + first + TURN2, max_new_tokens=n)
    return turn1 + first + TURN2, res


def record_drafts(dec: SpeculativeDecoder) -> list[list[int]]:
    """The tokens of every draft the decoder's drafter proposes from now on."""
    drafts: list[list[int]] = []
    propose = dec.drafter.propose

    def recording(step):
        draft = propose(step)
        drafts.append(draft.tokens.tolist())
        return draft

    dec.drafter.propose = recording
    return drafts


@pytest.mark.parametrize("method", ["autoregressive", "draft_model", "eagle"])
def test_a_second_turn_feeds_only_its_new_tokens_and_answers_as_a_full_prefill(method):
    model = tiny_model("llama")

    def decoder(reuse: bool) -> SpeculativeDecoder:
        if method == "eagle":
            dec = eagle_decoder(model, "native")
        elif method == "draft_model":
            draft = load_model(tiny_model("llama", seed=1, num_hidden_layers=1), backend="native")
            dec = SpeculativeDecoder(load_model(model, backend="native"), DraftModel(draft.model, 96, k=3), k=3)
        else:
            dec = SpeculativeDecoder(load_model(model, backend="native"), Autoregressive(), k=0)
        dec.reuse_prefix = reuse
        return dec

    runs = []
    for reuse in (True, False):
        dec = decoder(reuse)
        drafts = record_drafts(dec)
        prompt, res = second_turn(dec, TURN1)
        runs.append((res, drafts))
    (reused, reused_drafts), (fresh, fresh_drafts) = runs
    assert fresh.stats.reused_tokens == 0
    # Everything but the new user turn (and the last answer token, never fed) came from the cache.
    assert reused.stats.reused_tokens == len(prompt) - len(TURN2) - 1
    assert reused.token_ids == fresh.token_ids
    if method != "autoregressive":
        # The drafter saw the same prompt state as after a full prefill (the head: the reused
        # tokens' hidden states from the cache's record), so it drafted the same tokens.
        assert reused.stats.drafted > 0
        assert reused_drafts == fresh_drafts


def test_an_unrelated_prompt_reuses_nothing():
    dec = SpeculativeDecoder(load_model(tiny_model("llama"), backend="native"), Autoregressive(), k=0)
    dec.generate(TURN1, max_new_tokens=8)
    assert dec.generate([60] + TURN1, max_new_tokens=8).stats.reused_tokens == 0
    assert dec.generate(TURN1, max_new_tokens=8).stats.reused_tokens == 0  # the cache now holds [60] + ...


@pytest.mark.skipif(not kernels.available(), reason=f"kernels unavailable: {kernels.unavailable_reason()}")
def test_bf16_reuse_and_long_prefills_change_no_bit():
    """A prompt longer than the kernels' attention rows is fed in chunks whose states do not depend
    on where the prompt was cut: a reused prefix and a full prefill give the same bits."""
    hf = bf16_model(num_hidden_layers=4)
    target = NativeLlama.from_hf(hf)
    assert target._fused_layers
    ids = torch.randint(0, 128, (150,), generator=torch.Generator().manual_seed(3))
    target.forward(ids[:149], num_logits=0)
    whole = target.forward(ids[149:])
    for kept in (110, 70):  # as if a previous request had left `kept` of these tokens
        target.rollback(kept)
        target.forward(ids[kept:149], num_logits=0)
        assert torch.equal(target.forward(ids[149:]), whole), kept

    dec = SpeculativeDecoder(LoadedModel(target, None, (), "tiny"), DraftModel(NativeLlama.from_hf(hf), 128, k=4), k=4)
    prompt, reused = second_turn(dec, ids[:120].tolist(), n=40)
    assert reused.stats.reused_tokens > 120
    dec.reuse_prefix = False
    assert dec.generate(prompt, max_new_tokens=40).token_ids == reused.token_ids


@pytest.mark.parametrize("method", ["autoregressive", "eagle"])
def test_the_transformers_backend_reuses_a_prefix_unless_a_head_needs_states_it_does_not_record(method):
    model = tiny_model("gpt2") if method == "autoregressive" else tiny_model("llama")
    if method == "eagle":
        dec = eagle_decoder(model, "hf")
    else:
        dec = SpeculativeDecoder(load_model(model, backend="hf"), Autoregressive(), k=0)
    prompt, res = second_turn(dec, TURN1)
    assert res.token_ids == greedy(model, prompt, 24)
    assert res.stats.reused_tokens == (0 if method == "eagle" else len(prompt) - len(TURN2) - 1)
