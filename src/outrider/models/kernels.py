"""outrider's own bf16 CPU kernels for the native backend's decode path (csrc/cpu_kernels.cpp).

A decode step reads every weight once and does little else, so on a CPU its time is the matmuls'
memory traffic plus the fixed cost of each small op. These kernels cut both:
- `linear`: the matmul, its weights laid out once (`pack_linear`) so that each thread streams one
  sequential run of memory and each weight loaded serves every row of the step. On SmolLM2-135M
  (2 cores) it streams at 24-35 GB/s against oneDNN's packed ~20 GB/s, and stays faster up to 256
  rows; the decode step went from ~21 to ~10-12 ms (a bandwidth floor of 7.8 ms).
- RMSNorm, residual add + RMSNorm, the SiLU gate and RoPE in one dispatch each instead of 3-10,
  bitwise equal to the torch ops they replace;
- attention for the few new tokens of a decode, verify or tree step.

They also make bf16 outputs row-invariant: every output of a token is computed by the same
instructions whatever the number of tokens in the forward (oneDNN's matmul changes its K blocking
from 8 rows on, and SDPA's GEMMs round differently at different sizes), so a verify forward of n
tokens gives each token bit for bit what a one-token step gives it (tests/test_kernels.py). bf16
speculative decoding then returns exactly the bf16 autoregressive output (contract 1).

The library is compiled with the machine's C++ compiler on first use (~15 s) and cached under
`$OUTRIDER_CACHE` (default ~/.cache/outrider) by a hash of the source, torch version and flags.
Where it cannot be built or the CPU lacks AVX512-BF16, `unavailable_reason()` says why and the
backend keeps torch's ops: speed changes, outputs stay right. OUTRIDER_KERNELS=0 turns them off.
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from outrider.models.hugepages import huge_copy

SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.cpp"
# Output columns per packed group of `linear` (a multiple of 16): 32 splits SmolLM2's 576-wide
# matrices evenly over 2 threads (64 left one thread 5 groups of 9).
LINEAR_GROUP = 32
_FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl",
          "-mavx512bf16", "-DNDEBUG", "-DOUTRIDER_PF=1024", f"-DOUTRIDER_GROUP={LINEAR_GROUP}"]
_REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_bf16")
_DISABLE_ENV = "OUTRIDER_KERNELS"  # =0 turns them off (to compare against torch's ops)


def cache_dir() -> Path:
    """$OUTRIDER_CACHE/kernels (default ~/.cache/outrider/kernels); a temporary folder of this
    user's where that cannot be created (a read-only home), so the kernels still build."""
    root = os.environ.get("OUTRIDER_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "outrider"
    path = Path(root) / "kernels"
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"outrider-kernels-{os.getuid()}"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _compile_command(out: Path) -> list[str]:
    from torch.utils import cpp_extension

    torch_lib = Path(torch.__file__).parent / "lib"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [os.environ.get("CXX", "g++"), *_FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    cmd += [f"-I{p}" for p in cpp_extension.include_paths()]
    cmd += [str(SOURCE), "-o", str(out), f"-L{torch_lib}", "-ltorch", "-ltorch_cpu", "-lc10",
            f"-Wl,-rpath,{torch_lib}"]
    return cmd


def library_path() -> Path:
    """Where the compiled library for this source, torch and flag set lives (built or not)."""
    key = hashlib.sha256(
        SOURCE.read_bytes() + torch.__version__.encode() + " ".join(_FLAGS).encode()
    ).hexdigest()[:16]
    return cache_dir() / f"cpu_kernels-{key}.so"


def _build() -> Path:
    lib = library_path()
    if lib.is_file():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: a process stopped mid-build, or two building at
    # once, never leave a half-written library where the next one would load it.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
    os.close(fd)
    try:
        print("outrider: compiling its CPU kernels once (~15 s) ...", file=sys.stderr, flush=True)
        done = subprocess.run(_compile_command(Path(tmp)), capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"the compiler failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


@functools.cache
def unavailable_reason() -> str | None:
    """Why the kernels cannot run here (None: they are loaded and agree with torch's ops)."""
    if os.environ.get(_DISABLE_ENV, "1") == "0":
        return f"turned off by {_DISABLE_ENV}=0"
    missing = [f for f in _REQUIRED_CPU_FLAGS if f not in _cpu_flags()]
    if missing:
        return f"this CPU lacks {missing}"
    try:
        torch.ops.load_library(str(_build()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return f"could not build or load {SOURCE.name}: {e}"
    return None if _agrees() else "the kernels disagree with torch's ops on this machine"


def available() -> bool:
    return unavailable_reason() is None


def _agrees() -> bool:
    """Probe once: each op against torch's on random bf16 inputs (a kernel a CPU runs wrongly must
    not decide tokens)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 80, generator=gen).to(torch.bfloat16)  # 80: not a multiple of 16
    nw = torch.randn(80, generator=gen).to(torch.bfloat16)
    ok = True
    ref_norm = nw * F.rms_norm(x.float(), (80,), eps=1e-6).to(torch.bfloat16)
    ok &= torch.allclose(rms_norm(x, nw, 1e-6).float(), ref_norm.float(), rtol=2e-2, atol=2e-2)
    ok &= torch.allclose(silu_mul(x).float(), (F.silu(x[:, :40]) * x[:, 40:]).float(), rtol=2e-2, atol=2e-2)
    cos, sin = torch.randn(2, 3, 1, 16, generator=gen).to(torch.bfloat16)
    ref_rope = x[:, :64].view(3, 4, 16) * cos + x[:, :64].view(3, 4, 16).roll(8, -1) * sin
    ok &= torch.allclose(rope(x, cos, sin, 4).float(), ref_rope.float(), rtol=2e-2, atol=2e-2)
    qk = torch.randn(3, 6, 16, generator=gen).to(torch.bfloat16)  # 4 query heads + 2 kv heads
    kc, vc = torch.randn(2, 2, 8, 16, generator=gen).to(torch.bfloat16)  # (kv heads, capacity, hd)
    kc[:, 5:8], vc[:, 5:8] = qk[:, 4:].transpose(0, 1), qk[:, 4:].transpose(0, 1)
    ref_att = F.scaled_dot_product_attention(qk[None, :, :4].transpose(1, 2).float(), kc[None].float(), vc[None].float(),
                                             attn_mask=torch.arange(8) <= torch.arange(5, 8)[:, None], enable_gqa=True)
    got = attend(qk, kc, vc, 5, 4, None).float()
    ok &= torch.allclose(got, ref_att[0].transpose(0, 1).reshape(3, 64), rtol=2e-2, atol=2e-2)
    w = torch.randn(70, 80, generator=gen).to(torch.bfloat16)
    ok &= torch.allclose(linear(x, pack_linear(w), nw[:70]).float(), (x.float() @ w.float().T + nw[:70].float()),
                         rtol=2e-2, atol=5e-2)
    return bool(ok)


# ---- the ops (bf16, CPU; callers check available() first) -----------------------------------------


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x (M, D) -> weight * bf16(x * rsqrt(mean(x^2) + eps)) in float32, as transformers' RMSNorm."""
    return torch.ops.outrider.rms_norm(x.contiguous(), weight, eps)


def add_rms_norm(x: Tensor, y: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(x + y, rms_norm(x + y)) in one pass: a residual add and the next layer norm."""
    return torch.ops.outrider.add_rms_norm(x.contiguous(), y.contiguous(), weight, eps)



def silu_mul(gate_up: Tensor) -> Tensor:
    """gate_up (M, 2F) = [gate | up] -> silu(gate) * up (M, F), rounded as torch's bf16 ops round."""
    return torch.ops.outrider.silu_mul(gate_up.contiguous())


def rope(qkv: Tensor, cos: Tensor, sin: Tensor, heads: int) -> Tensor:
    """The first `heads` heads of each row of qkv (N, >= heads * hd) rotated: (N, heads, hd), as
    llama.apply_rope does with cos, sin (N, 1, hd)."""
    return torch.ops.outrider.rope(qkv.contiguous(), cos.contiguous(), sin.contiguous(), heads)


def attend(q: Tensor, k_cache: Tensor, v_cache: Tensor, start: int, heads: int, mask: Tensor | None) -> Tensor:
    """Attention of n new tokens (q (n, >= heads, hd), the first `heads` heads the queries) over
    one sequence's caches (kv_heads, C, hd), positions [0, start + n): token i sees mask[i]
    ((n, start + n) bool) or, without one, positions <= start + i. Returns (n, heads * hd) bf16.
    Row-invariant at any n, and as fast as SDPA's flash kernel on a prefill here (768 causal rows:
    7.3 ms a layer against 7.5), so a prefill, a verify and a decode step all go through it."""
    return torch.ops.outrider.attend(q.contiguous(), k_cache, v_cache, start, heads, mask)


@dataclass(frozen=True, slots=True)
class KernelWeight:
    """A (N, K) bf16 matmul weight laid out for `linear`; `shape` is the logical one."""

    data: Tensor  # (ceil(N / G), K / 2, G / 16, 16, 2), G = LINEAR_GROUP
    shape: torch.Size


def pack_linear(weight: Tensor) -> KernelWeight:
    """A (N, K) bf16 weight (K even) laid out for `linear`: per group of LINEAR_GROUP output columns and pair
    of inputs, the 64 columns' two weights side by side, zero-padded to whole groups."""
    N, K = weight.shape
    if K % 2:
        raise ValueError(f"pack_linear needs an even number of inputs, got {K}")
    w = F.pad(weight.detach().to(torch.bfloat16), (0, 0, 0, -N % LINEAR_GROUP))  # (Np, K)
    # On huge pages: every decode step streams all the packed weights (models/hugepages.py).
    return KernelWeight(huge_copy(w.view(-1, LINEAR_GROUP // 16, 16, K // 2, 2).permute(0, 3, 1, 2, 4)), weight.shape)


def linear(x: Tensor, w: KernelWeight, bias: Tensor | None) -> Tensor:
    """x (M, K) bf16 -> (M, N) bf16, like F.linear(x, weight, bias) with float32 sums; each output
    row is computed alike whatever M is (see csrc/cpu_kernels.cpp)."""
    return torch.ops.outrider.linear(x.contiguous(), w.data, bias, w.shape[0])


def layer_args(attn_norm: Tensor, wqkv: KernelWeight, bqkv: Tensor | None, wo: KernelWeight, bo: Tensor | None,
               mlp_norm: Tensor, w_gate_up: KernelWeight, b_gate_up: Tensor | None, w_down: KernelWeight,
               b_down: Tensor | None) -> tuple:
    """A layer's weights as the decoder-layer ops take them (after x, before the caches): a model
    unpacks them once and passes them to decoder_layer_op / decoder_layer_rows_op per layer call."""
    return (attn_norm, wqkv.data, bqkv, wqkv.shape[0], wo.data, bo, wo.shape[0], mlp_norm, w_gate_up.data,
            b_gate_up, w_gate_up.shape[0], w_down.data, b_down, w_down.shape[0])


def decoder_layer_op() -> Callable[..., Tensor]:
    """One Llama decoder layer over the n new tokens x (n, D) of one sequence, in one call:
    `op(x, *layer_args(...), k_cache, v_cache, cos, sin, start, heads, mask, eps)`, x contiguous;
    llama.py's _layers with these kernels, bit for bit; the tokens' keys and values are written at
    [start, start + n) of k_cache, v_cache (kv_heads, C, hd)."""
    return torch.ops.outrider.decoder_layer


def decoder_layer_rows_op() -> Callable[..., Tensor]:
    """decoder_layer_rows' op: `op(x, *layer_args(...), k_all, v_all, cos, sin, slots, starts, ns,
    masks, heads, eps)`, x and each mask contiguous."""
    return torch.ops.outrider.decoder_layer_rows


def decoder_layer_rows(x: Tensor, attn_norm: Tensor, wqkv: KernelWeight, bqkv: Tensor | None, wo: KernelWeight,
                       bo: Tensor | None, mlp_norm: Tensor, w_gate_up: KernelWeight, b_gate_up: Tensor | None,
                       w_down: KernelWeight, b_down: Tensor | None, k_all: Tensor, v_all: Tensor, cos: Tensor,
                       sin: Tensor, slots: list[int], starts: list[int], ns: list[int],
                       masks: list[Tensor | None], heads: int, eps: float) -> Tensor:
    """decoder_layer_op for several sequences at once (a batch step): x (N, D) holds sequence r's
    ns[r] new tokens after those of the sequences before it; its caches are slot slots[r] of k_all,
    v_all (slots, kv_heads, C, hd), written at [starts[r], starts[r] + ns[r]), and its tokens see
    masks[r] ((ns[r], starts[r] + ns[r]) bool) or are causal. Bit for bit one decoder_layer_op call
    per sequence, in one call: the weights are read once and the attention of all rows runs in one
    parallel loop."""
    args = layer_args(attn_norm, wqkv, bqkv, wo, bo, mlp_norm, w_gate_up, b_gate_up, w_down, b_down)
    return torch.ops.outrider.decoder_layer_rows(
        x.contiguous(), *args, k_all, v_all, cos, sin, slots, starts, ns,
        [None if m is None else m.contiguous() for m in masks], heads, eps)
