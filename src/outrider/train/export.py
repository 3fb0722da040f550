"""Export of a trained model in Hugging Face format, loadable by transformers and outrider."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaForCausalLM


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def export_model(
    model: LlamaForCausalLM, tokenizer_dir: Path, eos_id: int, out_dir: Path
) -> dict[str, float | int]:
    """Write config.json, model.safetensors (bf16), tokenizer files and generation_config.json.

    bf16 halves the files and is the dtype the CPU decodes fastest; training kept fp32 masters.
    Returns parameter count and size of the weights file in MB.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    exported = copy.deepcopy(model).to(device="cpu", dtype=torch.bfloat16)
    exported.config.dtype = torch.bfloat16
    # Greedy by default: the demo's contract is that speculative output equals greedy output.
    exported.generation_config = GenerationConfig(
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id, do_sample=False
    )
    exported.save_pretrained(str(out_dir), safe_serialization=True)
    # Copy the saved files rather than re-saving: they are the ones every transformers loads.
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir / name, out_dir / name)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "size_mb": round((out_dir / "model.safetensors").stat().st_size / 1e6, 3),
    }
