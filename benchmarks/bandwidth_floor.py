"""Where a decode step stands against the memory-bandwidth floor (weight bytes / bandwidth).

Bandwidth is measured as a streaming read (sum) of a buffer far larger than the caches; the decode
step is the median one-token forward of the target on outrider's backend, timed here too.

    .venv/bin/python benchmarks/bandwidth_floor.py [--target DIR] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from outrider.decoder import embedded_pair_dir
from outrider.models import load_model


def read_bandwidth(n_bytes: int = 1 << 30, repeats: int = 7) -> float:
    buf = torch.ones(n_bytes // 4, dtype=torch.float32)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - t)
    return n_bytes / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default=str(embedded_pair_dir() / "target"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--backend", default="auto")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.target, backend=args.backend)
    model = loaded.model
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(args.target, dtype="auto")
    weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    del hf
    bw = read_bandwidth()
    ids = torch.arange(64) % model.vocab_size
    model.reset()
    model.forward(ids, num_logits=0)
    steps = []
    for i in range(200):
        t = time.perf_counter()
        model.forward(ids[i % 64 : i % 64 + 1], num_logits=1)
        steps.append(time.perf_counter() - t)
        if model.length >= 1000:
            model.rollback(64)
    step = statistics.median(steps)
    floor = weight_bytes / bw
    print(f"{args.target}: {weight_bytes / 1e6:.1f} MB of weights, {torch.get_num_threads()} threads, "
          f"backend {type(model).__name__}")
    print(f"read bandwidth {bw / 1e9:.1f} GB/s -> floor {floor * 1e3:.2f} ms per decode step")
    print(f"measured decode step {step * 1e3:.2f} ms = {step / floor:.1f}x the floor")


if __name__ == "__main__":
    main()
