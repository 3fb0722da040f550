"""Medusa heads: exact under greedy and lossless under sampling with random heads, a product tree
cut by stored acceptance, saved and loaded, refused for another target; trained end to end."""

from __future__ import annotations


import pytest
import torch

from conftest import tiny_model
from test_e2e_hf import hf_greedy as greedy
from outrider import SpeculativeDecoder
from outrider.drafters.heads import target_embedding
from outrider.drafters.medusa import MedusaDrafter, MedusaHeads, new_heads
from outrider.models import load_model
from outrider.sampling import SamplingParams

PROMPT = [5, 17, 3, 42, 8, 5, 17, 3]


def random_heads(model, backend="native", draft_vocab=None, seed=0):
    target = load_model(model, backend=backend)
    embed = target_embedding(target.model)
    V = embed.shape[0]
    d2t = torch.arange(V) if draft_vocab is None else torch.randperm(V, generator=torch.Generator().manual_seed(1))[:draft_vocab]
    heads = new_heads(model.config, embed, model.get_output_embeddings().weight.detach(), "tiny", d2t)
    torch.manual_seed(seed)
    with torch.no_grad():
        for block in heads.blocks:
            block.weight.normal_(std=0.3)
    return target, heads.to(embed.dtype)


@pytest.mark.parametrize("backend", ["native", "hf"])
@pytest.mark.parametrize("k", [1, 6, 12])
def test_medusa_is_exact_under_greedy(backend, k):
    model = tiny_model("llama")
    target, heads = random_heads(model, backend, draft_vocab=50)
    dec = SpeculativeDecoder(target, MedusaDrafter(heads, target.model.vocab_size, k=k), k=k)
    for prompt in (PROMPT, [1], PROMPT * 3):
        res = dec.generate(prompt, max_new_tokens=25)
        assert res.token_ids == greedy(model, prompt, 25)
    assert res.stats.drafted >= res.stats.steps - 1


def test_tree_is_the_best_nodes_of_the_product_by_stored_acceptance():
    model = tiny_model("llama")
    target, heads = random_heads(model)
    from dataclasses import replace

    heads.cfg = replace(heads.cfg, widths=(2, 2, 1, 1), acceptance=((0.9, 0.05), (0.5, 0.4), (0.3,), (0.2,)))
    drafter = MedusaDrafter(heads, target.model.vocab_size, k=5)
    parents, depth, rank = drafter._shape(5)
    # scores: (0,0) .9; (1,0) .45; (1,1) .36; then .135 (2,0 under .45) and .108 (2,0 under .36)
    assert list(zip(parents, depth, rank)) == [(-1, 0, 0), (0, 1, 0), (0, 1, 1), (1, 2, 0), (2, 2, 0)]


@pytest.mark.slow
@pytest.mark.parametrize("params", [SamplingParams(1.0), SamplingParams(0.7, top_p=0.8)], ids=["t1", "t0.7-topp0.8"])
def test_medusa_samples_losslessly(params):
    from test_lossless import V, assert_samples_like_the_llama, soft_tiny_llama

    model = soft_tiny_llama()
    target, heads = random_heads(model, draft_vocab=4)
    assert_samples_like_the_llama(SpeculativeDecoder(target, MedusaDrafter(heads, V, k=6), k=6), model, params)


def test_save_load_and_refuse_another_target(tmp_path):
    model = tiny_model("llama")
    _, heads = random_heads(model)
    heads.save(tmp_path / "m")
    loaded = MedusaHeads.load(tmp_path / "m")
    assert loaded.cfg == heads.cfg
    dec = SpeculativeDecoder.from_pretrained(model, draft=tmp_path / "m", method="medusa", k=6)
    assert dec.generate(PROMPT, max_new_tokens=12).token_ids == greedy(model, PROMPT, 12)
    with pytest.raises(ValueError, match="trained for target 'tiny'"):
        SpeculativeDecoder.from_pretrained(tiny_model("llama", seed=4), draft=tmp_path / "m", method="medusa")
    with pytest.raises(ValueError, match="is not a Medusa heads folder"):
        SpeculativeDecoder.from_pretrained(model, draft=tmp_path, method="medusa")


@pytest.mark.slow
def test_train_medusa_end_to_end(tmp_path, tokenizer):
    from outrider.train.medusa import train_medusa
    from test_train_eagle import tiny_recipe

    recipe = tiny_recipe(tmp_path, tokenizer, 2, "x = {i} + y\n", "heads", 6, 12)
    report = train_medusa(recipe)
    assert report["steps"] > 0 and len(report["heldout_rank_acceptance"]) == 4
    heads = MedusaHeads.load(tmp_path / "heads")
    assert heads.cfg.acceptance is not None and len(heads.cfg.acceptance[0]) == heads.cfg.widths[0]
    dec = SpeculativeDecoder.from_pretrained(str(tmp_path / "target"), draft=str(tmp_path / "heads"), method="medusa",
                                             dtype="float32")
    ref = SpeculativeDecoder.from_pretrained(str(tmp_path / "target"), method="autoregressive", dtype="float32")
    assert dec.generate("x = 3", max_new_tokens=12).token_ids == ref.generate("x = 3", max_new_tokens=12).token_ids
