"""Self-distillation data for chat targets: the seeded sampler that generate() runs through, the
requests a target writes itself (Magpie), and the mix of them with the offline templates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from outrider.sampling import SamplingParams, probs_from_logits
from outrider.train.eagle import EagleRecipe
from outrider.train.rowgen import SeededSampler
from outrider.train.selfdistill import chat_requests
from outrider.train.selfrequests import request_opening, target_requests
from test_train_eagle import tiny_tokenizer_with_template


def test_seeded_sampler_draws_from_the_processed_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0, -3.0]]).expand(4000, -1)
    params = SamplingParams(temperature=0.7, top_k=4)
    scores = SeededSampler(params, seed=1)(None, logits)
    picks = scores.argmax(-1)
    # One finite score per row, so greedy decoding emits exactly the draw.
    assert bool((scores.isfinite().sum(-1) == 1).all())
    p = probs_from_logits(logits[0], params).double()
    p = p / p.sum()
    counts = torch.bincount(picks, minlength=6).numpy()
    assert counts[p.numpy() == 0].sum() == 0  # never outside top-k
    keep = p.numpy() > 0
    assert chisquare(counts[keep], 4000 * p.numpy()[keep]).pvalue > 1e-3
    # A sampler biased toward the argmax would fail the same test at this sample size.
    biased = torch.where(torch.rand(4000, generator=torch.Generator().manual_seed(2)) < 0.1, 0, picks)
    assert chisquare(torch.bincount(biased, minlength=6).numpy()[keep], 4000 * p.numpy()[keep]).pvalue < 1e-3


def test_seeded_sampler_reproduces_with_its_seed():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    draw = lambda seed: SeededSampler(SamplingParams(temperature=1.0), seed)(None, logits).argmax(-1)  # noqa: E731
    assert torch.equal(draw(3), draw(3)) and not torch.equal(draw(3), draw(4))


def test_request_opening_is_the_template_up_to_the_user_message(tokenizer):
    tok = tiny_tokenizer_with_template(tokenizer)
    assert tok.decode(request_opening(tok)) == "<|user|>"


class _Writer:
    """A stand-in target whose generate() writes fixed rows after the opening (cycled)."""

    device = torch.device("cpu")

    def __init__(self, rows: list[list[int]]) -> None:
        self.rows, self.calls = rows, 0

    def generate(self, ids, attention_mask, max_new_tokens, logits_processor, eos_token_id, **kw):
        assert kw["do_sample"] is False and isinstance(logits_processor[0], SeededSampler)
        new = [self.rows[(self.calls + i) % len(self.rows)] for i in range(ids.shape[0])]
        self.calls += ids.shape[0]
        return torch.cat([ids, torch.tensor(new)], dim=1)


def test_target_requests_keep_finished_distinct_requests(tokenizer):
    tok = tiny_tokenizer_with_template(tokenizer)
    eos = tok.eos_token_id
    words = tok("def add greet name", add_special_tokens=False)["input_ids"]
    short = tok("def", add_special_tokens=False)["input_ids"]
    pad = lambda r: (r + [eos] * 8)[:8]  # noqa: E731
    finished = pad(words + [eos])
    unfinished = (words * 8)[:8]  # no EOS within max_tokens: cut off
    too_short = pad(short + [eos])
    writer = _Writer([finished, unfinished, too_short, finished])
    got = target_requests(writer, tok, 5, seed=0, eos=(eos,), batch=4, max_tokens=8)
    assert got == [tok.decode(words, skip_special_tokens=True).strip()]  # once: the repeat is dropped
    assert writer.calls == 16  # gave up after 3n = 15 rows (4 batches of 4)


def test_chat_requests_mix_the_targets_own_share(tokenizer, monkeypatch):
    import outrider.train.selfrequests as sr

    tok = tiny_tokenizer_with_template(tokenizer)
    tok.eos_token = tok.eos_token or "</s>"
    own = [f"own request number {i}" for i in range(100)]
    monkeypatch.setattr(sr, "target_requests", lambda target, tokenizer, n, seed, eos, batch: own[:n])
    monkeypatch.setattr("outrider.train.selfdistill.eos_ids_of", lambda target, tokenizer: (0,))
    # The offline templates read the whole standard library; stand-ins keep this test fast.
    monkeypatch.setattr("outrider.train.instructions.make_instructions",
                        lambda n, heldout, seed: [f"template request {seed} {i}" for i in range(n)])
    recipe = EagleRecipe(target="t", out="o", prompt_len=512, self_requests=0.25)
    rows = chat_requests(tok, recipe, False, 20, seed=0, target=object())
    texts = [tok.decode(r) for r in rows]
    assert len(rows) == 20 and sum("own request" in t for t in texts) == 5
    assert all(t.startswith("<|user|>") and t.endswith("<|assistant|>") for t in texts)
    assert rows == chat_requests(tok, recipe, False, 20, seed=0, target=object())  # seeded order
    # Without a target (or share 0) every request comes from the offline templates.
    assert not any("own request" in tok.decode(r) for r in chat_requests(tok, recipe, False, 20, seed=0))


def test_self_requests_share_is_validated():
    with pytest.raises(ValueError, match="self_requests=1.5"):
        EagleRecipe(target="t", out="o", self_requests=1.5).check()
