"""Batch > 1 (batch.py, NativeLlama.forward_rows): rows share one target forward per step, and each
row's output is what it would be alone: token for token in float32 greedy, and the target's exact
law under sampling (chi-square per row)."""

from __future__ import annotations


import pytest
import torch

from conftest import tiny_model
from outrider import GenerationRequest, SpeculativeDecoder
from outrider.batch import BatchCosts, BatchDecoder
from outrider.models.llama import NativeLlama, RowForward
from outrider.sampling import SamplingParams


def native(vocab_size: int = 96, seed: int = 0) -> NativeLlama:
    return NativeLlama.from_hf(tiny_model("llama", vocab_size=vocab_size, seed=seed), capacity=256)


def test_forward_rows_equals_each_row_alone():
    """Rows of different cache lengths, a causal chunk and a tree, in one forward: the same logits
    as each row's own forward, and caches that go on alike."""
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 96, (n,), generator=gen) for n in (5, 11, 1)]
    steps = [torch.randint(0, 96, (n,), generator=gen) for n in (1, 4, 3)]
    tree_mask = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)  # root, two children
    tree_pos = torch.tensor([1, 2, 2])
    alone = native()
    want = []
    for p, s, tree in zip(prompts, steps, (False, False, True)):
        alone.reset()
        alone.forward(p, num_logits=0)
        kw = dict(attn_mask=tree_mask, positions=tree_pos) if tree else {}
        first = alone.forward(s, **kw)
        alone.rollback(alone.length - s.shape[0] + 1)
        want.append((first, alone.forward(torch.tensor([7]))))
    batched = native()
    batched.set_slots(3)
    batched.forward_rows([RowForward(i, p, 0) for i, p in enumerate(prompts)])
    got = batched.forward_rows([
        RowForward(0, steps[0]), RowForward(1, steps[1]), RowForward(2, steps[2], None, tree_mask, tree_pos)])
    for i, s in enumerate(steps):
        batched.rollback(batched.slot_length(i) - s.shape[0] + 1, i)
    again = batched.forward_rows([RowForward(i, torch.tensor([7])) for i in range(3)])
    for (first, second), g, a in zip(want, got, again):
        assert torch.allclose(first, g, atol=1e-5) and torch.allclose(second, a, atol=1e-5)
    assert [batched.slot_length(i) for i in range(3)] == [7, 13, 3]


def test_forward_rows_refuses_bad_rows():
    m = native()
    m.set_slots(2)
    with pytest.raises(ValueError, match="distinct slots"):
        m.forward_rows([RowForward(0, torch.tensor([1])), RowForward(0, torch.tensor([2]))])
    with pytest.raises(ValueError, match="slot 2"):
        m.forward_rows([RowForward(2, torch.tensor([1]))])
    with pytest.raises(ValueError, match="slots=0"):
        m.set_slots(0)


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    from conftest import tiny_tokenizer

    tok = tiny_tokenizer()
    path = tmp_path_factory.mktemp("batch") / "target"
    tiny_model("llama", vocab_size=len(tok), eos_token_id=tok.eos_token_id).save_pretrained(path)
    tok.save_pretrained(path)
    return path


REQUESTS = [
    GenerationRequest("def add(a, b):\n    return a + b\n\ndef add(", max_new_tokens=24),
    GenerationRequest("for i in range(10):\n    print(i)\n", max_new_tokens=9),
    GenerationRequest("x = 1\ny = 2\nx = 1\ny = ", max_new_tokens=30, stop="\n\n"),
    GenerationRequest([5, 6, 7, 5, 6, 7, 5, 6], max_new_tokens=17),
    GenerationRequest("import os\nimport sys\nimport os\n", max_new_tokens=12),
]


@pytest.mark.parametrize("method, kw", [("autoregressive", {}), ("prompt_lookup", {}),
                                        ("prompt_lookup", {"width": 3}), ("suffix", {})],
                         ids=["autoregressive", "prompt_lookup", "prompt_lookup-tree", "suffix"])
def test_greedy_rows_equal_their_output_alone(target_dir, method, kw):
    """float32 greedy: every request of a batch (more requests than rows, so rows join as others
    leave) gives exactly the tokens it gives alone; with the gate on (with and without the cost
    model) and off."""
    alone = SpeculativeDecoder.from_pretrained(target_dir, method=method, dtype="float32", backend="native", **kw)
    want = [alone.generate(r) for r in REQUESTS]
    for gate in ({}, {"cost_gate": True}, {"gate": False}):
        dec = SpeculativeDecoder.from_pretrained(target_dir, method=method, dtype="float32", backend="native", **kw)
        got = BatchDecoder(dec, max_batch=3, **gate).generate(REQUESTS)
        assert [g.token_ids for g in got] == [w.token_ids for w in want]
        assert [g.text for g in got] == [w.text for w in want]
        assert [g.finish_reason for g in got] == [w.finish_reason for w in want]
    if method != "autoregressive":  # the drafts really were verified in the batch
        assert sum(g.stats.accepted for g in got) > 0


def test_rows_share_one_datastore_and_equal_their_output_alone(target_dir, tmp_path):
    """suffix with a datastore: each row drafts from the same (read-only) suffix array and gives
    the tokens it gives alone; the store holds the requests' own answers, so it drafts."""
    from outrider.drafters.datastore import DATASTORE_NAME, Datastore

    plain = SpeculativeDecoder.from_pretrained(target_dir, method="suffix", dtype="float32", backend="native")
    Datastore.from_sequences([plain.generate(r).token_ids for r in REQUESTS]).save(tmp_path / DATASTORE_NAME)
    alone = SpeculativeDecoder.from_pretrained(target_dir, method="suffix", dtype="float32", backend="native",
                                               datastore=tmp_path)
    want = [alone.generate(r) for r in REQUESTS]
    dec = SpeculativeDecoder.from_pretrained(target_dir, method="suffix", dtype="float32", backend="native",
                                             datastore=tmp_path)
    batch = BatchDecoder(dec, max_batch=3, gate=False)
    got = batch.generate(REQUESTS)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert len({id(d.datastore) for d in batch._drafters}) == 1 and batch._drafters[0].datastore is not None
    assert sum(g.stats.accepted for g in got) > 0


def count_calls(obj, name: str = "run_rows") -> list[int]:
    """The number of rows in each call of obj's rows method (a lockstep's, a head runner's), as it runs."""
    calls: list[int] = []
    run_rows = getattr(obj, name)

    def counted(items):
        calls.append(len(items))
        return run_rows(items)

    setattr(obj, name, counted)
    return calls


@pytest.mark.parametrize("kw", [{"k": 3}, {"k": "auto"}, {"k": 6, "width": 2}], ids=["chain", "auto", "tree"])
def test_draft_model_rows_draft_in_lockstep_and_equal_their_output_alone(model_dirs, kw):
    """draft_model in a batch: each row drafts on its own slot of the draft, the rows' draft
    forwards run together (fewer forwards than rows x depths), and float32 greedy outputs equal
    each request's output alone; seeded sampling rows too."""
    target, draft = model_dirs
    reqs = REQUESTS + [GenerationRequest("def add(a, b):\n    return", max_new_tokens=16, temperature=0.9, seed=4)]
    alone = SpeculativeDecoder.from_pretrained(target, draft=draft, method="draft_model", dtype="float32",
                                               backend="native", **kw)
    want = [alone.generate(r).token_ids for r in reqs]
    dec = SpeculativeDecoder.from_pretrained(target, draft=draft, method="draft_model", dtype="float32",
                                             backend="native", **kw)
    # check_every=0: on this tiny pair the measured check rightly finds plain steps faster, and
    # would leave only the seeded row drafting.
    batch = BatchDecoder(dec, max_batch=3, check_every=0)
    calls = count_calls(batch._lockstep)
    got = batch.generate(reqs)
    assert [g.token_ids for g in got] == want
    assert sum(g.stats.accepted for g in got) > 0
    assert max(calls) > 1  # rows met in one draft forward


def test_seeded_sampling_rows_reproduce_alone(target_dir):
    """A seeded sampling request gives the same tokens in a batch (with the gate on) as alone."""
    reqs = [GenerationRequest("def add(a, b):\n    return a + b\n\ndef add(", max_new_tokens=20, temperature=0.8,
                              seed=s) for s in range(3)] + [GenerationRequest("x = 1\nx = ", max_new_tokens=15)]
    alone = SpeculativeDecoder.from_pretrained(target_dir, method="prompt_lookup", dtype="float32", backend="native")
    want = [alone.generate(r).token_ids for r in reqs]
    dec = SpeculativeDecoder.from_pretrained(target_dir, method="prompt_lookup", dtype="float32", backend="native")
    assert [r.token_ids for r in BatchDecoder(dec, max_batch=4).generate(reqs)] == want
    assert [r.token_ids for r in BatchDecoder(dec, max_batch=4, cost_gate=True).generate(reqs)] == want


@pytest.fixture(scope="module")
def head_dirs(target_dir):
    """An (untrained) EAGLE head and Medusa heads saved for the batch tests' target."""
    from transformers import AutoModelForCausalLM

    from outrider.drafters.eagle import new_head
    from outrider.drafters.medusa import new_heads

    model = AutoModelForCausalLM.from_pretrained(target_dir)
    embed = model.get_input_embeddings().weight.detach()
    d2t = torch.arange(embed.shape[0])[:60]
    new_head(model.config, embed, "tiny", d2t, seed=1, max_positions=256).save(target_dir.parent / "eagle")
    new_heads(model.config, embed, model.get_output_embeddings().weight.detach(), "tiny", d2t).save(
        target_dir.parent / "medusa")
    return {"eagle": target_dir.parent / "eagle", "medusa": target_dir.parent / "medusa"}


@pytest.mark.parametrize("method, kw", [("eagle", {"k": 3}), ("eagle", {"k": "auto"}), ("eagle", {"k": 6, "width": 2}),
                                        ("eagle+suffix", {}), ("medusa", {})],
                         ids=["eagle-chain", "eagle-auto", "eagle-tree", "eagle+suffix", "medusa"])
def test_head_rows_draft_in_lockstep_and_equal_their_output_alone(target_dir, head_dirs, method, kw):
    """Self-drafting heads in a batch: the rows share one copy of the head, their head steps run
    together (propose_rows: one call of the head per depth for all rows), each row's head reads its own row's hidden states,
    and float32 greedy outputs (and a seeded sampling row's) equal each request's output alone."""
    head = head_dirs["medusa" if method == "medusa" else "eagle"]
    reqs = REQUESTS + [GenerationRequest("def add(a, b):\n    return", max_new_tokens=16, temperature=0.9, seed=4)]
    load = lambda: SpeculativeDecoder.from_pretrained(target_dir, draft=head, method=method, dtype="float32",  # noqa: E731
                                                      backend="native", **kw)
    alone = load()
    want = [alone.generate(r) for r in reqs]
    dec = load()
    batch = BatchDecoder(dec, max_batch=3, gate=False)
    # The head's shared compute, which propose_rows calls for all rows at once.
    first = batch._drafters[0]
    calls = count_calls(first.heads, "forward") if method == "medusa" else \
        count_calls(first.head.runner if method == "eagle+suffix" else first.runner)
    got = batch.generate(reqs)
    if method == "eagle+suffix":
        # Its suffix tries remember earlier outputs, per slot in a batch, so its drafts (and with
        # them a sampled row's draws) depend on which requests came before: compare greedy rows.
        reqs, got, want = reqs[:-1], got[:-1], want[:-1]
    else:  # the same drafts as alone: a row that read another row's states would draft differently
        assert [g.stats.drafted for g in got] == [w.stats.drafted for w in want]
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert sum(g.stats.drafted for g in got) > 0 and max(calls) > 1


def flat_costs(per_token: float, rows: int = 4) -> BatchCosts:
    """A cost table: one forward costs 1 + per_token * (tokens per row - 1), at every batch size."""
    sizes = (1, 2, 4, 8, 16)
    return BatchCosts(sizes, tuple(tuple(1.0 + per_token * (n - 1) for n in sizes) for _ in range(rows)))


def test_the_gate_drops_drafts_that_cannot_pay(target_dir):
    """Where a drafted token costs as much as a whole step, no draft pays: the gate drops them but
    for its periodic probes; where drafted tokens are free, it keeps them all. Outputs are equal."""
    requests = REQUESTS[:4]

    def run(per_token: float | None, probe_every: int = 2):
        dec = SpeculativeDecoder.from_pretrained(target_dir, method="prompt_lookup", dtype="float32", backend="native")
        if per_token is None:
            return BatchDecoder(dec, max_batch=4, gate=False).generate(requests)
        return BatchDecoder(dec, max_batch=4, costs=flat_costs(per_token), probe_every=probe_every,
                            cost_gate=True, check_every=0).generate(requests)  # the cost model alone

    cheap, dear, never, off = run(0.0), run(1.0), run(1.0, probe_every=10**6), run(None)
    assert [r.token_ids for r in cheap] == [r.token_ids for r in dear] == [r.token_ids for r in off]
    kept = lambda results: sum(r.stats.drafted for r in results)  # noqa: E731
    assert kept(cheap) == kept(off) > 0
    assert kept(never) == 0  # no probes: every draft dropped
    # Probes (every 2nd draft here) still verify some drafts, so the estimate can recover.
    assert 0 < kept(dear) < kept(off)


class VirtualClock:
    """A clock that only the target's forwards advance: 1 per forward, plus per_token per token a
    row feeds beyond its root (its draft)."""

    def __init__(self, batch: BatchDecoder, per_token: float) -> None:
        self.now = 0.0
        forward = batch.model.forward_rows

        def timed(feeds):
            self.now += 1.0 + per_token * sum(max(int(f.ids.shape[0]) - 1, 0) for f in feeds)
            return forward(feeds)

        batch.model.forward_rows = timed

    def __call__(self) -> float:
        return self.now


def test_the_measured_check_runs_the_faster_mode(target_dir):
    """The batch's measured check finds which mode commits more tokens per second of its clock
    and runs it, but for its warm-up and CHECK_BURST steps after every check_every. Outputs never
    change."""
    requests = [GenerationRequest(p, max_new_tokens=96) for p in
                ("def add(a, b):\n    return a + b\n\ndef add(", "x = 1\ny = 2\nx = 1\ny = ",
                 "import os\nimport sys\nimport os\n", "for i in range(10):\n    print(i)\n")]

    def run(per_token: float, check_every: int = 16):
        dec = SpeculativeDecoder.from_pretrained(target_dir, method="prompt_lookup", dtype="float32", backend="native")
        batch = BatchDecoder(dec, max_batch=4, check_every=check_every)
        batch.clock = VirtualClock(batch, per_token)
        return batch, batch.generate(requests)

    (unchecked, every), (dear, dear_out), (cheap, cheap_out) = run(3.0, check_every=0), run(3.0), run(0.0)
    assert [r.token_ids for r in every] == [r.token_ids for r in dear_out] == [r.token_ids for r in cheap_out]
    drafted = lambda results: sum(r.stats.drafted for r in results)  # noqa: E731
    assert drafted(every) > 0 and unchecked.mode_steps["plain"] == 0
    # Allowed steps of the slower mode: the warm-up at each batch size seen (3 speculating, the
    # first unmeasured, and 2 plain; one within a factor of 2 of a measured size needs none), and
    # CHECK_BURST (3) after every 16 steps.
    def others(batch, mode):
        total = sum(batch.mode_steps.values())
        return batch.mode_steps[mode] <= 5 * len(batch._rates) + 3 * (total // 16) + 3
    assert others(dear, "speculating") and dear.mode_steps["plain"] > 2 * dear.mode_steps["speculating"]
    per_step = lambda batch, results: drafted(results) / sum(batch.mode_steps.values())  # noqa: E731
    assert per_step(dear, dear_out) < per_step(unchecked, every) / 2
    assert others(cheap, "plain") and cheap.mode_steps["speculating"] > 2 * cheap.mode_steps["plain"]
    assert drafted(cheap_out) > drafted(every) / 2


def test_a_row_alone_drafts_as_the_single_sequence_decoder(target_dir):
    """At batch 1 the check does not run (batch.py's module doc): the row drafts as the decoder
    alone would, even where the batch's clock prices drafts so dear that the check would pick
    plain steps at batch 2 and up."""
    reqs = [GenerationRequest(p, max_new_tokens=40) for p in ("x = 1\ny = 2\nx = 1\ny = ", "import os\nimport sys\n")]
    alone = SpeculativeDecoder.from_pretrained(target_dir, method="prompt_lookup", dtype="float32", backend="native")
    want = [alone.generate(r) for r in reqs]
    dec = SpeculativeDecoder.from_pretrained(target_dir, method="prompt_lookup", dtype="float32", backend="native")
    batch = BatchDecoder(dec, max_batch=1)
    batch.clock = VirtualClock(batch, 5.0)
    got = batch.generate(reqs)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert batch.mode_steps["plain"] == 0
    assert [r.stats.drafted for r in got] == [r.stats.drafted for r in want] and want[0].stats.drafted > 0


def test_the_check_never_stops_seeded_rows_drafting(target_dir):
    """In a plain step seeded sampling rows still draft (their random draws depend on the drafts,
    contract 3): where the check runs plain steps, a seeded request gives its tokens alone."""
    reqs = [GenerationRequest("import os\nimport sys\nimport os\n", max_new_tokens=32, temperature=0.2,
                              seed=3)] + [GenerationRequest(p, max_new_tokens=24) for p in
                                          ("x = 1\ny = 2\nx = 1\ny = ", "import os\nimport sys\nimport os\n")]
    alone = SpeculativeDecoder.from_pretrained(target_dir, method="prompt_lookup", dtype="float32", backend="native")
    want = [alone.generate(r).token_ids for r in reqs]
    dec = SpeculativeDecoder.from_pretrained(target_dir, method="prompt_lookup", dtype="float32", backend="native")
    batch = BatchDecoder(dec, max_batch=3)
    batch.clock = VirtualClock(batch, 5.0)
    assert [r.token_ids for r in batch.generate(reqs)] == want
    assert batch.mode_steps["plain"] >= 4  # the check did run plain steps


def test_batch_costs_interpolate():
    costs = BatchCosts((1, 4), ((1.0, 4.0), (2.0, 8.0)))
    assert costs.forward_s(1, 1) == 1.0 and costs.forward_s(1, 2) == 2.0  # between sizes: linear
    assert costs.forward_s(2, 8) == 8.0 and costs.forward_s(2, 16) == 16.0  # past the last: extrapolated
    assert costs.forward_s(5, 5) == 2.0  # more rows than measured: the largest batch's row


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_hf_backend_batches_any_model(tmp_path, tokenizer, arch):
    """On the transformers backend (here GPT-2 too, which the native backend cannot run) rows take
    turns on their own caches: every request still equals its output alone, trees included."""
    path = tmp_path / arch
    tiny_model(arch, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id).save_pretrained(path)
    tokenizer.save_pretrained(path)
    kw = dict(method="prompt_lookup", width=2, dtype="float32", backend="hf")
    alone = SpeculativeDecoder.from_pretrained(path, **kw)
    want = [alone.generate(r).token_ids for r in REQUESTS]
    got = BatchDecoder(SpeculativeDecoder.from_pretrained(path, **kw), max_batch=3, gate=False).generate(REQUESTS)
    assert [g.token_ids for g in got] == want and sum(g.stats.accepted for g in got) > 0


def test_batch_refuses_what_it_cannot_do(target_dir):
    from conftest import FakeModel, loaded

    from outrider.drafters import Autoregressive

    fake = SpeculativeDecoder(loaded(FakeModel(6)), Autoregressive(), k=0)
    fake.new_drafter = Autoregressive
    with pytest.raises(ValueError, match="cache slots"):
        BatchDecoder(fake, max_batch=2)
    hf = SpeculativeDecoder.from_pretrained(target_dir, method="prompt_lookup", dtype="float32", backend="hf")
    ok = SpeculativeDecoder.from_pretrained(target_dir, method="prompt_lookup", dtype="float32", backend="native")
    hand = SpeculativeDecoder(ok.target, ok.drafter, k=2)  # no drafter factory
    with pytest.raises(ValueError, match="built by hand"):
        BatchDecoder(hand, max_batch=2)
    class Unbatched:  # a user's drafter that does not say it batches
        pass

    hand.new_drafter, hand.method, hand.drafter = Unbatched, "mine", Unbatched()
    with pytest.raises(ValueError, match="method 'mine' does not batch"):
        BatchDecoder(hand, max_batch=2)
    draft_hf = SpeculativeDecoder.from_pretrained(target_dir, draft=target_dir, method="draft_model", k=2,
                                                  dtype="float32", backend="native")
    draft_hf.drafter.model = fake.target.model  # a draft without slots
    with pytest.raises(ValueError, match="draft with cache slots"):
        BatchDecoder(draft_hf, max_batch=2)
    with pytest.raises(ValueError, match="max_batch=0"):
        BatchDecoder(ok, max_batch=0)
    batch = BatchDecoder(ok, max_batch=1, gate=False)
    batch.add(REQUESTS[0])
    with pytest.raises(RuntimeError, match="batch is full"):
        batch.add(REQUESTS[1])
    with pytest.raises(ValueError, match="max_new_tokens"):
        BatchDecoder(ok, max_batch=1, gate=False).generate([GenerationRequest("x", max_new_tokens=100000)])


# ---- losslessness per row: the chi-square test of test_lossless.py on a batch ----------------------

PROMPTS = ([1, 2, 3, 1, 2], [4, 5, 4, 5, 4])
PARAMS = (SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=3))


@pytest.mark.slow
def test_each_row_of_a_mixed_batch_samples_the_target_law():
    """Two kinds of rows interleaved in one batch (another prompt, other sampling parameters), with
    prompt lookup drafting: each kind's samples pass the chi-square test against its exact law."""
    from test_lossless import H, N, P_REJECT, chi_square_p_value, llama_distribution, soft_tiny_llama

    from outrider.drafters import PromptLookup
    from outrider.models import LoadedModel

    n = N // 2  # samples per kind: half the single-sequence tests' N still rejects the other prompt's law
    model = soft_tiny_llama()
    dec = SpeculativeDecoder(LoadedModel(NativeLlama.from_hf(model, capacity=64), None, (), "soft"), PromptLookup(k=3),
                             k=3, method="prompt_lookup")
    dec.new_drafter = lambda: PromptLookup(k=3)
    requests = [GenerationRequest(PROMPTS[i % 2], max_new_tokens=H, temperature=PARAMS[i % 2].temperature,
                                  top_k=PARAMS[i % 2].top_k, seed=i) for i in range(2 * n)]
    results = BatchDecoder(dec, max_batch=8, gate=False).generate(requests)
    assert sum(r.stats.drafted for r in results) > n  # prompt lookup drafted in most rows
    for kind in range(2):
        counts: dict[tuple[int, ...], int] = {}
        for r in results[kind::2]:
            counts[tuple(r.token_ids)] = counts.get(tuple(r.token_ids), 0) + 1
        law = llama_distribution(model, PARAMS[kind], list(PROMPTS[kind]))
        assert chi_square_p_value(counts, law, n) > P_REJECT
        other = llama_distribution(model, PARAMS[kind], list(PROMPTS[1 - kind]))  # power: the other prompt's law
        assert chi_square_p_value(counts, other, n) < P_REJECT


def test_bench_batch_size_reports_each_batch_size(target_dir, tmp_path, capsys):
    """`outrider bench --batch-size 1,2`: one row per method and batch size, speculation off first;
    float32 greedy outputs equal at every batch size; the table is printed and written."""
    import json

    from outrider.cli import main

    out = tmp_path / "b"
    assert main(["bench", "--batch-size", "1,2", "--target", str(target_dir), "--methods", "prompt_lookup",
                 "--max-new-tokens", "8", "--dtype", "float32", "--limit-per-category", "1", "--out", str(out)]) == 0
    report = json.loads((out / "batch.json").read_text())
    got = [(r["batch_size"], r["method"]) for r in report["rows"]]
    assert got == [(b, m) for b in (1, 2) for m in ("autoregressive", "prompt_lookup", "prompt_lookup (no gate)")]
    assert all(r["same_as_batch1_autoregressive"] == 1.0 for r in report["rows"])
    assert len({r["new_tokens"] for r in report["rows"]}) == 1 and report["rows"][0]["new_tokens"] > 0
    assert "| 2 | prompt_lookup |" in capsys.readouterr().out and (out / "batch.md").exists()
    assert main(["bench", "--batch-size", "0,2", "--target", str(target_dir), "--methods", "prompt_lookup",
                 "--out", str(tmp_path / "c")]) == 2


def test_bench_batch_size_reads_a_datastore_variant(target_dir, tmp_path):
    """`suffix@datastore=FILE` in the batch sweep drafts from FILE (here the target's own answers
    to the same questions), so it accepts more than plain `suffix`, with the same outputs."""
    import json

    from outrider.cli import main
    from outrider.drafters.datastore import Datastore

    common = ["--target", str(target_dir), "--max-new-tokens", "12", "--dtype", "float32", "--limit-per-category", "1"]
    assert main(["bench", "--methods", "autoregressive", "--out", str(tmp_path / "ar"), *common]) == 0
    answers = [json.loads(line)["output_ids"] for line in (tmp_path / "ar" / "results.jsonl").read_text().splitlines()]
    Datastore.from_sequences(answers).save(tmp_path / "a.npy")
    variant = f"suffix@datastore={tmp_path / 'a.npy'}"
    assert main(["bench", "--batch-size", "1", "--methods", f"suffix,{variant}", "--out", str(tmp_path / "b"),
                 *common]) == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "b" / "batch.json").read_text())["rows"]}
    plain, stored = rows["suffix (no gate)"], rows[f"{variant} (no gate)"]
    assert plain["same_as_batch1_autoregressive"] == stored["same_as_batch1_autoregressive"] == 1.0
    assert stored["tau"] > plain["tau"]


@pytest.mark.parametrize("table_s", [10.0, 0.0], ids=["table-says-dear", "measured-dear"])
def test_the_gate_skips_a_draft_model_that_cannot_pay(model_dirs, table_s):
    """When a draft forward costs far more than a target step, draft_model rows skip drafting (but
    for probes): the draft model runs far fewer forwards than with every draft verified, and the
    outputs do not change. Dear by its cost table (10 s), or by what the batch measures a lockstep
    depth to take (50 ms against a target forward of 1 ms) while its table says free."""
    import time

    target, draft = model_dirs

    def run(draft_s: float, sleep_s: float, gate: bool = True):
        dec = SpeculativeDecoder.from_pretrained(target, draft=draft, method="draft_model", k=3, dtype="float32",
                                                 backend="native")
        table = BatchCosts((1, 2), tuple((draft_s, draft_s) for _ in range(3)))
        # A target forward costs 1 ms whatever its size: only the draft's cost argues against drafts.
        flat_ms = BatchCosts((1, 16), tuple((0.001, 0.001) for _ in range(3)))
        batch = BatchDecoder(dec, max_batch=3, gate=gate, cost_gate=True, check_every=0, costs=flat_ms,
                             draft_costs=table)
        run_rows = batch._lockstep.run_rows

        def slow(items):
            time.sleep(sleep_s)
            return run_rows(items)

        batch._lockstep.run_rows = slow
        return batch.generate(REQUESTS)

    every, gated = run(0.0, 0.0, gate=False), run(table_s, 0.05)
    assert [r.token_ids for r in every] == [r.token_ids for r in gated]
    drafted = lambda results: sum(r.stats.drafted for r in results)  # noqa: E731
    assert 0 < drafted(gated) < drafted(every) / 3


@pytest.mark.parametrize("method", ["prompt_lookup", "eagle"])
def test_a_next_turn_joins_the_slot_that_holds_its_conversation(target_dir, head_dirs, method):
    """Prefix reuse in a batch: each conversation's next turn is served by the free slot whose cache
    holds its first turn, feeds only its new tokens, and answers as a decoder that prefills it whole
    (an EAGLE head reading the kept tokens' hidden states from the cache's record)."""
    draft = head_dirs["eagle"] if method == "eagle" else None
    load = lambda: SpeculativeDecoder.from_pretrained(target_dir, draft=draft, method=method, dtype="float32",  # noqa: E731
                                                      backend="native")
    batch = BatchDecoder(load(), max_batch=3, gate=False)
    first = [GenerationRequest(list(r.prompt) if isinstance(r.prompt, list) else batch.decoder.encode(r.prompt),
                               max_new_tokens=12) for r in REQUESTS[:3]]
    answers = batch.generate(first)
    follow = [7, 7, 21, 4]
    second = [GenerationRequest(r.prompt + a.token_ids + follow, max_new_tokens=12) for r, a in zip(first, answers)]
    rows = [batch.add(r) for r in second[::-1]][::-1]  # in another order than the first turns took the slots
    while batch.active:
        batch.step()
    fresh = load()
    fresh.reuse_prefix = False
    for row, r in zip(rows, second):
        want = fresh.generate(r)
        assert row.collected.ids == want.token_ids
        assert row.stats.reused_tokens == len(r.prompt) - len(follow) - 1
        if method == "eagle":  # the head's cache holds what a full prefill gives it: it read the whole prompt's states
            mine, alone = batch._drafters[row.slot], fresh.drafter
            assert mine._pairs == alone._pairs
            assert torch.allclose(mine.runner.outs[row.slot, : mine._pairs], alone.runner.outs[0, : alone._pairs],
                                  atol=1e-5)
