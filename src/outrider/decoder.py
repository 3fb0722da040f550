"""The speculative decoding loop: draft -> verify (one target forward) -> commit -> roll back.

One sequence at a time (batch size 1, the Spec-Bench protocol). Each step feeds the target the
last committed token plus the d drafted tokens: the d+1 logits score every draft position and give
the recovered or bonus token, so a step commits accepted + 1 tokens. The target's cache is then
rolled back to the committed length; the drafter is told how many of its tokens were committed.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import torch

from outrider.adaptive import AdaptiveK
from outrider.detokenize import Detokenizer
from outrider.drafters import REGISTRY, BuildContext, DraftStep, Drafter, drafter_class
from outrider.drafters.base import empty_draft
from outrider.models import LoadedModel, load_model
from outrider.sampling import SamplingParams, probs_from_logits
from outrider.stats import SpecStats
from outrider.verify import verify_greedy, verify_speculative

FinishReason = Literal["length", "eos", "stop"]
AUTO_K_MAX = 8  # the longest draft k="auto" considers


@dataclass
class Chunk:
    """Tokens committed by one step, in order. drafted[i] is True when token i was proposed by the
    drafter and accepted, False when the target produced it (recovered or bonus token)."""

    token_ids: list[int]
    drafted: list[bool]
    pieces: list[str]  # text each token completed ('' without a tokenizer or mid-character)

    @property
    def text(self) -> str:
        return "".join(self.pieces)


@dataclass
class GenerationResult:
    token_ids: list[int]  # new tokens only (an EOS token that ended generation included)
    text: str | None  # None when there is no tokenizer
    stats: SpecStats
    finish_reason: FinishReason
    drafted: list[bool] = field(default_factory=list)


def embedded_pair_dir() -> Path:
    return Path(__file__).resolve().parent / "assets"


def _default_target() -> Path:
    path = embedded_pair_dir() / "target"
    if not (path / "config.json").is_file():
        raise ValueError(
            f"no target given and the embedded demo target is missing at {str(path)!r}: pass "
            "target=<model folder or object>, or train the pair with `outrider train demo-pair`"
        )
    return path


def _check_same_vocabulary(target: LoadedModel, draft: LoadedModel) -> None:
    """Speculative decoding compares token ids, so both models must mean the same by each id."""
    tt, dt = target.tokenizer, draft.tokenizer
    if tt is not None and dt is not None:
        if tt.get_vocab() != dt.get_vocab():
            raise ValueError(
                f"target {target.name!r} and draft {draft.name!r} have different tokenizers "
                f"({len(tt)} vs {len(dt)} tokens): choose a draft trained with the target's tokenizer"
            )
        for loaded in (target, draft):
            if loaded.model.vocab_size < len(tt):
                raise ValueError(
                    f"{loaded.name!r} has {loaded.model.vocab_size} output rows for a tokenizer of "
                    f"{len(tt)} tokens: the model does not match its tokenizer"
                )
    elif target.model.vocab_size != draft.model.vocab_size:
        raise ValueError(
            f"target vocabulary ({target.model.vocab_size}) and draft vocabulary "
            f"({draft.model.vocab_size}) differ: use a draft with the target's tokenizer, or pass "
            "both tokenizers so that a padded embedding can be checked"
        )


def _check_positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid: use an integer >= 1")


class SpeculativeDecoder:
    """Generates from a target model, exactly (greedy) or losslessly (sampling), with a drafter."""

    def __init__(
        self, target: LoadedModel, drafter: Drafter, *, k: int, method: str = "custom",
        adaptive: AdaptiveK | None = None,
    ) -> None:
        """k: draft length per step (0: no drafting); with `adaptive`, k is chosen per step in
        1..adaptive.k_max from measured acceptance and costs instead."""
        if k < 0:
            raise ValueError(f"k={k} is invalid: use k >= 1 (or 0 for no drafting)")
        self.target = target
        self.drafter = drafter
        self.k = k
        self.method = method
        self.adaptive = adaptive
        self.tokenizer = target.tokenizer

    @classmethod
    def from_pretrained(
        cls,
        target: str | Path | torch.nn.Module | None = None,
        draft: str | Path | torch.nn.Module | None = None,
        method: str = "draft_model",
        k: int | Literal["auto"] | None = None,
        backend: str = "auto",
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        tokenizer: Any | None = None,
        draft_tokenizer: Any | None = None,
    ) -> SpeculativeDecoder:
        """Load target (and draft) from local folders or model objects.

        target None means the embedded demo pair (its draft too, for method="draft_model").
        k: draft length; "auto" = chosen per step (AdaptiveK); None = the method's default:
        "auto" for drafters that stop on their own confidence (draft_model; measured faster than
        every fixed k on the embedded pair), else the drafter's default_k.
        tokenizer: a transformers tokenizer or folder, for model objects that come without one.
        """
        cls_ = drafter_class(method)
        if k is None and getattr(cls_, "stops_on_confidence", False):
            k = "auto"
        adaptive = None
        if k == "auto":
            adaptive = AdaptiveK(k_max=AUTO_K_MAX)
            k = AUTO_K_MAX if cls_.default_k else None
        elif k is not None:
            _check_positive("k", k)
        if draft is not None and not cls_.uses_draft_model:
            raise ValueError(
                f"method {method!r} uses no draft model, but draft={draft!r} was given: drop the "
                "draft or use method='draft_model'"
            )
        if target is None:
            target = _default_target()
            if cls_.uses_draft_model and draft is None:
                draft = embedded_pair_dir() / "draft"
        loaded_target = load_model(target, dtype=dtype, device=device, backend=backend, tokenizer=tokenizer)
        loaded_draft = None
        if cls_.uses_draft_model:
            if draft is None:
                raise ValueError(
                    f"method {method!r} needs a draft model: pass draft=<folder or model object>, "
                    f"or choose another method from {sorted(REGISTRY)}"
                )
            loaded_draft = load_model(
                draft,
                dtype=dtype,
                device=loaded_target.model.device,
                backend=backend,
                tokenizer=draft_tokenizer if draft_tokenizer is not None else tokenizer,
            )
            _check_same_vocabulary(loaded_target, loaded_draft)
        drafter = cls_.build(BuildContext(loaded_target, loaded_draft, k))
        k = k or cls_.default_k
        return cls(loaded_target, drafter, k=k, method=method, adaptive=adaptive if k else None)

    # ---- input handling -------------------------------------------------------------------

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(
                    "a text prompt needs a tokenizer, and the target has none: pass token ids "
                    "(a list of ints) or a tokenizer=..."
                )
            if not prompt:
                raise ValueError("prompt is empty: give at least one token of context")
            ids = list(self.tokenizer(prompt)["input_ids"])
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("prompt is empty: give at least one token of context")
        vocab = self.target.model.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        return ids

    def _check_lengths(self, n_prompt: int, max_new_tokens: int) -> None:
        _check_positive("max_new_tokens", max_new_tokens)
        limit = self.target.model.max_length
        if limit is not None and n_prompt + max_new_tokens > limit:
            raise ValueError(
                f"prompt ({n_prompt} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                f"target's context of {limit} tokens: shorten the prompt or lower max_new_tokens"
            )

    # ---- public generation API ------------------------------------------------------------

    def generate(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
    ) -> GenerationResult:
        stats = SpecStats()
        ids: list[int] = []
        drafted: list[bool] = []
        pieces: list[str] = []
        finish: list[FinishReason] = []
        for chunk in self._run(prompt, max_new_tokens, temperature, top_k, top_p, seed, stop, stats, finish, False):
            ids += chunk.token_ids
            drafted += chunk.drafted
            pieces += chunk.pieces
        text = None
        if self.tokenizer is not None:
            # With stop strings the pieces are exact (truncated at the stop); otherwise one decode.
            text = "".join(pieces) if stop else self.tokenizer.decode(ids, skip_special_tokens=True)
        return GenerationResult(ids, text, stats, finish[0], drafted)

    def stream(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stats: SpecStats | None = None,
    ) -> Iterator[Chunk]:
        """Yield the tokens as they are committed (one Chunk per step). Pass a SpecStats to read
        the run's counts and times while or after it runs."""
        yield from self._run(
            prompt, max_new_tokens, temperature, top_k, top_p, seed, stop, stats or SpecStats(), [], True
        )

    # ---- the loop -------------------------------------------------------------------------

    def _run(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int,
        temperature: float,
        top_k: int | None,
        top_p: float | None,
        seed: int | None,
        stop: str | Sequence[str] | None,
        stats: SpecStats,
        finish: list[FinishReason],
        want_text: bool,
    ) -> Iterator[Chunk]:
        params = SamplingParams(temperature, top_k, top_p)
        prompt_ids = self.encode(prompt)
        self._check_lengths(len(prompt_ids), max_new_tokens)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError(f"stop={stop!r} is invalid: stop strings must be non-empty strings")
        if stops and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer, and the target has none: use EOS or max_new_tokens")
        text = _TextTracker(self.tokenizer, prompt_ids, stops) if (want_text or stops) and self.tokenizer else None
        generator = None
        if not params.greedy:
            generator = torch.Generator(device=self.target.model.device)
            generator.manual_seed(seed if seed is not None else random.getrandbits(63))
        for chunk, reason in self._loop(prompt_ids, max_new_tokens, params, generator, stats, text):
            if reason is not None:
                finish.append(reason)
            if chunk.token_ids:
                yield chunk

    def _loop(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        params: SamplingParams,
        generator: torch.Generator | None,
        stats: SpecStats,
        text: _TextTracker | None,
    ) -> Iterator[tuple[Chunk, FinishReason | None]]:
        target, drafter = self.target.model, self.drafter
        eos = set(self.target.eos_token_ids)
        n_prompt = len(prompt_ids)
        # seq holds prompt + committed tokens; drafts are written past n before verification.
        seq = torch.tensor(prompt_ids + [0] * max_new_tokens, dtype=torch.long)  # (n_prompt + max_new,)
        dev = target.device
        stats.prompt_tokens = n_prompt
        clock = time.perf_counter
        t0 = clock()
        target.reset()
        if n_prompt > 1:
            # The last prompt token is fed with the first draft, so every step scores d+1 tokens.
            target.forward(seq[: n_prompt - 1].to(dev), num_logits=0)
        drafter.begin(seq[:n_prompt])
        t1 = clock()
        stats.prefill_s += t1 - t0
        n = n_prompt
        empty = empty_draft(dev)
        # k="auto" with a drafter that reports its confidence: the draft length is decided per token.
        per_token = self.adaptive if getattr(drafter, "stops_on_confidence", False) else None
        keep_drafting = per_token.keep_drafting if per_token is not None else None
        while True:
            remaining = n_prompt + max_new_tokens - n
            if per_token is not None:
                k = min(per_token.k_max, remaining - 1)  # an upper bound; the drafter stops earlier
            else:
                k = self.adaptive.choose(remaining - 1) if self.adaptive else min(self.k, remaining - 1)
            ta = clock()
            if k > 0:
                draft = drafter.propose(DraftStep(seq[:n], k, params, generator, keep_drafting))
            else:
                draft = empty
            d = draft.tokens.shape[0]
            tb = clock()
            if d:
                seq[n : n + d] = draft.tokens.cpu()
            logits = target.forward(seq[n - 1 : n + d].to(dev))  # (d+1, V)
            if params.greedy:
                accepted, next_token = verify_greedy(draft.tokens, logits)
            else:
                p = probs_from_logits(logits, params)
                accepted, next_token = verify_speculative(draft.tokens, draft.probs, p, generator)
            tc = clock()
            seq[n + accepted] = next_token
            target.rollback(n + accepted)
            if k > 0:
                drafter.update(accepted)
            new = seq[n : n + accepted + 1].tolist()
            reason: FinishReason | None = None
            for j, t in enumerate(new):
                if t in eos:
                    new, reason = new[: j + 1], "eos"
                    break
            drafted_flags = [j < accepted for j in range(len(new))]
            pieces = [""] * len(new)
            if text is not None:
                keep, pieces, hit = text.push(new)
                if hit:
                    new, drafted_flags, reason = new[:keep], drafted_flags[:keep], "stop"
            n += len(new)
            if reason is None and n - n_prompt >= max_new_tokens:
                reason = "length"
            if reason is not None and text is not None and pieces:
                pieces[-1] += text.flush()
            if self.adaptive is not None and k > 0:
                self.adaptive.observe(d, accepted, tb - ta, tc - tb, draft.confidences)
            stats.record_step(d, min(accepted, len(new)), len(new))
            stats.draft_s += tb - ta
            stats.target_s += tc - tb
            stats.decode_s += clock() - ta
            yield Chunk(new, drafted_flags, pieces), reason
            if reason is not None:
                return


class _TextTracker:
    """Text of the committed tokens, and stop strings: text that could still become the start of a
    stop string is held back, so nothing past a stop string is ever shown."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int], stops: list[str]) -> None:
        self.detok = Detokenizer(tokenizer, prompt_ids)
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""  # all text of the committed tokens
        self.shown = 0  # characters of self.text already returned as pieces

    def push(self, ids: list[int]) -> tuple[int, list[str], bool]:
        """Add committed tokens; return (tokens kept, their pieces, whether a stop string ended it)."""
        pieces: list[str] = []
        for j, t in enumerate(ids):
            before = len(self.text)
            self.text += self.detok.push(t)
            cut = self._find_stop(max(0, before - self.hold))
            if cut is not None:
                pieces.append(self.text[self.shown : cut])
                self.text, self.shown = self.text[:cut], cut
                return j + 1, pieces, True
            safe = max(self.shown, len(self.text) - self.hold)
            pieces.append(self.text[self.shown : safe])
            self.shown = safe
        return len(ids), pieces, False

    def flush(self) -> str:
        """Text held back at the end of generation (it cannot start a stop string any more)."""
        self.text += self.detok.flush()
        rest = self.text[self.shown :]
        self.shown = len(self.text)
        return rest

    def _find_stop(self, start: int) -> int | None:
        hits = [i for s in self.stops if (i := self.text.find(s, start)) >= 0]
        return min(hits) if hits else None
