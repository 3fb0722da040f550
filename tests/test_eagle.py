"""The EAGLE head drafter: exact under greedy, lossless under sampling (a random, untrained head
drafts badly, which is what these contracts must survive), saved and loaded, and refused for
another target."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from conftest import tiny_model
from test_e2e_hf import hf_greedy as greedy
from outrider import SpeculativeDecoder
from outrider.drafters.eagle import EagleDrafter, EagleHead, PairFeed, new_head
from outrider.drafters.heads import fingerprint, target_embedding
from outrider.models import kernels, load_model
from outrider.sampling import SamplingParams

PROMPT = [5, 17, 3, 42, 8, 5, 17, 3]


def eagle_decoder(model, backend="auto", k=4, draft_vocab=None, seed=0, adaptive=None, width=1):
    target = load_model(model, backend=backend)
    embed = target_embedding(target.model)
    V = embed.shape[0]
    d2t = torch.arange(V) if draft_vocab is None else torch.randperm(V, generator=torch.Generator().manual_seed(1))[:draft_vocab]
    head = new_head(model.config, embed, "tiny", d2t, seed=seed, max_positions=256).to(embed.dtype)
    return SpeculativeDecoder(target, EagleDrafter(head, embed, V, k=k, width=width), k=k, adaptive=adaptive)


@pytest.mark.parametrize("backend", ["native", "hf"])
@pytest.mark.parametrize("draft_vocab", [None, 40])
@pytest.mark.parametrize("width, k", [(1, 4), (3, 10)])
def test_eagle_is_exact_under_greedy(backend, draft_vocab, width, k):
    model = tiny_model("llama")
    dec = eagle_decoder(model, backend, draft_vocab=draft_vocab, width=width, k=k)
    for prompt in (PROMPT, [1], PROMPT * 3):
        res = dec.generate(prompt, max_new_tokens=30)
        assert res.token_ids == greedy(model, prompt, 30)
        assert res.stats.drafted > 0


def test_the_first_draft_reads_the_newest_pair():
    """The head's state after prefill comes from the pair (feature of the second-last prompt token,
    embedding of the last one): changing only the last prompt token changes it."""
    model = tiny_model("llama")
    dec = eagle_decoder(model, "native")
    a = dec.drafter
    out = []
    for last in (7, 9):
        dec.generate(PROMPT + [last], max_new_tokens=2)
        out.append(a._last_out.clone())
    assert not torch.allclose(out[0], out[1])


@pytest.mark.slow
@pytest.mark.parametrize("params, width", [(SamplingParams(1.0), 1), (SamplingParams(0.7, top_p=0.8), 1),
                                           (SamplingParams(1.0), 2)], ids=["t1", "t0.7-topp0.8", "t1-tree"])
def test_eagle_samples_losslessly(params, width):
    from test_lossless import LLAMA_PROMPT, assert_samples_like_the_llama, soft_tiny_llama

    model = soft_tiny_llama()
    dec = eagle_decoder(model, "native", k=3 * width, draft_vocab=4, width=width)
    assert_samples_like_the_llama(dec, model, params)
    assert dec.generate(LLAMA_PROMPT, max_new_tokens=3, temperature=1.0, seed=0).stats.drafted > 0


def test_save_load_and_refuse_another_target(tmp_path):
    model = tiny_model("llama")
    embed = target_embedding(load_model(model).model)
    head = new_head(model.config, embed, "tiny-a", torch.arange(50), max_positions=256)
    head.save(tmp_path / "head")
    loaded = EagleHead.load(tmp_path / "head")
    assert loaded.cfg == head.cfg and torch.equal(loaded.d2t, head.d2t)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), head.state_dict().values()))
    dec = SpeculativeDecoder.from_pretrained(model, draft=tmp_path / "head", method="eagle", k=3)
    assert dec.generate(PROMPT, max_new_tokens=10).token_ids == greedy(model, PROMPT, 10)
    other = tiny_model("llama", seed=5)
    with pytest.raises(ValueError, match=r"trained for target 'tiny-a'"):
        SpeculativeDecoder.from_pretrained(other, draft=tmp_path / "head", method="eagle")
    with pytest.raises(ValueError, match="is not an EAGLE head folder"):
        SpeculativeDecoder.from_pretrained(model, draft=tmp_path, method="eagle")
    assert fingerprint(embed) == head.cfg.target_fingerprint


def test_drafting_runs_the_layer_training_runs():
    """EagleDrafter runs the head's layer with its own packed weights and cache (for speed); its
    outputs must be the ones EagleHead.block computes in training, or training optimises a model
    that never drafts. Checked on a chain of pairs fed in two calls (the cache in between)."""
    from outrider.drafters.eagle import _rope

    model = tiny_model("llama", seed=2)
    embed = model.get_input_embeddings().weight.detach()
    head = new_head(model.config, embed, "tiny", torch.arange(50), seed=3, max_positions=64)
    drafter = EagleDrafter(head, embed, embed.shape[0], k=4)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, embed.shape[1], generator=g)  # (L, T, D_t)
    tokens = torch.randint(0, embed.shape[0], (7,), generator=g)
    with torch.no_grad():
        x = head.pairs(head.fuse_features(hidden), torch.nn.functional.embedding(tokens, embed))  # (T, D)
        cos, sin = _rope(torch.arange(7), head.cfg.head_dim, head.cfg.rope_theta, x.dtype)
        want, _, _ = head.block(x[None], cos, sin, None, None, None)
        want_logits = head.logits(want[0])
    run = drafter.runner.run_rows
    first, _ = run([PairFeed(0, 0, tokens[:4], hidden[:, :4], fuse=True)])[0]
    second, last_logits = run([PairFeed(0, 4, tokens[4:], hidden[:, 4:], fuse=True, logits=True)])[0]
    got = torch.cat([first, second])
    assert torch.allclose(got, want[0], atol=1e-5)
    assert torch.allclose(drafter.runner.logits(got), want_logits, atol=1e-5)
    assert torch.allclose(last_logits, want_logits[-1], atol=1e-5)


def test_runner_rows_fed_together_equal_each_fed_alone():
    """EagleRunner.run_rows with several slots (a batch's head steps in one pass): rows of
    different lengths and cache positions, target states and stand-in features mixed, give what
    each gives fed alone, and no row's cache sees another's."""
    from outrider.drafters.eagle import EagleRunner

    model = tiny_model("llama", seed=2)
    embed = model.get_input_embeddings().weight.detach()
    head = new_head(model.config, embed, "tiny", torch.arange(50), seed=3, max_positions=64)
    g = torch.Generator().manual_seed(1)
    D, V = head.cfg.hidden_size, embed.shape[0]
    firsts = [PairFeed(s, 0, torch.randint(0, V, (n,), generator=g), torch.randn(3, n, embed.shape[1], generator=g),
                       fuse=True) for s, n in enumerate((5, 2, 7))]
    seconds = [PairFeed(0, 5, torch.randint(0, V, (1,), generator=g), torch.randn(1, D, generator=g), logits=True),
               PairFeed(1, 2, torch.randint(0, V, (3,), generator=g), torch.randn(3, embed.shape[1], generator=g)[None]
                        .expand(3, 3, -1).contiguous(), fuse=True, logits=True),
               PairFeed(2, 7, torch.randint(0, V, (2,), generator=g), torch.randn(2, D, generator=g))]
    alone = []
    for a, b in zip(firsts, seconds):
        r = EagleRunner(head, embed)
        r.run_rows([replace(a, slot=0)])
        alone.append(r.run_rows([replace(b, slot=0)])[0])
    together = EagleRunner(head, embed, slots=3)
    together.run_rows(firsts)
    for (out, lg), (want_out, want_lg) in zip(together.run_rows(seconds), alone):
        assert torch.allclose(out, want_out, atol=1e-5)
        assert (lg is None) == (want_lg is None) and (lg is None or torch.allclose(lg, want_lg, atol=1e-5))


@pytest.mark.skipif(not kernels.available(), reason=f"kernels unavailable: {kernels.unavailable_reason()}")
def test_bf16_runner_rows_fed_together_are_each_row_alone_bitwise():
    """Where outrider's kernels run, a batch's head pass is one kernel layer call for all rows
    (EagleRunner._run_fused): reads, chain pairs and a tree feed (mask, positions) of rows at
    different cache positions give bit for bit each row's one-row pass, caches included."""
    from outrider.drafters.eagle import EagleRunner

    model = tiny_model("llama", seed=2)
    embed = model.get_input_embeddings().weight.detach().to(torch.bfloat16)
    head = new_head(model.config, embed, "tiny", torch.arange(50), seed=3, max_positions=64).to(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    D, V = head.cfg.hidden_size, embed.shape[0]
    bf = torch.bfloat16
    firsts = [PairFeed(s, 0, torch.randint(0, V, (n,), generator=g), torch.randn(3, n, embed.shape[1], generator=g).to(bf),
                       fuse=True, logits=s == 1) for s, n in enumerate((5, 2, 7))]
    mask = torch.ones(3, 10, dtype=torch.bool)  # three siblings after 7 pairs: each sees the cache and itself
    mask[:, 7:] = torch.eye(3, dtype=torch.bool)
    seconds = [PairFeed(0, 5, torch.randint(0, V, (1,), generator=g), torch.randn(1, D, generator=g).to(bf), logits=True),
               PairFeed(1, 2, torch.randint(0, V, (3,), generator=g),
                        torch.randn(3, 3, embed.shape[1], generator=g).to(bf), fuse=True, logits=True),
               PairFeed(2, 7, torch.randint(0, V, (3,), generator=g), torch.randn(3, D, generator=g).to(bf), mask=mask,
                        positions=torch.tensor([7, 7, 7]), logits=True)]
    alone = []
    for a, b in zip(firsts, seconds):
        r = EagleRunner(head, embed)
        first = r.run_rows([replace(a, slot=0)])[0]
        alone.append((first, r.run_rows([replace(b, slot=0)])[0], r.k_cache[0].clone()))
    together = EagleRunner(head, embed, slots=3)
    assert together._fused
    got_firsts = together.run_rows(firsts)
    got = together.run_rows(seconds)
    for i, ((out, lg), (first, (want_out, want_lg), cache)) in enumerate(zip(got, alone)):
        assert torch.equal(got_firsts[i][0], first[0]), i
        assert (got_firsts[i][1] is None) == (first[1] is None)
        assert torch.equal(out, want_out) and torch.equal(lg, want_lg), i
        assert torch.equal(together.k_cache[i], cache), i


def test_bf16_drafting_weights_stay_the_layer_training_runs():
    """In bf16 on a CPU a drafting pass multiplies by weights laid out for speed: outrider's kernel
    layout where its kernels run, else int8 copies for passes over few pairs (a chain depth, a
    step's read; EagleRunner). The head must still compute the layer training optimises, to that
    rounding: a layout or quantization bug (a wrong scale, a transposed weight) would leave
    drafting exact and lossless but its drafts worthless."""
    from outrider.drafters.eagle import FEW_PAIRS, EagleRunner, _rope
    from outrider.models import kernels
    from outrider.models.llama import linear_packer
    from outrider.models.quant import QuantWeight, quant_works

    int8 = linear_packer(torch.bfloat16, torch.device("cpu")) is not None and quant_works("int8")
    if not kernels.available() and not int8:
        pytest.skip("neither outrider's kernels nor oneDNN bf16 with int8 weight-only matmuls run here")
    model = tiny_model("llama", seed=2)
    embed = model.get_input_embeddings().weight.detach()
    head = new_head(model.config, embed, "tiny", torch.arange(50), seed=3, max_positions=64)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # norms that are not all ones: a swapped or skipped norm then shows
        for p in (head.attn_norm, head.mlp_norm, head.norm):
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    hidden = torch.randn(3, 7, embed.shape[1], generator=g)
    tokens = torch.randint(0, embed.shape[0], (7,), generator=g)
    with torch.no_grad():  # the float32 layer: the reference
        x = head.pairs(head.fuse_features(hidden), torch.nn.functional.embedding(tokens, embed))
        cos, sin = _rope(torch.arange(7), head.cfg.head_dim, head.cfg.rope_theta, x.dtype)
        want = head.logits(head.block(x[None], cos, sin, None, None, None)[0][0])  # (T, N)
    runner = EagleRunner(head.to(torch.bfloat16), embed.to(torch.bfloat16))
    few = runner._weights(FEW_PAIRS)[0][0]
    assert isinstance(few, kernels.KernelWeight if kernels.available() else QuantWeight)  # the fast path is taken
    outs = [runner.run_rows([PairFeed(0, j, tokens[j:j + 1], hidden[:, j:j + 1].to(torch.bfloat16), fuse=True,
                                      logits=True)])[0][1] for j in range(7)]  # one pair per pass, as drafting
    got = torch.stack(outs)
    err = (got - want).norm(dim=-1) / want.norm(dim=-1)
    assert float(err.max()) < 0.05, err
    top2 = want.topk(2, dim=-1).values
    decided = top2[:, 0] - top2[:, 1] > 0.1  # pairs whose fp32 choice is not a near-tie under bf16 rounding
    assert decided.sum() >= 3 and torch.equal(got.argmax(-1)[decided], want.argmax(-1)[decided])


@pytest.mark.skipif(not kernels.available(), reason=f"kernels unavailable: {kernels.unavailable_reason()}")
def test_the_fused_bf16_pass_computes_what_the_op_by_op_pass_does():
    """Where outrider's kernels run, a pass over one row's few pairs is one kernel layer call
    (EagleRunner._run_fused). Reads, chain pairs and tree feeds (mask, positions) give the op-by-op
    pass's outputs and logits, to bf16 rounding."""
    from outrider.drafters.eagle import EagleRunner

    model = tiny_model("llama", seed=2)
    embed = model.get_input_embeddings().weight.detach().to(torch.bfloat16)
    head = new_head(model.config, embed, "tiny", torch.arange(50), seed=3, max_positions=64)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in (head.attn_norm, head.mlp_norm, head.norm):
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    head = head.to(torch.bfloat16)
    V, D = embed.shape
    fused, plain = EagleRunner(head, embed), EagleRunner(head, embed)
    assert fused._fused
    plain._fused = False
    read = PairFeed(0, 0, torch.randint(0, V, (9,), generator=g), torch.randn(3, 9, D, generator=g).to(torch.bfloat16),
                    fuse=True, logits=True)
    chain = PairFeed(0, 9, torch.randint(0, V, (1,), generator=g), torch.randn(1, D, generator=g).to(torch.bfloat16),
                     logits=True)
    mask = torch.ones(3, 13, dtype=torch.bool)  # three siblings at depth 1: each sees the cache and itself
    mask[:, 10:] = torch.eye(3, dtype=torch.bool)
    tree = PairFeed(0, 10, torch.randint(0, V, (3,), generator=g), torch.randn(3, D, generator=g).to(torch.bfloat16),
                    mask=mask, positions=torch.tensor([10, 10, 10]), logits=True)
    for feed in (read, chain, tree):
        (out, lg), (want, want_lg) = fused.run_rows([feed])[0], plain.run_rows([feed])[0]
        assert torch.allclose(out.float(), want.float(), rtol=0.03, atol=0.03), feed.start
        assert torch.allclose(lg, want_lg, rtol=0.03, atol=0.05), feed.start
    assert torch.allclose(fused.k_cache.float(), plain.k_cache.float(), rtol=0.03, atol=0.03)
