"""Chat messages go through the model's chat template (or one given), with errors that name the fix."""

from __future__ import annotations

import pytest

from outrider import SpeculativeDecoder
from outrider.decoder import GenerationRequest

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "def add(a, b):"}]


@pytest.fixture(scope="module")
def decoder(model_dirs):
    return SpeculativeDecoder.from_pretrained(model_dirs[0], method="prompt_lookup", dtype="float32", k=4)


def test_messages_are_rendered_by_the_template_and_generate_as_that_prompt(decoder):
    decoder.chat_template = TEMPLATE
    try:
        ids = decoder.chat_ids(MESSAGES)
        text = decoder.tokenizer.decode(ids)
        assert text == "<|system|>be brief\n<|user|>def add(a, b):\n<|assistant|>"
        chat = decoder.generate(messages=MESSAGES, max_new_tokens=12)
        plain = decoder.generate(ids, max_new_tokens=12)
        assert chat.token_ids == plain.token_ids
        streamed = [t for c in decoder.stream(messages=MESSAGES, max_new_tokens=12) for t in c.token_ids]
        assert streamed == plain.token_ids
    finally:
        decoder.chat_template = None


def test_tokenizer_template_is_used_and_override_wins(decoder):
    decoder.tokenizer.chat_template = TEMPLATE
    try:
        assert decoder.tokenizer.decode(decoder.chat_ids(MESSAGES)).startswith("<|system|>")
        decoder.chat_template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
        assert decoder.tokenizer.decode(decoder.chat_ids(MESSAGES)) == "[be brief][def add(a, b):]"
    finally:
        decoder.tokenizer.chat_template = None
        decoder.chat_template = None


def test_model_without_template_names_the_fix(decoder):
    with pytest.raises(ValueError, match="no chat template.*chat_template"):
        decoder.generate(messages=MESSAGES, max_new_tokens=4)


def test_chat_template_file_is_read(model_dirs, tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text(TEMPLATE)
    dec = SpeculativeDecoder.from_pretrained(model_dirs[0], method="prompt_lookup", chat_template=str(path))
    assert dec.chat_template == TEMPLATE
    with pytest.raises(ValueError, match="does not exist"):
        SpeculativeDecoder.from_pretrained(model_dirs[0], method="prompt_lookup", chat_template=tmp_path / "no")


@pytest.mark.parametrize("kwargs, match", [
    ({}, "exactly one of prompt"),
    ({"prompt": "x", "messages": MESSAGES}, "exactly one of prompt"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "user"}]}, r"messages\[0\]"),
    ({"messages": [{"role": "user", "content": 3}]}, r"messages\[0\]"),
    ({"messages": "hello"}, "non-empty list"),
])
def test_bad_requests_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GenerationRequest(**kwargs)


def test_cli_generate_chat_equals_the_api(decoder, model_dirs, tmp_path, capsys):
    from outrider.cli import main

    template = tmp_path / "t.jinja"
    template.write_text(TEMPLATE)
    args = ["generate", "--target", str(model_dirs[0]), "--method", "prompt_lookup", "--k", "4", "--dtype", "float32",
            "--max-new-tokens", "10", "--chat", "--prompt", "def add(a, b):", "--chat-template", str(template), "--json"]
    assert main(args) == 0
    import json

    got = json.loads(capsys.readouterr().out)["token_ids"]
    decoder.chat_template = TEMPLATE
    try:
        want = decoder.generate(messages=[{"role": "user", "content": "def add(a, b):"}], max_new_tokens=10).token_ids
    finally:
        decoder.chat_template = None
    assert got == want
    assert main(args[:-3] + ["--json"]) == 2  # the tiny model has no template of its own
    assert "no chat template" in capsys.readouterr().err


def test_cli_chat_keeps_the_conversation(model_dirs, tmp_path, capsys, monkeypatch):
    import io

    from outrider.cli import main

    template = tmp_path / "t.jinja"
    template.write_text(TEMPLATE)
    seen = []
    from outrider.decoder import SpeculativeDecoder as Dec

    original = Dec.chat_ids
    monkeypatch.setattr(Dec, "chat_ids", lambda self, m: seen.append([dict(x) for x in m]) or original(self, m))
    monkeypatch.setattr("sys.stdin", io.StringIO("def add(a, b):\nagain\n"))
    assert main(["chat", "--target", str(model_dirs[0]), "--method", "prompt_lookup", "--dtype", "float32",
                 "--max-new-tokens", "6", "--chat-template", str(template), "--system", "be brief"]) == 0
    out = capsys.readouterr()
    assert out.err.count("tokens/s") == 2 and len(out.out.strip().splitlines()) >= 1
    last = seen[-1]  # the second turn's prompt holds the system line, turn 1, its answer, and turn 2
    assert [m["role"] for m in last] == ["system", "user", "assistant", "user"]
    assert last[1]["content"] == "def add(a, b):" and last[3]["content"] == "again"
