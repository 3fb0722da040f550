"""Tiny GGUF files written the way llama.cpp's converter writes them (for tests; nothing downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp stores q/k rows interleaved per rotary pair (convert_hf_to_gguf's permute); the
    # loader must undo this, which the round-trip test checks.
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(model: torch.nn.Module, tokenizer, path: Path, qtype: str = "F32",
                    chat_template: str | None = None, arch: str = "llama") -> Path:
    """A Llama model and its byte-level BPE tokenizer as a GGUF file; qtype F32, F16, Q8_0, or a raw
    type name (e.g. Q8_1) to write bytes the dequantizer cannot read."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    w.add_vocab_size(cfg.vocab_size)
    kinds = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    if qtype in kinds:
        w.add_file_type(kinds[qtype])
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    special = set(tokenizer.all_special_ids)
    w.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))])
    w.add_token_merges(merges)
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_bos_token_id(tokenizer.eos_token_id)
    if chat_template:
        w.add_chat_template(chat_template)

    def put(name: str, t: torch.Tensor) -> None:
        a = t.detach().float().numpy()
        if a.ndim == 1 or qtype == "F32":
            w.add_tensor(name, a.astype(np.float32))
        elif qtype == "F16":
            w.add_tensor(name, a.astype(np.float16))
        else:
            kind = gguf.GGMLQuantizationType[qtype]
            if kind == gguf.GGMLQuantizationType.Q8_0:
                w.add_tensor(name, gguf.quants.quantize(a, kind), raw_dtype=kind)
            else:  # bytes of the right size for a type with no dequantizer
                shape = gguf.quants.quant_shape_to_byte_shape(a.shape, kind)
                w.add_tensor(name, np.zeros(shape, dtype=np.uint8), raw_shape=shape, raw_dtype=kind)

    sd = model.state_dict()
    put("token_embd.weight", sd["model.embed_tokens.weight"])
    put("output_norm.weight", sd["model.norm.weight"])
    if "lm_head.weight" in sd and not cfg.tie_word_embeddings:
        put("output.weight", sd["lm_head.weight"])
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                t = torch.from_numpy(_permute(t.numpy(), cfg.num_attention_heads))
            elif gg == "attn_k":
                t = torch.from_numpy(_permute(t.numpy(), cfg.num_key_value_heads))
            put(f"blk.{i}.{gg}.weight", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
