"""Requests the target writes itself (Magpie, Xu et al. 2024), for self-distilling a drafter.

An instruction model fed only its chat template's opening of a user turn writes a user request:
sampled, these are as varied as what the model was tuned on, which the offline templates of
train/instructions.py are not (a head trained on 12 templates drafted well on them and poorly on
Spec-Bench). Nothing is downloaded, and the requests are the target's own, so Spec-Bench stays a
test set. The opening is found by rendering the template around a sentinel message, so any chat
template works.
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

_SENTINEL = "\x00outrider-request\x00"


def request_opening(tokenizer: Any) -> list[int]:
    """Token ids of the chat template up to where a user's first message would begin."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False,
                                             add_generation_prompt=True)
    if _SENTINEL not in rendered:
        raise ValueError("the chat template does not show the user's message: cannot let the target write requests")
    return list(tokenizer(rendered[: rendered.index(_SENTINEL)], add_special_tokens=False)["input_ids"])


@torch.inference_mode()
def target_requests(model: Any, tokenizer: Any, n: int, seed: int, eos: tuple[int, ...], batch: int = 128,
                    max_tokens: int = 64, temperature: float = 0.9, top_k: int = 100) -> list[str]:
    """Up to n distinct requests the target writes after its template's user opening (seeded).
    A request counts only when the target ends it (EOS within max_tokens) and it has at least
    three words; duplicates are dropped. Draws at most 3n rows before giving up on n. top_k, not
    top_p, trims the tail: top_p sorts the 49k vocabulary of every row, 0.43 s a step at batch 128
    on this CPU against 0.05 s."""
    from outrider.sampling import SamplingParams
    from outrider.train.rowgen import RowWriter

    if not eos:
        raise ValueError("target_requests needs the target's EOS ids to know where a request ends")
    opening = request_opening(tokenizer)
    write = RowWriter(model, len(opening) + max_tokens)
    params = SamplingParams(temperature=temperature, top_k=top_k)
    seen: set[str] = set()
    out: list[str] = []
    rounds = range(0, 3 * n, batch)
    for r in tqdm(rounds, desc="target-written requests", unit="batch", disable=len(rounds) < 4):
        if len(out) >= n:
            break
        news = write([opening] * batch, max_tokens, params, seed * 1_000_003 + r, eos)
        for row in news:  # a row ends after its first EOS, or at max_tokens
            if not row or row[-1] not in eos:
                continue  # cut off: not a finished request
            text = tokenizer.decode(row[:-1], skip_special_tokens=True).strip()
            if len(text.split()) >= 3 and text not in seen:
                seen.add(text)
                out.append(text)
    return out[:n]
