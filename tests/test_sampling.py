import pytest
import torch

from outrider.sampling import SamplingParams, probs_from_logits


def test_temperature_scales_logits():
    logits = torch.tensor([1.0, 2.0, 3.0])
    p = probs_from_logits(logits, SamplingParams(temperature=0.5))
    assert torch.allclose(p, (logits / 0.5).softmax(-1))


def test_greedy_is_one_hot_on_argmax():
    p = probs_from_logits(torch.tensor([[0.1, 5.0, 0.3]]), SamplingParams(temperature=0.0))
    assert p.tolist() == [[0.0, 1.0, 0.0]]


def test_top_k_keeps_k_largest():
    p = probs_from_logits(torch.tensor([1.0, 4.0, 3.0, 2.0]), SamplingParams(temperature=1.0, top_k=2))
    assert p[0] == 0 and p[3] == 0
    assert torch.allclose(p[1:3], torch.tensor([4.0, 3.0]).softmax(-1))


def test_top_p_keeps_smallest_prefix_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: keep the first two tokens.
    p = probs_from_logits(logits, SamplingParams(temperature=1.0, top_p=0.7))
    assert torch.allclose(p, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    # top_p smaller than the top token's mass keeps only the top token.
    p = probs_from_logits(logits, SamplingParams(temperature=1.0, top_p=0.2))
    assert p.tolist() == [1.0, 0.0, 0.0, 0.0]


def test_a_top_p_below_float32_range_keeps_the_top_token():
    """top_p=1e-58 is valid but rounds to 0 in float32: the top token must still be kept (the
    CLI's property test found a nan here)."""
    logits = torch.tensor([[0.5, 3.0, 1.0], [2.0, 0.1, 0.3]])
    p = probs_from_logits(logits, SamplingParams(temperature=1.0, top_p=9.8e-58))
    assert p.tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]


def test_batched_rows_are_independent():
    logits = torch.tensor([[1.0, 4.0, 3.0], [3.0, 1.0, 2.0]])
    p = probs_from_logits(logits, SamplingParams(temperature=1.0, top_k=1))
    assert p.tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]


@pytest.mark.parametrize(
    "kwargs, needle",
    [({"temperature": -1.0}, "temperature=-1.0"), ({"top_p": 0.0}, "top_p=0.0"), ({"top_p": 1.5}, "top_p=1.5"),
     ({"top_k": 0}, "top_k=0")],
)
def test_bad_params_name_the_value(kwargs, needle):
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("t", [5e-156, 1e-300, 5e-324])
def test_a_tiny_temperature_is_nearly_greedy_not_nan(t):
    """Valid but below what float32 holds: the distribution tends to one-hot on the argmax (ties
    shared), never nan (found by the CLI's property test: --temperature 5.17e-156)."""
    p = probs_from_logits(torch.tensor([1.0, 2.0, 0.5, 2.0]), SamplingParams(temperature=t, top_p=0.9))
    assert p.tolist() == [0.0, 0.5, 0.0, 0.5] or p.tolist() == [0.0, 1.0, 0.0, 0.0]
    assert p.dtype == torch.float32 and not p.isnan().any()


def test_sample_draws_each_token_at_its_probability_and_never_a_zero_one():
    """sample() draws by the inverse CDF (one uniform per row): frequencies match p (chi-square),
    tokens of probability 0 never come, rows are drawn independently, and a seed repeats them."""
    from scipy.stats import chisquare

    from outrider.sampling import sample

    p = torch.tensor([0.5, 0.0, 0.2, 0.0, 0.25, 0.05])
    n = 20000
    draws = sample(p.expand(n, -1), torch.Generator().manual_seed(0))
    assert draws.shape == (n,) and draws.dtype == torch.long
    counts = torch.bincount(draws, minlength=6).double()
    assert counts[1] == 0 and counts[3] == 0
    keep = p > 0
    assert chisquare(counts[keep].numpy(), (p[keep].double() * n).numpy()).pvalue > 1e-3
    rows = torch.stack([p, torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0])])  # (2, V): row 1 is one-hot
    got = sample(rows.expand(3, 2, 6), torch.Generator().manual_seed(1))
    assert got.shape == (3, 2) and (got[:, 1] == 5).all()
    again = sample(p.expand(n, -1), torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)


def test_sample_consumes_one_uniform_per_row():
    """A draw over a 49k vocabulary (SmolLM2's) takes one uniform from the generator, not one per
    vocabulary entry as torch.multinomial's exponentials do (~1 ms a draw here, paid per sampled
    token): the generator's state after a draw is its state after one float64 uniform."""
    from outrider.sampling import sample

    p = torch.randn(49152).softmax(-1)
    g = torch.Generator().manual_seed(0)
    before = g.get_state().clone()
    sample(p, g)
    used = torch.Generator()
    used.set_state(before)
    torch.rand(1, generator=used, dtype=torch.float64)
    assert torch.equal(used.get_state(), g.get_state())
