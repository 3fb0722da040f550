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
    from outrider import SpeculativeDecoder
    from outrider.render import legend, render_chunk

    target, _ = model_dirs
    rc = main(["generate", "--target", str(target), "--draft", str(target), "--prompt", "for i in",
               "--max-new-tokens", "10", "--show-drafts"])
    assert rc == 0
    captured = capsys.readouterr()
    streamed, legend_line = captured.out.rstrip("\n").rsplit("\n", 1)
    assert legend_line == legend(False)  # not a terminal: brackets, not colour
    # The streamed text itself (not just the legend) marks each drafted token: it is the same greedy
    # run through the API, rendered chunk by chunk, and that run has drafted tokens with text to mark.
    dec = SpeculativeDecoder.from_pretrained(str(target), draft=str(target))
    chunks = list(dec.stream("for i in", max_new_tokens=10))
    marked = [piece for chunk in chunks for piece, drafted in zip(chunk.pieces, chunk.drafted) if drafted and piece]
    assert len(marked) >= 2  # draft == target: every drafted token is accepted
    assert streamed == "".join(render_chunk(chunk, False) for chunk in chunks)
    assert all(f"[{piece}]" in streamed for piece in marked)
    assert "tau" in captured.err


def test_python_dash_m_outrider_help():
    proc = subprocess.run([sys.executable, "-m", "outrider", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: outrider")
    assert all(command in proc.stdout for command in ("generate", "demo", "bench", "train"))


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


def test_generate_drafts_from_a_datastore(model_dirs, tmp_path, capsys):
    """--datastore FILE feeds the suffix drafter the answers in it (a bad path is named)."""
    from outrider.drafters.datastore import Datastore

    target, _ = model_dirs
    args = ["generate", "--target", str(target), "--method", "suffix", "--prompt-ids", "5,6,7",
            "--max-new-tokens", "16", "--json"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    Datastore.from_sequences([plain["token_ids"]]).save(tmp_path / "answers.npy")
    assert main(args + ["--datastore", str(tmp_path / "answers.npy")]) == 0
    stored = json.loads(capsys.readouterr().out)
    assert stored["token_ids"] == plain["token_ids"]
    assert stored["stats"]["accepted"] > plain["stats"]["accepted"]
    assert main(args + ["--datastore", str(tmp_path / "missing.npy")]) == 2
    assert "missing.npy' is not a datastore" in capsys.readouterr().err
