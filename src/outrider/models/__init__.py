"""Target/draft backends behind one protocol, and loading from a folder or a model object."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from outrider.models.base import CausalModel
from outrider.models.gguf import is_gguf, load_gguf
from outrider.models.hf import HFModel
from outrider.models.quant import QUANT_TYPES

BACKENDS = ("auto", "native", "hf", "compiled")  # compiled: native under torch.compile
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")

__all__ = ["BACKENDS", "CausalModel", "HFModel", "LoadedModel", "load_model", "load_transformers_model", "parse_dtype"]


@dataclass
class LoadedModel:
    model: CausalModel
    tokenizer: Any | None  # a transformers tokenizer, or None when only token ids can be used
    eos_token_ids: tuple[int, ...]
    name: str


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is unknown: use one of {sorted(set(_DTYPES))}, 'auto', "
                         "or 'int8' / 'int4' (weight-only, native backend)")
    return _DTYPES[dtype]


def default_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_device(device: str | None) -> torch.device:
    """A training recipe's --device: cpu, cuda or cuda:N, refused by name when torch cannot use it
    here; None: cuda where torch sees one, else cpu."""
    if device is None:
        return default_device(None)
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r} is invalid: use cpu or cuda")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: torch sees no CUDA device here; use --device cpu")
    return resolved


def _check_model_folder(path: Path) -> None:
    """Fail early, naming the path, on folders that transformers would reject obscurely."""
    if not path.exists():
        raise ValueError(f"model path {str(path)!r} does not exist: pass a local Hugging Face model folder")
    if not path.is_dir():
        raise ValueError(f"model path {str(path)!r} is not a folder: pass the folder holding config.json")
    if not (path / "config.json").is_file():
        raise ValueError(
            f"{str(path)!r} is not a Hugging Face model folder (no config.json): pass the folder "
            "written by save_pretrained()"
        )
    shards = sorted(path.glob("*.safetensors"))
    if not shards and not list(path.glob("*.bin")):
        raise ValueError(f"{str(path)!r} holds no weights (*.safetensors or *.bin): the model folder is incomplete")
    from safetensors import safe_open

    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as f:
                keys = list(f.keys())
                if keys:  # reading one tensor checks the data region, not just the header
                    f.get_slice(keys[-1])
        except Exception as e:  # safetensors raises its own error types; name the file either way
            raise ValueError(
                f"weights file {str(shard)!r} is corrupt or truncated ({e}): re-save or re-download the model"
            ) from e


def _load_tokenizer(path: Path) -> Any | None:
    if not any((path / name).exists() for name in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise ValueError(f"the tokenizer files in {str(path)!r} could not be loaded ({e})") from e


def eos_ids_of(model: Any, tokenizer: Any | None) -> tuple[int, ...]:
    """End-of-sequence ids, first from generation_config (what transformers' generate uses)."""
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if value is not None:
            return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)
    return ()


def load_transformers_model(path: Path, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A checked model folder loaded by transformers (dtype None: as stored), errors naming it."""
    _check_model_folder(path)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # outrider prints its own progress; keep output clean
    try:
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or "auto")
    except Exception as e:  # transformers raises many types; name the folder either way
        raise ValueError(f"could not load a causal LM from {str(path)!r}: {e}") from e


def load_model(
    source: str | Path | torch.nn.Module,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    backend: str = "auto",
    tokenizer: Any | None = None,
) -> LoadedModel:
    """Load a causal LM from a local folder, a GGUF file, or wrap a transformers model object.

    dtype None keeps the stored dtype (folder) or the object's dtype; a given dtype converts.
    backend: "auto" (native for Llama, Mistral, Qwen2; transformers otherwise), "native", "hf",
    or "compiled" (native under torch.compile: 10-60 s to compile; no faster on a small CPU).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown: use one of {list(BACKENDS)}")
    quant = dtype if dtype in QUANT_TYPES else None
    if quant is not None:  # weight-only int8/int4 matmuls on bf16 activations (models/quant.py)
        if backend not in ("auto", "native"):
            raise ValueError(f"dtype={dtype!r} runs on the native backend only: use backend='native' or 'auto'")
        dtype = torch.bfloat16
    torch_dtype = parse_dtype(dtype)
    dev = default_device(device)
    if isinstance(source, torch.nn.Module):
        hf_model = source
        if not hasattr(hf_model, "get_output_embeddings") or hf_model.get_output_embeddings() is None:
            raise ValueError(
                f"{type(source).__name__} is not a causal LM with an output layer: pass an "
                "AutoModelForCausalLM model or its folder"
            )
        name = getattr(hf_model.config, "_name_or_path", "") or type(source).__name__
    elif is_gguf(source):  # a llama.cpp file: dequantized (float32 unless dtype says otherwise)
        hf_model, file_tokenizer = load_gguf(source, torch_dtype)
        tokenizer = file_tokenizer if tokenizer is None else tokenizer
        name = str(Path(source).expanduser())
    elif isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        hf_model = load_transformers_model(path, torch_dtype)
        if tokenizer is None:
            tokenizer = _load_tokenizer(path)
        name = str(path)
    else:
        raise ValueError(
            f"model source {source!r} is neither a folder path nor a transformers model object"
        )
    if isinstance(tokenizer, (str, Path)):
        tokenizer = _load_tokenizer(Path(tokenizer))
    if torch_dtype is not None or hf_model.device != dev:
        hf_model = hf_model.to(device=dev, dtype=torch_dtype)
    out_rows = hf_model.get_output_embeddings().weight.shape[0]
    if tokenizer is not None and len(tokenizer) > out_rows:
        raise ValueError(
            f"the tokenizer of {name!r} has {len(tokenizer)} tokens but the model scores only {out_rows}: the "
            "tokenizer files do not belong to these weights (pass the model's own tokenizer)"
        )
    return LoadedModel(_backend(hf_model, backend, quant), tokenizer, eos_ids_of(hf_model, tokenizer), name)


def _backend(hf_model: torch.nn.Module, backend: str, quant: str | None = None) -> CausalModel:
    """native: the lean Llama-family path (static cache); auto: native where supported, else hf."""
    from outrider.models.llama import NativeLlama, unsupported_reason

    if backend == "hf":
        return HFModel(hf_model)
    reason = unsupported_reason(hf_model.config)
    if reason is None:
        return NativeLlama.from_hf(hf_model, compile=backend == "compiled", quant=quant)
    if backend in ("native", "compiled") or quant is not None:
        raise ValueError(f"backend={backend!r}{f' with dtype={quant!r}' if quant else ''} cannot run this model: {reason}")
    return HFModel(hf_model)
