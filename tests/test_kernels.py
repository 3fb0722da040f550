"""outrider's bf16 CPU kernels (models/kernels.py): each op against torch's, row invariance (a
token's outputs do not depend on how many tokens share the forward), and what that buys: bf16
speculative output equal to bf16 autoregressive output."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from outrider import SpeculativeDecoder
from outrider.drafters import DraftModel
from outrider.models import LoadedModel, kernels
from outrider.models import llama as native
from outrider.models.llama import NativeLlama, step_ops

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernels unavailable: {kernels.unavailable_reason()}")

BF16 = torch.bfloat16


def rand(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(BF16)


@pytest.mark.parametrize("rows,dim", [(1, 576), (7, 80), (33, 64)])
def test_small_ops_are_bitwise_torch_ops(rows, dim):
    x, y, w = rand(rows, dim, scale=3.0), rand(rows, dim, seed=1), rand(dim, seed=2)
    assert torch.equal(kernels.rms_norm(x, w, 1e-5), native.rms_norm(x, w, 1e-5))
    for got, want in zip(kernels.add_rms_norm(x, y, w, 1e-5), native.add_rms_norm(x, y, w, 1e-5)):
        assert torch.equal(got, want)
    assert torch.equal(kernels.silu_mul(x), native.silu_mul(x))


@pytest.mark.parametrize("hd", [16, 64, 24])
def test_rope_is_bitwise_apply_rope(hd):
    heads, n = 3, 5
    qkv = rand(n, (heads + 1) * hd, scale=2.0)
    cos, sin = rand(n, 1, hd, seed=1), rand(n, 1, hd, seed=2)
    assert torch.equal(kernels.rope(qkv, cos, sin, heads), native.rope_heads(qkv, cos, sin, heads))


@pytest.mark.parametrize("n_out,n_in", [(200, 96), (64, 576), (37, 80), (130, 2)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_float32_and_is_row_invariant(n_out, n_in, bias):
    w, x = rand(n_out, n_in, seed=3), rand(70, n_in, seed=4)
    b = rand(n_out, seed=5) if bias else None
    packed = kernels.pack_linear(w)
    assert packed.shape == (n_out, n_in)
    alone = torch.cat([kernels.linear(x[i : i + 1], packed, b) for i in range(len(x))])
    want = F.linear(x.float(), w.float(), None if b is None else b.float())
    # One bf16 rounding of a float32 sum: within half a bf16 step of the exact value.
    assert ((alone.float() - want).abs() <= want.abs() * 2**-8 + 1e-3).all()
    for m in (2, 3, 4, 5, 8, 9, 16, 64, 70):
        assert torch.equal(kernels.linear(x[:m], packed, b), alone[:m]), m


def test_linear_refuses_an_odd_input_size():
    with pytest.raises(ValueError, match="even number of inputs, got 7"):
        kernels.pack_linear(rand(4, 7))


def sdpa(q, kc, vc, start, heads, mask):
    n = q.shape[0]
    end = start + n
    if mask is None:
        mask = torch.arange(end) <= torch.arange(start, end)[:, None]
    y = F.scaled_dot_product_attention(q[None, :, :heads].transpose(1, 2).float(), kc[None, :, :end].float(),
                                       vc[None, :, :end].float(), attn_mask=mask, enable_gqa=True)
    return y[0].transpose(0, 1).reshape(n, -1)


# (query heads, kv heads, head size): an attention task holds up to 6 queries of one kv head (rows x
# the group's heads): groups of 1, 2, 3 and 7 heads (7: two tasks per group), 64-wide heads (4
# chunks), 128 (8 chunks, 3 queries a task) and sizes that are not a multiple of 16 or 32.
ATTEND_SHAPES = [(4, 2, 8), (4, 2, 16), (4, 2, 64), (9, 3, 64), (6, 6, 40), (14, 2, 128), (2, 1, 200)]


@pytest.mark.parametrize("heads, kv, hd", ATTEND_SHAPES)
def test_attend_matches_sdpa_and_is_row_invariant(heads, kv, hd):
    start, n, cap = 21, 6, 40
    q = rand(n, heads + kv, hd, seed=6)
    kc, vc = rand(kv, cap, hd, seed=7), rand(kv, cap, hd, seed=8)
    got = kernels.attend(q, kc, vc, start, heads, None)
    assert torch.allclose(got.float(), sdpa(q, kc, vc, start, heads, None), atol=2e-2, rtol=2e-2)
    # Token i alone (a one-token step at position start + i) gets bit for bit what it got among n.
    for i in range(n):
        assert torch.equal(kernels.attend(q[i : i + 1], kc, vc, start + i, heads, None), got[i : i + 1]), i
    # A tree mask: token i sees the cache and a chosen subset of the new tokens; rows 3 and 5 also
    # miss a cache key (the keys all rows of a task see end there).
    mask = torch.ones(n, start + n, dtype=torch.bool)
    mask[:, start:] = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 0, 1, 0, 0, 0],
                                    [1, 1, 0, 1, 0, 0], [1, 0, 1, 0, 1, 0], [1, 1, 0, 1, 0, 1]], dtype=torch.bool)
    mask[[3, 5], 17] = False
    got = kernels.attend(q, kc, vc, start, heads, mask)
    assert torch.allclose(got.float(), sdpa(q, kc, vc, start, heads, mask), atol=2e-2, rtol=2e-2)
    # A tree node gets what the same token gets as a one-token step once its path is the cache:
    # node 5 (path 0 -> 1 -> 3 -> 5) with the cache [0, start) + nodes 0, 1, 3 in place, key 17
    # hidden as in its tree row.
    path = [0, 1, 3]
    kp, vp = kc.clone(), vc.clone()
    kp[:, start : start + 3], vp[:, start : start + 3] = kc[:, start + torch.tensor(path)], vc[:, start + torch.tensor(path)]
    kp[:, start + 3], vp[:, start + 3] = kc[:, start + 5], vc[:, start + 5]
    alone = torch.ones(1, start + 4, dtype=torch.bool)
    alone[0, 17] = False
    assert torch.equal(kernels.attend(q[5:6], kp, vp, start + 3, heads, alone), got[5:6])


def bf16_model(cls=LlamaConfig, **overrides) -> torch.nn.Module:
    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=512, bos_token_id=None, eos_token_id=None,
               pad_token_id=None)
    cfg.update(overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cls(**cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model.to(BF16)


MODELS = {"llama-hd16": (LlamaConfig, {}), "qwen2-hd8-biases": (Qwen2Config, {"hidden_size": 32})}


@pytest.mark.parametrize("case", MODELS)
def test_a_verify_forward_equals_one_token_steps_bitwise(case):
    cls, overrides = MODELS[case]
    model = NativeLlama.from_hf(bf16_model(cls, **overrides))
    assert model.kernels and model.packed
    ids = torch.randint(0, 128, (90,), generator=torch.Generator().manual_seed(1))
    model.forward(ids[:20], num_logits=0)
    steps = torch.cat([model.forward(ids[20 + i : 21 + i]) for i in range(40)])
    for n in (2, 5, 8, 17, 40):
        model.rollback(20)
        assert torch.equal(model.forward(ids[20 : 20 + n]), steps[:n]), n


def test_kernels_true_where_they_cannot_run_names_why():
    with pytest.raises(ValueError, match="kernels=True but .* bfloat16 activations"):
        step_ops(torch.float32, torch.device("cpu"), use_kernels=True)
    assert step_ops(BF16, torch.device("cpu"), use_kernels=False) is native.TORCH_OPS
    assert not NativeLlama.from_hf(bf16_model(), kernels=False).kernels


def test_bf16_speculative_greedy_equals_bf16_autoregressive():
    """Contract 1 in bf16: with row-invariant kernels, verifying k+1 tokens scores each exactly as
    a one-token step does, so no near-tie can flip. The draft is the target itself: every draft is
    accepted and each step verifies k + 1 tokens."""
    hf = bf16_model(num_hidden_layers=4)
    target = NativeLlama.from_hf(hf)
    prompt = torch.randint(0, 128, (12,), generator=torch.Generator().manual_seed(2)).tolist()

    def run(drafter, k):
        dec = SpeculativeDecoder(LoadedModel(target, None, (), "tiny"), drafter, k=k)
        target.reset()
        return dec.generate(prompt, max_new_tokens=80)

    from outrider.drafters import Autoregressive

    plain = run(Autoregressive(), 0)
    for k in (3, 7):
        spec = run(DraftModel(NativeLlama.from_hf(hf), 128, k=k), k)
        assert spec.stats.accepted > 40  # the steps really verified several tokens each
        assert spec.token_ids == plain.token_ids, k


def test_a_batched_bf16_forward_gives_each_row_its_logits_alone_bitwise():
    """Rows of a batch share the matmuls (their tokens stacked), so row invariance makes a batched
    bf16 forward give each sequence bit for bit the logits it gets alone (batch.py's rows then
    decode as single requests do)."""
    from outrider.models.base import RowForward

    # intermediate 1536: a down projection whose K oneDNN blocks differently from 8 rows on.
    model = NativeLlama.from_hf(bf16_model(intermediate_size=1536, num_hidden_layers=2))
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 128, (n,), generator=gen) for n in (9, 15, 4)]
    steps = [torch.randint(0, 128, (n,), generator=gen) for n in (1, 9, 6)]
    alone = []
    for p, s in zip(prompts, steps):
        model.reset()
        model.forward(p, num_logits=0)
        alone.append(model.forward(s))
    model.set_slots(3)
    model.forward_rows([RowForward(i, p, 0) for i, p in enumerate(prompts)])
    got = model.forward_rows([RowForward(i, s) for i, s in enumerate(steps)])
    for i in range(3):
        assert torch.equal(got[i], alone[i]), i


@pytest.mark.parametrize("case", MODELS)
def test_a_batch_step_of_mixed_rows_equals_each_row_alone_bitwise(case):
    """A batch step runs each layer as one call for all sequences (kernels.decoder_layer_rows): a
    prefill, one-token steps, a 6-token chain (more rows than an attention block) and a tree (mask
    and positions) in one forward give each sequence bit for bit its logits and caches alone, and
    the op-by-op batch path's."""
    from outrider.models.base import RowForward
    from outrider.tree import verify_mask, verify_positions

    cls, overrides = MODELS[case]
    hf = bf16_model(cls, **overrides)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 128, (n,), generator=gen) for n in (9, 21, 4, 13, 1)]
    parents = torch.tensor([-1, 0, 0, 1, 2, 3])
    steps = [torch.randint(0, 128, (n,), generator=gen) for n in (1, 6, 7, 1, 17)]
    trees = {2: parents}  # row 2 verifies [root] + a 6-node tree

    def row(slot: int, i: int, start: int) -> RowForward:
        if i in trees:
            return RowForward(slot, steps[i], None, verify_mask(trees[i]), verify_positions(trees[i], start))
        return RowForward(slot, steps[i])

    alone = NativeLlama.from_hf(hf)
    expected, caches = [], []
    for i, p in enumerate(prompts):
        alone.reset()
        alone.forward(p, num_logits=0)
        expected.append(alone.forward_rows([row(0, i, len(p))])[0])
        caches.append(alone._k[-1][0, :, : alone.length].clone())
    for fused in (True, False):
        batched = NativeLlama.from_hf(hf)
        batched._fused_layers = fused
        batched.set_slots(len(prompts))
        batched.forward_rows([RowForward(i, p, 0) for i, p in enumerate(prompts[:4])])
        # Row 4 prefills its 1-token prompt and 17 more tokens in the same step as the others' steps.
        got = batched.forward_rows([row(i, i, len(p)) for i, p in enumerate(prompts[:4])]
                                   + [RowForward(4, torch.cat([prompts[4], steps[4]]))])
        got[4] = got[4][1:]
        for i in range(len(prompts)):
            assert torch.equal(got[i], expected[i]), (fused, i)
            assert torch.equal(batched._k[-1][i, :, : len(prompts[i]) + len(steps[i])], caches[i]), (fused, i)


@pytest.mark.parametrize("case", MODELS)
def test_a_fused_layer_is_the_op_by_op_layer_bitwise(case):
    """A sequence's step runs each layer as one kernel call (kernels.decoder_layer_op); it must be the
    op-by-op layer bit for bit: prefill, one-token steps, a tree (mask and positions), the caches."""
    from outrider.tree import verify_mask, verify_positions

    cls, overrides = MODELS[case]
    hf = bf16_model(cls, **overrides)
    fused, plain = NativeLlama.from_hf(hf), NativeLlama.from_hf(hf)
    plain._fused_layers = False
    assert fused._fused_layers
    ids = torch.randint(0, 128, (30,), generator=torch.Generator().manual_seed(4))
    parents = torch.tensor([-1, 0, 0, 1, 2, 3])
    for m in (fused, plain):
        m.forward(ids[:20])
    assert torch.equal(fused.forward(ids[20:21]), plain.forward(ids[20:21]))
    outs = [m.forward(ids[21:28], attn_mask=verify_mask(parents), positions=verify_positions(parents, m.length))
            for m in (fused, plain)]
    assert torch.equal(*outs)
    assert torch.equal(fused._k[0], plain._k[0]) and torch.equal(fused._v[-1], plain._v[-1])
