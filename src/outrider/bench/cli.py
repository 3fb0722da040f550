"""`outrider bench`: options, and building the reports after a (possibly interrupted) run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from outrider.bench.metrics import BASELINE, Record, summarize
from outrider.bench.peers import known_methods
from outrider.bench.report import write_reports
from outrider.bench.runner import Bench, BenchConfig, config_dict, machine_info, model_dirs


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_draft_length(text: str) -> int | str:
    text = text.strip()
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"draft length {text!r} is neither an integer nor 'auto'")


def _sweep(text: str) -> list[int | str]:
    body = text[2:] if text.startswith("k=") else text
    return [parse_draft_length(x) for x in body.split(",") if x.strip()]


def _sizes(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"batch sizes {text!r} are not integers: use e.g. 1,2,4,8")


def build_parser(parser: argparse.ArgumentParser) -> None:
    """Add `outrider bench` options to parser (a subparser of the outrider CLI)."""
    # Required unless a sub-command (serve) runs instead: checked in run_from_args.
    parser.add_argument("--out", default=None, help="folder for results.jsonl, summary.{json,md} and plots; "
                        "rerunning with the same folder resumes")
    parser.add_argument("--dataset", default=None,
                        help="Spec-Bench question.jsonl (default: a built-in set of Python completion prompts)")
    parser.add_argument("--categories", type=_names, default=None, help="comma-separated categories (default: all)")
    parser.add_argument("--limit-per-category", type=int, default=None, help="at most N questions per category")
    parser.add_argument("--methods", type=_names, default=["autoregressive", "draft_model", "prompt_lookup"],
                        help=f"comma-separated, from: {', '.join(known_methods())} (autoregressive is always run: "
                        "it is the baseline of every speedup)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (outputs compared exactly)")
    parser.add_argument("--repeats", type=int, default=1, help="times each question is run per method")
    parser.add_argument("--k", type=parse_draft_length, default=None,
                        help="draft length, or 'auto' (chosen per step) (default: each method's own)")
    parser.add_argument("--sweep", type=_sweep, default=None, metavar="k=1,2,4,auto",
                        help="run each drafting outrider method once per k; adds speedup vs k and the "
                        "theoretical curve")
    parser.add_argument("--target", default=None, help="target folder (default: the embedded demo pair)")
    parser.add_argument("--draft", default=None, help="draft folder, for draft_model and hf-assisted")
    parser.add_argument("--head", default=None, help="EAGLE head folder for the eagle methods (default: the embedded target's shipped head; with --batch-size, a head shipped for the target)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: as stored)")
    parser.add_argument("--backend", default="auto", help="outrider backend: auto, native, hf or compiled")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--gguf", default=None,
                        help="the target's weights as a GGUF file, for the llamacpp / llamacpp-prompt-lookup peers")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--batch-size", type=_sizes, default=None, metavar="1,2,4,8",
                        help="instead of the per-question bench: throughput of batched decoding at these batch "
                        "sizes, speculation on vs off (batch.{json,md,png})")
    sub = parser.add_subparsers(dest="bench_command", metavar="{serve}")
    from outrider.bench.serve import build_parser as serve_parser

    serve_parser(sub.add_parser("serve", help="load-test an OpenAI-compatible server: TTFT, TPOT, goodput"))


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(
        out=args.out, dataset=args.dataset, categories=args.categories,
        limit_per_category=args.limit_per_category, methods=args.methods, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, repeats=args.repeats, k=args.k, target=args.target, draft=args.draft,
        head=args.head, dtype=args.dtype, backend=args.backend, device=args.device, threads=args.threads, sweep=args.sweep, gguf=args.gguf,
        progress=not args.no_progress,
    )


def build_report(cfg: BenchConfig, records: list[Record]) -> dict[str, Any]:
    """Everything summary.json holds: config, machine, models, and the figures of all records."""
    seen = {r["method"] for r in records}
    methods = [m for m in cfg.methods if m in seen] + sorted(seen - set(cfg.methods))
    target_dir, draft_dir = model_dirs(cfg)
    k: dict[str, int | None] = {}
    precision: dict[str, str | None] = {}
    for r in records:
        k.setdefault(r["method"], r.get("k"))
        precision.setdefault(r["method"], r.get("precision"))
    return {
        "config": config_dict(cfg),
        "dataset": str(cfg.dataset) if cfg.dataset else "built-in code completion",
        "models": {"target": str(target_dir), "draft": str(draft_dir) if draft_dir else None},
        "machine": machine_info(),
        "k": k,
        "precision": precision,
        "prompts_truncated": sum(1 for r in records if r.get("prompt_truncated") and r["method"] == BASELINE),
        "summary": summarize(records, methods),
    }


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Run (or resume) a bench and write its reports; return the report."""
    bench = Bench(cfg)
    try:
        bench.run()
    finally:  # interrupted or failed: the reports still cover every finished record
        report = build_report(cfg, bench.records)
        if bench.records:
            write_reports(Path(cfg.out), report)
    return report


def run_from_args(args: argparse.Namespace) -> int:
    if getattr(args, "bench_command", None) == "serve":
        from outrider.bench.serve import run_from_args as serve_run

        return serve_run(args)
    if args.out is None:
        raise ValueError("outrider bench needs --out FOLDER (results.jsonl, summary.{json,md} and plots go there)")
    cfg = config_from_args(args)
    if args.batch_size is not None:
        from outrider.bench.batching import format_batch_markdown, run_batch_bench
        from outrider.bench.runner import load_questions

        cfg.check()
        if cfg.target is None:  # the embedded pair, draft included
            cfg.target, cfg.draft = (str(p) for p in model_dirs(cfg))
        print(format_batch_markdown(run_batch_bench(cfg, args.batch_size, load_questions(cfg))))
        print(f"Written to {cfg.out}/", file=sys.stderr)
        return 0
    try:
        report = run_bench(cfg)
    except KeyboardInterrupt:
        print(f"\noutrider bench: interrupted; finished records are in {cfg.out}/results.jsonl, "
              "rerun the same command to resume", file=sys.stderr)
        return 130
    from outrider.bench.report import format_markdown

    print(format_markdown(report))
    print(f"Written to {cfg.out}/", file=sys.stderr)
    return 0
