"""Weights and KV cache on 2 MiB pages against 4 KiB pages (models/hugepages.py), in one run: the
target loaded twice, once with huge pages refused, then forwards of 1 and 4 tokens after a
300-token context and plain greedy decoding of the bench's code prompts, the two copies alternating.

    .venv/bin/python benchmarks/hugepages_speed.py --target models/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from drafter_ab import alternate  # benchmarks/: this script's folder
from outrider import SpeculativeDecoder
from outrider.bench.datasets import builtin_code, render_prompt
from outrider.models import hugepages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", required=True)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if hugepages._madvise() is None:
        raise SystemExit("this OS gives no transparent huge pages (Linux with THP 'madvise' or 'always'): nothing to compare")
    decoders = {}
    real = hugepages._madvise
    for arm in ("4k", "2m"):
        hugepages._madvise = (lambda: None) if arm == "4k" else real  # type: ignore[assignment]
        try:
            decoders[arm] = SpeculativeDecoder.from_pretrained(args.target, method="autoregressive", dtype="bfloat16")
        finally:
            hugepages._madvise = real  # type: ignore[assignment]
    ctx = 300
    for dec in decoders.values():
        m = dec.target.model
        m.reset()
        m.forward(torch.randint(0, 1000, (ctx,)), num_logits=0)
    times: dict[tuple[str, int], list[float]] = {}
    for r in range(args.repeats):
        for arm in ("4k", "2m") if r % 2 == 0 else ("2m", "4k"):
            m = decoders[arm].target.model
            for n in (1, 4):
                ids = torch.randint(0, 1000, (n,))
                t = time.perf_counter()
                m.forward(ids)
                times.setdefault((arm, n), []).append(time.perf_counter() - t)
                m.rollback(ctx)
    for n in (1, 4):
        a, b = (statistics.median(times[(arm, n)]) * 1e3 for arm in ("4k", "2m"))
        print(f"forward of {n} token(s) after {ctx}: 4 KiB pages {a:.2f} ms, 2 MiB pages {b:.2f} ms ({a / b:.3f}x)")
    prompts = [render_prompt(decoders["4k"].tokenizer, q, 0, []) for q in builtin_code()]
    rate, _, _ = alternate(decoders, prompts, args.max_new_tokens)
    print(f"plain greedy decoding, {len(prompts)} code prompts: 4 KiB pages {rate['4k']:.1f} tokens/s, "
          f"2 MiB pages {rate['2m']:.1f} tokens/s ({rate['2m'] / rate['4k']:.3f}x)")


if __name__ == "__main__":
    main()
