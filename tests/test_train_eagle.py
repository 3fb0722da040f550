"""`outrider train drafter --method eagle` end to end on a tiny target, and the pieces it is made
of: self-distilled data, the reduced vocabulary, the unrolled (training-time test) attention."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_model
from outrider import SpeculativeDecoder
from outrider.train.eagle import EagleRecipe, train_eagle, unroll_mask
from outrider.train.selfdistill import frequent_tokens


def test_unroll_mask_follows_the_drafting_chain():
    m = unroll_mask(5, 3, torch.device("cpu"))  # 5 pairs, step 3: keys [step1 | step2 | step3]
    # Pair 4 at depth 3 drafts after true pairs 0..2, then its chain: step 2 at pair 3, itself.
    assert m[4].nonzero().flatten().tolist() == [0, 1, 2, 5 + 3, 10 + 4]
    assert m[2].nonzero().flatten().tolist() == [0, 5 + 1, 10 + 2]
    assert unroll_mask(4, 1, torch.device("cpu"))[:, :4].tril().equal(unroll_mask(4, 1, torch.device("cpu")))


def test_frequent_tokens_are_the_reduced_vocabulary():
    seqs = torch.tensor([[5, 5, 5, 2, 2, 9], [5, 2, 7, 7, 7, 7]])
    assert frequent_tokens(seqs, 3, 10).tolist() == [2, 5, 7]  # 7 x4, 5 x4, 2 x3; ascending ids


def tiny_recipe(tmp_path, tokenizer, layers: int, prompt: str, out: str, prompt_len: int, gen_len: int) -> EagleRecipe:
    """A saved tiny Llama target with the tiny tokenizer, 40 prompts (`prompt` formatted with i) in a
    JSONL file, and a recipe training for 3 s on 24 of them."""
    target = tiny_model("llama", vocab_size=len(tokenizer), num_hidden_layers=layers, eos_token_id=tokenizer.eos_token_id)
    target.save_pretrained(tmp_path / "target")
    tokenizer.save_pretrained(tmp_path / "target")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": prompt.format(i=i)}) + "\n" for i in range(40)))
    return EagleRecipe(target=str(tmp_path / "target"), out=str(tmp_path / out), minutes=0.05, prompts=24,
                       heldout_prompts=8, prompt_len=prompt_len, gen_len=gen_len, draft_vocab=64, gen_batch=8,
                       prompts_file=str(prompts))


@pytest.mark.slow
def test_train_drafter_end_to_end(tmp_path, tokenizer):
    recipe = tiny_recipe(tmp_path, tokenizer, 4, "def f{i}(a, b):\n    return a + {i}", "head", 8, 16)
    report = train_eagle(recipe)
    assert report["steps"] > 0 and report["draft_vocab"] == 64 and len(report["heldout_acceptance_by_depth"]) == 3
    assert all(0.0 <= a <= 1.0 for a in report["heldout_acceptance_by_depth"])
    assert (tmp_path / "head" / "report.md").read_text().startswith("# EAGLE head")
    # Resuming a finished run trains no further and reports the same steps.
    assert train_eagle(recipe)["steps"] == report["steps"]
    dec = SpeculativeDecoder.from_pretrained(str(tmp_path / "target"), draft=str(tmp_path / "head"), method="eagle",
                                             k=3, dtype="float32")
    ref = SpeculativeDecoder.from_pretrained(str(tmp_path / "target"), method="autoregressive", dtype="float32")
    prompt = "def f3(a, b):\n"
    assert dec.generate(prompt, max_new_tokens=16).token_ids == ref.generate(prompt, max_new_tokens=16).token_ids


def test_cli_train_drafter_validates(tmp_path, capsys):
    from outrider.cli import main

    assert main(["train", "drafter", "--target", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
