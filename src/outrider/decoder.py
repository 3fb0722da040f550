"""The speculative decoding loop: draft -> verify (one target forward) -> commit -> roll back.

One sequence at a time (batch size 1, the Spec-Bench protocol; batch.py runs many sequences
through the same step, split into `_plan` and `_complete` around the target's forward, so that
one forward serves every row). Each step feeds the target the
last committed token (the root) plus the d drafted nodes of a draft tree (a chain is the tree
[-1, 0, 1, ...]): the d+1 logits score every node and give the recovered or bonus token, so a step
commits accepted + 1 tokens. The target's cache then keeps the accepted path (a chain rolls back);
the drafter is told the accepted path.
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import torch

from outrider.adaptive import AdaptiveK
from outrider.detokenize import Detokenizer
from outrider.drafters import REGISTRY, BuildContext, DraftStep, Drafter, drafter_class
from outrider.drafters.base import Draft
from outrider.models import LoadedModel, load_model
from outrider.models.base import reuse_prefix
from outrider.costs import CostModel, calibrate
from outrider.sampling import SamplingParams, probs_from_logits
from outrider.stats import SpecStats
from outrider.tree import verify_mask, verify_positions
from outrider.verify import verify_greedy, verify_speculative, verify_tree_greedy, verify_tree_speculative

FinishReason = Literal["length", "eos", "stop"]
AUTO_K_MAX = 8  # the longest draft k="auto" considers
AUTO_TREE_SIZE = 24  # the largest tree k="auto" considers (a CPU verifies 25 tokens for ~1.5 steps)
# Greedy runs that teach k="auto" how often the draft is right at each confidence, once per decoder
# (deterministic: no clock, no sampling), before any request: plain text and code.
CALIBRATION_PROMPTS = ("The history of the city began", "def main(argv):\n    ")
# An instruction model answers requests: it is calibrated on answers, through its chat template.
CALIBRATION_REQUESTS = ("Tell me about the history of an old city.", "Write a Python function that adds two numbers.")
CALIBRATION_TOKENS = 64


@dataclass
class Chunk:
    """Tokens committed by one step, in order. drafted[i] is True when token i was proposed by the
    drafter and accepted, False when the target produced it (recovered or bonus token)."""

    token_ids: list[int]
    drafted: list[bool]
    pieces: list[str]  # text each token completed ('' without a tokenizer or mid-character)
    finish_reason: FinishReason | None = None  # set on the last chunk of a generation

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


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: what generate() and stream() take (and the CLI and server build).

    Give either a prompt (text or token ids) or chat `messages` ([{"role": ..., "content": ...}]),
    which the model's chat template turns into the prompt."""

    prompt: str | Sequence[int] | None = None
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None  # None: a fresh random seed (sampling only)
    stop: str | Sequence[str] | None = None
    messages: Sequence[Mapping[str, Any]] | None = None

    def __post_init__(self) -> None:
        """Every value a user (or an HTTP client) sends is checked here, once, by name: the CLI
        and the server build requests, so they inherit these checks."""
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt=<text or token ids> and messages=[{'role', 'content'}, ...]")
        if self.messages is not None:
            check_messages(self.messages)
        else:
            check_prompt(self.prompt)
        _check_positive("max_new_tokens", self.max_new_tokens)
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed={self.seed!r} is invalid: use an integer in [0, 2**63) or None")
        if self.stop is not None and not isinstance(self.stop, (str, list, tuple)):
            raise ValueError(f"stop={self.stop!r} is invalid: use a string or a list of strings")
        stops = self.stops
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError(f"stop={self.stop!r} is invalid: stop strings must be non-empty strings")
        SamplingParams(self.temperature, self.top_k, self.top_p)  # checks temperature, top_k, top_p

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p)

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class Collector:
    """A generation's chunks gathered into its GenerationResult."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.drafted: list[bool] = []
        self.pieces: list[str] = []
        self.finish: FinishReason = "length"

    def add(self, chunk: Chunk) -> None:
        self.ids += chunk.token_ids
        self.drafted += chunk.drafted
        self.pieces += chunk.pieces
        self.finish = chunk.finish_reason or self.finish

    def result(self, request: GenerationRequest, stats: SpecStats, tokenizer: Any) -> GenerationResult:
        text = None
        if tokenizer is not None:
            # With stop strings the pieces are exact (truncated at the stop); otherwise one decode.
            text = "".join(self.pieces) if request.stops else tokenizer.decode(self.ids, skip_special_tokens=True)
        return GenerationResult(self.ids, text, stats, self.finish, self.drafted)


def check_prompt(prompt: object) -> None:
    """A prompt is text or a flat sequence of integer token ids (not bools, floats, bytes or lists)."""
    if isinstance(prompt, str):
        return
    if isinstance(prompt, (bytes, bytearray)) or not isinstance(prompt, (list, tuple, range)) and not (
        isinstance(prompt, torch.Tensor) and prompt.dim() == 1 and not prompt.is_floating_point()
    ):
        raise ValueError(
            f"prompt={prompt!r:.80} is invalid: pass text (str) or a list of integer token ids"
        )
    items = prompt.tolist() if isinstance(prompt, torch.Tensor) else list(prompt)
    bad = [t for t in items if not isinstance(t, int) or isinstance(t, bool)]
    if bad:
        raise ValueError(
            f"prompt token ids must be integers, got {bad[0]!r} ({type(bad[0]).__name__}): pass a flat list of ints"
        )


def check_messages(messages: object) -> None:
    """Chat messages are a non-empty list of {"role": str, "content": str} mappings."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"messages={messages!r:.80} is invalid: pass a non-empty list of "
                         "{'role': ..., 'content': ...} mappings")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}]={m!r:.80} is invalid: each message is "
                             "{'role': 'system'|'user'|'assistant', 'content': <text>}")


def read_chat_template(template: str | Path | None) -> str | None:
    """Jinja text as given, or read from a file when it names one (`--chat-template FILE`)."""
    if template is None:
        return None
    if isinstance(template, Path) or ("{" not in template and Path(template).expanduser().is_file()):
        path = Path(template).expanduser()
        if not path.is_file():
            raise ValueError(f"chat_template file {str(path)!r} does not exist: pass Jinja text or a file of it")
        return path.read_text()
    if "{" not in template:
        raise ValueError(f"chat_template={template!r:.80} is neither a Jinja template nor an existing file")
    return template


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


def _datastore(cls_: Any, method: str, datastore: str | Path | None) -> Any:
    """The Datastore a drafter of class cls_ reads (from_pretrained's `datastore`), or None."""
    from outrider.drafters.datastore import load_datastore

    if datastore is None:
        return None
    if not isinstance(datastore, (str, Path)):
        raise ValueError(f"datastore={datastore!r} is invalid: pass a datastore file or a folder holding one")
    if not getattr(cls_, "reads_datastore", False):
        readers = sorted(name for name, c in REGISTRY.items() if getattr(c, "reads_datastore", False))
        raise ValueError(f"method {method!r} reads no datastore, but datastore={str(datastore)!r} was given: "
                         f"drop it or use one of {readers}")
    return load_datastore(datastore)


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


class _Sequence:
    """One request's state between steps: the committed tokens and what decides the next step."""

    def __init__(
        self, prompt_ids: list[int], request: GenerationRequest, generator: torch.Generator | None,
        stats: SpecStats, text: _TextTracker | None, model: Any, drafter: Drafter, adaptive: AdaptiveK | None,
    ) -> None:
        # The sequence's own target cache (the target itself, or one slot of a batch), drafter and
        # k policy: a batch holds one of each per row.
        self.model, self.drafter, self.adaptive = model, drafter, adaptive
        self.request = request
        self.n_prompt = len(prompt_ids)
        self.n = self.n_prompt  # committed length (prompt included)
        self.end = self.n_prompt + request.max_new_tokens
        self.seq = torch.tensor(prompt_ids + [0] * request.max_new_tokens, dtype=torch.long)  # (end,)
        self.params = request.sampling
        self.generator = generator
        self.stats = stats
        self.text = text
        self.hidden: torch.Tensor | None = None  # (L, m, D) states not yet handed to the drafter
        self.kept = 0  # prompt tokens whose cache the previous sequence left (not fed again)

    @property
    def remaining(self) -> int:
        return self.end - self.n


@dataclass
class _StepPlan:
    """One step's draft and the target input built from it (decoder._plan), until verified."""

    k: int  # the draft budget asked for (0: no draft)
    draft: Draft | None
    hidden: torch.Tensor | None  # the hidden states handed to the drafter (kept when k == 0)
    ids: torch.Tensor  # (d+1,) root + nodes, on the target's device
    attn_mask: torch.Tensor | None  # (d+1, d+1) for a tree, None for a chain
    positions: torch.Tensor | None  # (d+1,) for a tree
    ta: float  # clock before drafting (stats only)
    tb: float  # clock after drafting


class SpeculativeDecoder:
    """Generates from a target model, exactly (greedy) or losslessly (sampling), with a drafter."""

    def __init__(
        self, target: LoadedModel, drafter: Drafter, *, k: int, method: str = "custom",
        adaptive: AdaptiveK | None = None,
    ) -> None:
        """k: draft length (chains) or tree size per step (0: no drafting); with `adaptive`, k is
        chosen per step in 1..adaptive.k_max from acceptance and frozen costs instead."""
        if k < 0:
            raise ValueError(f"k={k} is invalid: use k >= 1 (or 0 for no drafting)")
        self.target = target
        self.drafter = drafter
        self.k = k
        self.method = method
        self.adaptive = adaptive
        self.tokenizer = target.tokenizer
        self.chat_template: str | None = None  # None: the tokenizer's own (chat_ids)
        self.clock = time.perf_counter  # timings for the stats only: no decision reads it
        # Self-drafting heads read the target's hidden states: capture the layers they name.
        self.hidden_layers = tuple(getattr(drafter, "hidden_layers", ()) or ())
        if self.hidden_layers:
            target.model.capture_hidden(self.hidden_layers)
        self._learning = False  # True during calibrate_acceptance: requests then add to one history
        # A fresh drafter like this one (set by from_pretrained; batch.py builds one per row).
        self.new_drafter: Callable[..., Drafter] | None = None
        # A request keeps the target's cache of the prefix it shares with the previous one
        # (models/base.py, reuse_prefix); False prefills every prompt whole.
        self.reuse_prefix = True

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
        width: int | None = None,
        costs: CostModel | str | Path | None = None,
        chat_template: str | Path | None = None,
        datastore: str | Path | None = None,
    ) -> SpeculativeDecoder:
        """Load target (and draft) from local folders or model objects.

        target None means the embedded demo pair (its draft too, for method="draft_model").
        k: draft length (chains) or tree size; "auto" = chosen per step (AdaptiveK); None = the
        method's default: "auto" for drafters that stop on their own confidence (draft_model;
        measured faster than every fixed k on the embedded pair), else the drafter's default_k.
        width: children per expanded node of a draft tree, for drafters that grow trees (1: a
        chain; None: the drafter's default).
        costs: c and v(n) for k="auto" (a CostModel or a JSON file written by CostModel.to_json);
        None: measured once now (costs.calibrate) and frozen.
        tokenizer: a transformers tokenizer or folder, for model objects that come without one.
        chat_template: Jinja text (or a file of it) for chat messages, replacing the tokenizer's.
        datastore: for the drafters that read one (suffix, eagle+suffix): the target's answers to
        other requests (drafters/datastore.py), a file or a folder holding datastore.npy (a head
        folder: `outrider train drafter` writes one); None: none.
        """
        cls_ = drafter_class(method)
        if k is None and getattr(cls_, "stops_on_confidence", False):
            k = "auto"
        auto = k == "auto"
        if auto:
            k = (AUTO_K_MAX if (width or 1) == 1 else AUTO_TREE_SIZE) if cls_.default_k else None
        elif k is not None:
            _check_positive("k", k)
        if width is not None:
            _check_positive("width", width)
        uses_head = getattr(cls_, "uses_head", False)
        if draft is not None and not cls_.uses_draft_model and not uses_head:
            raise ValueError(
                f"method {method!r} uses no draft model, but draft={draft!r} was given: drop the "
                "draft or use method='draft_model'"
            )
        if target is None:
            target = _default_target()
            if cls_.uses_draft_model and draft is None:
                draft = embedded_pair_dir() / "draft"
            if uses_head and draft is None:
                # The head trained for the embedded target (a hybrid names the head it reads).
                draft = embedded_pair_dir() / getattr(cls_, "head_method", method)
        if uses_head and not isinstance(draft, (str, Path)):
            raise ValueError(
                f"method {method!r} needs draft=<folder of a head trained by `outrider train drafter "
                f"--method {method}`>, got {draft!r}"
            )
        if isinstance(costs, (str, Path)):
            costs = CostModel.load(costs)
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
        head_path = Path(draft).expanduser() if uses_head else None
        store = _datastore(cls_, method, datastore)
        drafter = cls_.build(BuildContext(loaded_target, loaded_draft, k, width, head_path, store))
        k = k or getattr(drafter, "k", cls_.default_k)
        adaptive = None
        if auto and k:
            if costs is None:
                probe = getattr(drafter, "probe", None)  # a head's one draft step, timed like a draft forward
                costs = _calibrated(loaded_target, loaded_draft, probe, str(head_path) if head_path else None)
            adaptive = AdaptiveK(k_max=AUTO_K_MAX, costs=costs)
        decoder = cls(loaded_target, drafter, k=k, method=method, adaptive=adaptive)
        # A batch (batch.py) gives each row a drafter of its own, built the same way (on its own
        # view of the draft model, for a drafter that has one).
        def new_drafter(draft_model: Any = None) -> Drafter:
            draft = loaded_draft if draft_model is None else dataclasses.replace(loaded_draft, model=draft_model)
            return cls_.build(BuildContext(loaded_target, draft, k, width, head_path, store))

        decoder.new_drafter = new_drafter
        decoder.chat_template = read_chat_template(chat_template)
        if adaptive is not None:
            decoder.calibrate_acceptance()
        return decoder

    def calibrate_acceptance(self, prompts: Sequence[str | Sequence[int]] | None = None,
                             max_new_tokens: int = CALIBRATION_TOKENS) -> None:
        """Learn k="auto"'s prior (acceptance per draft position and per draft confidence) from
        greedy runs on fixed prompts, and keep it for every later request (AdaptiveK.keep_as_prior).
        Deterministic, so decoders built alike start alike. Text prompts need a tokenizer (they are
        skipped without one). prompts None: CALIBRATION_REQUESTS through the chat template for a
        target that has one (an instruction model), else CALIBRATION_PROMPTS."""
        if self.adaptive is None:
            return
        if prompts is None:
            prompts = ([self.chat_ids([{"role": "user", "content": r}]) for r in CALIBRATION_REQUESTS]
                       if self.has_chat_template else CALIBRATION_PROMPTS)
        self.adaptive.reset()
        self._learning = True
        try:
            for prompt in prompts:
                if isinstance(prompt, str) and self.tokenizer is None:
                    continue
                n = len(self.encode(prompt))
                limit = self.target.model.max_length
                new = max_new_tokens if limit is None else min(max_new_tokens, limit - n)
                if new >= 1:
                    self.generate(prompt, max_new_tokens=new)
        finally:
            self._learning = False
        self.adaptive.keep_as_prior()

    @property
    def costs(self) -> CostModel:
        """c and v(n) of this decoder's models: the frozen ones k="auto" decides by, else measured
        once per process on first use (the bench predicts speedups with them)."""
        if self.adaptive is not None:
            return self.adaptive.costs
        draft_model = getattr(self.drafter, "model", None)
        draft = LoadedModel(draft_model, None, (), f"draft@{id(draft_model)}") if draft_model is not None else None
        probe = getattr(self.drafter, "probe", None)  # a self-drafting head's one step
        return _calibrated(self.target, draft, probe, f"probe@{id(self.drafter)}" if probe else None)

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
            check_prompt(prompt)
            ids = prompt.tolist() if isinstance(prompt, torch.Tensor) else list(prompt)
        return self.encode_ids(ids)

    @property
    def has_chat_template(self) -> bool:
        """Whether chat_ids can render messages: a tokenizer with a template, or chat_template set."""
        return self.tokenizer is not None and bool(self.chat_template or getattr(self.tokenizer, "chat_template", None))

    def chat_ids(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """The prompt ids of a chat: `messages` rendered by the chat template (the decoder's
        `chat_template` if set, else the tokenizer's), ending with the assistant's turn opened."""
        check_messages(messages)
        if self.tokenizer is None:
            raise ValueError("chat messages need a tokenizer, and the target has none: pass token ids")
        template = self.chat_template or getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise ValueError(
                f"the target {self.target.name!r} has no chat template: pass chat_template=<Jinja text> "
                "(CLI: --chat-template FILE), or send a plain prompt"
            )
        try:
            text = self.tokenizer.apply_chat_template(
                [dict(m) for m in messages], chat_template=template, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja raises its own types (template errors, raise_exception calls)
            raise ValueError(f"the chat template could not render these messages: {e}") from e
        # The template already holds any BOS: adding special tokens again would double it.
        return self.encode_ids(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_ids(self, ids: list[int]) -> list[int]:
        if not ids:
            raise ValueError("prompt is empty: give at least one token of context")
        vocab = self.target.model.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        return ids

    def _check_lengths(self, n_prompt: int, max_new_tokens: int) -> None:
        limit = self.target.model.max_length
        if limit is not None and n_prompt + max_new_tokens > limit:
            raise ValueError(
                f"prompt ({n_prompt} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                f"target's context of {limit} tokens: shorten the prompt or lower max_new_tokens"
            )

    # ---- public generation API ------------------------------------------------------------

    def generate(
        self,
        prompt: str | Sequence[int] | GenerationRequest | None = None,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        *,
        messages: Sequence[Mapping[str, Any]] | None = None,
    ) -> GenerationResult:
        """Generate for one prompt, or chat `messages` through the model's chat template (or a
        GenerationRequest, whose fields then replace the others)."""
        request = prompt if isinstance(prompt, GenerationRequest) else GenerationRequest(
            prompt, max_new_tokens, temperature, top_k, top_p, seed, stop, messages)
        stats = SpecStats()
        collected = Collector()
        for chunk in self._run(request, stats, want_text=False):
            collected.add(chunk)
        return collected.result(request, stats, self.tokenizer)

    def stream(
        self,
        prompt: str | Sequence[int] | GenerationRequest | None = None,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stats: SpecStats | None = None,
        *,
        messages: Sequence[Mapping[str, Any]] | None = None,
    ) -> Iterator[Chunk]:
        """Yield the tokens as they are committed (one Chunk per step; the last one carries the
        finish_reason). Pass a SpecStats to read the run's counts and times while or after it runs."""
        request = prompt if isinstance(prompt, GenerationRequest) else GenerationRequest(
            prompt, max_new_tokens, temperature, top_k, top_p, seed, stop, messages)
        yield from self._run(request, stats or SpecStats(), want_text=True)

    # ---- the loop -------------------------------------------------------------------------

    def _run(self, request: GenerationRequest, stats: SpecStats, want_text: bool) -> Iterator[Chunk]:
        state = self._new_sequence(request, stats, want_text, self.target.model, self.drafter, self.adaptive)
        self._prefill(state)
        while True:
            chunk = self._step(state)
            if chunk.token_ids or chunk.finish_reason is not None:
                yield chunk
            if chunk.finish_reason is not None:
                return

    def _new_sequence(self, request: GenerationRequest, stats: SpecStats, want_text: bool, model: Any,
                      drafter: Drafter, adaptive: AdaptiveK | None) -> _Sequence:
        """A request's checked prompt and its state (not yet prefilled), on `model`'s cache."""
        params = request.sampling
        prompt_ids = self.encode(request.prompt) if request.messages is None else self.chat_ids(request.messages)
        self._check_lengths(len(prompt_ids), request.max_new_tokens)
        stops = request.stops
        if stops and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer, and the target has none: use EOS or max_new_tokens")
        text = _TextTracker(self.tokenizer, prompt_ids, stops) if (want_text or stops) and self.tokenizer else None
        generator = None
        if not params.greedy:
            generator = torch.Generator(device=self.target.model.device)
            generator.manual_seed(request.seed if request.seed is not None else random.getrandbits(63))
        return _Sequence(prompt_ids, request, generator, stats, text, model, drafter, adaptive)

    def _prefill(self, state: _Sequence) -> None:
        t0 = self.clock()
        target = state.model
        ids = self._prefill_ids(state)
        kept = self._keep_prefix(state)
        hidden = None
        if ids is not None and kept < ids.shape[0]:
            target.forward(ids[kept:].to(target.device), num_logits=0)
            hidden = target.hidden if self.hidden_layers else None
        self._begin(state, self._prompt_hidden(state, hidden) if ids is not None else None, t0)

    def _keep_prefix(self, state: _Sequence) -> int:
        """Keep the part of the sequence's cache that the prompt shares with what it holds (a chat's
        earlier turns, a common system prompt; models/base.py, reuse_prefix), or empty it; returns
        the prompt tokens kept, which the prefill then skips."""
        ids = self._prefill_ids(state)
        target = state.model
        # A drafter that reads hidden states needs the reused tokens' too: only from a cache that
        # records them.
        records = not self.hidden_layers or getattr(target, "cached_hidden", lambda: None)() is not None
        if ids is None or not (self.reuse_prefix and records):
            target.reset()
            kept = 0
        else:
            kept = reuse_prefix(target, ids)
        state.kept = state.stats.reused_tokens = kept
        return kept

    def _prompt_hidden(self, state: _Sequence, fed: torch.Tensor | None) -> torch.Tensor | None:
        """The hidden states of the prompt's prefill tokens for the drafter, from those the prefill
        fed (fed) and, for a kept prefix, the cache's record. Where the kernels run, the whole
        prompt's states are the same bits as a full prefill's (models/llama.py, forward)."""
        if not self.hidden_layers:
            return None
        return state.model.cached_hidden().clone() if state.kept else fed

    @staticmethod
    def _prefill_ids(state: _Sequence) -> torch.Tensor | None:
        """The prompt tokens a prefill feeds (all but the last: it is fed with the first draft, so
        every step scores d+1 tokens); None for a one-token prompt."""
        return state.seq[: state.n_prompt - 1] if state.n_prompt > 1 else None

    def _begin(self, state: _Sequence, hidden: torch.Tensor | None, t0: float) -> None:
        """After the prefill forward (hidden: its captured states): start the drafter and the stats."""
        if self.hidden_layers:
            state.hidden = hidden
        state.drafter.begin(state.seq[: state.n_prompt])
        if state.adaptive is not None and not self._learning:
            state.adaptive.reset()  # each request decides from the prior and its own history (contract 3)
        state.stats.prompt_tokens = state.n_prompt
        state.stats.prefill_s += self.clock() - t0

    def _step(self, state: _Sequence) -> Chunk:
        """One draft -> verify -> commit step; returns the committed tokens (finish_reason set when
        the generation ended)."""
        plan = self._plan(state)
        logits = state.model.forward(plan.ids, attn_mask=plan.attn_mask, positions=plan.positions)  # (d+1, V)
        return self._complete(state, plan, logits)

    def _plan(self, state: _Sequence, k_cap: int | None = None) -> _StepPlan:
        """Draft (at most k_cap nodes when given) and build the target's input for this step: the
        last committed token (the root) and the draft's nodes."""
        k, step, ta = self._draft_step(state, k_cap)
        draft = state.drafter.propose(step) if k > 0 else None
        return self._plan_from(state, k, step, draft, ta)

    def _draft_step(self, state: _Sequence, k_cap: int | None = None) -> tuple[int, DraftStep, float]:
        """The step's draft budget k (0: no draft), what the drafter sees, and the clock before it
        drafts; the hidden states waiting for the drafter are handed over (in the step)."""
        drafter, adaptive = state.drafter, state.adaptive
        if adaptive is not None and not getattr(drafter, "stops_on_confidence", False):
            k = adaptive.choose(state.remaining - 1)
        else:
            k = min(self.k, state.remaining - 1)  # an upper bound; adaptive drafters stop earlier
        if k_cap is not None:
            k = min(k, k_cap)
        ta = self.clock()
        hidden, state.hidden = state.hidden, None
        return k, DraftStep(state.seq[: state.n], k, state.params, state.generator, adaptive, hidden), ta

    def _plan_from(self, state: _Sequence, k: int, step: DraftStep, draft: Draft | None, ta: float) -> _StepPlan:
        """The plan of a step whose draft was proposed (None: k was 0)."""
        target, n, seq = state.model, state.n, state.seq
        d = draft.size if draft is not None else 0
        root = seq[n - 1 : n].to(target.device)
        ids = torch.cat([root, draft.tokens]) if d else root
        attn_mask = positions = None
        if d and not draft.is_chain:
            # A tree: [root] + nodes in one forward, each node seeing the root and its ancestors.
            positions = verify_positions(draft.parents, n - 1).to(target.device)  # (d+1,): n - 1 + depth
            attn_mask = verify_mask(draft.parents).to(target.device)
        return _StepPlan(k, draft, step.hidden, ids, attn_mask, positions, ta, self.clock())

    def _complete(self, state: _Sequence, plan: _StepPlan, logits: torch.Tensor,
                  verdict: tuple[int, int] | None = None) -> Chunk:
        """Verify the step's draft against the target's logits (d+1, V), keep the accepted path in
        the caches, commit; returns the committed tokens. verdict: a greedy chain's (accepted,
        next token) already verified with the other rows of a batch (batch.py)."""
        target, drafter, clock = state.model, state.drafter, self.clock
        n, seq, params, adaptive, draft, k = state.n, state.seq, state.params, state.adaptive, plan.draft, plan.k
        d = draft.size if draft is not None else 0
        if d and not draft.is_chain:
            parents = draft.parents
            if params.greedy:
                path, next_token = verify_tree_greedy(draft.tokens, parents, logits)
            else:
                p = probs_from_logits(logits, params)
                path, next_token = verify_tree_speculative(draft.tokens, parents, draft.probs, p, state.generator)
            target.keep_path(n - 1, [0] + [i + 1 for i in path])
            depth = int(plan.positions.max()) - (n - 1)
        else:
            tokens = draft.tokens if d else plan.ids[:0]
            if verdict is not None:
                accepted, next_token = verdict
            elif params.greedy:
                accepted, next_token = verify_greedy(tokens, logits)
            else:
                p = probs_from_logits(logits, params)
                accepted, next_token = verify_speculative(tokens, draft.probs if d else None, p, state.generator)
            path = list(range(accepted))
            target.rollback(n + accepted)
            depth = d
        tc = clock()
        accepted = len(path)
        if self.hidden_layers:
            # The root and the accepted nodes are committed now: rows 0 and 1 + path of the forward.
            rows = torch.tensor([0] + [i + 1 for i in path], device=target.device)
            state.hidden = _join(plan.hidden if k == 0 else None, target.hidden.index_select(1, rows))
        if accepted:
            seq[n : n + accepted] = draft.tokens[path].cpu()
        seq[n + accepted] = next_token
        if draft is not None:
            drafter.update(path)
        if adaptive is not None and draft is not None:
            adaptive.observe(depth, accepted, _tried(draft, path))
        new = seq[n : n + accepted + 1].tolist()
        chunk = self._commit(state, new, accepted)
        committed = len(chunk.token_ids)
        state.stats.record_step(d, min(accepted, committed), committed, depth,
                                draft.forwards if draft is not None else 0)
        state.stats.draft_s += plan.tb - plan.ta
        state.stats.target_s += tc - plan.tb
        state.stats.decode_s += clock() - plan.ta
        if chunk.finish_reason is not None:
            finish = getattr(drafter, "finish", None)
            if finish is not None:  # drafters that learn from whole outputs (suffix) see the last step
                finish(state.seq[: state.n])
        return chunk

    def _commit(self, state: _Sequence, new: list[int], accepted: int) -> Chunk:
        """Cut the step's tokens at EOS, a stop string or the length limit; advance the sequence."""
        reason: FinishReason | None = None
        eos = self.target.eos_token_ids
        for j, t in enumerate(new):
            if t in eos:
                new, reason = new[: j + 1], "eos"
                break
        drafted_flags = [j < accepted for j in range(len(new))]
        pieces = [""] * len(new)
        text = state.text
        if text is not None:
            keep, pieces, hit = text.push(new)
            if hit:
                new, drafted_flags, reason = new[:keep], drafted_flags[:keep], "stop"
        state.n += len(new)
        if reason is None and state.remaining <= 0:
            reason = "length"
        if reason is not None and text is not None and pieces:
            pieces[-1] += text.flush()
        return Chunk(new, drafted_flags, pieces, reason)


_CALIBRATED: dict[tuple, CostModel] = {}


def _calibrated(target: LoadedModel, draft: LoadedModel | None, probe: Any = None,
                probe_name: str | None = None) -> CostModel:
    """Costs measured once per process for the same models on the same device and threads: fresh
    decoders of one process then draft alike, so their seeded outputs agree (contract 3)."""
    def identity(m: LoadedModel) -> str:
        # A folder names its weights; a model object passed in (named after its class) does not.
        return m.name if Path(m.name).exists() else f"{m.name}@{id(m.model)}"

    key = tuple(
        (identity(m), str(m.model.device), str(getattr(m.model, "dtype", "")), m.model.vocab_size)
        for m in (target, draft) if m is not None
    ) + (probe_name, torch.get_num_threads())
    if key not in _CALIBRATED:
        _CALIBRATED[key] = calibrate(target.model, draft.model if draft is not None else None, probe=probe)
    return _CALIBRATED[key]


def _join(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    """Hidden states (L, m, D) in sequence order: a's tokens, then b's."""
    return b if a is None else torch.cat([a, b], dim=1)


def _tried(draft: Draft, path: list[int]) -> list[tuple[float, bool, int]] | None:
    """(confidence, kept, rank among siblings) of the nodes verification tried: the children of the
    root and of every accepted node (for a chain: the first accepted + 1 tokens)."""
    if not draft.confidences:
        return None
    conf = draft.confidences
    if draft.is_chain:
        return [(conf[i], i < len(path), 0) for i in range(min(len(path) + 1, len(conf)))]
    on_path = set(path)
    tried_parents = {-1, *path}
    out, siblings = [], {}
    for i, p in enumerate(draft.parents.tolist()):
        rank = siblings.get(p, 0)
        siblings[p] = rank + 1
        if p in tried_parents and conf[i] is not None:  # None: a node from a drafter that reports none
            out.append((conf[i], i in on_path, rank))
    return out


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
