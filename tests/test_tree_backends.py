"""Both model backends score token trees, keep an accepted path, and return hidden states, each
checked against transformers' own full forward of the same tokens as a plain chain (the oracle)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig

from outrider.models.hf import HFModel
from outrider.models.llama import NativeLlama
from outrider.tree import path_to, verify_mask, verify_positions
from conftest import tiny_model

TOL = 1e-4
VOCAB = 96
CONTEXT = [5, 17, 42, 8, 63]  # already in the cache when the tree is scored
ROOT = 29  # the last committed token: row 0 of the verify forward
# Seven nodes, several branches: 0 -> {2, 3}, 1 -> 4, 3 -> 5 -> 6 (depths 1, 1, 2, 2, 2, 3, 4).
PARENTS = torch.tensor([-1, -1, 0, 0, 1, 3, 5])
TOKENS = [11, 12, 21, 22, 31, 41, 51]
BACKENDS = [("llama", "hf"), ("qwen2", "hf"), ("gpt2", "hf"), ("llama", "native"), ("qwen2", "native")]


def build(arch: str, backend: str, attn: str | None = None):
    """(transformers model, backend wrapping the same weights)."""
    model = tiny_model(arch)
    if attn is not None:
        model.set_attn_implementation(attn)
    return model, HFModel(model) if backend == "hf" else NativeLlama.from_hf(model)


def oracle(model, ids: list[int]):
    """transformers' full forward of ids as a chain on a fresh cache: logits (n, V) and the tuple of
    hidden states, each (n, D)."""
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    return out.logits[0].float(), [h[0] for h in out.hidden_states]


def branch(node: int) -> list[int]:
    """Tokens of the root-to-node branch, root included (node -1: the root alone)."""
    return [ROOT] + [TOKENS[i] for i in path_to(PARENTS.tolist(), node)]


def score_tree(m) -> torch.Tensor:
    """Prefill CONTEXT, then score [root] + tree in one forward; logits (8, V)."""
    m.forward(torch.tensor(CONTEXT), num_logits=0)
    L = m.length
    return m.forward(
        torch.tensor([ROOT] + TOKENS), attn_mask=verify_mask(PARENTS), positions=verify_positions(PARENTS, L)
    )


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("arch,backend", BACKENDS + [("llama", "hf-eager"), ("gpt2", "hf-eager")])
def test_tree_logits_equal_each_branch_as_a_chain(arch, backend):
    # hf-eager: the eager attention *adds* the mask to the scores, so a bool mask would go wrong there.
    model, m = build(arch, backend.split("-")[0], "eager" if backend.endswith("eager") else None)
    tree_logits = score_tree(m)
    assert m.length == len(CONTEXT) + 1 + len(TOKENS)
    for node in range(-1, len(TOKENS)):
        expected = oracle(model, CONTEXT + branch(node))[0][-1]
        assert max_diff(tree_logits[node + 1], expected) <= TOL, node
    # The tree is not a chain: a causal forward of the same rows gives other logits for a branch node.
    causal = oracle(model, CONTEXT + [ROOT] + TOKENS)[0][len(CONTEXT) + 2]  # node 1 after node 0
    assert max_diff(tree_logits[2], causal) > 1e-2


@pytest.mark.parametrize("arch,backend", BACKENDS)
@pytest.mark.parametrize("node", [6, 4, 0, -1])  # deep branch, side branch, a prefix, the root alone
def test_keep_path_leaves_the_path_as_a_chain(arch, backend, node):
    model, m = build(arch, backend)
    score_tree(m)
    start = len(CONTEXT)
    path = [0] + [i + 1 for i in path_to(PARENTS.tolist(), node)]  # row offsets: root, then node i at i + 1
    m.keep_path(start, path)
    assert m.length == start + len(path)
    nxt = [7, 70, 3]
    out = m.forward(torch.tensor(nxt))
    expected = oracle(model, CONTEXT + branch(node) + nxt)[0][-len(nxt) :]
    assert max_diff(out, expected) <= TOL


@pytest.mark.parametrize("arch,backend", BACKENDS)
def test_hidden_states_of_a_chain_equal_transformers(arch, backend):
    model, m = build(arch, backend)
    last = model.config.num_hidden_layers
    assert m.hidden is None
    layers = [last, 0, 1]  # any order, the embeddings and the final norm included
    m.capture_hidden(layers)
    m.forward(torch.tensor(CONTEXT), num_logits=0)
    _, hs = oracle(model, CONTEXT + [ROOT, 9, 88])
    assert m.hidden.shape == (3, len(CONTEXT), 32) and m.hidden.dtype == torch.float32
    for row, i in enumerate(layers):
        assert max_diff(m.hidden[row], hs[i][: len(CONTEXT)]) <= TOL, i
    logits = m.forward(torch.tensor([ROOT, 9, 88]), num_logits=1)  # only the appended tokens are recorded
    assert m.hidden.shape == (3, 3, 32)
    for row, i in enumerate(layers):
        assert max_diff(m.hidden[row], hs[i][len(CONTEXT) :]) <= TOL, i
    assert max_diff(logits[0], oracle(model, CONTEXT + [ROOT, 9, 88])[0][-1]) <= TOL  # capturing keeps the logits
    m.capture_hidden([])
    m.forward(torch.tensor([4]))
    assert m.hidden is None


@pytest.mark.parametrize("arch,backend", BACKENDS)
def test_hidden_states_of_a_tree_equal_each_branch(arch, backend):
    model, m = build(arch, backend)
    last = model.config.num_hidden_layers
    layers = [0, 1, last]
    m.capture_hidden(layers)
    score_tree(m)
    assert m.hidden.shape == (3, 1 + len(TOKENS), 32)
    for node in range(-1, len(TOKENS)):
        _, hs = oracle(model, CONTEXT + branch(node))
        for row, i in enumerate(layers):
            assert max_diff(m.hidden[row, node + 1], hs[i][-1]) <= TOL, (node, i)


@pytest.mark.slow  # compiles the decoder layers twice (~1 min on 2 cores); test_e2e_hf covers no capture
def test_compiled_native_captures_the_same_hidden_states():
    # Capturing layer 1 of 2 runs the compiled layers in two segments, [0, 1) and [1, 2).
    model = tiny_model("llama")
    eager = NativeLlama.from_hf(model)
    compiled = NativeLlama.from_hf(model, compile=True)
    assert compiled._decoder_layers is not compiled._layers
    for m in (eager, compiled):
        m.capture_hidden([1, 2])
    eager_logits, compiled_logits = score_tree(eager), score_tree(compiled)
    assert max_diff(compiled.hidden, eager.hidden) <= TOL
    assert max_diff(compiled_logits, eager_logits) <= TOL


@pytest.mark.parametrize("arch,backend", BACKENDS)
def test_bad_arguments_raise_naming_the_value(arch, backend):
    model, m = build(arch, backend)
    m.forward(torch.tensor(CONTEXT), num_logits=0)
    L = m.length
    ids = torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match=r"attn_mask has shape \(3, 4\)"):
        m.forward(ids, attn_mask=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask has dtype torch.float32"):
        m.forward(ids, attn_mask=torch.ones(3, 3))
    with pytest.raises(ValueError, match=r"positions has shape \(2,\)"):
        m.forward(ids, positions=torch.tensor([L, L + 1]))
    assert m.length == L  # nothing was appended
    m.forward(ids)
    with pytest.raises(ValueError, match=r"path=\[0, 9\]"):
        m.keep_path(L, [0, 9])
    with pytest.raises(ValueError, match=r"path=\[2, 1\]"):
        m.keep_path(L, [2, 1])
    with pytest.raises(ValueError, match="start=9"):
        m.keep_path(9, [0])
    assert m.length == L + 3
    last = model.config.num_hidden_layers
    with pytest.raises(ValueError, match=f"layer index {last + 1} is out of range"):
        m.capture_hidden([0, last + 1])
    with pytest.raises(ValueError, match="layer index -1 is out of range"):
        m.capture_hidden([-1])
    with pytest.raises(ValueError, match="layer index 1.5"):
        m.capture_hidden([1.5])


def test_hf_tree_refuses_attention_that_ignores_the_mask():
    model, m = build("llama", "hf")
    model.config._attn_implementation = "flash_attention_2"  # never run: the forward refuses first
    with pytest.raises(ValueError, match="attn_implementation='flash_attention_2'"):
        m.forward(torch.tensor([1, 2]), attn_mask=torch.ones(2, 2, dtype=torch.bool))
    assert m.length == 0


def test_hf_tree_in_a_sliding_window_model_works_until_the_window_fills():
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=16,
                           bos_token_id=None, eos_token_id=None, pad_token_id=None)  # fmt: skip
    model = AutoModelForCausalLM.from_config(config).eval()
    m = HFModel(model)
    tree_logits = score_tree(m)  # 13 tokens: inside the window
    for node in (2, 6):
        assert max_diff(tree_logits[node + 1], oracle(model, CONTEXT + branch(node))[0][-1]) <= TOL
    m.keep_path(len(CONTEXT), [0, 1, 4, 6, 7])
    assert m.length == len(CONTEXT) + 5
    nxt = [7, 70]
    assert max_diff(m.forward(torch.tensor(nxt)), oracle(model, CONTEXT + branch(6) + nxt)[0][-2:]) <= TOL
    with pytest.raises(ValueError, match="sliding window of 16 tokens"):
        m.forward(torch.tensor([1, 2, 3, 4]), attn_mask=torch.ones(4, 4, dtype=torch.bool))


@pytest.mark.parametrize("arch,backend", BACKENDS)
def test_a_wide_mask_hides_branches_already_in_the_cache(arch, backend):
    """A drafter grows a tree over several forwards: the second forward's nodes must see the
    committed tokens and their own ancestors, not the sibling branch fed before them. attn_mask
    (n, length + n) says so; each node's logits then equal its branch fed as a chain."""
    model, m = build(arch, backend)
    m.forward(torch.tensor(CONTEXT + [ROOT]))
    base = m.length
    m.forward(torch.tensor([11, 12]), attn_mask=torch.eye(2, dtype=torch.bool),
              positions=torch.tensor([base, base]))  # two depth-1 siblings
    # Depth 2: a child of 12 (cache slot base + 1) and a child of 11 (slot base).
    sees = torch.zeros(2, base + 2 + 2, dtype=torch.bool)
    sees[:, :base] = True
    sees[0, base + 1] = sees[1, base] = True
    sees[0, base + 2] = sees[1, base + 3] = True
    logits = m.forward(torch.tensor([21, 22]), attn_mask=sees, positions=torch.tensor([base + 1, base + 1]))
    assert max_diff(logits[0], oracle(model, CONTEXT + [ROOT, 12, 21])[0][-1]) <= TOL
    assert max_diff(logits[1], oracle(model, CONTEXT + [ROOT, 11, 22])[0][-1]) <= TOL
    with pytest.raises(ValueError, match=r"attn_mask has shape \(2, 3\)"):
        m.forward(torch.tensor([1, 2]), attn_mask=torch.ones(2, 3, dtype=torch.bool))
