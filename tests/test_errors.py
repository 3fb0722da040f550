"""Bad input gets a ValueError that names the value and the fix (contract 5)."""

import shutil

import pytest

from conftest import FakeModel, fake_decoder, tiny_model, tiny_tokenizer
from outrider import SpeculativeDecoder


@pytest.fixture(scope="module")
def target():
    return tiny_model("llama", seed=0)


def test_unknown_method_lists_known_ones(target):
    with pytest.raises(ValueError, match=r"unknown method 'medusa2'.*autoregressive.*draft_model.*prompt_lookup"):
        SpeculativeDecoder.from_pretrained(target, method="medusa2")


def test_draft_given_for_autoregressive(target):
    with pytest.raises(ValueError, match="uses no draft model"):
        SpeculativeDecoder.from_pretrained(target, draft=target, method="autoregressive")


def test_draft_model_without_draft(target):
    with pytest.raises(ValueError, match="needs a draft model"):
        SpeculativeDecoder.from_pretrained(target, method="draft_model")


@pytest.mark.parametrize("k", [0, -2])
def test_non_positive_k(target, k):
    with pytest.raises(ValueError, match=f"k={k}"):
        SpeculativeDecoder.from_pretrained(target, method="prompt_lookup", k=k)


def test_vocabulary_mismatch_without_tokenizers(target):
    other = tiny_model("llama", seed=1, vocab_size=100)
    with pytest.raises(ValueError, match=r"target vocabulary \(96\) and draft vocabulary \(100\) differ"):
        SpeculativeDecoder.from_pretrained(target, draft=other)


def test_different_tokenizers_are_refused(tmp_path):
    tok_a, tok_b = tiny_tokenizer(300), tiny_tokenizer(280)
    a = tiny_model("llama", seed=0, vocab_size=300)
    b = tiny_model("llama", seed=1, vocab_size=300)
    with pytest.raises(ValueError, match="different tokenizers"):
        SpeculativeDecoder.from_pretrained(a, draft=b, tokenizer=tok_a, draft_tokenizer=tok_b)


def test_padded_draft_embedding_with_same_tokenizer_is_fine(tokenizer):
    n = len(tokenizer)
    a = tiny_model("llama", seed=0, vocab_size=n)
    b = tiny_model("llama", seed=1, vocab_size=n + 20)  # padded rows past the real vocabulary
    dec = SpeculativeDecoder.from_pretrained(a, draft=b, tokenizer=tokenizer, k=3)
    ref = SpeculativeDecoder.from_pretrained(a, method="autoregressive", tokenizer=tokenizer)
    out = dec.generate("def f", max_new_tokens=12, temperature=1.0, seed=0)
    assert all(t < n for t in out.token_ids)
    assert dec.generate("def f", max_new_tokens=12).token_ids == ref.generate("def f", max_new_tokens=12).token_ids


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"prompt": []}, "prompt is empty"),
        ({"prompt": [1, 2], "max_new_tokens": 0}, "max_new_tokens=0"),
        ({"prompt": [1, 2], "temperature": -0.5}, r"temperature=-0\.5"),
        ({"prompt": [1, 2], "top_p": 1.5}, r"top_p=1\.5"),
        ({"prompt": [1, 2], "top_p": 0.0}, r"top_p=0\.0"),
        ({"prompt": [1, 999]}, r"\[999\] are outside the vocabulary"),
        ({"prompt": list(range(90)) * 3}, "exceeds the target's context of 256 tokens"),
        ({"prompt": [1, 2], "max_new_tokens": 300}, "exceeds the target's context"),
        ({"prompt": "text"}, "needs a tokenizer"),
        ({"prompt": [1, 2], "stop": ["x"]}, "stop strings need a tokenizer"),
    ],
)
def test_bad_generate_arguments(target, kwargs, needle):
    dec = SpeculativeDecoder.from_pretrained(target, method="prompt_lookup")
    with pytest.raises(ValueError, match=needle):
        dec.generate(**kwargs)


def test_empty_text_prompt(model_dirs):
    dec = SpeculativeDecoder.from_pretrained(str(model_dirs[0]), method="autoregressive")
    with pytest.raises(ValueError, match="prompt is empty"):
        dec.generate("")


def test_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        SpeculativeDecoder.from_pretrained(str(tmp_path / "nope"), method="autoregressive")


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="no config.json"):
        SpeculativeDecoder.from_pretrained(str(tmp_path), method="autoregressive")


def test_corrupt_safetensors(tmp_path, model_dirs):
    broken = tmp_path / "broken"
    shutil.copytree(model_dirs[0], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        SpeculativeDecoder.from_pretrained(str(broken), method="autoregressive")


def test_garbage_safetensors_header(tmp_path, model_dirs):
    broken = tmp_path / "garbage"
    shutil.copytree(model_dirs[0], broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="model.safetensors"):
        SpeculativeDecoder.from_pretrained(str(broken), method="autoregressive")


def test_unknown_backend_and_dtype(target):
    with pytest.raises(ValueError, match="backend='tensorrt'"):
        SpeculativeDecoder.from_pretrained(target, method="autoregressive", backend="tensorrt")
    with pytest.raises(ValueError, match="dtype='float8'"):
        SpeculativeDecoder.from_pretrained(target, method="autoregressive", dtype="float8")


def test_stop_strings_must_be_non_empty(model_dirs):
    dec = SpeculativeDecoder.from_pretrained(str(model_dirs[0]), method="autoregressive")
    with pytest.raises(ValueError, match="stop strings must be non-empty"):
        dec.generate("def", stop=[""])


def test_fake_decoder_rejects_negative_k():
    with pytest.raises(ValueError, match="k=-1"):
        fake_decoder(FakeModel(), FakeModel(), k=-1)


# ---- model loading faults (issue 14): each names the file or folder --------------------------------

def test_truncated_config_names_the_folder(tmp_path, model_dirs):
    import shutil

    target, _ = model_dirs
    broken = tmp_path / "target"
    shutil.copytree(target, broken)
    text = (broken / "config.json").read_text()
    (broken / "config.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=str(broken)):
        SpeculativeDecoder.from_pretrained(str(broken), method="autoregressive")


def test_tokenizer_larger_than_the_weights_is_refused(tmp_path, tokenizer):
    from conftest import tiny_model

    small = tiny_model("llama", vocab_size=64)  # the tokenizer has 300 tokens
    small.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match=r"has 300 tokens but the model scores only 64"):
        SpeculativeDecoder.from_pretrained(str(tmp_path / "m"), method="autoregressive")


def test_a_draft_of_another_family_with_another_vocabulary_is_refused(tmp_path, model_dirs):
    from conftest import tiny_model

    target, _ = model_dirs
    gpt2 = tiny_model("gpt2", vocab_size=50)
    gpt2.save_pretrained(tmp_path / "draft")
    with pytest.raises(ValueError, match="vocabulary"):
        SpeculativeDecoder.from_pretrained(str(target), draft=str(tmp_path / "draft"))


@pytest.mark.parametrize("argv, needle", [
    (["--temperature", "nan"], "temperature=nan"),
    (["--top-p", "inf"], "top_p=inf"),
    (["--seed", "-4"], "seed=-4"),
    (["--max-new-tokens", "0"], "max_new_tokens=0"),
])
def test_cli_refuses_bad_values_with_status_2_and_no_traceback(model_dirs, capsys, argv, needle):
    from outrider.cli import main

    target, draft = model_dirs
    code = main(["generate", "--target", str(target), "--draft", str(draft), "--prompt", "def f", *argv])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err
