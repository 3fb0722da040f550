import io

from outrider.cli import main
from outrider.demo import run_demo


def test_demo_streams_and_prints_a_measured_table(model_dirs):
    target, draft = model_dirs
    out = io.StringIO()
    rows = run_demo(str(target), str(draft), k=3, max_new_tokens=12, dtype="float32", prompts=("def f(x):\n", "x = 1\n"),
                    out=out)
    text = out.getvalue()
    assert [r.method for r in rows] == ["autoregressive", "draft_model", "prompt_lookup"]
    assert "speedup" in text and "bracketed" in text  # not a terminal: drafted tokens marked with [ ]
    for method in ("autoregressive", "draft_model", "prompt_lookup"):
        assert method in text
    # Greedy float32: every method reproduces the autoregressive output.
    assert all(r.same_as_autoregressive for r in rows)
    assert all(r.stats.new_tokens == 24 or r.stats.new_tokens <= 24 for r in rows)
    ar = rows[0]
    assert ar.stats.tau == 1.0 and ar.stats.drafted == 0


def test_demo_cli_without_stream(model_dirs, capsys):
    target, draft = model_dirs
    assert main(["demo", "--target", str(target), "--draft", str(draft), "--max-new-tokens", "6", "--no-stream"]) == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "Completing" not in out
