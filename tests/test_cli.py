import json
import subprocess
import sys

from outrider.cli import main


def test_generate_json(model_dirs, capsys):
    target, draft = model_dirs
    rc = main(["generate", "--target", str(target), "--draft", str(draft), "--prompt", "def add(a, b):",
               "--max-new-tokens", "12", "--k", "3", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"text", "token_ids", "stats"}
    assert len(out["token_ids"]) <= 12 and out["stats"]["new_tokens"] == len(out["token_ids"])
    assert {"tau", "alpha", "drafted", "accepted", "acceptance_at", "tokens_per_s"} <= set(out["stats"])


def test_generate_prompt_ids_matches_api(model_dirs, capsys):
    from outrider import SpeculativeDecoder

    target, _ = model_dirs
    rc = main(["generate", "--target", str(target), "--method", "prompt_lookup", "--prompt-ids", "5,6,7,5,6",
               "--max-new-tokens", "10", "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "3",
               "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    dec = SpeculativeDecoder.from_pretrained(str(target), method="prompt_lookup")
    ref = dec.generate([5, 6, 7, 5, 6], max_new_tokens=10, temperature=0.8, top_k=20, top_p=0.9, seed=3)
    assert out["token_ids"] == ref.token_ids


def test_generate_streams_text_with_markers(model_dirs, capsys):
    target, _ = model_dirs
    rc = main(["generate", "--target", str(target), "--draft", str(target), "--prompt", "for i in",
               "--max-new-tokens", "10", "--show-drafts"])
    assert rc == 0
    captured = capsys.readouterr()
    assert "[" in captured.out and "bracketed" in captured.out  # all drafts accepted: marked text
    assert "tau" in captured.err


def test_bad_input_exits_non_zero(model_dirs, capsys):
    target, _ = model_dirs
    assert main(["generate", "--target", str(target), "--method", "nope", "--prompt", "x"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert main(["generate", "--target", str(target), "--method", "prompt_lookup", "--prompt", "x",
                 "--max-new-tokens", "0"]) == 2
    assert "max_new_tokens=0" in capsys.readouterr().err


def test_console_script_runs(model_dirs):
    target, _ = model_dirs
    proc = subprocess.run([sys.executable, "-m", "outrider.cli", "generate", "--target", str(target), "--method",
                           "autoregressive", "--prompt-ids", "1,2,3", "--max-new-tokens", "4", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["token_ids"]) <= 4
