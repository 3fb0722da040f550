"""Speed of the embedded pair (or --target/--draft): fixed k vs adaptive k vs transformers' peers.

Every configuration decodes the same code prompts greedily, interleaved prompt by prompt after a
warm-up, `--repeats` rounds; totals give tokens/s (prefill included), and ratios are taken within
this one run. Also printed: the speedup the DESIGN.md formula predicts from the measured alpha,
c (draft step / target step) and v (verify k+1 / one decode step): tau / (k c + v).

    .venv/bin/python benchmarks/pair_speed.py [--max-new-tokens 96] [--repeats 2] [--dtype bfloat16]
        [--device cuda]
"""

from __future__ import annotations

import argparse
import time

import torch

from outrider import SpeculativeDecoder, SpecStats
from outrider.decoder import embedded_pair_dir
from outrider.demo import DEMO_PROMPTS


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default=None)
    ap.add_argument("--draft", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--ks", default="1,2,3,4,5,6")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-peers", action="store_true")
    args = ap.parse_args()
    target = args.target or str(embedded_pair_dir() / "target")
    draft = args.draft or str(embedded_pair_dir() / "draft")
    ks = [int(k) for k in args.ks.split(",")]
    configs: dict[str, SpeculativeDecoder] = {
        "autoregressive": SpeculativeDecoder.from_pretrained(target, method="autoregressive", dtype=args.dtype,
                                                          device=args.device)
    }
    for k in ks:
        configs[f"draft_model k={k}"] = SpeculativeDecoder.from_pretrained(target, draft=draft, k=k, dtype=args.dtype,
                                                                          device=args.device)
    configs["draft_model k=auto"] = SpeculativeDecoder.from_pretrained(target, draft=draft, k="auto", dtype=args.dtype,
                                                                    device=args.device)
    configs["prompt_lookup"] = SpeculativeDecoder.from_pretrained(target, method="prompt_lookup", dtype=args.dtype,
                                                                 device=args.device)
    peers = {}
    if not args.no_peers:
        from outrider.bench.peers import load_hf

        dev = configs["autoregressive"].target.model.device
        hf_t, hf_d = load_hf(target, args.dtype, dev), load_hf(draft, args.dtype, dev)
        tok = configs["autoregressive"].tokenizer
        peers = {"hf-generate": {}, "hf-assisted": {"assistant_model": hf_d}}
    totals = {name: SpecStats() for name in configs}
    peer_time = {name: [0.0, 0] for name in peers}
    prompts = DEMO_PROMPTS
    for rnd in range(args.repeats + 1):  # round 0 is warm-up
        for prompt in prompts:
            for name, dec in configs.items():
                res = dec.generate(prompt, max_new_tokens=args.max_new_tokens if rnd else 8)
                if rnd:
                    totals[name] = totals[name].merge(res.stats)
            for name, extra in peers.items():
                ids = tok(prompt, return_tensors="pt").to(dev)
                t = time.perf_counter()
                with torch.inference_mode():
                    out = hf_t.generate(**ids, max_new_tokens=args.max_new_tokens if rnd else 8, do_sample=False,
                                        pad_token_id=tok.eos_token_id, **extra)
                if rnd:
                    peer_time[name][0] += time.perf_counter() - t
                    peer_time[name][1] += out.shape[1] - ids["input_ids"].shape[1]
    base = totals["autoregressive"]
    t_step = base.target_s / base.steps  # one decode step of the target
    print(f"target {target}\ndraft {draft}\ndtype {args.dtype or 'as stored'}, {torch.get_num_threads()} threads, "
          f"{len(prompts)} prompts x {args.max_new_tokens} tokens x {args.repeats} rounds")
    print(f"{'config':22} {'tok/s':>7} {'speedup':>8} {'tau':>5} {'alpha':>6} {'c':>5} {'v':>5} {'formula':>8}")
    for name, s in totals.items():
        speedup = s.tokens_per_s / base.tokens_per_s
        if s.drafted and name.startswith("draft_model") and "auto" not in name:
            k = s.drafted / s.steps
            c = s.draft_s / s.drafted / t_step
            v = s.target_s / s.steps / t_step
            # DESIGN.md's formula with its expected tokens per step replaced by the measured tau.
            predicted = s.tau / (k * c + v)
            extra = f"{s.alpha:6.2f} {c:5.2f} {v:5.2f} {predicted:7.2f}x"
        elif s.drafted:
            extra = f"{s.alpha:6.2f}"
        else:
            extra = ""
        print(f"{name:22} {s.tokens_per_s:7.1f} {speedup:7.2f}x {s.tau:5.2f} {extra}")
    for name, (secs, n) in peer_time.items():
        tps = n / secs
        print(f"{name:22} {tps:7.1f} {tps / base.tokens_per_s:7.2f}x")
    if peer_time:
        hf_gen = peer_time["hf-generate"][1] / peer_time["hf-generate"][0]
        hf_ass = peer_time["hf-assisted"][1] / peer_time["hf-assisted"][0]
        best = max((s.tokens_per_s, n) for n, s in totals.items() if n.startswith("draft_model"))
        print(f"outrider autoregressive / hf-generate: {base.tokens_per_s / hf_gen:.2f}x; "
              f"best outrider draft_model ({best[1]}) / hf-assisted: {best[0] / hf_ass:.2f}x")


if __name__ == "__main__":
    main()
