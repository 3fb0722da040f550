"""How well an EAGLE head predicts a bench run's own answers, per category, in seconds.

Each autoregressive answer of an `outrider bench` run (its results.jsonl) is fed to the target once
with its prompt (rendered as the bench rendered it), and the head's first draft at every answer
token is compared with the target's argmax, teacher-forced: the share that agree is the head's
depth-1 acceptance on that text, without decoding anything. It separates "the head does not know
this kind of text" from "drafting loses what the head knows" (compare it with the bench's measured
acceptance at position 1).

    .venv/bin/python benchmarks/head_agreement.py --target models/SmolLM2-135M-Instruct \
        --head src/outrider/assets/eagle-smollm2 --run DIR --dataset ../shared/data/spec_bench/question.jsonl
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import torch


POSITION_BUCKETS = (128, 1024)  # bucket width; the last bucket starts here


def main() -> None:
    from outrider.bench.datasets import load_spec_bench, render_prompt
    from outrider.drafters.eagle import EagleHead
    from outrider.models import load_transformers_model, parse_dtype
    from outrider.train.eagle import draft_hits, target_pass

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", required=True)
    ap.add_argument("--head", required=True)
    ap.add_argument("--run", required=True, help="an `outrider bench --out` folder with autoregressive records")
    ap.add_argument("--dataset", required=True, help="the question.jsonl that run read")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.target)
    target = load_transformers_model(Path(args.target), parse_dtype(args.dtype)).eval()
    head = EagleHead.load(args.head, dtype=torch.float32)
    embed = target.get_input_embeddings().weight.detach().float()
    questions = {q.question_id: q for q in load_spec_bench(args.dataset)}
    records = [json.loads(line) for line in (Path(args.run) / "results.jsonl").read_text().splitlines() if line]
    answers = {(r["question_id"], r["turn"]): r for r in records if r["method"] == "autoregressive" and r["repeat"] == 0}
    if not answers:
        raise SystemExit(f"{args.run}/results.jsonl has no autoregressive records: run the bench first")
    agree: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    # By the drafted token's position in its sequence: a head trained on short rows may not carry
    # to the long prompts of summarization and RAG (positions it never saw).
    by_position: dict[int, list[int]] = collections.defaultdict(lambda: [0, 0])
    for (qid, turn), rec in sorted(answers.items()):
        q = questions[qid]
        ids = render_prompt(tokenizer, q, turn, [answers[(qid, t)]["output_text"] for t in range(turn)])
        seq = torch.tensor([ids + rec["output_ids"]])
        with torch.no_grad():
            hidden, logits = target_pass(target, seq, head.cfg.target_layers)
            (hits,) = draft_hits(head, embed, seq, hidden.float(), logits.float(), 1)  # as decoding checks
        counts = agree[q.category]
        first = len(ids) - 1  # pairs from here on draft an answer token (pair j drafts token j + 2)
        agreed = hits[0][first : seq.shape[1] - 2]
        counts[0] += int(agreed.sum())
        counts[1] += int(agreed.shape[0])
        for at, ok in enumerate(agreed.tolist(), start=first + 2):  # the drafted token's position
            bucket = by_position[min(at, POSITION_BUCKETS[-1]) // POSITION_BUCKETS[0]]
            bucket[0] += ok
            bucket[1] += 1
    total = [sum(c[0] for c in agree.values()), sum(c[1] for c in agree.values())]
    print("| category | answer tokens | head's first draft = target's argmax |")
    print("|---|---:|---:|")
    for category, (right, n) in sorted(agree.items()):
        print(f"| {category} | {n} | {right / max(n, 1):.3f} |")
    print(f"| overall | {total[1]} | {total[0] / max(total[1], 1):.3f} |")
    print()
    print("| drafted token's position | answer tokens | head's first draft = target's argmax |")
    print("|---|---:|---:|")
    step = POSITION_BUCKETS[0]
    for b, (right, n) in sorted(by_position.items()):
        span = f"{b * step}-{(b + 1) * step - 1}" if b * step < POSITION_BUCKETS[-1] else f">= {b * step}"
        print(f"| {span} | {n} | {right / max(n, 1):.3f} |")


if __name__ == "__main__":
    main()
