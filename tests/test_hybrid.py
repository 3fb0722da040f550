"""eagle+suffix: the head and the suffix tries in one drafter. Exact under greedy and lossless
under sampling while it switches between them step by step; each really drafts."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from test_e2e_hf import hf_greedy as greedy
from outrider import SpeculativeDecoder
from outrider.adaptive import AdaptiveK
from outrider.drafters.eagle import EagleDrafter, new_head
from outrider.drafters.heads import target_embedding
from outrider.drafters.hybrid import HeadWithSuffix
from outrider.drafters.suffix import SuffixDrafter
from outrider.models import load_model
from outrider.sampling import SamplingParams

PROMPT = [5, 17, 3, 42, 8, 5, 17, 3, 42, 8, 5, 17]  # repeats: the suffix tries match it


def hybrid_decoder(model, backend="auto", k=4, draft_vocab=None, width=1, adaptive=None):
    target = load_model(model, backend=backend)
    embed = target_embedding(target.model)
    V = embed.shape[0]
    d2t = torch.arange(V) if draft_vocab is None else torch.arange(draft_vocab)
    head = new_head(model.config, embed, "tiny", d2t, max_positions=256).to(embed.dtype)
    drafter = HeadWithSuffix(EagleDrafter(head, embed, V, k=k, width=width), SuffixDrafter(k=8, max_depth=24))
    return SpeculativeDecoder(target, drafter, k=k, adaptive=adaptive)


@pytest.mark.parametrize("backend", ["native", "hf"])
@pytest.mark.parametrize("width, k", [(1, 4), (2, 6)])
def test_hybrid_is_exact_under_greedy_and_uses_both(backend, width, k):
    model = tiny_model("llama")
    dec = hybrid_decoder(model, backend, k=k, width=width)
    steps = 0
    for prompt in (PROMPT, [1], [7, 8, 9, 10]):
        res = dec.generate(prompt, max_new_tokens=40)
        assert res.token_ids == greedy(model, prompt, 40)
        steps += res.stats.steps
    assert 0 < dec.drafter.chose_suffix < steps  # some steps from the tries, the others from the head


def test_the_head_reads_only_when_it_drafts_and_drafts_the_same(monkeypatch):
    """On the suffix's steps the head keeps the new hidden states and reads them with the next
    step's: fewer head passes, the same drafts (a later read sees the same pairs)."""
    model = tiny_model("llama")
    passes, drafts = [], []
    propose_rows = EagleDrafter.propose_rows.__func__

    def recorded(cls, heads, steps, wanted=None):
        out = propose_rows(cls, heads, steps, wanted)
        drafts.extend(d.tokens.tolist() for d, w in zip(out, wanted or [True] * len(out)) if w)
        return out

    monkeypatch.setattr(EagleDrafter, "propose_rows", classmethod(recorded))

    def run(keep_for_later: bool):
        dec = hybrid_decoder(model, "native", k=4)
        runner = dec.drafter.head.runner
        real = runner.run_rows
        passes.clear()
        drafts.clear()
        monkeypatch.setattr(runner, "run_rows", lambda feeds: passes.append(len(feeds)) or real(feeds))
        if not keep_for_later:  # the reference: a read every step, drafting or not
            read = EagleDrafter._read_feed
            monkeypatch.setattr(dec.drafter.head, "_read_feed", lambda step, drafts: read(dec.drafter.head, step, True))
        res = [dec.generate(p, max_new_tokens=40) for p in (PROMPT, [7, 8, 9, 10])]
        return [r.token_ids for r in res], list(drafts), len(passes), dec.drafter.chose_suffix

    ids, head_drafts, deferred, chose = run(True)
    ref_ids, ref_drafts, every, _ = run(False)
    assert chose > 0 and ids == ref_ids
    assert head_drafts == ref_drafts and len(head_drafts) > 0  # the head drafted the same tokens each time
    assert deferred < every


def test_min_value_is_validated():
    model = tiny_model("llama")
    dec = hybrid_decoder(model)
    with pytest.raises(ValueError, match="min_value=0"):
        HeadWithSuffix(dec.drafter.head, dec.drafter.suffix, min_value=0)


@pytest.mark.slow
@pytest.mark.parametrize("params", [SamplingParams(0.7, top_p=0.8)], ids=["t0.7-topp0.8"])
def test_hybrid_samples_losslessly(params):
    """Each step's draft is wholly the head's or the tries' (each lossless alone, tested at T=1 and
    T=0.7 with top-p in their own files); this checks the switching between them, at one setting
    (the suite's time budget)."""
    from test_lossless import LLAMA_PROMPT, assert_samples_like_the_llama, soft_tiny_llama

    model = soft_tiny_llama()
    dec = hybrid_decoder(model, "native", k=3, draft_vocab=4)
    assert_samples_like_the_llama(dec, model, params)
    assert dec.drafter.chose_suffix > 0 and dec.generate(LLAMA_PROMPT, max_new_tokens=3, temperature=1.0,
                                                          seed=0).stats.drafted > 0


def test_from_pretrained_reads_the_eagle_head(tmp_path):
    model = tiny_model("llama")
    embed = target_embedding(load_model(model).model)
    new_head(model.config, embed, "tiny", torch.arange(50), max_positions=256).save(tmp_path / "head")
    dec = SpeculativeDecoder.from_pretrained(model, draft=tmp_path / "head", method="eagle+suffix", k=3)
    assert isinstance(dec.drafter, HeadWithSuffix)
    assert dec.generate(PROMPT, max_new_tokens=12).token_ids == greedy(model, PROMPT, 12)


def test_greedy_head_steps_also_verify_the_tries_tree(monkeypatch):
    """Where the head drafts under greedy decoding, the tries' tree rides along as more branches:
    the head's nodes first (their confidences kept), the tries' after (None); the output is the
    target's greedy output either way, and a sampled step never mixes the two."""
    model = tiny_model("llama")
    seen = []
    propose_rows = HeadWithSuffix.propose_rows.__func__

    def recorded(cls, drafters, steps):
        out = propose_rows(cls, drafters, steps)
        seen.extend(out)
        return out

    monkeypatch.setattr(HeadWithSuffix, "propose_rows", classmethod(recorded))

    def merged_drafts(merge: bool, **sampling):
        dec = hybrid_decoder(model, "native", k=4, adaptive=AdaptiveK(k_max=4))  # the head reports confidences
        dec.drafter.merge = merge
        dec.drafter.min_value = 10.0  # the head drafts every step; the tries' trees ride along
        seen.clear()
        ids = [dec.generate(p, max_new_tokens=40, **sampling).token_ids for p in (PROMPT, [7, 8, 9, 10, 7, 8])]
        return ids, [d for d in seen if d.confidences is not None and None in d.confidences]

    ids, merged = merged_drafts(True)
    assert ids == [greedy(model, p, 40) for p in (PROMPT, [7, 8, 9, 10, 7, 8])]
    assert merged, "no step verified the head's and the tries' drafts together"
    for d in merged:
        first = d.confidences.index(None)
        assert all(c is not None for c in d.confidences[:first]) and all(c is None for c in d.confidences[first:])
        assert d.parents[:first].tolist() == list(range(-1, first - 1))  # the head's chain, unchanged, first
    assert merged_drafts(False)[1] == []
    assert merged_drafts(True, temperature=1.0, seed=0)[1] == []
