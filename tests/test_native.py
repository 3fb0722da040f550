"""The native Llama-family backend against transformers on the same tiny random weights."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

from outrider.models.base import CausalModel
from outrider.models.llama import NativeLlama, linear_packer, supports

VOCAB = 100
TOL = 1e-4

LLAMA3_ROPE = {
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
}  # fmt: skip
CASES = {
    "llama": (LlamaConfig, {"tie_word_embeddings": True}),
    "llama3-rope-untied": (LlamaConfig, {"rope_parameters": LLAMA3_ROPE, "tie_word_embeddings": False}),
    "llama-biases": (LlamaConfig, {"attention_bias": True, "mlp_bias": True, "hidden_size": 64}),
    "mistral": (MistralConfig, {"sliding_window": 4096}),
    "qwen2": (Qwen2Config, {}),
}


@functools.cache
def hf_model(case: str) -> torch.nn.Module:
    cls, overrides = CASES[case]
    kwargs = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)  # fmt: skip
    kwargs.update(overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cls(**kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:  # zeros/ones at init would hide a missed term
                p.add_(torch.randn_like(p) * 0.2)
        # Sharper random logits make greedy near-ties (which could flip in float32) improbable.
        model.get_output_embeddings().weight.mul_(8.0)
    return model


def hf_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()  # (n, V)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def random_ids(n: int, seed: int = 1) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("case", CASES)
def test_full_forward_matches_transformers(case):
    model = hf_model(case)
    native = NativeLlama.from_hf(model)
    assert isinstance(native, CausalModel) and native.vocab_size == VOCAB and native.max_length == 256
    ids = random_ids(40)
    assert max_diff(native.forward(torch.tensor(ids)), hf_logits(model, ids)) <= TOL
    assert native.length == 40


@pytest.mark.parametrize("case", CASES)
def test_incremental_forward_matches_transformers(case):
    model = hf_model(case)
    native = NativeLlama.from_hf(model)
    ids = random_ids(30)
    ref = hf_logits(model, ids)
    assert native.forward(torch.tensor(ids[:8]), num_logits=0).shape == (0, VOCAB)  # prefill
    pos = 8
    for size in (1, 3, 1, 3, 3, 1):
        out = native.forward(torch.tensor(ids[pos : pos + size]))
        assert max_diff(out, ref[pos : pos + size]) <= TOL, (case, pos, size)
        pos += size
    out = native.forward(torch.tensor(ids[pos : pos + 4]), num_logits=2)  # only the last 2 rows
    assert max_diff(out, ref[pos + 2 : pos + 4]) <= TOL


def test_weights_are_shared_not_copied():
    model = hf_model("llama3-rope-untied")
    native = NativeLlama.from_hf(model)
    assert not native.packed  # float32 stays on plain matmuls
    layer = model.model.layers[1]
    attn, mlp = layer.self_attn, layer.mlp
    # The module's own parameters became row views of the fused tensors: one copy in memory.
    wqkv = native.layers[1].wqkv
    assert attn.q_proj.weight.data_ptr() == wqkv.data_ptr()
    assert attn.v_proj.weight.data_ptr() == wqkv[-attn.v_proj.weight.shape[0] :].data_ptr()
    assert mlp.up_proj.weight.data_ptr() == native.layers[1].w_gate_up[mlp.gate_proj.weight.shape[0] :].data_ptr()
    assert native.layers[1].w_down.data_ptr() == mlp.down_proj.weight.data_ptr()
    assert native.embed.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert native.lm_head.data_ptr() == model.lm_head.weight.data_ptr()
    tied = hf_model("llama")
    assert NativeLlama.from_hf(tied).lm_head.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    # ... and the module still computes what it did before the fusion.
    ids = random_ids(12)
    assert max_diff(hf_logits(model, ids), NativeLlama.from_hf(model).forward(torch.tensor(ids))) <= TOL


def bf16_copy(case: str) -> torch.nn.Module:
    model32 = hf_model(case)
    model16 = AutoModelForCausalLM.from_config(model32.config).eval()
    model16.load_state_dict(model32.state_dict())
    return model16.to(torch.bfloat16)


@pytest.mark.skipif(linear_packer(torch.bfloat16, torch.device("cpu")) is None, reason="no oneDNN bf16 here")
@pytest.mark.parametrize("case", ["llama-biases", "qwen2"])
def test_packed_bf16_matmuls_equal_plain_ones(case):
    model = bf16_copy(case)
    # kernels=False: oneDNN's packed matmul against F.linear (outrider's own, tests/test_kernels.py).
    packed, plain = NativeLlama.from_hf(model, kernels=False), NativeLlama.from_hf(model, pack=False, kernels=False)
    assert packed.packed and not plain.packed
    ids = torch.tensor(random_ids(20))
    a = torch.cat([packed.forward(ids[:16]), packed.forward(ids[16:17]), packed.forward(ids[17:])])
    b = torch.cat([plain.forward(ids[:16]), plain.forward(ids[16:17]), plain.forward(ids[17:])])
    # Bitwise equal, as linear_packer's docstring says: both paths run oneDNN's bf16 matmul, packed
    # weights only skip the per-call reorder (measured equal for every CASES model and at single
    # linears up to 4096x4096, torch 2.13 CPU on an AVX512-BF16 x86). A CPU where this fails runs
    # different kernels for the two paths, and the docstring's "equal" is then untrue there.
    assert torch.equal(a, b), max_diff(a, b)


def test_pack_true_refuses_float32():
    with pytest.raises(ValueError, match="pack=True needs bfloat16"):
        NativeLlama.from_hf(hf_model("llama"), pack=True)


def test_rollback_then_new_tokens_equals_fresh_forward():
    model = hf_model("qwen2")
    native = NativeLlama.from_hf(model)
    ids = random_ids(10)
    native.forward(torch.tensor(ids))
    native.rollback(6)
    assert native.length == 6
    new = random_ids(5, seed=2)
    out = native.forward(torch.tensor(new))
    assert max_diff(out, hf_logits(model, ids[:6] + new)[6:]) <= TOL
    native.reset()
    assert max_diff(native.forward(torch.tensor(new)), hf_logits(model, new)) <= TOL
    with pytest.raises(ValueError, match="roll back to length 12"):
        native.rollback(12)


@pytest.mark.parametrize("case", ["llama", "qwen2"])
def test_greedy_matches_generate(case):
    model = hf_model(case)
    native = NativeLlama.from_hf(model)
    prompt = random_ids(6, seed=3)
    n_new = 240  # the context is 256
    expected = model.generate(torch.tensor([prompt]), max_new_tokens=n_new, min_new_tokens=n_new,
                              do_sample=False)[0, len(prompt):].tolist()  # fmt: skip
    out: list[int] = []
    logits = native.forward(torch.tensor(prompt), num_logits=1)
    for _ in range(n_new):
        out.append(int(logits[-1].argmax()))
        logits = native.forward(torch.tensor(out[-1:]))
    assert out == expected


def test_tree_mask_equals_each_branch_as_a_chain():
    model = hf_model("llama")
    native = NativeLlama.from_hf(model)
    context = random_ids(5, seed=4)
    root, a, b = 11, [21, 22], [31, 32]
    native.forward(torch.tensor(context), num_logits=0)
    L = native.length
    # Flattened tree [root, a1, a2, b1, b2]: each token sees the cache and its ancestors.
    tree = torch.tensor([root, *a, *b])
    positions = torch.tensor([L, L + 1, L + 2, L + 1, L + 2])
    mask = torch.tensor(
        [[1, 0, 0, 0, 0],
         [1, 1, 0, 0, 0],
         [1, 1, 1, 0, 0],
         [1, 0, 0, 1, 0],
         [1, 0, 0, 1, 1]], dtype=torch.bool)  # fmt: skip
    tree_logits = native.forward(tree, attn_mask=mask, positions=positions)
    native.rollback(L)
    chain_a = native.forward(torch.tensor([root, *a]))
    native.rollback(L)
    chain_b = native.forward(torch.tensor([root, *b]))
    assert max_diff(tree_logits[:3], chain_a) <= TOL
    assert max_diff(tree_logits[[0, 3, 4]], chain_b) <= TOL
    assert max_diff(chain_b, hf_logits(model, context + [root, *b])[L:]) <= TOL


def test_keeping_a_tree_path_equals_feeding_it_as_a_chain():
    model = hf_model("qwen2")
    native = NativeLlama.from_hf(model)
    context = random_ids(6, seed=5)
    native.forward(torch.tensor(context), num_logits=0)
    L = native.length
    # Tree [r, a1, b1, b2]: r -> a1, r -> b1 -> b2. Keep the b branch.
    tree = torch.tensor([11, 21, 31, 32])
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)
    native.forward(tree, attn_mask=mask, positions=torch.tensor([L, L + 1, L + 1, L + 2]))
    native.keep_path(L, [0, 2, 3])
    assert native.length == L + 3
    nxt = random_ids(3, seed=6)
    out = native.forward(torch.tensor(nxt))
    assert max_diff(out, hf_logits(model, context + [11, 31, 32] + nxt)[-3:]) <= TOL
    with pytest.raises(ValueError, match="path=\\[2, 1\\]"):
        native.keep_path(L, [2, 1])
    with pytest.raises(ValueError, match="path=\\[0, 9\\]"):
        native.keep_path(native.length - 2, [0, 9])


def test_capacity_overflow_names_the_capacity():
    model = hf_model("llama")
    native = NativeLlama.from_hf(model, capacity=16)
    assert native.capacity == 16 and native.max_length == 16
    assert NativeLlama.from_hf(model, capacity=10**6).capacity == 256  # capped by the context
    native.forward(torch.tensor(random_ids(10)))
    with pytest.raises(ValueError, match="holding 10 of 16"):
        native.forward(torch.tensor(random_ids(7)))
    assert native.length == 10  # a refused forward leaves the cache as it was
    with pytest.raises(ValueError, match="num_logits=3"):
        native.forward(torch.tensor([1, 2]), num_logits=3)
    native.forward(torch.tensor(random_ids(6)))  # fills the cache exactly
    with pytest.raises(ValueError, match="capacity=0"):
        NativeLlama.from_hf(model, capacity=0)


def test_unsupported_models_raise_naming_the_feature():
    gpt2 = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=64)
    assert not supports(gpt2)
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        NativeLlama.from_hf(AutoModelForCausalLM.from_config(gpt2))
    assert supports(hf_model("mistral").config) and supports(hf_model("qwen2").config)
    windowed = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             sliding_window=64)  # fmt: skip
    assert not supports(windowed) and supports(windowed, capacity=64)
    with pytest.raises(ValueError, match="sliding_window=64"):
        NativeLlama.from_hf(AutoModelForCausalLM.from_config(windowed))
    yarn = LlamaConfig(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0})
    assert not supports(yarn)


def test_bfloat16_runs_close_to_float32():
    model32 = hf_model("qwen2")
    ids = random_ids(24)
    ref = NativeLlama.from_hf(model32).forward(torch.tensor(ids))
    model16 = bf16_copy("qwen2")
    native = NativeLlama.from_hf(model16)
    assert native._k[0].dtype == torch.bfloat16
    native.forward(torch.tensor(ids[:20]), num_logits=0)
    out = torch.cat([native.forward(torch.tensor(ids[20:21])), native.forward(torch.tensor(ids[21:]))])
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    scale = ref.abs().max().item()
    assert max_diff(out, ref[20:]) <= 0.05 * scale
    assert max_diff(out, hf_logits(model16, ids)[20:]) <= 0.02 * scale  # same bf16 arithmetic as HF


def test_kernels_build_and_load_where_the_cpu_runs_them():
    """tests/test_kernels.py skips where outrider's kernels cannot run; on a CPU with AVX512-BF16
    and a C++ compiler they must build and agree with torch's ops, or a broken kernel source would
    pass CI as a quiet fallback to the slower path."""
    import os
    import shutil

    from outrider.models import kernels

    missing = [f for f in kernels._REQUIRED_CPU_FLAGS if f not in kernels._cpu_flags()]
    if missing or shutil.which("g++") is None or os.environ.get("OUTRIDER_KERNELS") == "0":
        pytest.skip(f"this machine cannot run them (CPU lacks {missing}, or no g++, or OUTRIDER_KERNELS=0)")
    assert kernels.unavailable_reason() is None


def test_kernel_cache_falls_back_to_a_temporary_folder_where_home_is_unwritable(monkeypatch, tmp_path):
    import tempfile
    from pathlib import Path

    from outrider.models import kernels

    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a folder cannot be made under a file
    monkeypatch.setenv("OUTRIDER_CACHE", str(blocker / "cache"))
    assert kernels.cache_dir().parent == Path(tempfile.gettempdir())
    monkeypatch.setenv("OUTRIDER_CACHE", str(tmp_path / "ok"))
    assert kernels.cache_dir() == tmp_path / "ok" / "kernels" and kernels.cache_dir().is_dir()
