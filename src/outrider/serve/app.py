"""The HTTP layer: an OpenAI-compatible FastAPI app around one SpeculativeDecoder.

It only translates: protocol models in, GenerationRequests to the engine, engine events out as
OpenAI responses or server-sent events. Every error becomes one OpenAI-shaped body in one place
(`error_response`): ValueError -> 400, unknown model -> 404, full queue -> 429 (with Retry-After),
shutting down -> 503.
"""

from __future__ import annotations

import asyncio
import re
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from outrider.decoder import GenerationRequest, SpeculativeDecoder
from outrider.serve.engine import Draining, Engine, Event, Job, QueueFull
from outrider.serve.metrics import CONTENT_TYPE, ServeMetrics
from outrider.serve.protocol import (
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
    ChatCompletionResponse, CompletionChoice, CompletionChunk, CompletionRequest, CompletionResponse, Delta,
    ErrorBody, ErrorResponse, ModelCard, ModelList, PromptTokensDetails, SpecFigures, Usage, finish_reason, new_id,
    now,
)

# Context of a target that states none (only the hf backend on a config without one): the
# default max_tokens then, since "the rest of the context" is unbounded.
FALLBACK_MAX_TOKENS = 256
CLIENT_CLOSED = 499  # nginx's status for a request whose client hung up (only the access log sees it)


class ModelNotFound(LookupError):
    def __init__(self, asked: str, served: str) -> None:
        super().__init__(f"model {asked!r} is not served here: use model={served!r} (GET /v1/models lists it)")


class BadRequest(ValueError):
    """A ValueError that knows which request field it is about."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


# The decoder names its own parameters; a client knows them by their HTTP names.
_PARAM_NAMES = {"max_new_tokens": "max_tokens"}


def error_response(exc: Exception) -> JSONResponse:
    """The one place where an exception becomes a status code and an OpenAI error body."""
    headers: dict[str, str] = {}
    param = None
    if isinstance(exc, RequestValidationError):
        status, kind, code = 400, "invalid_request_error", None
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":  # loc then holds the character offset, not a field
            where = f" at character {loc[0]}" if loc else ""
            message, code = f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'decode error')}" \
                            f"{where}): send one JSON object", "invalid_json"
        else:
            param = ".".join(loc) or None
            message = f"{param or 'body'}: {first.get('msg', 'invalid value')} (got {first.get('input')!r:.80})"
    elif isinstance(exc, ModelNotFound):
        status, kind, code, message, param = 404, "invalid_request_error", "model_not_found", str(exc), "model"
    elif isinstance(exc, QueueFull):
        status, kind, code, message = 429, "rate_limit_error", "queue_full", str(exc)
        headers["Retry-After"] = str(exc.retry_after)
    elif isinstance(exc, Draining):
        status, kind, code, message = 503, "service_unavailable", "shutting_down", str(exc)
    elif isinstance(exc, ValueError):
        status, kind, code, message = 400, "invalid_request_error", None, str(exc)
        param = getattr(exc, "param", None)
        if param is None and (m := re.match(r"(\w+)=", message)):
            param = _PARAM_NAMES.get(m.group(1), m.group(1))
    elif isinstance(exc, StarletteHTTPException):
        status, kind, code, message = exc.status_code, "invalid_request_error", None, str(exc.detail)
    else:
        status, kind, code, message = 500, "internal_error", None, f"{type(exc).__name__}: {exc}"
    body = ErrorResponse(error=ErrorBody(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


@dataclass
class _Prepared:
    job: Job
    created: int
    id: str


def create_app(
    decoder: SpeculativeDecoder,
    *,
    model_name: str | None = None,
    max_queue: int = 16,
    defaults: Mapping[str, float | int | None] | None = None,
    max_batch: int = 1,
) -> FastAPI:
    """An OpenAI-compatible app serving `decoder` as the model `model_name` (default: the target
    folder's name). max_queue: requests that may wait behind the running ones before 429s.
    max_batch: requests generated at once, batched continuously (batch.py; native backend).
    defaults: temperature / top_k / top_p for requests that leave them unset (protocol.
    generation_defaults reads them from a model folder; None: greedy)."""
    name = model_name or Path(decoder.target.name).name or "outrider"
    metrics = ServeMetrics(name)
    engine = Engine(decoder, max_queue=max_queue, metrics=metrics, max_batch=max_batch)
    sampling_defaults = {"temperature": 0.0, "top_k": None, "top_p": None, **(defaults or {})}
    context = decoder.target.model.max_length
    created = now()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.close)

    app = FastAPI(title="outrider", lifespan=lifespan)
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.model_name = name
    for exc_type in (RequestValidationError, ValueError, ModelNotFound, QueueFull, Draining,
                     StarletteHTTPException, Exception):
        app.add_exception_handler(exc_type, lambda request, exc: error_response(exc))

    def admit(body: CompletionRequest | ChatCompletionRequest, prompt_ids: Callable[[], list[int]],
              max_tokens: int | None) -> _Prepared:
        """Check a request, turn it into a GenerationRequest and queue it (raises the errors that
        error_response maps)."""
        if body.model is not None and body.model != name:
            raise ModelNotFound(body.model, name)
        if body.n != 1:
            raise BadRequest(f"n={body.n} is invalid: outrider returns one choice per request; send n=1 "
                             "(or leave it out) and repeat the request for more", "n")
        field = body.unsupported()
        if field is not None:
            raise BadRequest(f"{field} is not supported by outrider: leave it out of the request", field)
        ids = prompt_ids()
        if context is not None:
            rest = context - len(ids)
            if rest < 1:
                raise BadRequest(f"the prompt ({len(ids)} tokens) fills the model's context of {context} "
                                 "tokens: shorten it", "prompt" if isinstance(body, CompletionRequest) else "messages")
            if max_tokens is None:
                max_tokens = rest
            elif len(ids) + max_tokens > context:
                raise BadRequest(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                                 f"context of {context} tokens: lower max_tokens to at most {rest} or leave "
                                 "it out (default: the rest of the context)", "max_tokens")
        elif max_tokens is None:
            max_tokens = FALLBACK_MAX_TOKENS
        top_k = body.top_k if body.top_k is not None else sampling_defaults["top_k"]
        request = GenerationRequest(
            prompt=ids, max_new_tokens=max_tokens,
            temperature=body.temperature if body.temperature is not None else sampling_defaults["temperature"],
            top_k=None if top_k in (-1, 0) else top_k,  # vLLM's and llama.cpp's "off"
            top_p=body.top_p if body.top_p is not None else sampling_defaults["top_p"],
            seed=body.seed, stop=body.stop,
        )
        job = engine.submit(request, len(ids), body.deadline)
        return _Prepared(job, now(), new_id("cmpl" if isinstance(body, CompletionRequest) else "chatcmpl"))

    def figures(job: Job) -> SpecFigures:
        s = job.stats
        return SpecFigures(method=decoder.method, steps=s.steps, drafts=s.drafted_at[0] if s.drafted_at else 0,
                           drafted=s.drafted, accepted=s.accepted, accepted_at=list(s.accepted_at),
                           tau=s.tau, alpha=s.alpha)

    def usage(job: Job) -> Usage:
        return Usage(prompt_tokens=job.n_prompt, completion_tokens=job.stats.new_tokens,
                     total_tokens=job.n_prompt + job.stats.new_tokens,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=job.stats.reused_tokens))

    async def collect(prepared: _Prepared, request: Request) -> tuple[str, str] | None:
        """Wait for a non-streamed job's text and finish reason; a client that hangs up cancels it
        (None then: nobody is left to answer)."""
        job = prepared.job

        async def gather() -> tuple[str, str]:
            parts: list[str] = []
            async for event in job.events():
                if event.error is not None:
                    raise event.error
                parts.append(event.text)
                if event.finish_reason is not None:
                    return "".join(parts), event.finish_reason
            raise AssertionError("a job's events end with a finish reason or an error")

        async def hung_up() -> None:
            # The body is read already: the next ASGI message is the disconnect, whenever it comes.
            while (await request.receive())["type"] != "http.disconnect":
                pass

        result, watch = asyncio.ensure_future(gather()), asyncio.ensure_future(hung_up())
        try:
            await asyncio.wait({result, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not result.done():
                engine.cancel(job)
                result.cancel()
        return None if result.cancelled() else result.result()

    def stream(prepared: _Prepared, make_chunk: Callable[[Event, bool], Any], include_usage: bool,
               usage_chunk: Callable[[], Any]) -> StreamingResponse:
        """Server-sent events: a chunk per step that released text (one step may commit several
        tokens), the last one with finish_reason, then usage if asked, then [DONE]."""
        job = prepared.job

        async def sse() -> AsyncIterator[str]:
            first = True
            async for event in job.events():
                if event.error is not None:
                    body = error_response(event.error).body.decode()  # headers are sent: report in-band
                    yield f"data: {body}\n\n"
                    break
                if event.text or event.last or first:
                    yield f"data: {make_chunk(event, first).model_dump_json()}\n\n"
                    first = False
            else:
                if include_usage:
                    yield f"data: {usage_chunk().model_dump_json()}\n\n"
            yield "data: [DONE]\n\n"

        return _EventStream(sse(), on_close=lambda: engine.cancel(job))

    async def respond(body: Any, prepared: _Prepared, request: Request, chunk: Callable[[Event, bool], Any],
                      chunk_type: type, response_type: type, choice: Callable[[str, Any], Any]) -> Response:
        """The one answer path of both endpoints: SSE chunks when streaming, else one response."""
        job = prepared.job
        ids = dict(id=prepared.id, created=prepared.created, model=name)
        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            return stream(prepared, chunk, include, lambda: chunk_type(**ids, choices=[], usage=usage(job)))
        done = await collect(prepared, request)
        if done is None:
            return Response(status_code=CLIENT_CLOSED)
        text, reason = done
        return JSONResponse(response_type(**ids, choices=[choice(text, finish_reason(reason))], usage=usage(job),
                                          outrider=figures(job)).model_dump())

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise BadRequest(f"prompt holds {len(prompt)} prompts: send one prompt per request", "prompt")
            prompt = prompt[0]
        prepared = admit(body, lambda: _about("prompt", decoder.encode, prompt), body.max_tokens)
        job = prepared.job

        def chunk(event: Event, first: bool) -> CompletionChunk:
            reason = finish_reason(event.finish_reason) if event.finish_reason else None
            return CompletionChunk(id=prepared.id, created=prepared.created, model=name,
                                   choices=[CompletionChoice(text=event.text, finish_reason=reason)],
                                   outrider=figures(job) if reason else None)

        return await respond(body, prepared, request, chunk, CompletionChunk, CompletionResponse,
                             lambda text, reason: CompletionChoice(text=text, finish_reason=reason))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        prepared = admit(body, lambda: _about("messages", decoder.chat_ids, messages), max_tokens)
        job = prepared.job

        def chunk(event: Event, first: bool) -> ChatCompletionChunk:
            reason = finish_reason(event.finish_reason) if event.finish_reason else None
            # OpenAI's first delta names the role; the last carries finish_reason (and no content).
            delta = Delta(role="assistant" if first else None, content=event.text if event.text or first else None)
            return ChatCompletionChunk(id=prepared.id, created=prepared.created, model=name,
                                       choices=[ChatChunkChoice(delta=delta, finish_reason=reason)],
                                       outrider=figures(job) if reason else None)

        return await respond(body, prepared, request, chunk, ChatCompletionChunk, ChatCompletionResponse,
                             lambda text, reason: ChatChoice(message=AssistantMessage(content=text),
                                                             finish_reason=reason))

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=name, created=created, max_model_len=context)])

    @app.get("/health")
    async def health() -> Response:
        # 503 while draining, so that a load balancer stops routing here before the process exits.
        if not engine.accepting:
            return error_response(Draining())
        return JSONResponse({"status": "ok", "running": engine.running, "waiting": engine.waiting})

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app


def _about(param: str, fn: Callable[[Any], list[int]], value: Any) -> list[int]:
    """fn(value), its ValueErrors marked as being about the request field `param`."""
    try:
        return fn(value)
    except BadRequest:
        raise
    except ValueError as e:
        raise BadRequest(str(e), param) from e


class _EventStream(StreamingResponse):
    """Server-sent events that run `on_close` however the stream ends: finished, or the client
    hung up (Starlette cancels the stream then) -- so a lost client never keeps the engine busy."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
