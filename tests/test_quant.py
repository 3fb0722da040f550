"""Weight-only int8 / int4: the kernels multiply by the weights `dequantize` says, the native model
runs them, and speculation reproduces the quantized target."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from outrider import SpeculativeDecoder
from outrider.models import load_model
from outrider.models.quant import dequantize, quant_linear, quant_works, quantize_int4, quantize_int8

from conftest import tiny_model

pytestmark = pytest.mark.skipif(not (quant_works("int8") and quant_works("int4")),
                                reason="this torch build lacks the CPU weight-only int8/int4 kernels")


@pytest.mark.parametrize("quantize, bits", [(quantize_int8, 8), (quantize_int4, 4)])
def test_kernels_multiply_by_the_dequantized_weights(quantize, bits):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=g) * 0.05
    q = quantize(w)
    deq = dequantize(q)
    # Rounding error at most half a step (+ bf16 rounding of scales): int8 steps are max|w|/127,
    # int4 steps (max-min)/15 per group of 32.
    step = (w.abs().amax() / 127) if bits == 8 else ((w.amax() - w.amin()) / 15)
    assert (deq - w).abs().max() <= 0.5 * step + 0.01 * w.abs().max()
    assert not torch.equal(deq, w)  # really quantized
    x = torch.randn(5, 64, generator=g).to(torch.bfloat16)
    got = quant_linear(x, q, None).float()
    want = F.linear(x.float(), deq)
    assert torch.allclose(got, want, atol=0.02, rtol=0.02)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("q")
    model = tiny_model("llama", seed=5, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                       hidden_size=64, intermediate_size=128)
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_native_quantized_logits_follow_the_dequantized_model(model_dir, kind):
    from transformers import AutoModelForCausalLM

    q = load_model(model_dir, dtype=kind).model
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # The oracle: transformers on the weights the kernels read (layers `kind`, output layer int8).
    with torch.no_grad():
        for layer, w in zip(ref.model.layers, q.layers):
            H, Hkv, hd = q.n_heads, q.n_kv_heads, q.head_dim
            qkv = dequantize(w.wqkv)
            layer.self_attn.q_proj.weight.copy_(qkv[: H * hd])
            layer.self_attn.k_proj.weight.copy_(qkv[H * hd : (H + Hkv) * hd])
            layer.self_attn.v_proj.weight.copy_(qkv[(H + Hkv) * hd :])
            layer.self_attn.o_proj.weight.copy_(dequantize(w.wo))
            gate_up = dequantize(w.w_gate_up)
            layer.mlp.gate_proj.weight.copy_(gate_up[: gate_up.shape[0] // 2])
            layer.mlp.up_proj.weight.copy_(gate_up[gate_up.shape[0] // 2 :])
            layer.mlp.down_proj.weight.copy_(dequantize(w.w_down))
        ref.lm_head.weight = torch.nn.Parameter(dequantize(q.lm_head))
        ids = torch.arange(3, 23)
        want = ref(ids[None]).logits[0]
    got = q.forward(ids)
    plain = load_model(model_dir, dtype="bfloat16").model.forward(ids)
    err, err_plain = (got - want).abs().max(), (plain - want).abs().max()
    assert err < 0.1 * want.abs().max(), (err, want.abs().max())
    assert err < err_plain  # closer to its own dequantized weights than the unquantized model is


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_speculation_reproduces_the_quantized_target(model_dir, kind):
    ar = SpeculativeDecoder.from_pretrained(model_dir, method="autoregressive", dtype=kind)
    spec = SpeculativeDecoder.from_pretrained(model_dir, method="prompt_lookup", dtype=kind, k=4)
    prompt = "def add(a, b):\n    return a + b\n\ndef add("
    a, b = ar.generate(prompt, max_new_tokens=24), spec.generate(prompt, max_new_tokens=24)
    assert b.stats.accepted > 0  # speculation happened
    assert a.token_ids == b.token_ids


def test_quantized_dtypes_are_refused_where_they_cannot_run(model_dir):
    with pytest.raises(ValueError, match="native backend only"):
        load_model(model_dir, dtype="int8", backend="hf")
    with pytest.raises(ValueError, match="int8.*int4"):
        load_model(model_dir, dtype="int2")
