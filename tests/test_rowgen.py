"""train/rowgen.py: the training data's continuations written on the native engine, many rows at
once, each row as the target decodes it alone."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from outrider.models import kernels
from outrider.models.llama import NativeLlama
from outrider.sampling import SamplingParams
from outrider.train.rowgen import continue_rows, native_engine
from outrider.train.selfdistill import self_distill

needs_kernels = pytest.mark.skipif(not kernels.available(), reason=f"kernels unavailable: {kernels.unavailable_reason()}")


def tiny(dtype: torch.dtype) -> torch.nn.Module:
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, bos_token_id=None, eos_token_id=None,
                      pad_token_id=None)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval().to(dtype)


def alone_greedy(model: torch.nn.Module, prompt: list[int], n: int, eos: tuple[int, ...]) -> list[int]:
    """One sequence's greedy continuation, one token per forward."""
    m = NativeLlama.from_hf(model, capacity=128)
    logits = m.forward(torch.tensor(prompt), num_logits=1)
    out: list[int] = []
    while len(out) < n:
        out.append(int(logits[-1].argmax()))
        if out[-1] in eos:
            break
        logits = m.forward(torch.tensor(out[-1:]))
    return out


@needs_kernels
def test_greedy_rows_are_each_rows_own_greedy_decode_and_stop_at_eos():
    model = tiny(torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 96, (n,), generator=gen).tolist() for n in (5, 17, 9, 30, 2)]
    plain = [alone_greedy(model, p, 24, ()) for p in prompts]
    eos = (plain[1][6],)  # a token row 1 writes 7th: that row ends there, EOS kept
    engine = native_engine(model, 64)
    assert engine is not None and engine.kernels
    got = continue_rows(engine, prompts, 24, SamplingParams(), None, eos)
    for p, row in zip(prompts, got):
        assert row == alone_greedy(model, p, 24, eos)
    assert got[1] == plain[1][: plain[1].index(eos[0]) + 1] and len(got[1]) <= 7
    assert any(len(r) == 24 for r in got)  # rows without that token run to max_new


@needs_kernels
def test_sampled_rows_repeat_with_their_seed():
    model = tiny(torch.bfloat16)
    engine = native_engine(model, 64)
    prompts = [[3, 4, 5], [7, 1], [9, 9, 9, 2]]
    params = SamplingParams(temperature=1.0)
    a = continue_rows(engine, prompts, 20, params, torch.Generator().manual_seed(5))
    b = continue_rows(engine, prompts, 20, params, torch.Generator().manual_seed(5))
    c = continue_rows(engine, prompts, 20, params, torch.Generator().manual_seed(6))
    assert a == b and a != c
    assert all(len(r) == 20 for r in a)


def test_models_the_kernels_do_not_run_go_to_generate():
    """float32 (or a GPU, or a model type the native backend lacks): no engine, and self_distill
    writes the rows with transformers' generate as before."""
    model = tiny(torch.float32)
    assert native_engine(model, 64) is None
    rows = self_distill(model, [[1, 2, 3], [4, 5]], 6, batch=2, seed=0)
    assert rows.shape == (2, 9) and rows[1, :3].tolist() == [1, 2, 3]  # shorter prompts first


@needs_kernels
def test_self_distill_writes_bf16_rows_on_the_engine_not_generate(monkeypatch):
    model = tiny(torch.bfloat16)

    def refuse(*args, **kwargs):
        raise AssertionError("generate was called")

    monkeypatch.setattr(model, "generate", refuse)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    probe = torch.tensor([[1, 2, 3, 4, 5]])
    before = model(probe).logits
    rows = self_distill(model, prompts, 6, batch=2, seed=0)  # batch 0 greedy, batch 1 sampled
    assert torch.equal(model(probe).logits, before)  # training then reads the module's own features
    assert rows.shape == (3, 10)
    order = sorted(range(3), key=lambda i: len(prompts[i]))  # self_distill batches by prompt length
    first = order[0]
    assert rows[0, : len(prompts[first])].tolist() == prompts[first]
    assert rows[0, len(prompts[first]) :].tolist()[:6] == alone_greedy(model, prompts[first], 6, ())
