"""Attention of one layer, outrider's kernel against torch's SDPA on the same bf16 inputs, by cached
positions and by what a forward holds: a decode step (1 row), a 9-token chain and a 9-node tree
(verify forwards), a 256-row prefill. Microseconds per layer (median of repeated calls, both
alternating) and the kernel's speed over SDPA's, measured in one run.

    .venv/bin/python benchmarks/attention_speed.py [--heads 9 --kv-heads 3 --head-dim 64] [--contexts 100,500,1000]

The defaults are SmolLM2-135M's shape; the embedded pair's is --heads 6 --kv-heads 6.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from outrider.models import kernels
from outrider.models.llama import sdpa_attend
from outrider.tree import verify_mask

TREE = torch.tensor([-1, 0, 0, 1, 1, 2, 3, 4])  # 8 nodes under the root: a 9-row verify forward


def per_call_us(calls: dict[str, object], repeats: int, inner: int) -> dict[str, float]:
    """Median microseconds per call of each function, the functions alternating round by round."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, f in calls.items():
            t = time.perf_counter()
            for _ in range(inner):
                f()
            times[name].append((time.perf_counter() - t) / inner)
    return {name: statistics.median(ts) * 1e6 for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--contexts", default="100,500,1000")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=11)
    args = ap.parse_args()
    if not kernels.available():
        raise SystemExit(f"outrider's kernels cannot run here: {kernels.unavailable_reason()}")
    torch.set_num_threads(args.threads)
    H, KV, hd = args.heads, args.kv_heads, args.head_dim
    gen = torch.Generator().manual_seed(0)
    print(f"attention, one layer: {H} query heads over {KV} kv heads of {hd}, bf16, {args.threads} threads")
    print("| cached positions | forward | outrider us | SDPA us | outrider / SDPA speed |")
    print("|---:|---|---:|---:|---:|")
    for ctx in (int(c) for c in args.contexts.split(",")):
        kc = torch.randn(KV, ctx + 256, hd, generator=gen).bfloat16()
        vc = torch.randn(KV, ctx + 256, hd, generator=gen).bfloat16()
        tree = torch.ones(9, ctx + 9, dtype=torch.bool)
        tree[:, ctx:] = verify_mask(TREE)
        for label, n, mask in (("decode step", 1, None), ("9-token chain", 9, None), ("9-node tree", 9, tree),
                               ("256-row prefill", 256, None)):
            q = torch.randn(n, H + 2 * KV, hd, generator=gen).bfloat16()
            causal = None
            if mask is None and n > 1:  # SDPA takes the chain's causal rows after the cache as a mask
                causal = torch.arange(ctx + n)[None] <= torch.arange(ctx, ctx + n)[:, None]
            sdpa_mask = mask if mask is not None else causal
            calls = {
                "kernel": lambda q=q, m=mask: kernels.attend(q, kc, vc, ctx, H, m),
                "sdpa": lambda q=q, m=sdpa_mask: sdpa_attend(q, kc, vc, ctx, H, m, False),
            }
            inner = 3 if n == 256 else 30
            per_call_us(calls, 2, inner)  # warm-up
            us = per_call_us(calls, args.repeats, inner)
            print(f"| {ctx} | {label} | {us['kernel']:.1f} | {us['sdpa']:.1f} | {us['sdpa'] / us['kernel']:.2f}x |",
                  flush=True)


if __name__ == "__main__":
    main()
