"""`outrider serve`: load the decoder, build the app, run it under uvicorn with a graceful drain.

SIGTERM (or Ctrl-C): the engine stops admitting (new requests get 503, /health turns 503), the
running and queued requests get --shutdown-timeout seconds to finish, then the rest end with
finish_reason "abort"; uvicorn closes the listener, waits for the responses to go out and the
process exits 0. A second Ctrl-C forces the exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import signal
import socket
import sys
from types import FrameType
from typing import Iterator

import uvicorn
from fastapi import FastAPI

# Responses still being written when the drain aborts their generations need a moment to go out.
FLUSH_MARGIN_S = 5.0


class DrainingServer(uvicorn.Server):
    """uvicorn.Server that drains the engine on SIGTERM/SIGINT and exits 0 afterwards."""

    def __init__(self, app: FastAPI, shutdown_timeout: float, log_level: str = "warning") -> None:
        super().__init__(uvicorn.Config(app, log_level=log_level, lifespan="on",
                                        timeout_graceful_shutdown=math.ceil(shutdown_timeout + FLUSH_MARGIN_S)))
        self.app = app
        self.shutdown_timeout = shutdown_timeout
        self.loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)
        if self.started and sockets:
            host, port = sockets[0].getsockname()[:2]
            # Printed once the socket accepts connections: scripts and tests wait for this line.
            print(f"outrider serve: {self.app.state.model_name} on http://{host}:{port}", file=sys.stderr,
                  flush=True)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.loop is not None and not self.should_exit:
            # A signal handler must not take the engine's lock (the loop's thread may hold it).
            self.loop.call_soon_threadsafe(self.app.state.engine.drain, self.shutdown_timeout)
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn's own version re-raises the signal after shutdown, so the process would die of
        # SIGTERM; after a completed drain the exit is a clean one (status 0).
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)


def listen(host: str, port: int) -> socket.socket:
    """A bound socket (port 0: the system picks a free one), so the real port is known up front."""
    if not 0 <= port < 65536:
        raise ValueError(f"--port {port} is invalid: use 0..65535 (0: any free port)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port} ({e.strerror}): choose another --port or --host") from e
    sock.set_inheritable(True)
    return sock


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, shutdown_timeout: float = 30.0,
          log_level: str = "warning") -> None:
    """Run `app` (from create_app) until SIGTERM/SIGINT, then drain it (see the module docstring)."""
    if shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout {shutdown_timeout} is invalid: use seconds >= 0")
    sock = listen(host, port)
    DrainingServer(app, shutdown_timeout, log_level).run(sockets=[sock])


def run_from_args(args: argparse.Namespace) -> int:
    if args.replicas != 1 or args.ray or args.ray_address:
        from outrider.serve.ray_serve import run_from_args as run_on_ray

        return run_on_ray(args)
    from outrider import SpeculativeDecoder
    from outrider.cli import decoder_options
    from outrider.serve.app import create_app
    from outrider.serve.cli_args import check_options, served_model

    check_options(args)
    decoder = SpeculativeDecoder.from_pretrained(**decoder_options(args))
    name, defaults = served_model(args)
    app = create_app(decoder, model_name=name, max_queue=args.max_queue, defaults=defaults,
                     max_batch=args.max_batch)
    serve(app, args.host, args.port, args.shutdown_timeout, args.log_level)
    return 0
