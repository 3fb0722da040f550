"""The OpenAI wire format as pydantic models: what /v1/completions and /v1/chat/completions take
and return. Nothing here runs a model; app.py translates these to GenerationRequests.

Fields that OpenAI defines but outrider does not implement (logprobs, echo, penalties, tools, ...)
are declared so that a request using them gets a 400 naming the field instead of a silently
different answer (DESIGN contract 6). Unknown fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# OpenAI's finish reasons plus "abort" (vLLM's word): cancelled by a deadline or a shutdown.
FinishReason = Literal["stop", "length", "abort"]


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # None: the one served model (curl users need not repeat it)
    max_tokens: int | None = Field(default=None, ge=1)  # None: the rest of the context
    temperature: float | None = None  # None: the model's generation config
    top_p: float | None = None
    top_k: int | None = None  # not OpenAI's, but vLLM's and llama.cpp's; -1 or 0 mean off
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    deadline: float | None = Field(default=None, gt=0)  # outrider's: seconds from arrival, then "abort"
    # Declared only to refuse them (see unsupported()).
    logprobs: Any = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    def unsupported(self) -> str | None:
        """The name of the first field set to something outrider would silently ignore."""
        if self.logprobs not in (None, False, 0):
            return "logprobs"
        if self.logit_bias:
            return "logit_bias"
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                return name
        return None


class CompletionRequest(_Request):
    # One prompt per request: text or token ids (a list of one of them is unwrapped).
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> str | None:
        if self.echo:
            return "echo"
        if self.best_of not in (None, 1):
            return "best_of"
        if self.suffix:
            return "suffix"
        return super().unsupported()


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(default=None, ge=1)  # OpenAI's newer name for max_tokens
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    response_format: Any = None

    def unsupported(self) -> str | None:
        if self.top_logprobs:
            return "top_logprobs"
        if self.tools:
            return "tools"
        if self.response_format not in (None, {"type": "text"}):
            return "response_format"
        return super().unsupported()


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens whose cache the previous request left (not computed again)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int  # committed tokens, never drafted ones that were rejected
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class SpecFigures(BaseModel):
    """outrider's per-request figures (DESIGN words); the official client ignores the field."""

    method: str
    steps: int  # target forwards after prefill
    drafts: int  # steps that drafted at least one token
    drafted: int
    accepted: int
    accepted_at: list[int]  # steps whose accepted path reached depth i + 1
    tau: float
    alpha: float


class _Envelope(BaseModel):
    """What every completion response and chunk carries besides its object name and choices."""

    id: str
    created: int
    model: str
    usage: Usage | None = None
    outrider: SpecFigures | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None


class CompletionResponse(_Envelope):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason | None


class ChatCompletionResponse(_Envelope):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(_Envelope):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class CompletionChunk(_Envelope):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "outrider"
    max_model_len: int | None = None  # vLLM's field: the target's context in tokens


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def finish_reason(reason: str) -> FinishReason:
    """The decoder's reasons in OpenAI's words: an EOS token and a stop string both mean "stop"."""
    return {"eos": "stop", "stop": "stop", "length": "length"}.get(reason, "abort")  # type: ignore[return-value]


def generation_defaults(model_dir: str | Path | None) -> dict[str, float | int | None]:
    """Sampling values for fields a request leaves unset, from the model folder's
    generation_config.json (transformers' rule: without do_sample the model decodes greedily).
    No folder or no file: greedy, the exact mode."""
    defaults: dict[str, float | int | None] = {"temperature": 0.0, "top_k": None, "top_p": None}
    if model_dir is None or not (Path(model_dir) / "generation_config.json").is_file():
        return defaults
    from transformers import GenerationConfig

    config = GenerationConfig.from_pretrained(str(model_dir))
    if not config.do_sample:
        return defaults
    defaults["temperature"] = float(config.temperature) if config.temperature is not None else 1.0
    # transformers' own default top_k of 50 is a library default, not the model author's choice,
    # but it is what `generate` would do with this config, so it is kept.
    defaults["top_k"] = int(config.top_k) if config.top_k else None
    defaults["top_p"] = float(config.top_p) if config.top_p is not None and config.top_p < 1.0 else None
    return defaults
