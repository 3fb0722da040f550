"""GGUF in: tiny files written like llama.cpp's converter writes them load back exactly, generate
exactly what transformers generates on the same (dequantized) weights, convert to a folder, and are
refused with the reason when they cannot be read."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from outrider import SpeculativeDecoder
from outrider.models.gguf import convert_gguf, load_gguf

from conftest import tiny_model
from tiny_gguf import write_tiny_gguf

pytest.importorskip("gguf")
TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}<|assistant|>"
PROMPT = "def add(a, b):\n    return"


@pytest.fixture(scope="module")
def original(tokenizer):
    return tiny_model("llama", seed=3, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id)


@pytest.fixture(scope="module")
def f32_file(original, tokenizer, tmp_path_factory):
    return write_tiny_gguf(original, tokenizer, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf",
                           chat_template=TEMPLATE)


def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_f32_file_round_trips_weights_tokenizer_template_and_eos(f32_file, original, tokenizer):
    model, tok = load_gguf(f32_file)
    ref = original.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, ref[name]), name  # q/k un-permuted exactly
    assert tok(PROMPT)["input_ids"] == tokenizer(PROMPT)["input_ids"]
    assert tok.chat_template == TEMPLATE
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id


@pytest.mark.parametrize("method, backend", [("prompt_lookup", "native"), ("autoregressive", "hf")])
def test_greedy_output_equals_transformers_on_the_original(f32_file, original, tokenizer, method, backend):
    dec = SpeculativeDecoder.from_pretrained(str(f32_file), method=method, dtype="float32", backend=backend)
    ids = tokenizer(PROMPT)["input_ids"]
    got = dec.generate(ids, max_new_tokens=24)
    want = _hf_greedy(original, ids, 24)
    eos = tokenizer.eos_token_id
    cut = want.index(eos) + 1 if eos in want else len(want)
    assert got.token_ids == want[:cut]
    assert dec.chat_ids([{"role": "user", "content": "hi"}])  # the file's template is in use


def test_quantized_file_generates_what_transformers_does_on_its_dequantized_weights(original, tokenizer, tmp_path):
    path = write_tiny_gguf(original, tokenizer, tmp_path / "tiny-q8.gguf", qtype="Q8_0")
    dequantized, _ = load_gguf(path)
    w, ref = dequantized.model.layers[0].mlp.up_proj.weight, original.model.layers[0].mlp.up_proj.weight
    assert not torch.equal(w, ref) and torch.allclose(w, ref, atol=0.05)  # really quantized, and close
    dec = SpeculativeDecoder.from_pretrained(str(path), method="prompt_lookup", dtype="float32")
    ids = tokenizer(PROMPT)["input_ids"]
    want = _hf_greedy(dequantized, ids, 20)
    eos = tokenizer.eos_token_id
    assert dec.generate(ids, max_new_tokens=20).token_ids == want[: want.index(eos) + 1 if eos in want else 20]


def test_convert_writes_a_folder_that_loads_the_same(f32_file, tmp_path):
    out = convert_gguf(f32_file, tmp_path / "tiny", dtype=torch.float32)
    a = SpeculativeDecoder.from_pretrained(str(out), method="autoregressive", dtype="float32")
    b = SpeculativeDecoder.from_pretrained(str(f32_file), method="autoregressive", dtype="float32")
    assert a.generate(PROMPT, max_new_tokens=12).token_ids == b.generate(PROMPT, max_new_tokens=12).token_ids
    assert a.tokenizer.chat_template == TEMPLATE
    assert not (tmp_path / "tiny.partial").exists()
    with pytest.raises(ValueError, match="already holds a model"):
        convert_gguf(f32_file, out)


def test_cli_convert(f32_file, tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "outrider", "convert", str(f32_file), "--out", str(out),
                           "--dtype", "float32"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (out / "config.json").is_file() and str(out) in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "outrider", "convert", str(tmp_path / "none.gguf"), "--out",
                          str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr


def test_unreadable_files_are_refused_with_the_reason(original, tokenizer, f32_file, tmp_path):
    q81 = write_tiny_gguf(original, tokenizer, tmp_path / "q81.gguf", qtype="Q8_1")
    with pytest.raises(ValueError, match="type Q8_1.*cannot be dequantized"):
        load_gguf(q81)
    other = write_tiny_gguf(original, tokenizer, tmp_path / "other.gguf", arch="rwkv9")
    with pytest.raises(ValueError, match="architecture 'rwkv9'"):
        load_gguf(other)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(f32_file.read_bytes()[: f32_file.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_gguf(cut)
    with pytest.raises(ValueError, match="does not exist"):
        SpeculativeDecoder.from_pretrained(str(tmp_path / "missing.gguf"))
