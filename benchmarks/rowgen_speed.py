"""Training data written two ways, on the same prompts: outrider's native engine (train/rowgen.py,
every row decoded as it is alone) against transformers' generate (left-padded batch, static
cache), for one batch of chat requests; prints tokens/s of each and their ratio, measured in one
run, greedy and sampled.

    .venv/bin/python benchmarks/rowgen_speed.py --target models/SmolLM2-135M-Instruct [--batch 64] [--gen-len 256]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from outrider.models import eos_ids_of, load_transformers_model
from outrider.sampling import SamplingParams
from outrider.train.instructions import make_instructions
from outrider.train.rowgen import continue_rows, generate_rows, native_engine
from outrider.train.selfdistill import chat_prompt_ids


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--gen-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_transformers_model(Path(args.target), torch.bfloat16).eval().requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(args.target)
    eos = eos_ids_of(model, tok)
    prompts = [chat_prompt_ids(tok, t) for t in make_instructions(args.batch, False, 0)][: args.batch]
    engine = native_engine(model, max(map(len, prompts)) + args.gen_len)
    if engine is None:
        raise SystemExit("outrider's kernels do not run this model here (bf16 on a CPU with AVX512-BF16 needed)")
    print(f"{len(prompts)} requests of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, up to {args.gen_len} new")
    for params in (SamplingParams(), SamplingParams(temperature=0.8)):
        t0 = time.perf_counter()
        native = continue_rows(engine, prompts, args.gen_len, params, torch.Generator().manual_seed(1), eos)
        t_native = time.perf_counter() - t0
        t0 = time.perf_counter()
        hf = generate_rows(model, prompts, args.gen_len, params, 1, eos)
        t_hf = time.perf_counter() - t0
        a, b = sum(map(len, native)) / t_native, sum(map(len, hf)) / t_hf  # rows end at their EOS
        print(f"T={params.temperature}: native engine {a:.0f} tokens/s, generate {b:.0f} tokens/s: {a / b:.2f}x")


if __name__ == "__main__":
    main()
