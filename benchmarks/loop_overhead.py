"""Loop overhead per committed token: outrider's loop vs the model forwards it runs.

A random-weight Llama serves as target and, for draft_model, also as its own draft, so every draft
is accepted. For each method it measures the wall time of generate() and the time spent inside
model forwards; the rest is the loop's own cost (drafting logic, verification, bookkeeping).
Runs are interleaved and repeated; medians are printed.

    .venv/bin/python benchmarks/loop_overhead.py [--threads 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from outrider import SpeculativeDecoder


def timed_forwards(dec: SpeculativeDecoder) -> list[float]:
    """Wrap the forward of every model the decoder uses; returns the list that accumulates time."""
    spent = [0.0]
    models = [dec.target.model] + ([dec.drafter.model] if hasattr(dec.drafter, "model") else [])
    for m in {id(x): x for x in models}.values():
        inner = m.forward

        def forward(ids, num_logits=None, _inner=inner):
            t = time.perf_counter()
            out = _inner(ids, num_logits)
            spent[0] += time.perf_counter() - t
            return out

        m.forward = forward
    return spent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    prompt = torch.randint(0, 8192, (32,), generator=torch.Generator().manual_seed(1)).tolist()
    decoders = {
        "autoregressive": SpeculativeDecoder.from_pretrained(model, method="autoregressive"),
        "draft_model k=4 (draft == target)": SpeculativeDecoder.from_pretrained(model, draft=model, k=4),
    }
    spent = {name: timed_forwards(dec) for name, dec in decoders.items()}
    rows: dict[str, list[tuple[float, float, int, float]]] = {name: [] for name in decoders}
    hf_times = []
    for r in range(args.repeats + 1):  # the first round is warm-up
        for name, dec in decoders.items():
            spent[name][0] = 0.0
            t = time.perf_counter()
            res = dec.generate(prompt, max_new_tokens=args.new_tokens)
            wall = time.perf_counter() - t
            if r:
                rows[name].append((wall, spent[name][0], len(res.token_ids), res.stats.tau))
        t = time.perf_counter()
        model.generate(torch.tensor([prompt]), max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                       do_sample=False, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        if r:
            hf_times.append(time.perf_counter() - t)
    print(f"random Llama {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, float32, "
          f"{args.threads} thread(s), {args.new_tokens} new tokens, median of {args.repeats}")
    print(f"{'method':36} {'tok/s':>8} {'tau':>5} {'forwards ms':>12} {'loop us/token':>14}")
    ar_tps = None
    for name, rs in rows.items():
        wall = statistics.median(x[0] for x in rs)
        fwd = statistics.median(x[1] for x in rs)
        n = rs[0][2]
        tps = n / wall
        ar_tps = ar_tps or tps
        print(f"{name:36} {tps:8.1f} {rs[0][3]:5.2f} {fwd * 1e3:12.1f} {(wall - fwd) / n * 1e6:14.1f}")
    hf = statistics.median(hf_times)
    print(f"{'transformers generate (greedy)':36} {args.new_tokens / hf:8.1f}")
    print(f"outrider autoregressive / transformers generate: {ar_tps / (args.new_tokens / hf):.2f}x")


if __name__ == "__main__":
    main()
