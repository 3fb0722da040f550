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
