"""Shared test fixtures: fake models with fixed logits, tiny random transformers models, and a
tiny byte-level BPE tokenizer. Everything is built in memory; nothing is downloaded."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from outrider.drafters import DraftModel
from outrider.models import LoadedModel

warnings.filterwarnings("ignore", category=FutureWarning)
# Tiny tensors: a second intra-op thread only adds OpenMP start-up and wake-up costs.
torch.set_num_threads(1)


class FakeModel:
    """A CausalModel whose logits are a fixed random function of (position, previous token, last
    token). It keeps the tokens it has been fed as its 'cache', so a rollback bug changes the
    logits it returns and shows up as a wrong output."""

    def __init__(self, vocab_size: int = 6, seed: int = 0, periods: int = 4, scale: float = 2.0,
                 max_length: int | None = 512) -> None:
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(periods, vocab_size, vocab_size, vocab_size, generator=g) * scale
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.device = torch.device("cpu")
        self.tokens: list[int] = []
        self.forwards = 0

    def logits_for(self, context: list[int]) -> torch.Tensor:
        """(V,) logits for the token after `context` (the oracle the tests enumerate with)."""
        pos = len(context)
        prev = context[-2] if len(context) >= 2 else 0
        return self.table[pos % self.table.shape[0], prev, context[-1]]

    @property
    def length(self) -> int:
        return len(self.tokens)

    def forward(self, ids: torch.Tensor, num_logits: int | None = None, attn_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """attn_mask (n, n) over the new tokens or (n, length + n) over cache + new: each token's
        logits then come from the context it sees (its ancestors in a tree). positions are implied
        by what a token sees (its context length), so they are checked, not used."""
        self.forwards += 1
        start = len(self.tokens)
        self.tokens.extend(ids.tolist())
        n = ids.shape[0]
        if attn_mask is None:
            attn_mask = torch.ones(n, n, dtype=torch.bool).tril()
        if attn_mask.shape[1] == n:
            attn_mask = torch.cat([torch.ones(n, start, dtype=torch.bool), attn_mask.cpu()], dim=1)
        out = []
        for i in range(n):
            context = [t for t, seen in zip(self.tokens, attn_mask[i].tolist()) if seen]
            assert positions is None or int(positions[i]) == len(context) - 1, (positions, i, len(context))
            out.append(self.logits_for(context))
        m = len(out) if num_logits is None else num_logits
        if m == 0:
            return torch.empty(0, self.vocab_size)
        return torch.stack(out[len(out) - m :])

    def rollback(self, length: int) -> None:
        assert 0 <= length <= len(self.tokens)
        del self.tokens[length:]

    def keep_path(self, start: int, path: list[int]) -> None:
        assert all(b > a for a, b in zip(path, path[1:])) and all(0 <= o < len(self.tokens) - start for o in path)
        self.tokens[start:] = [self.tokens[start + o] for o in path]

    def reset(self) -> None:
        self.tokens = []


def loaded(model, eos: tuple[int, ...] = ()) -> LoadedModel:
    return LoadedModel(model, None, eos, "fake")


def fake_decoder(target: FakeModel, draft: FakeModel | None, k: int, eos: tuple[int, ...] = ()):
    from outrider import SpeculativeDecoder
    from outrider.drafters import Autoregressive

    drafter = DraftModel(draft, target.vocab_size, k=k) if draft is not None else Autoregressive()
    return SpeculativeDecoder(loaded(target, eos), drafter, k=k if draft is not None else 0)


def tiny_config(arch: str, vocab_size: int = 96, **overrides):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    if arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    elif arch == "qwen2":
        cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=256)
    else:
        raise AssertionError(arch)
    cfg.bos_token_id = cfg.eos_token_id = cfg.pad_token_id = None
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides)).eval()
    # Sharper random logits make greedy near-ties (which could flip in float32) improbable.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    model.generation_config.eos_token_id = overrides.get("eos_token_id")
    model.generation_config.pad_token_id = overrides.get("eos_token_id")
    return model


CORPUS = (
    "def add(a, b):\n    return a + b\n\n"
    "def greet(name):\n    print(f'hello {name}')\n\n"
    "for i in range(10):\n    total = add(total, i)\n"
    "héllo wörld ünïcode ✓ — 你好\n"
) * 20


def tiny_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on a few lines of code, as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer) -> tuple[Path, Path]:
    """A saved tiny Llama target and draft sharing the tiny tokenizer (with a real EOS id)."""
    root = tmp_path_factory.mktemp("pair")
    eos = tokenizer.eos_token_id
    vocab = len(tokenizer)
    for name, seed, layers in (("target", 0, 2), ("draft", 1, 1)):
        model = tiny_model("llama", seed=seed, vocab_size=vocab, num_hidden_layers=layers, eos_token_id=eos)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root / "target", root / "draft"
