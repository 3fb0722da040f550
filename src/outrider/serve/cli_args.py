"""`outrider serve` options, apart from server.py so that building the CLI's parser imports
neither FastAPI nor uvicorn (they come with the `serve` extra)."""

from __future__ import annotations

import argparse


def build_parser(parser: argparse.ArgumentParser) -> None:
    """Add the server's own options (the model options come from the CLI's shared set)."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port, printed at start)")
    parser.add_argument("--max-queue", type=int, default=16,
                        help="requests that may wait behind the running one; more get 429 with Retry-After")
    # --chat-template comes with the shared model options (cli._add_model_args).
    parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="seconds a SIGTERM leaves running requests to finish before aborting them")
    parser.add_argument("--served-model-name", default=None,
                        help="the model id clients send (default: the target folder's name)")
    parser.add_argument("--log-level", default="warning", help="uvicorn's: debug, info, warning, error")
    ray = parser.add_argument_group("scale-out on Ray Serve (the ray extra: pip install 'outrider[ray]')")
    ray.add_argument("--replicas", type=int, default=1,
                     help="copies of the server behind one port; more than 1 runs them on Ray Serve")
    ray.add_argument("--ray", action="store_true", help="run on Ray Serve even with one replica")
    ray.add_argument("--cpus-per-replica", type=float, default=None,
                     help="each replica's CPU share: Ray's num_cpus and its torch threads "
                          "(default: this machine's cores / --replicas)")
    ray.add_argument("--ray-address", default=None,
                     help="join a running Ray cluster (e.g. auto) instead of starting one here")
