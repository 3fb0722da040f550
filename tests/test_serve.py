"""`outrider serve` end to end: a real server in a subprocess on a free loopback port, driven by the
official openai client. Greedy float32 outputs must equal SpeculativeDecoder.generate's, /metrics
must add up to the responses' own figures, and every malformed request gets an OpenAI error body.

The server runs the real CLI, with one test-only change: each target forward can be slowed by a
fixed sleep, standing in for a bigger model's step, so that requests overlap and can be caught
mid-stream on any machine (test_serve_faults.py)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server needs the serve extra: pip install -e '.[serve]'")
openai = pytest.importorskip("openai", reason="the tests drive the server with the official openai client")
import httpx  # noqa: E402  (after the skip: httpx comes with the serve extra)
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from conftest import tiny_model  # noqa: E402
from outrider import SpeculativeDecoder  # noqa: E402

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CONTEXT = 384  # the tiny target's context: the default max_tokens is what the prompt leaves of it
PROMPTS = ("def add(a, b):\n", "for i in range(10):\n", "def greet(name):\n    print(")
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "def add(a, b):"}]
MODEL_ARGS = ("--method", "prompt_lookup", "--k", "4", "--dtype", "float32")

LAUNCH = """
import sys, time
from outrider.models import llama
delay = float(sys.argv[1])
if delay:
    forward = llama.NativeLlama.forward_rows  # every forward, one sequence's or a batch's

    def slowed(self, *args, **kwargs):
        time.sleep(delay)
        return forward(self, *args, **kwargs)

    llama.NativeLlama.forward_rows = slowed
from outrider.cli import main
sys.exit(main(sys.argv[2:]))
"""


class Server:
    """`outrider serve ... --port 0` in a subprocess; url once it listens."""

    def __init__(self, args: list[str], delay_s: float = 0.0, start_timeout_s: float = 90.0) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCH, str(delay_s), "serve", *args, "--host", "127.0.0.1", "--port", "0"],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        self.log: list[str] = []
        self.url: str | None = None
        ready = threading.Event()

        def read() -> None:  # drains stderr for the whole run, so the pipe never blocks the server
            for line in self.proc.stderr:
                self.log.append(line)
                if self.url is None and " on http://" in line:
                    self.url = line.rsplit(" on ", 1)[1].strip()
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        ready.wait(start_timeout_s)
        if self.url is None:
            self.stop()
            raise RuntimeError("the server did not start:\n" + "".join(self.log))

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """Samples by (name, sorted labels without model_name)."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
                out[(s.name, labels)] = s.value
        return out

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, **kwargs)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="session")
def serve_model(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama target with a real EOS and a CONTEXT-token context, and a chat template file."""
    root = tmp_path_factory.mktemp("serve")
    model = tiny_model("llama", vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                       max_position_embeddings=CONTEXT)
    model.save_pretrained(root / "target")
    tokenizer.save_pretrained(root / "target")
    (root / "chat.jinja").write_text(TEMPLATE)
    return root / "target"


@pytest.fixture(scope="session")
def reference(serve_model) -> SpeculativeDecoder:
    """The same decoder in this process: the oracle for every served text."""
    dec = SpeculativeDecoder.from_pretrained(serve_model, method="prompt_lookup", k=4, dtype="float32")
    dec.chat_template = TEMPLATE
    return dec


@pytest.fixture(scope="session")
def server(serve_model):
    """With a chat template (from --chat-template) and a queue of 8 (room for the concurrent tests,
    whatever is still finishing); each step slowed by 10 ms."""
    srv = Server(["--target", str(serve_model), *MODEL_ARGS, "--chat-template", str(serve_model.parent / "chat.jinja"),
                  "--max-queue", "8", "--shutdown-timeout", "1"], delay_s=0.01)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def bare_server(serve_model):
    """The same model without a chat template, at full speed."""
    srv = Server(["--target", str(serve_model), *MODEL_ARGS, "--shutdown-timeout", "1"])
    yield srv
    srv.stop()


def test_models_and_health(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["target"]
    assert models.data[0].model_extra["max_model_len"] == CONTEXT
    assert httpx.get(server.url + "/health").json() == {"status": "ok", "running": 0, "waiting": 0}


@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_completion_equals_generate(server, reference, prompt):
    want = reference.generate(prompt, max_new_tokens=24)
    got = server.client().completions.create(model="target", prompt=prompt, max_tokens=24, temperature=0)
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == ("length" if want.finish_reason == "length" else "stop")
    assert got.usage.completion_tokens == len(want.token_ids)
    assert got.usage.prompt_tokens == len(reference.encode(prompt))
    figures = got.model_extra["outrider"]
    assert figures["method"] == "prompt_lookup"
    assert (figures["drafted"], figures["accepted"]) == (want.stats.drafted, want.stats.accepted)
    assert figures["tau"] == pytest.approx(want.stats.tau)


def test_token_id_prompt_and_chat_equal_generate(server, reference):
    ids = reference.encode(PROMPTS[2])
    got = server.client().completions.create(model="target", prompt=ids, max_tokens=16)
    assert got.choices[0].text == reference.generate(ids, max_new_tokens=16).text
    want = reference.generate(messages=MESSAGES, max_new_tokens=20)
    chat = server.client().chat.completions.create(model="target", messages=MESSAGES, max_completion_tokens=20)
    assert chat.choices[0].message.content == want.text
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens == len(reference.chat_ids(MESSAGES))
    assert chat.usage.completion_tokens == len(want.token_ids)


def test_a_conversation_s_next_turn_reports_its_cached_prompt_tokens(server, reference):
    """The server keeps the previous request's cache: a chat's next turn computes only its new
    tokens, says how many it reused (OpenAI's usage.prompt_tokens_details.cached_tokens), and
    answers as a fresh decoder would."""
    client = server.client()
    first = client.chat.completions.create(model="target", messages=MESSAGES, max_completion_tokens=12)
    turn2 = MESSAGES + [{"role": "assistant", "content": first.choices[0].message.content},
                        {"role": "user", "content": "and subtract?"}]
    before = server.metrics().get(("outrider:prompt_tokens_cached_total", ()), 0.0)
    second = client.chat.completions.create(model="target", messages=turn2, max_completion_tokens=12)
    want = reference.generate(messages=turn2, max_new_tokens=12)
    assert second.choices[0].message.content == want.text
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert len(reference.chat_ids(MESSAGES)) <= cached < second.usage.prompt_tokens
    after = server.metrics()[("outrider:prompt_tokens_cached_total", ())]
    assert after - before == cached


def test_streaming_equals_generate_and_reports_usage(server, reference):
    want = reference.generate(PROMPTS[0], max_new_tokens=30)
    chunks = list(server.client().completions.create(
        model="target", prompt=PROMPTS[0], max_tokens=30, stream=True, stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == want.text
    assert len(texts) > 2  # streamed step by step, not in one piece
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and not any(finishes[:-1])
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == len(want.token_ids) == 30

    want = reference.generate(messages=MESSAGES, max_new_tokens=20)
    chunks = list(server.client().chat.completions.create(model="target", messages=MESSAGES, max_tokens=20,
                                                          stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason is not None
    assert all(c.usage is None for c in chunks)  # no include_usage: no usage chunk


def concurrent_texts(url: str, prompts, max_tokens: int) -> list[str]:
    """The completions of all prompts, sent at once by async clients."""
    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        results = await asyncio.gather(*(client.completions.create(model="target", prompt=p, max_tokens=max_tokens)
                                         for p in prompts))
        await client.close()
        return [r.choices[0].text for r in results]

    return asyncio.run(run())


def test_async_clients_get_their_own_answers(server, reference):
    # Three at once: one runs, the others wait in the queue; none is refused.
    assert concurrent_texts(server.url, PROMPTS, 20) == [reference.generate(p, max_new_tokens=20).text for p in PROMPTS]


def test_a_batching_server_answers_each_request_as_alone(serve_model, reference):
    """--max-batch 3: five concurrent requests run three at a time (rows join as others finish), and
    each answer equals the request's own greedy output."""
    prompts = [*PROMPTS, "x = 1\ny = 2\n", "import os\n"]
    srv = Server(["--target", str(serve_model), *MODEL_ARGS, "--max-batch", "3", "--max-queue", "8",
                  "--shutdown-timeout", "1"], delay_s=0.02)
    running: list[int] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            running.append(httpx.get(srv.url + "/health").json()["running"])

    try:
        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            texts = concurrent_texts(srv.url, prompts, 24)
        finally:
            done.set()
            watcher.join()
        assert texts == [reference.generate(p, max_new_tokens=24).text for p in prompts]
        assert max(running) == 3  # a batch of three ran at once
        assert srv.metrics()[("outrider:num_requests_running", ())] == 0
    finally:
        srv.stop()


def test_a_fresh_server_shows_its_counters_at_zero():
    """Before any request every per-model counter and histogram is a series at 0 (so an idle
    replica shows in a --replicas server's /metrics, and rate() works from the start)."""
    from prometheus_client.parser import text_string_to_metric_families

    from outrider.serve.metrics import ServeMetrics

    text = ServeMetrics("m").render().decode()
    samples = {s.name: s for family in text_string_to_metric_families(text) for s in family.samples}
    for name in ("generation_tokens_total", "prompt_tokens_total", "prompt_tokens_cached_total",
                 "spec_decode_num_drafts_total", "spec_decode_num_draft_tokens_total",
                 "spec_decode_num_accepted_tokens_total", "time_to_first_token_seconds_count",
                 "time_per_output_token_seconds_count", "e2e_request_latency_seconds_count"):
        sample = samples[f"outrider:{name}"]
        assert (sample.value, sample.labels) == (0.0, {"model_name": "m"}), name


def test_metrics_add_up_to_the_responses(server):
    before = server.metrics()
    figures, usages = [], []
    for i, prompt in enumerate(PROMPTS):
        body = {"model": "target", "prompt": prompt, "max_tokens": 12 + 4 * i}
        response = httpx.post(server.url + "/v1/completions", json=body, timeout=30).json()
        figures.append(response["outrider"])
        usages.append(response["usage"])
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=30, json={
            "messages": MESSAGES, "max_tokens": 10, "stream": True, "stream_options": {"include_usage": True}}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    figures.append(next(e["outrider"] for e in events if e.get("outrider")))
    usages.append(events[-1]["usage"])
    after = server.metrics()

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("outrider:generation_tokens_total") == sum(u["completion_tokens"] for u in usages)
    assert delta("outrider:prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert delta("outrider:spec_decode_num_draft_tokens_total") == sum(f["drafted"] for f in figures) > 0
    assert delta("outrider:spec_decode_num_accepted_tokens_total") == sum(f["accepted"] for f in figures)
    assert delta("outrider:spec_decode_num_drafts_total") == sum(f["drafts"] for f in figures)
    depth = max(len(f["accepted_at"]) for f in figures)
    for pos in range(depth):
        assert delta("outrider:spec_decode_num_accepted_tokens_per_pos_total", position=str(pos)) == sum(
            f["accepted_at"][pos] for f in figures if pos < len(f["accepted_at"]))
    for name in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds"):
        assert delta(f"outrider:{name}_count") == 4
    assert delta("outrider:e2e_request_latency_seconds_sum") > 0
    assert after[("outrider:num_requests_running", ())] == after[("outrider:num_requests_waiting", ())] == 0


def test_default_max_tokens_is_the_rest_of_the_context(bare_server, reference):
    n_prompt = len(reference.encode(PROMPTS[1]))
    want = reference.generate(PROMPTS[1], max_new_tokens=CONTEXT - n_prompt)
    got = bare_server.client().completions.create(model="target", prompt=PROMPTS[1])
    assert got.choices[0].text == want.text
    assert got.usage.completion_tokens == len(want.token_ids)
    if want.finish_reason == "length":
        assert got.usage.total_tokens == CONTEXT


def _post(url: str, body: object, path: str = "/v1/completions") -> httpx.Response:
    content = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(url + path, content=content, headers={"content-type": "application/json"}, timeout=30)


MALFORMED = [
    # (id, path, body, status, param, code)
    ("bad-json", "/v1/completions", '{"prompt": "x", ', 400, None, "invalid_json"),
    ("not-an-object", "/v1/completions", "[1, 2]", 400, None, None),
    ("unknown-model", "/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model", "model_not_found"),
    ("over-context", "/v1/completions", {"prompt": "def add(a, b):", "max_tokens": CONTEXT}, 400, "max_tokens", None),
    ("prompt-fills-context", "/v1/completions", {"prompt": [5] * CONTEXT}, 400, "prompt", None),
    ("temperature", "/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature", None),
    ("top-p", "/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p", None),
    ("max-tokens-0", "/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", None),
    ("n=2", "/v1/completions", {"prompt": "x", "n": 2}, 400, "n", None),
    ("no-prompt", "/v1/completions", {"max_tokens": 4}, 400, "prompt", None),
    ("ids-outside-vocab", "/v1/completions", {"prompt": [1, 10**6]}, 400, "prompt", None),
    ("two-prompts", "/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt", None),
    ("logprobs", "/v1/completions", {"prompt": "x", "logprobs": 2}, 400, "logprobs", None),
    ("empty-stop", "/v1/completions", {"prompt": "x", "stop": [""]}, 400, "stop", None),
    ("no-template", "/v1/chat/completions", {"messages": MESSAGES}, 400, "messages", None),
    ("bad-message", "/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages.0.role", None),
]


@pytest.mark.parametrize("path, body, status, param, code", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_requests_get_openai_errors(bare_server, path, body, status, param, code):
    response = _post(bare_server.url, body, path)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and len(error["message"]) > 10
    assert error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == (param, code)


def test_server_keeps_serving_after_errors(bare_server, reference):
    for _ in range(3):
        assert _post(bare_server.url, '{"prompt": ').status_code == 400
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        bare_server.client().chat.completions.create(model="target", messages=MESSAGES)
    got = bare_server.client().completions.create(model="target", prompt=PROMPTS[0], max_tokens=8)
    assert got.choices[0].text == reference.generate(PROMPTS[0], max_new_tokens=8).text
    health = httpx.get(bare_server.url + "/health").json()
    assert (health["running"], health["waiting"]) == (0, 0)


def test_cli_rejects_bad_server_options(serve_model):
    from outrider.cli import main

    for option, value in (("--max-queue", "-1"), ("--port", "70000"), ("--shutdown-timeout", "-2"),
                          ("--max-batch", "0")):
        assert main(["serve", "--target", str(serve_model), "--method", "prompt_lookup", option, value]) == 2
    assert main(["serve", "--target", str(serve_model), "--method", "nonexistent"]) == 2


def test_unset_sampling_fields_take_the_generation_config(tmp_path, serve_model):
    from transformers import GenerationConfig

    from outrider.serve.protocol import generation_defaults

    assert generation_defaults(serve_model) == {"temperature": 0.0, "top_k": None, "top_p": None}
    GenerationConfig(do_sample=True, temperature=0.7, top_k=20, top_p=0.9).save_pretrained(tmp_path)
    assert generation_defaults(tmp_path) == {"temperature": 0.7, "top_k": 20, "top_p": 0.9}
    assert generation_defaults(None)["temperature"] == 0.0


def test_bench_serve_counts_tokens_from_usage(bare_server, reference, tmp_path, capsys):
    from outrider.cli import main

    dataset = tmp_path / "question.jsonl"
    dataset.write_text("".join(json.dumps({"question_id": i, "category": "code", "turns": [p]}) + "\n"
                               for i, p in enumerate(PROMPTS)))
    code = main(["bench", "serve", "--url", f"a={bare_server.url}/v1", "--url", f"b={bare_server.url}",
                 "--concurrency", "1,2", "--num-prompts", "4", "--max-tokens", "8", "--dataset", str(dataset),
                 "--out", str(tmp_path / "out")])
    assert code == 0
    report = json.loads((tmp_path / "out" / "serve.json").read_text())
    rows = report["results"]
    sent = [f"User: {PROMPTS[i % len(PROMPTS)]}\nAssistant:" for i in range(4)]  # bench.serve's plain template
    tokens = sum(len(reference.generate(p, max_new_tokens=8).token_ids) for p in sent)
    assert [(r["server"], r["concurrency"]) for r in rows] == [("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    for row in rows:
        assert (row["ok"], row["errors"]) == (4, {})
        assert row["output_tokens"] == tokens  # from usage, not from the number of chunks
        assert row["ttft_ms"]["p50"] <= row["e2e_ms"]["p50"]
        assert row["output_tokens_per_s"] > 0 and row["mean_tau"] >= 1 and row["per_request_tokens_per_s"] > 0
        assert row["alpha"] is not None and 0 <= row["alpha"] <= 1  # prompt lookup drafted
    assert [r["vs_first"] for r in rows[::2]] == [1.0, 1.0]  # a is the first server at each level
    assert abs(rows[1]["vs_first"] - rows[1]["output_tokens_per_s"] / rows[0]["output_tokens_per_s"]) < 1e-9
    assert "| a | c=1 | 4/4 | 0 |" in capsys.readouterr().out
    assert (tmp_path / "out" / "serve.md").read_text().count("\n| ") == 5  # header + 4 rows
    assert (tmp_path / "out" / "serve.png").stat().st_size > 0  # matplotlib: the bench extra, installed by make
