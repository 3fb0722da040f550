"""`outrider serve` options, apart from server.py so that building the CLI's parser imports
neither FastAPI nor uvicorn (they come with the `serve` extra)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def build_parser(parser: argparse.ArgumentParser) -> None:
    """Add the server's own options (the model options come from the CLI's shared set)."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port, printed at start)")
    parser.add_argument("--max-queue", type=int, default=16,
                        help="requests that may wait behind the running ones; more get 429 with Retry-After")
    parser.add_argument("--max-batch", type=int, default=1,
                        help="requests generated at once, batched continuously (native backend; "
                             "autoregressive, prompt_lookup, suffix)")
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


def check_options(args: argparse.Namespace) -> None:
    """The server's own values, checked before any model loads (a typo fails in a moment)."""
    if args.max_queue < 0:
        raise ValueError(f"--max-queue {args.max_queue} is invalid: use an integer >= 0")
    if args.max_batch < 1:
        raise ValueError(f"--max-batch {args.max_batch} is invalid: use an integer >= 1 (1: one request at a time)")
    if args.max_batch > 1 and (args.replicas != 1 or args.ray or args.ray_address):
        raise ValueError("--max-batch > 1 runs on the local server only: drop --replicas/--ray, or use --max-batch 1")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port {args.port} is invalid: use 0..65535 (0: any free port)")
    if not args.shutdown_timeout >= 0:
        raise ValueError(f"--shutdown-timeout {args.shutdown_timeout} is invalid: use seconds >= 0")


def served_model(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The model id clients send, and the sampling defaults of its folder's generation_config."""
    from outrider.decoder import embedded_pair_dir
    from outrider.serve.protocol import generation_defaults

    target_dir = Path(args.target) if args.target is not None else embedded_pair_dir() / "target"
    name = args.served_model_name or ("outrider-demo" if args.target is None else target_dir.name)
    return name, generation_defaults(target_dir if target_dir.is_dir() else None)
