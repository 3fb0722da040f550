"""`outrider bench --batch-size 1,2,4,8`: throughput of batched decoding (batch.py), speculation on
against off, at each batch size.

Every run decodes the same requests (each question's first turn, through the chat template for an
instruction model) with all of them queued at once, so `max_batch` rows run together and a row
that finishes is replaced by the next request (continuous batching). Per batch size, interleaved:
autoregressive (speculation off), then each method with its gate (its normal mode: it speculates
only where that measures faster than plain steps) and without it (every draft verified: what the
gate saves or costs); with --repeats R the whole round runs R
times and each figure is the median run's. Figures per run:
- throughput: new tokens of all requests / wall time of the run;
- per-request tokens/s: the mean of each request's new tokens / its decode time;
- tau and alpha over all rows; and the share of requests whose tokens equal the batch-1
  autoregressive output (1.0 in float32 greedy; bf16 may round near-ties apart).
Written to OUT/batch.json, OUT/batch.md and OUT/batch.png (with matplotlib).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from outrider.bench.datasets import render_prompt

__all__ = ["run_batch_bench", "format_batch_markdown"]


def _run(batch: Any, requests: list[Any]) -> tuple[float, list[Any]]:
    t0 = time.perf_counter()
    results = batch.generate(requests)
    return time.perf_counter() - t0, results


def _figures(label: str, size: int, wall: float, results: list[Any], reference: list[list[int]] | None) -> dict:
    new = sum(len(r.token_ids) for r in results)
    drafted = sum(r.stats.drafted for r in results)
    accepted = sum(r.stats.accepted for r in results)
    steps = sum(r.stats.steps for r in results)
    per_request = [len(r.token_ids) / r.stats.decode_s for r in results if r.stats.decode_s > 0]
    same = None if reference is None else sum(r.token_ids == ref for r, ref in zip(results, reference)) / len(results)
    return {
        "method": label, "batch_size": size, "wall_s": round(wall, 3), "new_tokens": new,
        "throughput_tok_s": round(new / wall, 2),
        "per_request_tok_s": round(statistics.mean(per_request), 2) if per_request else None,
        "tau": round(new / steps, 3) if steps else None,
        "alpha": round(accepted / drafted, 3) if drafted else None,
        "drafted": drafted, "same_as_batch1_autoregressive": same,
    }


def run_batch_bench(cfg: Any, batch_sizes: list[int], questions: list[Any]) -> dict[str, Any]:
    """Run the batch sweep for cfg's target and methods; write and return the report."""
    from outrider.batch import BatchDecoder
    from outrider.decoder import GenerationRequest, SpeculativeDecoder

    bad = [b for b in batch_sizes if not isinstance(b, int) or b < 1]
    if bad or not batch_sizes:
        raise ValueError(f"--batch-size {batch_sizes} is invalid: use integers >= 1, e.g. 1,2,4,8")
    methods = [m for m in cfg.methods if m != "autoregressive"]
    if cfg.threads is not None:
        import torch

        torch.set_num_threads(cfg.threads)
    load = dict(dtype=cfg.dtype, backend="native" if cfg.backend == "auto" else cfg.backend, device=cfg.device)
    decoders = {"autoregressive": SpeculativeDecoder.from_pretrained(cfg.target, method="autoregressive", **load)}
    from outrider.bench.peers import variant_decoder
    from outrider.bench.runner import model_dirs
    from outrider.demo import eagle_head

    draft = model_dirs(cfg)[1]
    head = eagle_head(cfg.target, cfg.head, decoders["autoregressive"])  # given, else one shipped for the target
    for m in methods:  # e.g. eagle@w=2@k=6
        decoders[m] = variant_decoder(m, cfg.target, draft, head, cfg.k, **load)
    tok = decoders["autoregressive"].tokenizer
    requests = [GenerationRequest(render_prompt(tok, q, 0, []), max_new_tokens=cfg.max_new_tokens) for q in questions]
    warm = [GenerationRequest(requests[0].prompt, max_new_tokens=8)]
    rows: list[dict[str, Any]] = []
    reference: list[list[int]] | None = None
    for size in sorted(batch_sizes):
        runs = [("autoregressive", decoders["autoregressive"], False)]
        runs += [(m, decoders[m], True) for m in methods] + [(f"{m} (no gate)", decoders[m], False) for m in methods]
        timed: dict[str, list[tuple[float, list[Any]]]] = {label: [] for label, _, _ in runs}
        for rep in range(cfg.repeats):  # round-robin, so that every run sees the machine alike
            for label, dec, gate in runs:
                # A new batch each run: fresh drafters, so a suffix tree never remembers this run's
                # requests from the one before, and the gate measures afresh.
                batch = BatchDecoder(dec, max_batch=size, gate=gate)
                batch.generate(warm)  # warm-up
                timed[label].append(_run(batch, requests))
                print(f"batch {size} {label} (run {rep + 1}): "
                      f"{sum(len(r.token_ids) for r in timed[label][-1][1]) / timed[label][-1][0]:.1f} tok/s", flush=True)
        for label, _, _ in runs:
            wall, results = sorted(timed[label], key=lambda t: t[0])[(len(timed[label]) - 1) // 2]  # the median run
            if reference is None:
                reference = [r.token_ids for r in results]  # batch 1 autoregressive comes first
            rows.append(_figures(label, size, wall, results, reference))
            rows[-1]["runs"] = len(timed[label])
    base = {r["batch_size"]: r["throughput_tok_s"] for r in rows if r["method"] == "autoregressive"}
    one = base.get(min(batch_sizes))
    for r in rows:
        r["vs_speculation_off"] = round(r["throughput_tok_s"] / base[r["batch_size"]], 3)
        r["vs_batch1_autoregressive"] = round(r["throughput_tok_s"] / one, 3) if one else None
    report = {"target": str(cfg.target), "dtype": cfg.dtype, "requests": len(requests),
              "max_new_tokens": cfg.max_new_tokens, "batch_sizes": sorted(batch_sizes), "rows": rows}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "batch.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "batch.md").write_text(format_batch_markdown(report))
    _plot(out, report)
    return report


def format_batch_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Batched decoding: {report['target']} ({report['dtype'] or 'as stored'}), {report['requests']} requests "
        f"x {report['max_new_tokens']} tokens",
        "",
        "| batch | method | throughput tok/s | vs spec off | vs batch 1 AR | per-request tok/s | tau | alpha | same as AR |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        same = "" if r["same_as_batch1_autoregressive"] is None else f"{r['same_as_batch1_autoregressive']:.0%}"
        lines.append(
            f"| {r['batch_size']} | {r['method']} | {r['throughput_tok_s']:.1f} | {r['vs_speculation_off']:.2f}x | "
            f"{r['vs_batch1_autoregressive']:.2f}x | {r['per_request_tok_s'] or 0:.1f} | {r['tau'] or 1:.2f} | "
            f"{'' if r['alpha'] is None else format(r['alpha'], '.2f')} | {same} |")
    return "\n".join(lines) + "\n"


def _plot(out: Path, report: dict[str, Any]) -> None:
    from outrider.bench.report import _pyplot

    plt = _pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in report["rows"]):
        pts = [(r["batch_size"], r["throughput_tok_s"]) for r in report["rows"] if r["method"] == method]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    ax.set_xlabel("batch size (concurrent requests)")
    ax.set_ylabel("throughput, tokens/s")
    ax.set_xticks(report["batch_sizes"])
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "batch.png", dpi=120)
    plt.close(fig)
