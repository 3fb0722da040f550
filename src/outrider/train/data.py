"""Token streams: the tokenized corpus, cached once as .npy, and seeded random windows over it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from outrider.train.corpus import read_text
from outrider.train.tokenizer import encode


def tokenize_files(tokenizer: PreTrainedTokenizerFast, files: Sequence[Path]) -> np.ndarray:
    """One stream of token ids: each readable file followed by the end-of-text token.

    Returns (N,) uint16 (the vocabulary is far below 65536, and this halves the cache of int32).
    """
    eos = tokenizer.eos_token_id
    assert eos is not None and len(tokenizer) <= np.iinfo(np.uint16).max
    texts = [t for t in (read_text(p) for p in files) if t is not None]
    # The fast backend's batch encoder runs in Rust over all texts at once.
    encoded = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    parts: list[np.ndarray] = []
    for enc in encoded:
        parts.append(np.asarray(enc.ids, dtype=np.uint16))
        parts.append(np.asarray([eos], dtype=np.uint16))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def cached_tokens(
    path: Path, tokenizer: PreTrainedTokenizerFast, files: Sequence[Path]
) -> np.ndarray:
    """The token stream of ``files``, read from ``path`` if an earlier run saved it there."""
    if path.exists():
        return np.load(path)
    tokens = tokenize_files(tokenizer, files)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, tokens)
    tmp.replace(path)  # atomic: a killed run never leaves half a cache behind
    return tokens


def prompt_ids(
    tokenizer: PreTrainedTokenizerFast, files: Sequence[Path], n: int, length: int
) -> list[list[int]]:
    """The first ``length`` tokens of the first ``n`` readable files that have that many."""
    prompts: list[list[int]] = []
    for path in files:
        text = read_text(path)
        if text is None:
            continue
        ids = encode(tokenizer, text)
        if len(ids) >= length:
            prompts.append(ids[:length])
        if len(prompts) == n:
            break
    return prompts


class WindowSampler:
    """Seeded random windows of ``seq_len + 1`` tokens (inputs plus next-token targets).

    The generator state goes into checkpoints, so a resumed run draws the windows it would have
    drawn had it never stopped.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int) -> None:
        if len(tokens) <= seq_len + 1:
            raise ValueError(
                f"token stream has {len(tokens)} tokens, fewer than seq_len + 2 = {seq_len + 2}"
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._offsets = np.arange(seq_len + 1)

    def next_batch(self) -> torch.Tensor:
        """(B, T + 1) int64 token ids."""
        high = len(self.tokens) - self.seq_len - 1
        starts = torch.randint(0, high, (self.batch_size,), generator=self.generator).numpy()
        window = self.tokens[starts[:, None] + self._offsets]  # (B, T + 1)
        return torch.from_numpy(window.astype(np.int64))


def fixed_windows(tokens: np.ndarray, seq_len: int, n: int) -> torch.Tensor:
    """The first ``n`` non-overlapping windows of the stream: a fixed evaluation sample.

    Returns (n', T + 1) int64 with n' = min(n, what the stream holds).
    """
    count = min(n, (len(tokens) - 1) // seq_len)
    if count < 1:
        raise ValueError(f"held-out stream of {len(tokens)} tokens is shorter than one window")
    rows = [tokens[i * seq_len : i * seq_len + seq_len + 1] for i in range(count)]
    return torch.from_numpy(np.stack(rows).astype(np.int64))
