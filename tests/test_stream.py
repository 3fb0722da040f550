"""Streaming: text as it is committed, per-token provenance, stop strings."""

from conftest import tiny_model
from outrider import SpeculativeDecoder, SpecStats


def make(model_dirs, method="draft_model", k=3):
    target, draft = model_dirs
    return SpeculativeDecoder.from_pretrained(str(target), draft=str(draft) if method == "draft_model" else None,
                                              method=method, k=k)


def test_stream_matches_generate(model_dirs):
    dec = make(model_dirs)
    res = dec.generate("for i in", max_new_tokens=40)
    stats = SpecStats()
    chunks = list(dec.stream("for i in", max_new_tokens=40, stats=stats))
    assert [t for c in chunks for t in c.token_ids] == res.token_ids
    assert "".join(c.text for c in chunks) == res.text
    assert [f for c in chunks for f in c.drafted] == res.drafted
    assert all(len(c.pieces) == len(c.token_ids) == len(c.drafted) for c in chunks)
    assert stats.new_tokens == len(res.token_ids) and stats.steps == len(chunks)
    # Only the last chunk says why generation ended, and it agrees with generate().
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].finish_reason == res.finish_reason and res.finish_reason in ("length", "eos")


def test_a_request_object_gives_what_keyword_arguments_give(model_dirs):
    from outrider.decoder import GenerationRequest

    dec = make(model_dirs)
    request = GenerationRequest("for i in", max_new_tokens=12, temperature=0.8, top_k=20, seed=3)
    assert dec.generate(request).token_ids == dec.generate("for i in", max_new_tokens=12, temperature=0.8,
                                                           top_k=20, seed=3).token_ids
    assert [t for c in dec.stream(request) for t in c.token_ids] == dec.generate(request).token_ids


def test_each_chunk_is_accepted_drafts_then_one_target_token(model_dirs):
    target, _ = model_dirs
    dec = SpeculativeDecoder.from_pretrained(str(target), draft=str(target), k=3)
    for chunk in dec.stream("def", max_new_tokens=30):
        assert chunk.drafted[-1] is False or len(chunk.token_ids) < 4 or chunk.drafted == [True] * 4
        # Accepted draft tokens come first; the target's own token (recovered/bonus) is last.
        assert chunk.drafted == sorted(chunk.drafted, reverse=True)


def test_multibyte_characters_stream_whole(tokenizer):
    # The stream's pieces are valid text: a character split over byte tokens appears once, whole.
    ids = tokenizer("héllo wörld ✓ 你好")["input_ids"]
    model = tiny_model("llama", seed=0, vocab_size=len(tokenizer))
    dec = SpeculativeDecoder.from_pretrained(model, method="autoregressive", tokenizer=tokenizer)
    text = "".join(c.text for c in dec.stream(ids[:1], max_new_tokens=30))
    assert "\ufffd" not in text or text == tokenizer.decode(dec.generate(ids[:1], max_new_tokens=30).token_ids)
    from outrider.detokenize import Detokenizer

    d = Detokenizer(tokenizer)
    assert "".join(d.push(t) for t in ids) == "héllo wörld ✓ 你好"


def test_stop_string_truncates_text_and_tokens(model_dirs, tokenizer):
    dec = make(model_dirs)
    full = dec.generate("def", max_new_tokens=60)
    # A stop string of plain characters that the model produces (random weights emit stray bytes).
    starts = [i for i in range(2, len(full.text) - 3) if full.text[i : i + 3].isascii() and full.text[i : i + 3].isalnum()]
    assert starts
    stop = full.text[starts[0] : starts[0] + 3]
    res = dec.generate("def", max_new_tokens=60, stop=[stop, "@@never@@"])
    assert len(res.token_ids) < len(full.token_ids)
    assert res.finish_reason == "stop"
    cut = full.text.index(stop)
    assert res.text == full.text[:cut]
    # Tokens up to the one that completed the stop string are kept, no more.
    assert res.token_ids == full.token_ids[: len(res.token_ids)]
    assert stop in tokenizer.decode(res.token_ids) and stop not in tokenizer.decode(res.token_ids[:-1])
    streamed = "".join(c.text for c in dec.stream("def", max_new_tokens=60, stop=stop))
    assert streamed == res.text
