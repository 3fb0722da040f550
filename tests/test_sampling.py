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
