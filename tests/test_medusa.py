"""Medusa heads: exact under greedy and lossless under sampling with random heads, a product tree
cut by stored acceptance, saved and loaded, refused for another target; trained end to end."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from conftest import tiny_model
from outrider import SpeculativeDecoder
from outrider.drafters.eagle import target_embedding
from outrider.drafters.medusa import MedusaDrafter, MedusaHeads, new_heads
from outrider.models import load_model
from outrider.sampling import SamplingParams, probs_from_logits

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


def greedy(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0,
                         attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


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


V, H, N = 6, 3, 12000
PROMPT_SMALL = [1, 2, 3, 1, 2]


def exact(model, params):
    out = {}
    with torch.no_grad():
        for seq in itertools.product(range(V), repeat=H):
            logits = model(torch.tensor([PROMPT_SMALL + list(seq)])).logits[0].float()
            prob = 1.0
            for i, t in enumerate(seq):
                prob *= float(probs_from_logits(logits[len(PROMPT_SMALL) - 1 + i], params)[t])
            out[seq] = prob
    return out


@pytest.mark.slow
@pytest.mark.parametrize("params", [SamplingParams(1.0), SamplingParams(0.7, top_p=0.8)], ids=["t1", "t0.7-topp0.8"])
def test_medusa_samples_losslessly(params):
    from test_lossless import P_REJECT, chi_square_p_value, sample_exact

    model = tiny_model("llama", vocab_size=V)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(0.5)
    target, heads = random_heads(model, draft_vocab=4)
    dec = SpeculativeDecoder(target, MedusaDrafter(heads, V, k=6), k=6)
    counts: dict = {}
    for seed in range(N):
        ids = tuple(dec.generate(PROMPT_SMALL, max_new_tokens=H, temperature=params.temperature,
                                 top_p=params.top_p, seed=seed).token_ids)
        counts[ids] = counts.get(ids, 0) + 1
    dist = exact(model, params)
    assert chi_square_p_value(counts, dist, N) > P_REJECT
    other = tiny_model("llama", vocab_size=V, seed=3)
    with torch.no_grad():
        other.get_output_embeddings().weight.mul_(0.5)
    odist = exact(other, params)
    mixed = {s: 0.8 * dist[s] + 0.2 * odist[s] for s in dist}
    assert chi_square_p_value(sample_exact(mixed, seed=0), dist, N) < P_REJECT


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
    from outrider.train.eagle import EagleRecipe
    from outrider.train.medusa import train_medusa

    target = tiny_model("llama", vocab_size=len(tokenizer), num_hidden_layers=2, eos_token_id=tokenizer.eos_token_id)
    target.save_pretrained(tmp_path / "target")
    tokenizer.save_pretrained(tmp_path / "target")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"x = {i} + y\n"}) + "\n" for i in range(40)))
    recipe = EagleRecipe(target=str(tmp_path / "target"), out=str(tmp_path / "heads"), minutes=0.05, prompts=24,
                         heldout_prompts=8, prompt_len=6, gen_len=12, draft_vocab=64, gen_batch=8,
                         prompts_file=str(prompts))
    report = train_medusa(recipe)
    assert report["steps"] > 0 and len(report["heldout_rank_acceptance"]) == 4
    heads = MedusaHeads.load(tmp_path / "heads")
    assert heads.cfg.acceptance is not None and len(heads.cfg.acceptance[0]) == heads.cfg.widths[0]
    dec = SpeculativeDecoder.from_pretrained(str(tmp_path / "target"), draft=str(tmp_path / "heads"), method="medusa",
                                             dtype="float32")
    ref = SpeculativeDecoder.from_pretrained(str(tmp_path / "target"), method="autoregressive", dtype="float32")
    assert dec.generate("x = 3", max_new_tokens=12).token_ids == ref.generate("x = 3", max_new_tokens=12).token_ids
