"""`outrider serve --replicas 2` on Ray Serve: the real CLI in a subprocess (it starts a local Ray
cluster on loopback and shuts it down on SIGTERM), driven by the official openai client. Greedy
float32 answers must equal SpeculativeDecoder.generate's whichever replica serves them, /metrics
must show both replicas, and Ray's own plain-text overload answer must reach clients as an
OpenAI 429."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

pytest.importorskip("fastapi", reason="the server needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("openai", reason="the tests drive the server with the official openai client")
from outrider.serve.ray_serve import OpenAIErrors  # noqa: E402  (needs only starlette)

PROMPTS = ("def add(a, b):\n", "for i in range(10):\n", "def greet(name):\n    print(", "import os\n")


@pytest.fixture(scope="module")
def ray_server(model_dirs):
    pytest.importorskip("ray.serve", reason='Ray Serve is not installed: pip install -e ".[ray]"')
    from test_serve import Server

    target, draft = model_dirs
    srv = Server(["--replicas", "2", "--cpus-per-replica", "1", "--target", str(target), "--draft", str(draft),
                  "--k", "4", "--dtype", "float32", "--shutdown-timeout", "1"], start_timeout_s=150)
    yield srv
    assert srv.stop(timeout_s=60) == 0, "".join(srv.log[-20:])


@pytest.fixture(scope="module")
def reference(model_dirs):
    from outrider import SpeculativeDecoder

    target, draft = model_dirs
    return SpeculativeDecoder.from_pretrained(target, draft=draft, k=4, dtype="float32")


@pytest.mark.slow
def test_two_replicas_answer_like_generate(ray_server, reference):
    import httpx
    import openai
    from prometheus_client.parser import text_string_to_metric_families

    client = ray_server.client()
    want = reference.generate(PROMPTS[0], max_new_tokens=24)
    got = client.completions.create(model="target", prompt=PROMPTS[0], max_tokens=24, temperature=0)
    assert got.choices[0].text == want.text
    assert got.usage.completion_tokens == len(want.token_ids)
    assert got.model_extra["outrider"]["accepted"] == want.stats.accepted

    want = reference.generate(PROMPTS[1], max_new_tokens=30)
    chunks = list(client.completions.create(model="target", prompt=PROMPTS[1], max_tokens=30, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)

    async def together() -> list[openai.types.Completion]:  # enough at once for both replicas to serve
        aclient = openai.AsyncOpenAI(base_url=ray_server.url + "/v1", api_key="unused", max_retries=0)
        return await asyncio.gather(*(aclient.completions.create(model="target", prompt=p, max_tokens=16)
                                      for p in PROMPTS))

    answers = asyncio.run(together())
    assert [a.choices[0].text for a in answers] == [reference.generate(p, max_new_tokens=16).text for p in PROMPTS]

    # /metrics from any replica shows every replica, labelled; the sum is every answer's usage.
    served = 24 + 30 + sum(a.usage.completion_tokens for a in answers)
    deadline = time.monotonic() + 10  # another replica's figures may be a second old
    while True:
        per_replica: dict[str, float] = {}
        for family in text_string_to_metric_families(httpx.get(ray_server.url + "/metrics", timeout=10).text):
            for s in family.samples:
                if s.name == "outrider:generation_tokens_total":
                    per_replica[s.labels["replica"]] = s.value
        if sum(per_replica.values()) == served or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(per_replica) == 2 and sum(per_replica.values()) == served, per_replica


def _through(app) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one GET through OpenAIErrors(app)."""
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}
    asyncio.run(OpenAIErrors(app)(scope, receive, send))
    headers = {k.decode().lower(): v.decode() for k, v in sent[0]["headers"]}
    return sent[0]["status"], headers, b"".join(m.get("body", b"") for m in sent[1:])


def _plain(status: int, text: str, headers: list[tuple[bytes, bytes]] = ()):
    """An ASGI app answering the way Ray Serve's proxy does when it rejects a request itself."""
    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"), *headers]})
        await send({"type": "http.response.body", "body": text.encode()})
    return app


# Ray's text for ray.serve.exceptions.BackPressureError (max_queued_requests exceeded).
BACKPRESSURE = "Request dropped due to backpressure (num_queued_requests=4, max_queued_requests=4)."


@pytest.mark.parametrize("status, headers, want_status, want_type, retry_after", [
    (503, [], 429, "rate_limit_error", "1"),                          # Ray's default answer
    (429, [(b"retry-after", b"5")], 429, "rate_limit_error", "5"),    # with a BackpressureConfig
])
def test_ray_backpressure_becomes_openai_429(status, headers, want_status, want_type, retry_after):
    got_status, got_headers, body = _through(_plain(status, BACKPRESSURE, headers))
    assert (got_status, got_headers["retry-after"]) == (want_status, retry_after)
    assert got_headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert error["type"] == want_type and error["code"] == "queue_full" and BACKPRESSURE in error["message"]
    assert set(error) == {"message", "type", "param", "code"}


def test_other_ray_errors_keep_status_and_app_answers_pass_through():
    status, _, body = _through(_plain(408, "Request abc timed out after 5.0s."))
    assert status == 408 and json.loads(body)["error"]["type"] == "timeout"
    status, _, body = _through(_plain(503, "Deployment 'outrider' is unavailable."))
    assert status == 503 and json.loads(body)["error"]["type"] == "service_unavailable"

    async def app_error(scope, receive, send) -> None:  # the app's own 429: JSON already, untouched
        await send({"type": "http.response.start", "status": 429,
                    "headers": [(b"content-type", b"application/json"), (b"retry-after", b"3")]})
        await send({"type": "http.response.body", "body": b'{"error": {"message": "full"}}'})
    status, headers, body = _through(app_error)
    assert (status, headers["retry-after"], body) == (429, "3", b'{"error": {"message": "full"}}')
