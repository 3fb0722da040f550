"""One drafter setting against another, measured in one run: two decoders of the same method (each
remembers only its own outputs, e.g. in a suffix drafter's global trie), the drafter's attributes
set per arm, alternating which goes first per request, on first turns of Spec-Bench (2 per
category) or the bench's built-in code set, greedy. Prints tokens/s and tau of each arm, their
ratio, and how many outputs are equal (greedy: all of them should be).

    .venv/bin/python benchmarks/drafter_ab.py --target models/SmolLM2-135M-Instruct \
        --head src/outrider/assets/eagle-smollm2 --method eagle+suffix --a merge=0 --b merge=1 \
        [--dataset ../shared/data/spec_bench/question.jsonl]

An attribute of a drafter inside the drafter is named by its path: eagle+suffix's tries are
`suffix` (--a suffix.datastore_weight=0.4), its head `head`; its own threshold `min_value`.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from outrider import SpeculativeDecoder
from outrider.bench.datasets import builtin_code, load_spec_bench, render_prompt, select


def parse_settings(text: str) -> dict[str, int | float]:
    """"suffix.datastore_weight=0.5,merge=1" -> {"suffix.datastore_weight": 0.5, "merge": 1} (numbers;
    0/1 for booleans)."""
    out: dict[str, int | float] = {}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep:
            raise SystemExit(f"setting {part!r} is invalid: write ATTRIBUTE=NUMBER, e.g. min_value=2.0")
        out[key] = float(value) if "." in value else int(value)
    return out


def apply(drafter: Any, settings: dict[str, int | float]) -> None:
    """Set each (dotted) attribute, refusing one the drafter does not have (a typo would measure nothing)."""
    for path, value in settings.items():
        *parents, name = path.split(".")
        obj = drafter
        for p in parents:
            obj = getattr(obj, p)
        if not hasattr(obj, name):
            raise SystemExit(f"{type(obj).__name__} has no attribute {name!r} ({path})")
        current = getattr(obj, name)
        if isinstance(current, bool):
            value = bool(value)
        elif isinstance(current, (int, float)):
            value = type(current)(value)
        setattr(obj, name, value)


def alternate(decoders: dict[str, Any], prompts: list[list[int]], max_new_tokens: int
              ) -> tuple[dict[str, float], dict[str, float], dict[str, list[Any]]]:
    """Each prompt through every decoder, greedy, the order reversed on every other prompt (the
    machine's drift hits each alike). Returns per decoder tokens/s and tau over all prompts, and
    its results in prompt order."""
    arms = list(decoders)
    tokens, steps, seconds = dict.fromkeys(arms, 0), dict.fromkeys(arms, 0), dict.fromkeys(arms, 0.0)
    results: dict[str, list[Any]] = {arm: [] for arm in arms}
    for i, ids in enumerate(prompts):
        for arm in arms if i % 2 == 0 else arms[::-1]:
            t = time.perf_counter()
            res = decoders[arm].generate(ids, max_new_tokens=max_new_tokens)
            seconds[arm] += time.perf_counter() - t
            tokens[arm] += len(res.token_ids)
            steps[arm] += res.stats.steps
            results[arm].append(res)
    rate = {arm: tokens[arm] / seconds[arm] for arm in arms}
    tau = {arm: tokens[arm] / steps[arm] for arm in arms}
    return rate, tau, results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", required=True)
    ap.add_argument("--head", default=None, help="a head folder, for the methods that draft with one")
    ap.add_argument("--method", default="eagle+suffix")
    ap.add_argument("--a", default="", help="arm A's drafter settings, e.g. merge=0")
    ap.add_argument("--b", default="", help="arm B's drafter settings")
    ap.add_argument("--dataset", default=None, help="Spec-Bench question.jsonl (default: the built-in code set)")
    ap.add_argument("--limit-per-category", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    arms = {"A": parse_settings(args.a), "B": parse_settings(args.b)}
    decoders = {}
    for arm, settings in arms.items():
        dec = SpeculativeDecoder.from_pretrained(args.target, draft=args.head, method=args.method, k="auto",
                                                 dtype="bfloat16")
        apply(dec.drafter, settings)
        decoders[arm] = dec
    questions = builtin_code() if args.dataset is None else select(load_spec_bench(args.dataset),
                                                                   limit_per_category=args.limit_per_category)
    prompts = [render_prompt(decoders["A"].tokenizer, q, 0, []) for q in questions]
    for dec in decoders.values():  # warm-up
        dec.generate(prompts[0], max_new_tokens=16)
    rate, tau, results = alternate(decoders, prompts, args.max_new_tokens)
    for arm, settings in arms.items():
        print(f"{arm} {args.method} {settings or 'as built'}: {rate[arm]:.1f} tokens/s, tau {tau[arm]:.2f}")
    ratio = rate["B"] / rate["A"]
    same = sum(a.token_ids == b.token_ids for a, b in zip(results["A"], results["B"]))
    print(f"B / A: {ratio:.3f}x; equal outputs {same}/{len(prompts)}")


if __name__ == "__main__":
    main()
