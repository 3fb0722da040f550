"""eagle+suffix with and without merging the suffix tries' tree into the head's greedy steps
(HeadWithSuffix.merge), measured in one run: two decoders (each remembers only its own outputs in
its global trie), alternating which goes first per request, on first turns of Spec-Bench (2 per
category) or the bench's built-in code set. Prints tokens/s and tau of each, their ratio, and how
many outputs are equal.

    .venv/bin/python benchmarks/hybrid_merge.py --target models/SmolLM2-135M-Instruct \
        --head src/outrider/assets/eagle-smollm2 [--dataset ../shared/data/spec_bench/question.jsonl]
"""

from __future__ import annotations

import argparse
import time

import torch

from outrider import SpeculativeDecoder
from outrider.bench.datasets import builtin_code, load_spec_bench, render_prompt, select


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", required=True)
    ap.add_argument("--head", required=True)
    ap.add_argument("--dataset", default=None, help="Spec-Bench question.jsonl (default: the built-in code set)")
    ap.add_argument("--limit-per-category", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    decoders = {merge: SpeculativeDecoder.from_pretrained(args.target, draft=args.head, method="eagle+suffix", k="auto",
                                                          dtype="bfloat16") for merge in (False, True)}
    for merge, dec in decoders.items():
        dec.drafter.merge = merge
    questions = builtin_code() if args.dataset is None else select(load_spec_bench(args.dataset),
                                                                   limit_per_category=args.limit_per_category)
    prompts = [render_prompt(decoders[False].tokenizer, q, 0, []) for q in questions]
    for dec in decoders.values():  # warm-up
        dec.generate(prompts[0], max_new_tokens=16)
    tokens, steps, seconds = {m: 0 for m in decoders}, {m: 0 for m in decoders}, {m: 0.0 for m in decoders}
    outputs: dict[bool, list[list[int]]] = {m: [] for m in decoders}
    for i, ids in enumerate(prompts):
        for merge in (False, True) if i % 2 == 0 else (True, False):
            t = time.perf_counter()
            res = decoders[merge].generate(ids, max_new_tokens=args.max_new_tokens)
            seconds[merge] += time.perf_counter() - t
            tokens[merge] += len(res.token_ids)
            steps[merge] += res.stats.steps
            outputs[merge].append(res.token_ids)
    for merge in (False, True):
        print(f"merge={merge}: {tokens[merge] / seconds[merge]:.1f} tokens/s, tau {tokens[merge] / steps[merge]:.2f}")
    ratio = (tokens[True] / seconds[True]) / (tokens[False] / seconds[False])
    same = sum(a == b for a, b in zip(outputs[False], outputs[True]))
    print(f"merged / not merged: {ratio:.3f}x; equal outputs {same}/{len(prompts)}")


if __name__ == "__main__":
    main()
