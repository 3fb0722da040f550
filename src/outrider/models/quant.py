"""Weight-only quantized matmuls for the native backend on a CPU: dtype="int8" or "int4".

A decode step reads every weight once, so its time follows the bytes read: int8 halves them and
int4 (groups of 32) quarters them (benchmarks/step_profile.py measures the step). Activations
stay bf16. The model is then a different model: speculative decoding reproduces *this quantized
target* exactly (greedy) or losslessly (sampling), not the bf16 one.

- int8: symmetric, one scale per output row; torch's `_weight_int8pack_mm`.
- int4: asymmetric, a scale and offset per 32 inputs of a row; torch's
  `_weight_int4pack_mm_for_cpu` (the kernel torchao's CPU int4 layout uses), which dequantizes
  q in [0, 15] as (q - 8) * scale + zero.
- The output layer is int8 in both modes (as llama.cpp keeps it at higher precision than the
  layers): its logits pick every token.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

QUANT_TYPES = ("int8", "int4")
INT4_GROUP = 32
Quant = Literal["int8", "int4"]


@dataclass(frozen=True, slots=True)
class QuantWeight:
    """A (N, K) weight quantized for one kind of kernel; `shape` is the logical one."""

    kind: Quant
    data: Tensor  # int8 (N, K), or int4 packed uint8 (N, K/2)
    scales: Tensor  # int8: (N,) bf16; int4: (K/group, N, 2) bf16 of (scale, zero)
    shape: torch.Size


def quantize_int8(weight: Tensor) -> QuantWeight:
    """weight (N, K) -> int8 rows with one scale each (max |w| maps to 127)."""
    w = weight.float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # (N,)
    q = torch.round(w / scales[:, None]).clamp(-128, 127).to(torch.int8)
    return QuantWeight("int8", q.contiguous(), scales.to(torch.bfloat16), weight.shape)


def quantize_int4(weight: Tensor, group: int = INT4_GROUP) -> QuantWeight:
    """weight (N, K) -> 4-bit codes per group of `group` inputs, min..max mapped to 0..15."""
    N, K = weight.shape
    if K % group:
        raise ValueError(f"int4 needs the input size ({K}) to be a multiple of {group}: use dtype='int8'")
    w = weight.float().view(N, K // group, group)
    lo, hi = w.amin(-1), w.amax(-1)  # (N, K/g)
    scale = ((hi - lo) / 15.0).clamp(min=1e-12)
    q = torch.round((w - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).view(N, K)
    zero = lo + 8.0 * scale  # the kernel subtracts 8 from each code
    scales = torch.stack([scale.T, zero.T], dim=-1).to(torch.bfloat16).contiguous()  # (K/g, N, 2)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    return QuantWeight("int4", packed, scales, weight.shape)


def dequantize(w: QuantWeight) -> Tensor:
    """The float32 (N, K) weight the kernel multiplies by (the tests' oracle)."""
    if w.kind == "int8":
        return w.data.float() * w.scales.float()[:, None]
    N, K = w.shape
    eye = torch.eye(K, dtype=torch.bfloat16)
    return quant_linear(eye, w, None).float().T.contiguous()  # column j: the weights read by input j


def quant_linear(x: Tensor, w: QuantWeight, bias: Tensor | None) -> Tensor:
    """x (n, K) bf16 -> (n, N) bf16, like F.linear(x, dequantize(w), bias)."""
    if w.kind == "int8":
        y = torch.ops.aten._weight_int8pack_mm(x, w.data, w.scales)
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, w.data, INT4_GROUP, w.scales)
    return y if bias is None else y + bias


@functools.cache
def quant_works(kind: Quant) -> bool:
    """Whether this torch build runs the kernel (probe once rather than fail mid-model)."""
    try:
        w = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
        q = quantize_int8(w) if kind == "int8" else quantize_int4(w)
        quant_linear(torch.ones(1, 64, dtype=torch.bfloat16), q, None)
        return True
    except (RuntimeError, NotImplementedError, AttributeError):  # an op this build lacks
        return False


def quantizer(kind: Quant, device: torch.device):
    """(layer weight quantizer, output layer quantizer) for `kind`, or a ValueError naming why not."""
    if kind not in QUANT_TYPES:
        raise ValueError(f"quantization {kind!r} is unknown: use one of {list(QUANT_TYPES)}")
    if device.type != "cpu" or not quant_works(kind):
        raise ValueError(f"dtype={kind!r} needs a CPU whose torch runs {kind} weight-only matmuls: use bfloat16")
    return (quantize_int8 if kind == "int8" else quantize_int4), quantize_int8
