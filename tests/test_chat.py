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
