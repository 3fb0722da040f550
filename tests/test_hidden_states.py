"""Self-drafting heads read the target's hidden states through the decoder: each proposal gets the
states of the tokens committed since the last one, which equal transformers' own hidden states of
the committed sequence, on both backends, with chain and tree drafts."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from outrider import SpeculativeDecoder
from outrider.drafters import PromptLookup
from outrider.drafters.base import Draft, DraftStep
from outrider.models import load_model

PROMPT = [90, 91, 92, 90, 91, 92, 90, 91, 5, 17]


class RecordingLookup(PromptLookup):
    """Prompt lookup (a tree of matches) that names target layers and records what it receives."""

    def __init__(self, layers: tuple[int, ...], **kwargs) -> None:
        super().__init__(**kwargs)
        self.hidden_layers = layers
        self.received: list[torch.Tensor] = []
        self.lengths: list[int] = []

    def propose(self, step: DraftStep) -> Draft:
        assert step.hidden is not None
        self.received.append(step.hidden)
        self.lengths.append(step.tokens.shape[0])
        return super().propose(step)


@pytest.mark.parametrize("backend", ["native", "hf"])
@pytest.mark.parametrize("width", [1, 3])
def test_drafter_receives_the_committed_tokens_hidden_states(backend, width):
    model = tiny_model("llama")
    target = load_model(model, backend=backend)
    layers = (0, 1, model.config.num_hidden_layers)
    drafter = RecordingLookup(layers, max_ngram=2, k=6, width=width)
    dec = SpeculativeDecoder(target, drafter, k=6)
    res = dec.generate(PROMPT, max_new_tokens=30)
    assert res.stats.accepted > 0  # drafts were accepted, so steps committed several tokens
    got = torch.cat(drafter.received, dim=1)  # (L, m, D)
    # Each proposal sees exactly the tokens before the last committed one.
    assert [h.shape[1] for h in drafter.received] == [n - m for n, m in zip(drafter.lengths, [1] + drafter.lengths)]
    seq = PROMPT + res.token_ids
    with torch.no_grad():
        ref = model(torch.tensor([seq]), output_hidden_states=True).hidden_states
    m = got.shape[1]
    assert m == drafter.lengths[-1] - 1
    for row, layer in enumerate(layers):
        assert (got[row] - ref[layer][0, :m]).abs().max().item() < 1e-4, layer


def test_no_capture_without_hidden_layers():
    model = tiny_model("llama")
    dec = SpeculativeDecoder(load_model(model), PromptLookup(k=4), k=4)
    dec.generate(PROMPT, max_new_tokens=8)
    assert dec.target.model.hidden is None
