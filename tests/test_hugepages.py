"""Weights and caches on 2 MiB pages: the same values, laid out as before; matrices smaller than a
page share chunks, so that they sit on huge pages too."""

from __future__ import annotations

import torch

from outrider.models import hugepages
from outrider.models.hugepages import CHUNK, HUGE_PAGE, MIN_BYTES, SMALL, huge_copy, huge_zeros


def test_huge_copy_holds_the_same_values_on_an_aligned_start():
    src = torch.randn(3, CHUNK // 2 // 3 + 7).to(torch.bfloat16).t()  # past a chunk, not contiguous
    out = huge_copy(src)
    assert out.shape == src.shape and out.dtype == src.dtype and out.is_contiguous()
    assert torch.equal(out, src)
    if hugepages._madvise() is not None:  # Linux with transparent huge pages not off
        assert out.data_ptr() % HUGE_PAGE == 0
    z = huge_zeros((MIN_BYTES // 4 + 1,), torch.float32)
    assert z.shape == (MIN_BYTES // 4 + 1,) and not z.any()


def test_matrices_below_a_chunk_share_one(monkeypatch):
    monkeypatch.setattr(hugepages, "_CHUNKS", hugepages._Chunks())  # a chunk earlier tests did not fill
    a, b = (torch.randn(SMALL // 4 + 5) for _ in range(2))
    ca, cb = huge_copy(a), huge_copy(b)
    assert torch.equal(ca, a) and torch.equal(cb, b)
    ca += 1  # copies, not views of the sources
    assert not torch.equal(ca, a) and torch.equal(cb, b)
    if hugepages._madvise() is not None:
        assert ca.untyped_storage().data_ptr() == cb.untyped_storage().data_ptr()  # one chunk
        assert cb.data_ptr() % 64 == 0


def test_small_tensors_and_no_huge_pages_give_ordinary_copies(monkeypatch):
    src = torch.arange(10, dtype=torch.float32)
    out = huge_copy(src)
    assert torch.equal(out, src) and out.data_ptr() != src.data_ptr()
    monkeypatch.setattr(hugepages, "_madvise", lambda: None)
    big = torch.randn(MIN_BYTES // 4 + 3)
    out = huge_copy(big)
    assert torch.equal(out, big) and out.untyped_storage().nbytes() == big.untyped_storage().nbytes()
