"""OpenAI-compatible HTTP server: `create_app(decoder)` (app.py) over one engine loop (engine.py),
with Prometheus metrics (metrics.py) and the wire format (protocol.py); `outrider serve` runs it
(server.py), or on N Ray Serve replicas with `--replicas N` (ray_serve.py, the `ray` extra).
Needs the `serve` extra: pip install "outrider[serve]".

Names are imported on first use, so that `outrider --help` works without the extra."""

from __future__ import annotations

from typing import Any

_EXPORTS = {"create_app": "outrider.serve.app", "serve": "outrider.serve.server",
            "Engine": "outrider.serve.engine", "QueueFull": "outrider.serve.engine",
            "Draining": "outrider.serve.engine"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'outrider.serve' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
