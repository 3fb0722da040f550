"""Whether torch.compile pays on the native path: compile time and ms per forward, against the
eager path with oneDNN-packed bf16 matmuls (the default on a CPU) and with plain F.linear.

Each model is built three ways from one transformers module; forwards of 1 token (a decode step)
and of 4 tokens (verifying k=3) are timed interleaved over a cache of 64-114 tokens, medians.

    .venv/bin/python benchmarks/compile_speed.py [--models target,draft] [--dtype bfloat16] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from outrider.decoder import embedded_pair_dir
from outrider.models import load_transformers_model, parse_dtype
from outrider.models.llama import NativeLlama


def warm_up(model: NativeLlama) -> float:
    """Seconds for the first forwards of every shape class the decoder uses (this is where
    torch.compile compiles: prefill, single token, a few tokens)."""
    t = time.perf_counter()
    model.reset()
    model.forward(torch.randint(0, model.vocab_size, (64,)), num_logits=1)
    for n in (1, 4, 2, 1, 4):
        model.forward(torch.full((n,), 5))
        model.rollback(64)
    return time.perf_counter() - t


def step_ms(model: NativeLlama, n: int, i: int) -> float:
    model.rollback(64 + i % 50)
    t = time.perf_counter()
    model.forward(torch.full((n,), 5), num_logits=n)
    if model.device.type == "cuda":
        torch.cuda.synchronize()  # kernels run asynchronously: time them, not their launch
    return (time.perf_counter() - t) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="target,draft", help="embedded pair members or model folders")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    print(f"dtype {args.dtype}, {args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'model':8} {'variant':14} {'warm-up s':>9} {'1 tok ms':>9} {'4 tok ms':>9} {'vs packed':>9}")
    for name in args.models.split(","):
        path = embedded_pair_dir() / name if name in ("target", "draft") else name
        hf = load_transformers_model(path, parse_dtype(args.dtype)).to(args.device)
        variants = {
            "eager packed": NativeLlama.from_hf(hf),
            "eager plain": NativeLlama.from_hf(hf, pack=False),
            "compiled": NativeLlama.from_hf(hf, compile=True),
        }
        warm = {v: warm_up(m) for v, m in variants.items()}
        times: dict[str, dict[int, list[float]]] = {v: {1: [], 4: []} for v in variants}
        for i in range(args.iters):  # interleaved, so that machine noise hits every variant alike
            for v, m in variants.items():
                for n in (1, 4):
                    times[v][n].append(step_ms(m, n, i))
        med = {v: {n: statistics.median(ts) for n, ts in by_n.items()} for v, by_n in times.items()}
        ref = med["eager packed"][1]
        for v in variants:
            print(f"{str(name)[-8:]:8} {v:14} {warm[v]:9.1f} {med[v][1]:9.3f} {med[v][4]:9.3f} "
                  f"{ref / med[v][1]:8.2f}x")


if __name__ == "__main__":
    main()
