"""`outrider serve --replicas N`: the same FastAPI app (create_app) on N Ray Serve replicas.

Each replica is a Ray Serve deployment replica that loads its own decoder and runs create_app's
app through `@serve.ingress`, pinned to its CPU share (`ray_actor_options={"num_cpus": share}` and
`torch.set_num_threads(share)` inside the replica, so replicas do not fight over cores).

Queueing and backpressure. A replica's own engine queue stays the place where a request waits
and where a full queue answers 429 + Retry-After in OpenAI's error shape: `max_ongoing_requests`
lets every request the engine could hold (1 running + max_queue waiting) reach the replica, plus
CONTROL_SLOTS so that /health and /metrics never wait behind generations. Ray's router picks the
less loaded of two replicas for each request. Only when every replica is past that does Ray queue
in its proxy (max_queued_requests) and then reject by itself, in plain text ("Request dropped
due to backpressure ...", ray.serve.exceptions.BackPressureError, made HTTP in
ray/serve/_private/http_util.py): a 503, or a 429 with Retry-After where Ray has
BackpressureConfig. `OpenAIErrors`, a middleware installed in Ray's HTTP proxy (Ray's
RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH hook), rewrites every such plain-text error of Ray's
into an OpenAI error body: backpressure -> 429 + Retry-After, the rest keep their status.

Metrics per replica. Ray answers GET /metrics from whichever replica it routes to; that replica
answers for all of them: each replica posts its rendered metrics to one small Ray actor
(MetricsBoard) every second and at every scrape, and /metrics merges the replicas' latest
figures, every sample labelled replica="<Ray's replica id>". The answering replica's own figures
are exact; the others' at most POST_EVERY_S old.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Callable, Mapping

RAY_HINT = 'Ray Serve is not installed: pip install "outrider[ray]" (or run without --replicas/--ray)'
APP_NAME = "outrider"
BOARD_NAME = "outrider_metrics_board"
NAMESPACE = "outrider"
# Requests a replica admits beyond what its engine can hold: room for /health and /metrics.
CONTROL_SLOTS = 4
PROXY_CALLBACK = "outrider.serve.ray_serve.proxy_middlewares"
DEFAULT_RETRY_AFTER_S = 1
POST_EVERY_S = 1.0  # how stale another replica's figures may be in a /metrics answer


def import_ray() -> tuple[Any, Any]:
    """(ray, ray.serve), or a ValueError that says how to install them."""
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise ValueError(f"{RAY_HINT} ({e})") from e
    return ray, serve


# ---- the replica ------------------------------------------------------------------------------

def replica_app(decoder_kwargs: Mapping[str, Any], model_name: str, max_queue: int,
                defaults: Mapping[str, Any] | None, threads: int) -> Any:
    """Runs inside a replica, once: torch pinned to `threads`, the decoder loaded, create_app's
    app with per-replica metrics on /metrics."""
    import torch

    from outrider import SpeculativeDecoder
    from outrider.serve.app import create_app
    from outrider.serve.metrics import CONTENT_TYPE

    torch.set_num_threads(threads)
    decoder = SpeculativeDecoder.from_pretrained(**decoder_kwargs)
    app = create_app(decoder, model_name=model_name, max_queue=max_queue, defaults=defaults)
    replica_id = _replica_id()
    board = _board()
    metrics = app.state.metrics

    async def post() -> dict[str, bytes]:
        """Post this replica's figures; the board answers with every replica's."""
        if board is None:
            return {replica_id: metrics.render()}
        return await board.post.remote(replica_id, metrics.render())

    if board is not None:
        threading.Thread(target=_post_every, args=(board, replica_id, metrics.render), daemon=True,
                         name="outrider-metrics-post").start()

    async def render_all() -> tuple[bytes, str]:
        return merge_metrics(await post()), CONTENT_TYPE

    app.add_middleware(_MetricsRoute, render=render_all)
    app.state.replica_id = replica_id
    return app


def _post_every(board: Any, replica_id: str, render: Callable[[], bytes]) -> None:
    """Post this replica's figures to the board every POST_EVERY_S (a few KB: cheaper than
    working out which post of two threads landed last)."""
    while True:
        board.post.remote(replica_id, render())  # fire and forget: the next one replaces it
        time.sleep(POST_EVERY_S)


def _replica_id() -> str:
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        return serve.get_replica_context().replica_id.unique_id
    except RayServeException:  # outside a replica (a test calling replica_app): one unnamed replica
        return "0"


def _board() -> Any:
    import ray

    try:
        return ray.get_actor(BOARD_NAME, namespace=NAMESPACE)
    except ValueError:  # started without run(): each replica then reports only its own figures
        return None


class _MetricsRoute:
    """ASGI middleware: GET /metrics answered with every replica's figures (see the module doc)."""

    def __init__(self, app: Any, render: Callable[[], Any]) -> None:
        self.app = app
        self.render = render

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"].rstrip("/") != "/metrics" or scope["method"] != "GET":
            await self.app(scope, receive, send)
            return
        body, content_type = await self.render()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", content_type.encode()),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def merge_metrics(texts: Mapping[str, bytes]) -> bytes:
    """Prometheus text of several replicas (replica id -> its exposition) as one exposition: one
    family per name, every sample labelled replica=<id>."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Any] = {}
    for replica, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text.decode()):
            merged = families.setdefault(family.name, family)
            samples = [s._replace(labels={**s.labels, "replica": replica}) for s in family.samples]
            if merged is family:
                family.samples = samples
            else:
                merged.samples.extend(samples)

    class Families:
        def collect(self) -> Any:
            return iter(families.values())

    return generate_latest(Families())  # type: ignore[arg-type]


class MetricsBoard:
    """The latest metrics text of each replica (a Ray actor, num_cpus=0)."""

    def __init__(self) -> None:
        self.texts: dict[str, bytes] = {}

    def post(self, replica: str, text: bytes) -> dict[str, bytes]:
        self.texts[replica] = text
        return dict(self.texts)


# ---- Ray's own errors, in the proxy ----------------------------------------------------------

def proxy_middlewares() -> list[Any]:
    """Ray's HTTP-proxy callback (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH): the proxy's middlewares."""
    from starlette.middleware import Middleware

    return [Middleware(OpenAIErrors)]


class OpenAIErrors:
    """ASGI middleware for Ray Serve's proxy: a plain-text error that Ray itself sends (the app's
    errors are JSON already) becomes an OpenAI error body. Backpressure (Ray's 503 or 429 with
    "backpressure" in its text) becomes 429 rate_limit_error with Retry-After."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start: dict | None = None
        chunks: list[bytes] = []

        async def rewrite(message: dict) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                headers = {k.lower(): v for k, v in message.get("headers", [])}
                if message["status"] >= 400 and b"json" not in headers.get(b"content-type", b""):
                    start = message  # Ray's own: hold it until its body is complete
                    return
            elif message["type"] == "http.response.body" and start is not None:
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                start, message = openai_error(start, b"".join(chunks))
                await send(start)
            await send(message)

        await self.app(scope, receive, rewrite)


def openai_error(start: dict, body: bytes) -> tuple[dict, dict]:
    """The ASGI start and body messages of the OpenAI error that replaces Ray's plain-text one."""
    text = body.decode(errors="replace").strip() or f"HTTP {start['status']}"
    status = start["status"]
    headers = [(k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-type", b"content-length")]
    if status in (429, 503) and "backpressure" in text.lower():
        status, kind, code = 429, "rate_limit_error", "queue_full"
        text += " Every replica's queue is full: retry later, or start more --replicas or a larger --max-queue."
        if not any(k.lower() == b"retry-after" for k, _ in headers):
            headers.append((b"retry-after", str(DEFAULT_RETRY_AFTER_S).encode()))
    elif status == 408:
        kind, code = "timeout", "request_timeout"
    elif status == 404:
        kind, code = "invalid_request_error", "not_found"
    elif status >= 500:
        kind, code = ("service_unavailable", None) if status == 503 else ("internal_error", None)
    else:
        kind, code = "invalid_request_error", None
    payload = json.dumps({"error": {"message": text, "type": kind, "param": None, "code": code}}).encode()
    headers += [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    return {**start, "status": status, "headers": headers}, {"type": "http.response.body", "body": payload}


# ---- the deployment and the cluster -----------------------------------------------------------

def deployment(decoder_kwargs: Mapping[str, Any], *, model_name: str, replicas: int, cpus_per_replica: float,
               max_queue: int = 16, defaults: Mapping[str, Any] | None = None,
               shutdown_timeout: float = 30.0) -> Any:
    """A bound Ray Serve application: `replicas` copies of create_app's app (serve.run takes it)."""
    _, serve = import_ray()
    if replicas < 1:
        raise ValueError(f"--replicas {replicas} is invalid: use an integer >= 1")
    if not cpus_per_replica > 0:
        raise ValueError(f"--cpus-per-replica {cpus_per_replica} is invalid: use a number > 0")
    threads = max(1, math.floor(cpus_per_replica))
    kwargs, defaults = dict(decoder_kwargs), dict(defaults or {})

    def build() -> Any:  # evaluated in each replica when it starts (serve.ingress's builder form)
        return replica_app(kwargs, model_name, max_queue, defaults, threads)

    options: dict[str, Any] = dict(
        name=APP_NAME, num_replicas=replicas,
        ray_actor_options={"num_cpus": cpus_per_replica},
        max_ongoing_requests=1 + max_queue + CONTROL_SLOTS,
        # Past every replica's engine: a short queue in Ray's proxy, then Ray's rejection (rewritten
        # by OpenAIErrors into an OpenAI 429).
        max_queued_requests=max(1, max_queue) * replicas,
        graceful_shutdown_timeout_s=shutdown_timeout,
    )
    try:  # Ray >= 2.5x: Ray's rejection is a 429 with Retry-After already
        from ray.serve.config import BackpressureConfig

        options["backpressure_config"] = BackpressureConfig(status_code=429, retry_after_s=DEFAULT_RETRY_AFTER_S)
    except ImportError:
        pass
    return serve.deployment(serve.ingress(build)(), **options).bind()


def free_port(host: str) -> int:
    """A port that was free a moment ago (Ray's proxy needs a fixed port, not 0)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start(app: Any, *, host: str, port: int, cpus: float | None, address: str | None = None) -> tuple[str, Any]:
    """Start (or join, with `address`) a Ray cluster, the metrics board and Serve. Returns the URL
    and the board's handle: hold it while serving (the actor dies with its last reference)."""
    ray, serve = import_ray()
    # Read by Ray's HTTP proxy when it starts, in a process that this one's environment reaches
    # when the cluster is started here; a joined cluster must have been started with it.
    os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", PROXY_CALLBACK)
    # Ray gives its HTTP proxy 5 s to report ready and kills it after three misses: on a small
    # machine that is busy (2 cores, replicas loading models) the proxy can start slower than that.
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    os.environ.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "60")
    if address is None:
        ray.init(num_cpus=cpus, include_dashboard=False, namespace=NAMESPACE)
    else:
        ray.init(address=address, namespace=NAMESPACE)
    board = ray.remote(num_cpus=0)(MetricsBoard).options(name=BOARD_NAME, namespace=NAMESPACE,
                                                          get_if_exists=True).remote()
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}", board


def stop() -> None:
    """Serve and the Ray cluster down (each step tolerates an earlier failure)."""
    ray, serve = import_ray()
    try:
        if ray.is_initialized():  # serve.shutdown() on no cluster would start one to look for Serve
            serve.shutdown()
    finally:
        ray.shutdown()


def run_from_args(args: argparse.Namespace) -> int:
    """`outrider serve --replicas N`: Serve until SIGTERM/SIGINT, then shut Ray down. Ray Serve
    drains each replica (graceful_shutdown_timeout_s = --shutdown-timeout)."""
    from outrider.cli import decoder_options
    from outrider.serve.cli_args import check_options, served_model

    import_ray()
    check_options(args)
    replicas = args.replicas
    cpus = args.cpus_per_replica or max(1.0, float((os.cpu_count() or 1) // replicas))
    name, defaults = served_model(args)
    app = deployment(decoder_options(args), model_name=name, replicas=replicas, cpus_per_replica=cpus,
                     max_queue=args.max_queue, shutdown_timeout=args.shutdown_timeout, defaults=defaults)
    port = args.port or free_port(args.host)
    try:
        url, _board = start(  # _board: held while serving (the actor dies with its last reference)
            app, host=args.host, port=port, cpus=None if args.ray_address else cpus * replicas,
            address=args.ray_address)
        # After ray.init, which installs a SIGTERM handler of its own that aborts the process.
        stopping = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stopping.set())
        # The single-process server's line, the URL last: scripts and tests wait for it.
        plural = "s" if replicas > 1 else ""
        print(f"outrider serve: {name} ({replicas} Ray Serve replica{plural}, {cpus:g} CPU each) on {url}",
              file=sys.stderr, flush=True)
        while not stopping.wait(1.0):
            pass
    finally:
        stop()
    return 0
