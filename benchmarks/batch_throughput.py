"""Throughput of batched decoding (BatchDecoder, every draft verified) by batch size: the same
requests (short chat requests, half greedy and half sampled) decoded at each batch size, tokens/s
counting prefill and decode, and the ratio to batch 1, measured in one run.

    .venv/bin/python benchmarks/batch_throughput.py --target models/SmolLM2-135M-Instruct [--batches 1,16,64] [--method autoregressive]
"""

from __future__ import annotations

import argparse
import time

import torch

from outrider import BatchDecoder, GenerationRequest, SpeculativeDecoder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True)
    ap.add_argument("--head", default=None, help="a head folder for eagle methods")
    ap.add_argument("--method", default="autoregressive")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    subjects = ["cat", "robot", "teacher", "farmer", "pilot", "child", "doctor", "king"]
    skills = ["swim", "sing", "cook", "paint", "code", "fly", "read", "dance"]
    reqs = [GenerationRequest(messages=[{"role": "user", "content": f"Write a short story about a {a} who learns to {b}."}],
                              max_new_tokens=args.max_new_tokens, temperature=0.0 if i % 2 == 0 else 0.8, seed=i)
            for i, (a, b) in enumerate((a, b) for a in subjects for b in skills)][: args.requests]
    base = None
    for size in (int(b) for b in args.batches.split(",")):
        dec = SpeculativeDecoder.from_pretrained(args.target, draft=args.head, method=args.method, dtype="bfloat16")
        batch = BatchDecoder(dec, max_batch=size, gate=False)
        batch.generate(reqs[:size])  # warm-up
        t0 = time.perf_counter()
        results = batch.generate(reqs)
        rate = sum(len(r.token_ids) for r in results) / (time.perf_counter() - t0)
        base = base or rate
        print(f"batch {size:3d}: {rate:7.1f} tokens/s  {rate / base:.2f}x batch {args.batches.split(',')[0]}")


if __name__ == "__main__":
    main()
