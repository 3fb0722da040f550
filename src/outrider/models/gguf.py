"""GGUF in: a llama.cpp model file dequantized into a transformers model, with the tokenizer, chat
template and EOS ids the file carries.

Speculative decoding runs on dequantized weights (bf16 or float32), so the output is exactly that
of the dequantized model; `convert_gguf` writes it once as a Hugging Face folder, which then loads
in about a second instead of dequantizing again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

GGUF_SUFFIX = ".gguf"


def is_gguf(source: object) -> bool:
    return isinstance(source, (str, Path)) and str(source).lower().endswith(GGUF_SUFFIX)


def _reader(path: Path) -> Any:
    if not path.is_file():
        raise ValueError(f"GGUF file {str(path)!r} does not exist: pass the path of a .gguf model file")
    try:
        import gguf
    except ImportError as e:
        raise ValueError("reading a GGUF file needs the `gguf` package: pip install gguf") from e
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, struct.error, OSError on damaged files
        raise ValueError(f"GGUF file {str(path)!r} could not be read ({e}): it is truncated or not a GGUF file") from e


def _field_text(reader: Any, key: str) -> str | None:
    field = reader.fields.get(key)
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def check_gguf(path: Path) -> str:
    """Name what this file holds, or refuse it before any dequantizing: an architecture transformers
    cannot build, or a tensor type the `gguf` package cannot dequantize. Returns the architecture."""
    import gguf
    import gguf.quants
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    reader = _reader(path)
    arch = _field_text(reader, "general.architecture")
    if arch is None:
        raise ValueError(f"GGUF file {str(path)!r} names no architecture (general.architecture): it is incomplete")
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"GGUF file {str(path)!r} holds architecture {arch!r}, which cannot be loaded from GGUF here: "
            f"supported are {sorted(GGUF_SUPPORTED_ARCHITECTURES)} (or convert the original checkpoint "
            "and pass its Hugging Face folder)"
        )
    plain = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16}
    readable = plain | set(getattr(gguf.quants, "_type_traits", {}))
    bad = sorted({t.tensor_type.name for t in reader.tensors if t.tensor_type not in readable})
    if bad:
        raise ValueError(
            f"GGUF file {str(path)!r} has tensors of type {', '.join(bad)}, which cannot be dequantized: "
            f"re-quantize it with llama.cpp's llama-quantize to Q8_0, Q4_K_M or another k-quant, or use bf16"
        )
    return arch


def load_gguf(path: str | Path, dtype: torch.dtype | None = None) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) from a GGUF file; dtype None: float32 (dequantized values are exact in it)."""
    path = Path(path).expanduser()
    check_gguf(path)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    dtype = dtype or torch.float32
    folder, name = str(path.parent), path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)  # its weights are replaced below
        tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model, torch_dtype=dtype)["tensors"]
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except ValueError:
        raise
    except Exception as e:  # transformers and gguf raise many types; name the file either way
        raise ValueError(f"could not load a causal LM from GGUF file {str(path)!r}: {e}") from e
    expected = set(model.state_dict())
    if getattr(config, "tie_word_embeddings", False):
        expected.discard("lm_head.weight")  # tied: the file stores the embedding once
    missing = sorted(expected - set(tensors))
    if missing:
        raise ValueError(f"GGUF file {str(path)!r} lacks tensors {missing[:4]}: it is incomplete or of another model")
    model.load_state_dict(tensors, strict=False)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.eval()
    eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    model.generation_config.eos_token_id = eos
    model.generation_config.bos_token_id = config.bos_token_id
    model.generation_config.pad_token_id = config.pad_token_id if config.pad_token_id is not None else eos
    model.config._name_or_path = str(path)
    return model, tokenizer


def convert_gguf(path: str | Path, out: str | Path, dtype: torch.dtype | None = torch.bfloat16) -> Path:
    """Write a GGUF file as a Hugging Face folder (weights, config, tokenizer with chat template).
    The folder is written beside and renamed into place, so a stopped run leaves no half folder."""
    out = Path(out).expanduser()
    if (out / "config.json").exists():
        raise ValueError(f"{str(out)!r} already holds a model: pass a new --out folder or remove it")
    model, tokenizer = load_gguf(path, dtype)
    tmp = out.with_name(out.name + ".partial")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        out.rmdir()  # an empty folder only: config.json was checked above
    tmp.rename(out)
    return out
