"""Tier 2: the loop with fake modules of fixed logits: always / never / partly accepted drafts,
max_new_tokens and EOS edges, and cache rollback."""

import pytest
import torch

from conftest import FakeModel, fake_decoder


def greedy_reference(model: FakeModel, prompt: list[int], n: int, eos: tuple[int, ...] = ()) -> list[int]:
    seq = list(prompt)
    out = []
    for _ in range(n):
        t = int(model.logits_for(seq).argmax())
        seq.append(t)
        out.append(t)
        if t in eos:
            break
    return out


PROMPT = [1, 2, 3, 4]


@pytest.mark.parametrize("k", [1, 2, 4, 7])
def test_always_accepted_when_draft_is_target(k):
    target = FakeModel(vocab_size=8, seed=0)
    draft = FakeModel(vocab_size=8, seed=0)
    res = fake_decoder(target, draft, k).generate(PROMPT, max_new_tokens=30)
    assert res.token_ids == greedy_reference(target, PROMPT, 30)
    assert res.stats.alpha == 1.0
    assert res.stats.accepted_at == res.stats.drafted_at
    # Each full step commits k+1 tokens; only the last step may be shortened by max_new_tokens.
    assert res.stats.steps == -(-30 // (k + 1))
    assert res.stats.new_tokens == 30


def test_never_accepted_still_gives_target_output():
    target = FakeModel(vocab_size=8, seed=0)

    class Contrarian(FakeModel):
        def logits_for(self, context):  # always proposes a token the target does not pick
            bad = (int(target.logits_for(context).argmax()) + 1) % 8
            return torch.nn.functional.one_hot(torch.tensor(bad), 8).float()

    res = fake_decoder(target, Contrarian(vocab_size=8), k=3).generate(PROMPT, max_new_tokens=20)
    assert res.token_ids == greedy_reference(target, PROMPT, 20)
    assert res.stats.accepted == 0 and res.stats.alpha == 0.0
    assert res.stats.tau == 1.0
    assert all(not d for d in res.drafted)


def test_partly_accepted_matches_target_and_counts_add_up():
    target = FakeModel(vocab_size=4, seed=0, scale=1.0)
    draft = FakeModel(vocab_size=4, seed=5, scale=1.0)
    res = fake_decoder(target, draft, k=3).generate(PROMPT[:2], max_new_tokens=40)
    assert res.token_ids == greedy_reference(target, PROMPT[:2], 40)
    s = res.stats
    assert 0 < s.accepted < s.drafted
    assert s.new_tokens == len(res.token_ids) == 40
    assert sum(s.accepted_at) == s.accepted and sum(s.drafted_at) == s.drafted
    assert s.new_tokens == s.accepted + s.steps  # every step commits accepted + 1
    assert sum(res.drafted) == s.accepted
    assert s.acceptance_at[0] >= s.acceptance_at[-1] - 1e-9 or s.drafted_at[-1] < 5


@pytest.mark.parametrize("max_new", [1, 2, 3, 4, 5, 9])
def test_max_new_tokens_is_exact(max_new):
    target = FakeModel(vocab_size=8, seed=0)
    res = fake_decoder(target, FakeModel(vocab_size=8, seed=0), k=4).generate(PROMPT, max_new_tokens=max_new)
    assert res.token_ids == greedy_reference(target, PROMPT, max_new)
    assert res.finish_reason == "length"


def test_eos_ends_generation_inside_an_accepted_draft():
    target = FakeModel(vocab_size=8, seed=0)
    ref = greedy_reference(target, PROMPT, 30)
    eos = ref[5]  # a token first produced mid-generation, likely inside an accepted draft
    first = ref.index(eos)
    res = fake_decoder(target, FakeModel(vocab_size=8, seed=0), k=4, eos=(eos,)).generate(PROMPT, max_new_tokens=30)
    assert res.token_ids == ref[: first + 1]
    assert res.finish_reason == "eos"
    assert res.stats.new_tokens == first + 1


def test_caches_hold_exactly_the_committed_tokens():
    target = FakeModel(vocab_size=4, seed=0, scale=1.0)
    draft = FakeModel(vocab_size=4, seed=5, scale=1.0)
    dec = fake_decoder(target, draft, k=3)
    committed = list(PROMPT[:3])
    for chunk in dec.stream(PROMPT[:3], max_new_tokens=25):
        committed += chunk.token_ids
        # The target has seen every committed token but the newest one (fed with the next draft).
        assert target.tokens == committed[:-1]
        # The draft holds a prefix of the committed tokens, never a rejected draft token.
        assert draft.tokens == committed[: len(draft.tokens)]
        assert len(draft.tokens) >= len(committed) - 2


def test_draft_model_never_recomputes_context():
    target = FakeModel(vocab_size=8, seed=0)
    draft = FakeModel(vocab_size=8, seed=0)
    fed = []
    forward = draft.forward

    def counting_forward(ids, num_logits=None):
        fed.append(ids.shape[0])
        return forward(ids, num_logits)

    draft.forward = counting_forward
    prompt = list(range(8)) * 4
    fake_decoder(target, draft, k=3).generate(prompt, max_new_tokens=24)
    assert fed[0] == len(prompt) - 1  # prefill once
    assert max(fed[1:]) <= 2  # afterwards only unseen committed tokens or one draft token


def test_seeded_sampling_is_reproducible():
    target, draft = FakeModel(vocab_size=6, seed=0, scale=1.0), FakeModel(vocab_size=6, seed=1, scale=1.0)
    dec = fake_decoder(target, draft, k=3)
    a = dec.generate(PROMPT, max_new_tokens=30, temperature=1.0, seed=7).token_ids
    b = dec.generate(PROMPT, max_new_tokens=30, temperature=1.0, seed=7).token_ids
    c = dec.generate(PROMPT, max_new_tokens=30, temperature=1.0, seed=8).token_ids
    assert a == b and a != c
