"""The same code on a GPU: native logits against transformers' and exact greedy speculative
decoding on CUDA. Skipped where no GPU is present (CI has none; benchmarks/gpu_check.sh runs it)."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from outrider import SpeculativeDecoder
from outrider.models.llama import NativeLlama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_native_logits_match_transformers_on_cuda(arch):
    model = tiny_model(arch, seed=0).to("cuda")
    native = NativeLlama.from_hf(model)
    assert native.device.type == "cuda" and not native.packed
    ids = torch.randint(0, native.vocab_size, (40,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids[None].cuda()).logits[0].float()
    out = torch.cat([native.forward(ids[:30]), native.forward(ids[30:31]), native.forward(ids[31:])])
    assert (out - ref).abs().max().item() <= 1e-4


def test_speculative_greedy_is_exact_on_cuda():
    target = tiny_model("llama", seed=0).to("cuda")
    draft = tiny_model("llama", seed=1, num_hidden_layers=1).to("cuda")
    dec = SpeculativeDecoder.from_pretrained(target, draft=draft, k=3, device="cuda")
    prompt = [5, 17, 42, 8]
    expected = target.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=40, do_sample=False,
                               pad_token_id=0, attention_mask=torch.ones(1, 4, dtype=torch.long, device="cuda"))
    assert dec.generate(prompt, max_new_tokens=40).token_ids == expected[0, 4:].tolist()


def test_bf16_on_cuda_runs_close_to_transformers():
    model = tiny_model("qwen2", seed=0).to("cuda", torch.bfloat16)
    native = NativeLlama.from_hf(model)
    ids = torch.randint(0, native.vocab_size, (24,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids[None].cuda()).logits[0].float()
    out = native.forward(ids)
    assert (out - ref).abs().max().item() <= 0.02 * ref.abs().max().item()


def test_train_drafter_runs_on_cuda(tmp_path, tokenizer):
    """`outrider train drafter --device cuda`: self-distillation, features and training on the GPU;
    the head it writes drafts exactly on the CPU."""
    from test_train_eagle import tiny_recipe

    from outrider.train.eagle import train_eagle

    recipe = tiny_recipe(tmp_path, tokenizer, 4, "def f{i}(a, b):\n    return a + {i}", "head", 8, 16)
    report = train_eagle(recipe, torch.device("cuda"))
    assert report["steps"] > 0 and len(report["heldout_acceptance_by_depth"]) == 3
    dec = SpeculativeDecoder.from_pretrained(recipe.target, draft=recipe.out, method="eagle", k=3, dtype="float32")
    ref = SpeculativeDecoder.from_pretrained(recipe.target, method="autoregressive", dtype="float32")
    assert dec.generate("def f3(a, b):\n", max_new_tokens=16).token_ids == ref.generate("def f3(a, b):\n",
                                                                                     max_new_tokens=16).token_ids
