"""`outrider serve` under load and faults: a full queue answers 429 (and nobody gets a wrong answer),
clients that hang up cancel their generations, deadlines abort, and SIGTERM drains then aborts.

Each target forward sleeps 20 ms here (test_serve.Server), so that a 300-token request takes
seconds: long enough to be caught mid-stream on a busy machine. Cancellation is checked by what
the server counted (finish reasons, tokens), not by how fast it answered."""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the server needs the serve extra: pip install -e '.[serve]'")
openai = pytest.importorskip("openai", reason="the tests drive the server with the official openai client")
import httpx  # noqa: E402

from test_serve import MODEL_ARGS, PROMPTS, Server, reference, serve_model  # noqa: E402,F401  (fixtures)

LONG = 300  # tokens: ~100 slowed steps, seconds of work


@pytest.fixture(scope="module")
def slow_server(serve_model):
    srv = Server(["--target", str(serve_model), *MODEL_ARGS, "--max-queue", "2", "--shutdown-timeout", "1"],
                 delay_s=0.02)
    yield srv
    srv.stop()


def wait_for(read, want, timeout_s: float = 10.0) -> None:
    """Poll read() until it returns want."""
    deadline = time.monotonic() + timeout_s
    while (got := read()) != want:
        assert time.monotonic() < deadline, f"waited {timeout_s} s for {want}, still {got}"
        time.sleep(0.02)


def gauges(srv: Server) -> tuple[float, float]:
    m = srv.metrics()
    return m[("outrider:num_requests_running", ())], m[("outrider:num_requests_waiting", ())]


def counted(srv: Server) -> dict[str, float]:
    m = srv.metrics()
    return {"abort": m.get(("outrider:request_success_total", (("finished_reason", "abort"),)), 0.0),
            "generated": m[("outrider:generation_tokens_total", ())],
            "prompt": m[("outrider:prompt_tokens_total", ())]}


def first_text(lines) -> None:
    """Read server-sent events until one carries text."""
    for line in lines:
        if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
            return
    raise AssertionError("the stream ended before any text")


def test_full_queue_answers_429_and_nobody_gets_a_wrong_answer(slow_server, reference):
    barrier = threading.Barrier(10)
    results: list[tuple] = [()] * 10

    def ask(i: int) -> None:
        client, prompt = slow_server.client(), PROMPTS[i % len(PROMPTS)]
        barrier.wait()
        try:
            got = client.completions.create(model="target", prompt=prompt, max_tokens=40)
            results[i] = ("ok", prompt, got.choices[0].text)
        except openai.RateLimitError as e:
            results[i] = ("429", e.response.headers.get("retry-after"), e.response.json())

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    ok = [r for r in results if r and r[0] == "ok"]
    limited = [r for r in results if r and r[0] == "429"]
    assert len(ok) + len(limited) == 10
    assert len(ok) >= 3  # the first arrival runs and two wait: those are never refused
    assert limited
    for _, retry_after, body in limited:
        assert int(retry_after) >= 1
        assert body["error"]["code"] == "queue_full" and body["error"]["type"] == "rate_limit_error"
    want = {p: reference.generate(p, max_new_tokens=40).text for p in PROMPTS}
    assert all(text == want[prompt] for _, prompt, text in ok)
    wait_for(lambda: gauges(slow_server), (0, 0))


def test_clients_that_hang_up_mid_stream_or_in_the_queue_cancel(slow_server, reference):
    before = counted(slow_server)
    body = {"prompt": PROMPTS[0], "max_tokens": LONG, "stream": True}
    url = slow_server.url + "/v1/completions"
    with httpx.Client(timeout=30) as c1, httpx.Client(timeout=30) as c2:
        with c1.stream("POST", url, json=body) as running:
            lines = running.iter_lines()  # held: a dropped line iterator closes the connection
            first_text(lines)
            with c2.stream("POST", url, json=body):
                wait_for(lambda: gauges(slow_server), (1, 1))
            wait_for(lambda: gauges(slow_server), (1, 0))  # the waiting one left the queue
    wait_for(lambda: gauges(slow_server), (0, 0))
    after = counted(slow_server)
    assert after["abort"] - before["abort"] == 2
    assert after["generated"] - before["generated"] < LONG  # the running one stopped early
    assert after["prompt"] - before["prompt"] == len(reference.encode(PROMPTS[0]))  # the queued one never ran
    got = slow_server.client().completions.create(model="target", prompt=PROMPTS[1], max_tokens=12)
    assert got.choices[0].text == reference.generate(PROMPTS[1], max_new_tokens=12).text


def test_non_streaming_client_that_times_out_cancels(slow_server):
    before = counted(slow_server)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(slow_server.url + "/v1/completions", json={"prompt": PROMPTS[2], "max_tokens": LONG}, timeout=0.5)
    wait_for(lambda: gauges(slow_server), (0, 0))
    after = counted(slow_server)
    assert after["abort"] - before["abort"] == 1
    assert after["generated"] - before["generated"] < LONG


def test_deadline_aborts_with_the_tokens_so_far(slow_server, reference):
    got = slow_server.client().completions.create(model="target", prompt=PROMPTS[0], max_tokens=LONG,
                                                  extra_body={"deadline": 0.3})
    assert got.choices[0].finish_reason == "abort"
    assert 0 < got.usage.completion_tokens < LONG
    want = reference.generate(PROMPTS[0], max_new_tokens=got.usage.completion_tokens)
    assert got.choices[0].text == want.text  # what was sent is a prefix of the full answer


def test_sigterm_finishes_what_it_can_then_aborts_and_exits(serve_model, reference):
    # 0.1 s a step: the short request (~4 steps after its first token) must still be running when
    # the long one is queued (at 0.02 s it sometimes finished first on a loaded machine), and still
    # finish within the 1.5 s drain, where the long one (60+ steps) cannot.
    srv = Server(["--target", str(serve_model), *MODEL_ARGS, "--max-queue", "2", "--shutdown-timeout", "1.5"],
                 delay_s=0.1)
    try:
        url = srv.url + "/v1/completions"
        events: dict[str, list[dict]] = {"short": [], "long": []}
        done: dict[str, bool] = {}
        started = threading.Event()

        def stream(name: str, max_tokens: int) -> None:
            body = {"prompt": PROMPTS[0], "max_tokens": max_tokens, "stream": True}
            with httpx.stream("POST", url, json=body, timeout=30) as response:
                for line in response.iter_lines():
                    if line == "data: [DONE]":
                        done[name] = True
                    elif line.startswith("data: "):
                        events[name].append(json.loads(line[6:]))
                        started.set()

        short = threading.Thread(target=stream, args=("short", 20))
        short.start()
        started.wait(20)
        long = threading.Thread(target=stream, args=("long", LONG))
        long.start()
        wait_for(lambda: gauges(srv), (1, 1))
        srv.proc.send_signal(signal.SIGTERM)
        try:  # admitting has stopped: refused at the socket, or by the draining engine
            late = httpx.post(url, json={"prompt": "x", "max_tokens": 2}, timeout=10)
            assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
        except httpx.TransportError:
            pass
        short.join(20)
        long.join(20)
        assert srv.proc.wait(20) == 0
    finally:
        srv.stop(signal.SIGKILL)
    assert done == {"short": True, "long": True}
    # The running request finished within the drain; the queued one started, then was aborted.
    assert events["short"][-1]["choices"][0]["finish_reason"] == "length"
    text = "".join(e["choices"][0]["text"] for e in events["short"])
    assert text == reference.generate(PROMPTS[0], max_new_tokens=20).text
    assert events["long"][-1]["choices"][0]["finish_reason"] == "abort"
    assert "Traceback" not in "".join(srv.log)


def test_a_batching_server_ends_rows_alone(serve_model, reference):
    """--max-batch 2: a client that hangs up and a deadline each end their own row; the row beside
    them finishes with its own greedy answer, and the gauges return to zero."""
    srv = Server(["--target", str(serve_model), *MODEL_ARGS, "--max-batch", "2", "--max-queue", "1",
                  "--shutdown-timeout", "1"], delay_s=0.02)
    try:
        url = srv.url + "/v1/completions"
        answers: dict[str, str] = {}

        def complete() -> None:
            got = srv.client().completions.create(model="target", prompt=PROMPTS[1], max_tokens=60)
            answers["beside"] = got.choices[0].text

        beside = threading.Thread(target=complete)
        with httpx.Client(timeout=30) as client:
            with client.stream("POST", url, json={"prompt": PROMPTS[0], "max_tokens": LONG, "stream": True}) as r:
                lines = r.iter_lines()
                first_text(lines)
                beside.start()
                wait_for(lambda: gauges(srv), (2, 0))  # two rows in one batch
        beside.join(60)
        assert answers["beside"] == reference.generate(PROMPTS[1], max_new_tokens=60).text
        got = srv.client().completions.create(model="target", prompt=PROMPTS[0], max_tokens=LONG,
                                              extra_body={"deadline": 0.3})
        assert got.choices[0].finish_reason == "abort" and 0 < got.usage.completion_tokens < LONG
        assert got.choices[0].text == reference.generate(PROMPTS[0], max_new_tokens=got.usage.completion_tokens).text
        wait_for(lambda: gauges(srv), (0, 0))
        assert counted(srv)["abort"] == 2  # a fresh server: the hung-up stream and the deadline
    finally:
        srv.stop()
    assert "Traceback" not in "".join(srv.log)
