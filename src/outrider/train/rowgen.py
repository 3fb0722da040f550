"""Many prompts continued at once, for the training data the target writes (self-distillation
answers, requests it writes itself): on outrider's own native engine where its bf16 CPU kernels
run, else by transformers' generate.

Why: writing the data was the slowest part of training a head on a CPU. transformers' generate at
batch 64 ran SmolLM2-135M at ~200 tokens/s on 2 cores (6.5 min per 256 answers of 256 tokens); the
native engine's batch step (models/llama.py forward_rows: every row's tokens through each matmul
together, each layer one kernel call for all rows) runs it at ~650. Each row is decoded exactly as
it would be alone (the kernels are row-invariant), so a greedy row is the target's own greedy
continuation, not the left-padded batch's approximation of it.
"""

from __future__ import annotations

from typing import Any

import torch

from outrider.models.base import RowForward
from outrider.sampling import SamplingParams, probs_from_logits, sample


class RowWriter:
    """Continues batches of prompts with one model (self-distillation answers, the target's own
    requests): on the native engine where outrider's kernels run it, else by transformers'
    generate. Either way a row is its new tokens, ended after its first EOS (kept) or at max_new,
    and a batch's sampled draws follow `seed`."""

    def __init__(self, model: Any, capacity: int) -> None:
        self.model = model
        self.engine = native_engine(model, capacity)  # tokens per row: the longest prompt + max_new

    def __call__(self, prompts: list[list[int]], max_new: int, params: SamplingParams, seed: int,
                 eos: tuple[int, ...] = ()) -> list[list[int]]:
        if self.engine is not None:
            return continue_rows(self.engine, prompts, max_new, params, torch.Generator().manual_seed(seed), eos)
        return generate_rows(self.model, prompts, max_new, params, seed, eos)


class SeededSampler:
    """A logits processor for transformers' generate that samples itself, seeded: it turns each
    row's scores (B, V) into a one-hot choice drawn by the inverse CDF, so greedy decoding
    (do_sample=False) emits it. generate's own sampling draws with torch.multinomial, whose
    exponential draws over a 49k vocabulary took 126 ms of a 320 ms batch-64 step on this CPU;
    one uniform per row costs nothing. Temperature, top-k and top-p go through the one sampling
    function (outrider.sampling)."""

    def __init__(self, params: SamplingParams, seed: int) -> None:
        self.params = params
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        cdf = probs_from_logits(scores, self.params).cumsum(-1)  # (B, V)
        u = torch.rand(cdf.shape[0], 1, generator=self.generator).to(cdf.device) * cdf[:, -1:]
        pick = torch.searchsorted(cdf, u, right=True).clamp(max=cdf.shape[-1] - 1)  # (B, 1)
        return torch.full_like(scores, float("-inf")).scatter(-1, pick, 0.0)


def generate_rows(model: Any, prompts: list[list[int]], max_new: int, params: SamplingParams, seed: int,
                  eos: tuple[int, ...] = ()) -> list[list[int]]:
    """RowWriter's batch by transformers' generate: the rows left-padded, sampled rows drawn by
    SeededSampler; without `eos` every row gets max_new tokens."""
    fill = eos[0] if eos else 0
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[fill] * (width - len(p)) + p for p in prompts], dtype=torch.long, device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long, device=model.device)
    kw = {} if params.greedy else dict(logits_processor=[SeededSampler(params, seed)])
    stop = dict(eos_token_id=list(eos)) if eos else dict(min_new_tokens=max_new, eos_token_id=None)
    # A static cache measured 1.1-1.2x faster than the dynamic one at batch 64-128 on this CPU.
    out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new, pad_token_id=fill, do_sample=False,
                         cache_implementation="static", **stop, **kw)
    return [next((new[: j + 1] for j, t in enumerate(new) if t in eos), new[:max_new])
            for new in out[:, width:].tolist()]


def native_engine(model: Any, capacity: int) -> Any | None:
    """A native engine running this transformers model with room for `capacity` tokens per row,
    or None where outrider's CPU kernels would not run it (another dtype or device, a model type
    the native backend lacks): generate is then the faster way. Built per call (~1 s) and dropped
    by the caller when its rows are written: its packed weights and a batch's caches (~1.4 GB for
    SmolLM2 at 64 rows of 768) are not held through training."""
    from outrider.models import kernels
    from outrider.models.llama import NativeLlama, unsupported_reason

    try:
        param = next(model.parameters())
    except (StopIteration, AttributeError):
        return None
    if param.dtype != torch.bfloat16 or param.device.type != "cpu" or not kernels.available():
        return None
    if unsupported_reason(model.config, capacity) is not None:
        return None
    engine = NativeLlama.from_hf(model, capacity=capacity)
    return engine if engine.kernels else None


@torch.inference_mode()
def continue_rows(engine: Any, prompts: list[list[int]], max_new: int, params: SamplingParams,
                  generator: torch.Generator | None, eos: tuple[int, ...] = ()) -> list[list[int]]:
    """Each prompt's continuation (its new tokens only), all rows decoded together in the engine's
    slots: the prompts prefilled in one forward, then one forward per token for the rows still
    going. A row ends after its first EOS (kept) or max_new tokens. Sampled rows draw from the
    one sampling transform with `generator`, one uniform per live row per step, in row order."""
    engine.set_slots(len(prompts))
    logits = engine.forward_rows([RowForward(i, torch.tensor(p, dtype=torch.long), 1) for i, p in enumerate(prompts)])
    outs: list[list[int]] = [[] for _ in prompts]
    live = list(range(len(prompts)))
    stop = set(eos)
    while live:
        rows = torch.cat(logits)  # (len(live), V): each live row's last position
        if params.greedy:
            picks = rows.argmax(-1).tolist()
        else:
            picks = sample(probs_from_logits(rows, params), generator).tolist()
        going = []
        for i, x in zip(live, picks):
            outs[i].append(x)
            if x not in stop and len(outs[i]) < max_new:
                going.append(i)
        live = going
        if live:
            logits = engine.forward_rows([RowForward(i, torch.tensor(outs[i][-1:]), 1) for i in live])
    return outs
