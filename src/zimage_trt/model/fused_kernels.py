"""Hand-written Triton kernels for element-wise chains that Inductor leaves slow (CUDA only).

Profiled on the H100 (BENCHMARKS.md, "Speed II"): Inductor's fused q/k RMSNorm + RoPE ran at about a
third of memory bandwidth (the interleaved RoPE pairs defeat its vectorised loads), and the FP8
engine's SiLU gate + per-token quantisation at about half. Each kernel here computes the same maths
as the unfused torch code, rounding where it rounds, so the results agree to the last bit or so
(gpu-marked parity tests in tests/test_fused_kernels.py).

Triton is optional (absent on CPU-only installs): `AVAILABLE` says whether these kernels exist, and
callers fall back to the torch maths when it is False or the tensors are not on a CUDA device.
"""

from __future__ import annotations

import torch

try:  # optional heavy dependency: the kernels exist only where Triton does
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install
    triton = None

AVAILABLE = triton is not None
FP8_E4M3_MAX = 448.0


def usable(*tensors: torch.Tensor) -> bool:
    return AVAILABLE and all(t.is_cuda for t in tensors)


if triton is not None:

    @triton.jit
    def _qk_norm_rope_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, rows, heads, eps,
                             D: tl.constexpr, BLOCK_R: tl.constexpr):
        # rows = B*S*H head vectors of D values; row r belongs to token r // heads (cos/sin row).
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        live = r < rows
        d = tl.arange(0, D)
        x_raw = tl.load(x_ptr + r[:, None] * D + d[None, :], mask=live[:, None], other=0.0)
        half = x_raw.dtype
        x = x_raw.to(tl.float32)
        rs = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
        w = tl.load(w_ptr + d).to(tl.float32)
        # rms_norm: (x * rsqrt) rounded to the weight's dtype, times the weight, rounded again
        y = ((x * rs[:, None]).to(half).to(tl.float32) * w[None, :]).to(half).to(tl.float32)
        token = r // heads
        p = tl.arange(0, D // 2)
        c = tl.load(cos_ptr + token[:, None] * (D // 2) + p[None, :], mask=live[:, None], other=0.0)
        s = tl.load(sin_ptr + token[:, None] * (D // 2) + p[None, :], mask=live[:, None], other=0.0)
        even, odd = tl.split(tl.reshape(y, (BLOCK_R, D // 2, 2)))
        out = tl.reshape(tl.join(even * c - odd * s, even * s + odd * c), (BLOCK_R, D))
        out = out.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + r[:, None] * D + d[None, :], out, mask=live[:, None])

    @triton.jit
    def _silu_mul_quant_kernel(a_ptr, b_ptr, q_ptr, scale_ptr, n, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        col = tl.arange(0, BLOCK)
        live = col < n
        a = tl.load(a_ptr + row * n + col, mask=live, other=0.0)
        half = a.dtype
        af = a.to(tl.float32)
        gate = (af / (1.0 + tl.exp(-af))).to(half)  # F.silu, rounded to the 16-bit dtype
        b = tl.load(b_ptr + row * n + col, mask=live, other=0.0)
        prod = (gate * b).to(tl.float32)  # gate * up, a 16-bit product
        amax = tl.max(tl.where(live, tl.abs(prod), 0.0), axis=0)
        scale = tl.maximum(amax, 1e-12) / 448.0
        tl.store(q_ptr + row * n + col, (prod / scale).to(q_ptr.dtype.element_ty), mask=live)
        tl.store(scale_ptr + row, scale)


def qk_norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RMSNorm over the head dim (weight [D]) then interleaved RoPE, one pass. x [B, S, H, D];
    cos, sin [B, S, 1, D/2] fp32. Same dtype out."""
    B, S, H, D = x.shape
    x = x.contiguous()
    cos = cos.expand(B, S, 1, D // 2).reshape(B * S, D // 2).contiguous()
    sin = sin.expand(B, S, 1, D // 2).reshape(B * S, D // 2).contiguous()
    out = torch.empty_like(x)
    rows = B * S * H
    block_r = 16
    _qk_norm_rope_kernel[(triton.cdiv(rows, block_r),)](x, weight, cos, sin, out, rows, H, eps, D=D, BLOCK_R=block_r,
                                                        num_warps=4)
    return out


def quantize_static_fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x / scale in e4m3 (saturating): one pointwise pass, fused by Inductor with its neighbours.

    (A variant that wrote e4m3 straight from the q/k kernel failed to compile inside Inductor on the
    H200 with torch 2.11; this pass costs about 15 us a tensor at 1024x1024.)"""
    return (x.float() * (1.0 / scale)).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)


def silu_mul_quant_fp8(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(silu(a) * b) quantised per row to e4m3: (values [M, N] e4m3, scales [M, 1] fp32), as Fp8Linear does."""
    n = a.shape[-1]
    a2, b2 = a.reshape(-1, n).contiguous(), b.reshape(-1, n).contiguous()
    m = a2.shape[0]
    q = torch.empty((m, n), device=a.device, dtype=torch.float8_e4m3fn)
    scale = torch.empty((m, 1), device=a.device, dtype=torch.float32)
    block = triton.next_power_of_2(n)
    _silu_mul_quant_kernel[(m,)](a2, b2, q, scale, n, BLOCK=block, num_warps=16 if block >= 8192 else 8)
    return q, scale
