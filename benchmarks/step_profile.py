"""Where a native decode step's time goes: the median one-token step at a given context, and a
torch-profiler table of its ops (calls and self time per step).

    .venv/bin/python benchmarks/step_profile.py --target models/SmolLM2-135M-Instruct [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from outrider.models import load_model


def step_times(model, context: int, steps: int) -> list[float]:
    ids = torch.randint(0, model.vocab_size, (context,), generator=torch.Generator().manual_seed(0))
    model.reset()
    model.forward(ids, num_logits=1)
    token = ids[-1:]
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        model.forward(token, num_logits=1)
        times.append(time.perf_counter() - t)
        model.rollback(context)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--profile", action="store_true", help="also print the op table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.target, dtype=args.dtype, backend="native").model
    step_times(model, args.context, 5)  # warm-up
    times = step_times(model, args.context, args.steps)
    print(f"decode step at context {args.context}: median {statistics.median(times) * 1e3:.1f} ms, "
          f"min {min(times) * 1e3:.1f} ms ({args.threads} threads, {args.dtype})")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step_times(model, args.context, 10)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
