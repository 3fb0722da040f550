"""The demo-pair training recipe at toy scale: tokenizer, end to end, resume, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from outrider.train import corpus
from outrider.train.recipe import main, train_demo_pair
from outrider.train.tokenizer import decode, encode, train_tokenizer

CODE_SAMPLES = [
    "def f(x):\n\tif x  == 'é':\r\n        return 1   \n\n\n",
    "   leading spaces, trailing tabs\t\t\n",
    "class A:  # 中文 comment\n    '''doc'''\n    pass\n<|endoftext|>tail  ",
    "",
]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("toy")
    report = train_demo_pair(out, scale="toy", threads=1)
    return out, report


def test_tokenizer_round_trips_code(tmp_path: Path) -> None:
    split = corpus.split_files(max_train=6, max_heldout=2, max_file_bytes=30_000)
    tok = train_tokenizer(corpus.read_texts(split.train), 400, tmp_path / "tok")
    # Loaded back through AutoTokenizer, as users will load it.
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    heldout = [corpus.read_text(p) for p in split.heldout]
    for text in CODE_SAMPLES + [t for t in heldout if t]:
        assert decode(tok, encode(tok, text)) == text
        assert loaded.decode(loaded(text, add_special_tokens=False)["input_ids"]) == text
    assert loaded.eos_token == loaded.bos_token == loaded.pad_token == "<|endoftext|>"


def test_corpus_split_is_by_file_and_deterministic() -> None:
    a, b = corpus.split_files(), corpus.split_files()
    assert a.train == b.train and a.heldout == b.heldout
    assert not set(a.train) & set(a.heldout)
    assert all("site-packages" not in p.relative_to(a.root).parts for p in a.train + a.heldout)
    assert 0.005 < len(a.heldout) / (len(a.train) + len(a.heldout)) < 0.05


def test_toy_recipe_exports_load_through_transformers(toy_run: tuple[Path, dict]) -> None:
    out, report = toy_run
    for name in ("target", "draft"):
        folder = out / name
        for file in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
            assert (folder / file).exists(), file
        model = AutoModelForCausalLM.from_pretrained(str(folder))
        tok = AutoTokenizer.from_pretrained(str(folder))
        assert model.dtype == torch.bfloat16
        ids = tok("def main():\n    return 0\n", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        assert logits.shape == (1, ids.shape[1], len(tok))
        assert torch.isfinite(logits).all()
        gen = json.loads((folder / "generation_config.json").read_text())
        assert gen["eos_token_id"] == tok.eos_token_id and gen["do_sample"] is False
    saved = json.loads((out / "report.json").read_text())
    assert saved["models"]["target"]["steps"] == 30 and saved["models"]["draft"]["steps"] == 20
    for key in ("target_loss", "draft_loss", "top1_agreement"):
        assert math.isfinite(saved["evaluation"][key])
    assert saved["corpus"]["heldout_tokens"] > 0 and (out / "report.md").read_text()


def test_rerun_skips_finished_phases_and_extends_from_checkpoint(toy_run: tuple[Path, dict]) -> None:
    out, first = toy_run
    assert first["phases"]["pretrain"]["status"] == "ran"
    again = train_demo_pair(out, scale="toy", measure_acceptance=False)
    for phase in ("tokenizer", "tokenize", "pretrain", "distill"):
        assert again["phases"][phase]["status"] == "skipped", phase
    assert again["models"]["target"]["steps"] == 30
    assert again["evaluation"]["target_loss"] == pytest.approx(first["evaluation"]["target_loss"])
    # A larger budget continues from the checkpoint rather than restarting.
    longer = train_demo_pair(out, scale="toy", target_tokens=40 * 32 * 4, measure_acceptance=False)
    target = longer["models"]["target"]
    assert longer["phases"]["pretrain"]["status"] == "resumed"
    assert (target["resumed_from_step"], target["steps_this_run"], target["steps"]) == (30, 10, 40)


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--scale", "nonsense"], "'nonsense'"),
        (["--scale", "toy", "--target-tokens", "0"], "target_tokens"),
        (["--scale", "toy", "--draft-minutes", "-1"], "-1"),
        (["--scale", "toy", "--threads", "0"], "threads"),
        (["--scale", "toy", "--device", "tpu9"], "'tpu9'"),
    ],
)
def test_bad_input_raises_value_error_naming_it(tmp_path: Path, argv: list[str], named: str) -> None:
    with pytest.raises(ValueError, match=named.replace("-", r"\-")):
        main(["--out", str(tmp_path / "run"), *argv])
