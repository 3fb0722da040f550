"""Tensors on 2 MiB pages, for the weights and caches a decode step streams from memory.

A CPU decode step reads every weight once (SmolLM2-135M: 270 MB in bf16). On 4 KiB pages that is
~66,000 pages a step, far more than the TLB holds, so the stream pays page walks; on 2 MiB pages
it is ~130. Linux backs a region with huge pages when it is asked to (madvise MADV_HUGEPAGE, with
transparent huge pages set to "madvise" or "always") before the pages are first written: so the
tensor is allocated empty, advised, then filled. Measured on this project's 2-core machine
(benchmarks/hugepages_speed.py, SmolLM2 loaded twice, alternating; two runs): a forward of 1 token
after 300 1.091x / 1.063x faster, of 4 tokens 1.102x / 1.030x, plain greedy decoding of the code
prompts 1.082x / 1.061x. Where the OS refuses (another OS, THP off), the tensor is an ordinary
one: nothing but the speed depends on it.

A model's matrices are mostly smaller than a huge page (SmolLM2's: 0.7-3.5 MB each), so
huge_copy places them one after another in shared chunks of CHUNK bytes (a chunk lives while any
tensor in it does: freeing one model may keep up to one chunk of another's alive).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import sys
import threading

import torch
from torch import Tensor

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14  # linux/mman.h
MIN_BYTES = 4 * HUGE_PAGE  # huge_empty: smaller tensors gain nothing worth the alignment slack
CHUNK = 16 * HUGE_PAGE  # huge_copy: tensors below this share chunks of this size
SMALL = 64 << 10  # huge_copy: tensors below this stay ordinary (norms, biases)


@functools.cache
def _madvise() -> object | None:
    """libc's madvise where this is Linux and transparent huge pages are not off, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            if "[never]" in f.read():
                return None
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    fn = libc.madvise
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


def huge_empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device | str = "cpu") -> Tensor:
    """An uninitialised contiguous CPU tensor whose memory starts on a 2 MiB boundary and is advised
    to be backed by huge pages (fill it before reading: the advice acts on the first write). Off
    the CPU, below MIN_BYTES, or where the OS offers no huge pages: torch.empty."""
    shape = tuple(shape)
    nbytes = math.prod(shape) * dtype.itemsize
    madvise = _madvise()
    if torch.device(device).type != "cpu" or nbytes < MIN_BYTES or madvise is None:
        return torch.empty(shape, dtype=dtype, device=device)
    raw = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)  # large: mapped, not yet touched
    offset = -raw.data_ptr() % HUGE_PAGE
    span = (nbytes + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE
    if offset + span > raw.numel():
        span -= HUGE_PAGE  # the last partial page stays small
    if span > 0:
        madvise(raw.data_ptr() + offset, span, MADV_HUGEPAGE)  # advice only: a refusal changes no result
    return raw[offset : offset + nbytes].view(dtype).view(shape)


class _Chunks:
    """The chunk huge_copy is filling, and how much of it is used (64-byte aligned pieces)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.chunk: Tensor | None = None
        self.used = 0

    def take(self, nbytes: int) -> Tensor:
        with self.lock:
            if self.chunk is None or self.used + nbytes > self.chunk.numel():
                self.chunk, self.used = huge_empty((CHUNK,), torch.uint8), 0
            piece = self.chunk[self.used : self.used + nbytes]
            self.used += -(-nbytes // 64) * 64
            return piece


_CHUNKS = _Chunks()


def huge_copy(t: Tensor) -> Tensor:
    """A contiguous copy of t on huge pages where the OS gives them (else an ordinary copy): a
    large tensor on its own pages, one of SMALL..CHUNK bytes in a shared chunk."""
    nbytes = t.numel() * t.element_size()
    if t.device.type != "cpu" or _madvise() is None or nbytes < SMALL:
        return t.clone(memory_format=torch.contiguous_format)
    out = huge_empty(t.shape, t.dtype) if nbytes >= CHUNK else _CHUNKS.take(nbytes).view(t.dtype).view(t.shape)
    out.copy_(t)
    return out


def huge_zeros(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device | str = "cpu") -> Tensor:
    out = huge_empty(shape, dtype, device)
    out.zero_()
    return out
